"""``python -m conversion``: pack, convert, inspect, verify, push and revert FlashPack files.

Every error a user can cause prints ``error: <message>`` on stderr (no traceback) and exits 1;
bad arguments exit 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from model_loader.errors import FlashPackFormatError
from model_loader.format import PackLayout, dtype_name, read_layout

from .dtypes import dtype_key
from .errors import ConversionError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
INSPECT_SCHEMA_VERSION = 1



class UsageError(Exception):
    """Arguments that parse but make no sense together (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with errors printed as ``error: <message>`` after the usage line."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def parse_target_dtype(name: str) -> torch.dtype:
    """``"fp16"`` -> ``torch.float16``; the names a user may give for a target dtype."""
    try:
        return dtype_key(name)[0]
    except ConversionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _align(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Subcommands


def cmd_pack(args: argparse.Namespace) -> int:
    from .writer import pack_safetensors

    dst = Path(args.dst)
    for src in args.src:
        if not Path(src).is_file():
            raise ConversionError(f"{src}: no such file")
    _refuse_source_as_destination([Path(src) for src in args.src], dst)
    _refuse_existing(dst, args.force)
    layout = pack_safetensors(args.src, dst, target_dtype=args.dtype, align_bytes=args.align)
    print(f"wrote {dst}: {_summary(layout)}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    src_dir = Path(args.src)
    if src_dir.is_dir() and args.dst is not None:
        if args.revision is not None:
            raise UsageError("--revision applies to Hub repo ids, not local directories")
        if args.pipeline_class is not None or args.config is not None:
            raise UsageError("--pipeline-class and --config apply to single-file checkpoints, not local directories")
        dst = Path(args.dst)
        _refuse_source_as_destination([src_dir], dst)
        source = _local_source_info(src_dir)
        if dst.exists() and _is_conversion_of(dst, source, args.dtype, args.variant):
            print(f"{dst}: already a verified conversion of {src_dir}")
            return EXIT_OK
        from .config import ConversionConfig  # the CLI is an entry point: the environment is read here

        show_progress = ConversionConfig.from_env().show_progress
        out = _convert_local(src_dir, dst, args.dtype, args.variant, source, show_progress)
    else:
        try:
            from .store import convert_source
        except ImportError as exc:
            raise ConversionError(
                f"converting {args.src!r} needs conversion.store, which is not available ({exc})"
            ) from exc
        extra = {k: v for k, v in (("revision", args.revision), ("variant", args.variant),
                                   ("pipeline_class", args.pipeline_class), ("config", args.config)) if v}
        dst = Path(args.dst) if args.dst is not None else None
        out = convert_source(args.src, dst=dst, dtype=args.dtype, **extra)
    print(out)
    return EXIT_OK


def _local_source_info(src: Path) -> dict:
    """What the manifest records about a local source: its path and its contents' fingerprint."""
    from .sources import LocalSource, directory_fingerprint, require_pipeline_dir

    require_pipeline_dir(src)
    return {**LocalSource(str(src.resolve())).describe(), "identity": directory_fingerprint(src)}


def _is_conversion_of(dst: Path, source: dict, dtype: torch.dtype | None, variant: str | None) -> bool:
    """Whether ``dst`` is a conversion of ``source`` (as it is now) with these options that
    verifies in full; raises when it is one but fails verification."""
    from .manifest import VerificationError, read_manifest, verify_converted

    expected = {**source, "dtype": dtype_name(dtype) if dtype is not None else None, "variant": variant}
    try:
        recorded = read_manifest(dst).get("source")
    except VerificationError:
        return False  # not a converted directory: "already exists" says the rest
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in expected.items()):
        return False
    try:
        verify_converted(dst, full=True)
    except VerificationError as exc:
        raise ConversionError(f"{dst}: a conversion of {source['ref']} that fails verification ({exc}); "
                              "remove it and convert again") from exc
    return True


def _convert_local(src: Path, dst: Path, dtype: torch.dtype | None, variant: str | None, source: dict,
                   show_progress: bool) -> Path:
    """Convert a local pipeline directory beside ``dst``, then rename it into place."""
    try:
        from .convert import convert_pipeline
    except ImportError as exc:
        raise ConversionError(f"converting a local directory needs conversion.convert ({exc})") from exc
    from .durable import publish_dir, temp_path

    if dst.exists():
        raise ConversionError(f"{dst}: already exists; remove it or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dst)
    try:
        extra = {"variant": variant} if variant else {}
        convert_pipeline(src, tmp, dtype=dtype, source=source, show_progress=show_progress, **extra)
        if dst.exists():  # appeared while we converted; rename would merge into an empty dir
            raise ConversionError(f"{dst}: created by someone else during the conversion")
        publish_dir(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    layout = read_layout(path)
    info = inspect_info(path, layout)
    if args.json:
        json.dump(info, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return EXIT_OK
    print(f"file:      {path}")
    print(f"format:    {info['format']}")
    print(f"align:     {info['align_bytes']} bytes")
    print(f"tensors:   {info['tensor_count']}")
    print(f"payload:   {_human_bytes(info['payload_bytes'])} ({info['payload_bytes']} bytes)")
    print(f"file size: {_human_bytes(info['file_bytes'])} ({info['file_bytes']} bytes)")
    print()
    rows = [
        [
            str(b["index"]),
            b["dtype"],
            str(b["offset_bytes"]),
            str(b["length_bytes"]),
            str(b["length_elems"]),
            str(b["tensor_count"]),
        ]
        for b in info["blocks"]
    ]
    _table(["block", "dtype", "offset", "bytes", "elements", "tensors"], rows, right=[0, 2, 3, 4, 5])
    if args.tensors:
        print()
        rows = [
            [
                t["name"],
                t["dtype"],
                "x".join(map(str, t["shape"])) or "()",
                str(t["block"]),
                str(t["offset_bytes"]),
                str(t["nbytes"]),
            ]
            for t in info["tensors"]
        ]
        _table(["name", "dtype", "shape", "block", "offset", "bytes"], rows, right=[3, 4, 5])
    return EXIT_OK


def inspect_info(path: Path, layout: PackLayout) -> dict:
    """The ``inspect --json`` document (schema version ``INSPECT_SCHEMA_VERSION``)."""
    counts = [0] * len(layout.blocks)
    tensors = []
    for e in layout.entries:
        block = layout.blocks[e.block]
        esize = block.length_bytes // block.length_elems if block.length_elems else 0
        counts[e.block] += 1
        tensors.append(
            {
                "name": e.name,
                "dtype": dtype_name(block.dtype),
                "shape": list(e.shape),
                "block": e.block,
                "offset": e.offset,
                "length": e.length,
                "offset_bytes": block.offset_bytes + e.offset * esize,
                "nbytes": e.length * esize,
            }
        )
    return {
        "schema_version": INSPECT_SCHEMA_VERSION,
        "file": str(path),
        "format": _footer_format(path),
        "align_bytes": layout.align_bytes,
        "file_bytes": path.stat().st_size,
        "payload_bytes": layout.payload_bytes,
        "tensor_count": len(layout.entries),
        "tensor_bytes": sum(t["nbytes"] for t in tensors),
        "blocks": [
            {
                "index": i,
                "dtype": dtype_name(b.dtype),
                "offset_bytes": b.offset_bytes,
                "length_bytes": b.length_bytes,
                "length_elems": b.length_elems,
                "tensor_count": counts[i],
            }
            for i, b in enumerate(layout.blocks)
        ],
        "tensors": tensors,
    }


def cmd_push(args: argparse.Namespace) -> int:
    from .config import ConversionConfig
    from .push import push_to_hub

    pushed = push_to_hub(Path(args.path), args.repo, ConversionConfig.from_env(), revision=args.revision,
                         private=args.private, diffusers_weights=not args.no_diffusers_weights)
    print(f"pushed {args.path} to {pushed.repo}@{pushed.revision}: commit {pushed.commit}")
    print(f'serve it with [model] source = "{pushed.repo}", revision = "{pushed.commit}"')
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        from .manifest import read_manifest, verify_converted

        verify_converted(path, full=True)
        files = read_manifest(path)["files"]
        total = sum(f["size"] for f in files.values())
        print(f"OK {path}: {len(files)} files, {_human_bytes(total)}, sizes, footers and sha256 match")
    elif path.is_file():
        layout = read_layout(path)
        _read_payload(path, layout.payload_bytes)
        print(f"OK {path}: {_summary(layout)}, payload read in full")
    elif path.exists():
        raise ConversionError(f"{path}: not a regular file or a converted directory")
    else:
        raise ConversionError(f"{path}: no such file or directory")
    return EXIT_OK


def _read_payload(path: Path, payload_bytes: int) -> None:
    """Read every payload byte, so truncation and I/O errors surface now rather than at load."""
    buf = bytearray(8 << 20)
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < payload_bytes:
            n = f.readinto(memoryview(buf)[: min(len(buf), payload_bytes - done)])
            if not n:
                raise FlashPackFormatError(f"{path}: payload ends at byte {done}, expected {payload_bytes} (truncated)")
            done += n


def cmd_revert(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from model_loader import load_state_dict

    from .durable import atomic_path

    src, dst = Path(args.file), Path(args.dst)
    _refuse_source_as_destination([src], dst)
    read_layout(src)
    _refuse_existing(dst, args.force)
    # save_file refuses views sharing storage: give each tensor its own contiguous copy.
    tensors = {name: t.clone().contiguous() for name, t in load_state_dict(src).items()}
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    print(f"wrote {dst}: {len(tensors)} tensors")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Helpers


def _refuse_source_as_destination(sources: Sequence[Path], dst: Path) -> None:
    """Refuse a destination that is, or resolves to (symlinks, ``..``, hard links), one of its
    sources: writing it would replace the input with the output."""
    for src in sources:
        same = os.path.realpath(src) == os.path.realpath(dst)
        if not same:
            with contextlib.suppress(OSError):  # dst does not exist yet
                same = os.path.samefile(src, dst)
        if same:
            raise ConversionError(f"destination {dst} is the source {src}; write to another path")


def _refuse_existing(dst: Path, force: bool) -> None:
    if dst.is_dir():
        raise ConversionError(f"{dst}: is a directory")
    if dst.exists() and not force:
        raise ConversionError(f"{dst}: already exists (use --force to overwrite)")


def _footer_format(path: Path) -> str:
    """The footer's ``format`` string (read_layout has validated it already)."""
    from model_loader.format import TRAILER

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(size - TRAILER.size)
        footer_len, _ = TRAILER.unpack(f.read(TRAILER.size))
        f.seek(size - TRAILER.size - footer_len)
        return json.loads(f.read(footer_len).decode("utf-8"))["format"]


def _summary(layout: PackLayout) -> str:
    dtypes = ", ".join(dtype_name(b.dtype) for b in layout.blocks)
    return (
        f"{len(layout.entries)} tensors in {len(layout.blocks)} block(s) ({dtypes}), "
        f"{_human_bytes(layout.payload_bytes)}"
    )


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _table(header: list[str], rows: list[list[str]], right: Sequence[int] = ()) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m conversion",
        description="Convert weights to FlashPack and check FlashPack files and converted directories.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dtype_help = "cast floating-point tensors to this dtype (float16/fp16/half, bfloat16/bf16, float32/fp32); integer and bool tensors are never cast"

    p = sub.add_parser(
        "pack",
        help="pack safetensors file(s) into one .flashpack file",
        description="Pack one safetensors file, or the shards of one state dict, into a FlashPack file byte-identical to flashpack.pack_to_file.",
    )
    p.add_argument("src", nargs="+", metavar="SRC.safetensors", help="source file (several for shards)")
    p.add_argument("dst", metavar="DST.flashpack", help="file to write (atomically)")
    p.add_argument("--dtype", type=parse_target_dtype, default=None, help=dtype_help)
    p.add_argument(
        "--align",
        type=_align,
        default=128,
        metavar="N",
        help="align tensors to N bytes (default 128; 0 = element size only)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "convert",
        help="convert a pipeline (local dir, Hub repo id or URL)",
        description="Convert a diffusers pipeline to a converted directory (FlashPack per component + manifest). A local directory with DST is converted beside DST and renamed into place; anything else goes through the store (DST omitted: into the store on $APP_DATA_ROOT).",
    )
    p.add_argument("src", metavar="SRC", help="local pipeline directory, Hub repo id (org/name), Hub file "
                   "(org/name/file.safetensors) or https:// URL")
    p.add_argument("dst", nargs="?", default=None, metavar="DST", help="directory to create (must not exist)")
    p.add_argument("--dtype", type=parse_target_dtype, default=None, help=dtype_help)
    p.add_argument("--variant", default=None, help="weight variant to read, e.g. fp16 (*.fp16.safetensors)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit hash)")
    p.add_argument("--pipeline-class", default=None, metavar="CLASS",
                   help="a single file's diffusers pipeline, e.g. StableDiffusionXLPipeline (default: detected from its tensor names)")
    p.add_argument("--config", default=None, metavar="DIR_OR_REPO",
                   help="a single file's configs: a local diffusers directory or a Hub repo id (default: diffusers fetches them from the Hub)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "inspect",
        help="show a .flashpack file's blocks and tensors",
        description="Validate and describe a FlashPack file's footer.",
    )
    p.add_argument("file", metavar="FILE", help=".flashpack file")
    p.add_argument(
        "--json", action="store_true", help=f"print the full index as JSON (schema_version {INSPECT_SCHEMA_VERSION})"
    )
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "verify",
        help="check a .flashpack file or a converted directory",
        description="A .flashpack file: validate the footer and read the whole payload. A converted directory: check every file against the manifest (sizes, footers, sha256). Exit 0 when OK, 1 otherwise.",
    )
    p.add_argument("path", metavar="PATH", help=".flashpack file or converted directory")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "push",
        help="push a converted directory to a Hugging Face Hub repo",
        description="Push a converted directory (a store entry or a convert output) to a Hub repo in one commit, "
                    "after checking it in full: its packs, configs and manifest, a model card, and (unless "
                    "--no-diffusers-weights) each transformers component as model.safetensors so diffusers' "
                    "from_pretrained(use_flashpack=True) loads it too. HF_TOKEN needs write access.",
    )
    p.add_argument("path", metavar="PATH", help="converted directory")
    p.add_argument("repo", metavar="ORG/NAME", help="Hub repo id (created, private with --private, when missing)")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="branch to commit to (created from main when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--no-diffusers-weights", action="store_true",
                   help="leave out the transformers components' safetensors (this app does not need them)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "revert",
        help="write a .flashpack file's tensors as safetensors",
        description="Write every tensor of a FlashPack file to a safetensors file.",
    )
    p.add_argument("file", metavar="FILE", help=".flashpack file")
    p.add_argument("dst", metavar="DST.safetensors", help="file to write (atomically)")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.set_defaults(func=cmd_revert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # stdout closed early (`inspect --json | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure ends as one line on stderr, never a traceback
        if args.debug:
            raise
        known = (ConversionError, FlashPackFormatError, OSError, ValueError)
        prefix = "" if isinstance(exc, known) else f"unexpected {type(exc).__name__}: "
        print(f"error: {prefix}{_error_message(exc)}", file=sys.stderr)
        return EXIT_FAILURE
