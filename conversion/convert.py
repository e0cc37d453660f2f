"""Convert a local diffusers pipeline directory into a converted (FlashPack) directory.

Each torch component becomes ``<comp>/model.flashpack`` beside its ``config.json``. When the
component's safetensors tensors fit its model class exactly (checked on a meta-device model, after
the key renames ``from_pretrained`` would apply), they are streamed file to file one at a time, so
peak memory is one tensor; otherwise (``.bin`` weights, fused/split weight conversions) the model
is loaded on the CPU with its own ``from_pretrained`` and its state dict is written.

A component that is packed already (a ``model.flashpack`` beside its ``config.json``, as diffusers'
``save_pretrained(use_flashpack=True)`` writes its diffusers components) is adopted, not converted:
its footer is validated by our parser, its tensors are checked against its model class as above,
and it is copied byte for byte (hashed as it is copied) when its tensors are stored in the dtype
asked for, else rewritten cast, one tensor at a time from the source pack. Where a component holds
both a pack and safetensors, the pack is taken. Tokenizers, schedulers and other files are copied.
The manifest is written last.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from model_loader import private_api
from model_loader.assemble import (
    build_empty_model,
    check_tensors,
    is_diffusers_model,
    is_transformers_model,
    keep_in_fp32_rule,
    non_persistent_buffer_names,
)
from model_loader.bounded_json import loads_bounded
from model_loader.checksum import SegmentHasher
from model_loader.diffusers_layout import (
    MODEL_INDEX_NAME,
    PACK_EXT,
    PACK_NAME,
    choose_weights,
    components,
    is_weight_file,
    read_model_index,
    variants_present,
)
from model_loader.errors import DiffusersLayoutError, FlashPackFormatError, PipelineLoadError, StateDictMismatchError
from model_loader.format import (
    FORMAT_V3,
    FORMAT_V4,
    MAX_FOOTER_BYTES,
    TRAILER,
    PackLayout,
    dtype_name,
    element_size,
    footer_span,
    read_layout,
)
from model_loader.pipeline import model_class_and_config, resolve_class
from model_loader.rates import rate_text

from .durable import atomic_file, fsync_dir
from .errors import ConversionError
from .symlinks import warn_broken_symlink
from .writer import PackDigest, index_safetensors, shard_files, write_pack

logger = logging.getLogger("conversion.convert")

_COPY_CHUNK = 8 << 20  # bytes per read when a pack is copied


def convert_pipeline(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    source: dict | None = None,
    variant: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Convert the diffusers pipeline at ``src_dir`` into ``dst_dir`` (absent or empty).

    ``dtype`` casts floating-point weights (never integer/bool buffers; modules the model class
    keeps in float32 stay float32, as with ``from_pretrained(torch_dtype=...)``). ``variant``
    (e.g. ``"fp16"``) reads ``*.fp16.safetensors`` where a component has them. ``source`` is
    recorded in the manifest with ``dtype`` and ``variant``. ``show_progress``: draw a progress
    bar (on a terminal; ``ConversionConfig.show_progress`` says whether). Returns ``dst_dir``.
    """
    from .manifest import write_manifest

    start = time.perf_counter()
    src, dst = Path(src_dir), Path(dst_dir)
    index = _read_index(src)
    components = _plan(src, index, variant)
    _prepare_destination(dst)

    total_source = sum(f.stat().st_size for _, w in components.values() if w for f in w[0])
    written = 0
    digests: dict[Path, PackDigest] = {}  # each pack hashed as it is written: the manifest reads none back
    with tqdm(total=total_source, unit="B", unit_scale=True, desc="convert", disable=not show_progress or None) as bar:
        for name, (cls, weights) in components.items():
            comp_src, comp_dst = src / name, dst / name
            if weights is None:
                _copy_tree(comp_src, comp_dst)
                continue
            bar.set_postfix_str(name)
            if variant and weights[1] is None:
                logger.info("convert: %s has no %s variant; using its default weights", name, variant)
            written += _convert_model(name, cls, comp_src, comp_dst, dtype, weights, bar, digests)
    adopted = [name for name, (_, weights) in components.items() if weights and _is_pack(weights[0])]
    if adopted:
        converted = [name for name, (_, weights) in components.items() if weights and not _is_pack(weights[0])]
        logger.info("convert: adopted from packs: %s; converted: %s", ", ".join(adopted), ", ".join(converted) or "none")
    _copy_file(src / MODEL_INDEX_NAME, dst / MODEL_INDEX_NAME)
    fsync_dir(dst)

    info = dict(source or {})
    info["dtype"] = dtype_name(dtype) if dtype is not None else None
    info["variant"] = variant
    write_manifest(dst, info, digests)
    elapsed = time.perf_counter() - start
    logger.info("convert: %s %s -> %s", rate_text(written, elapsed), src, dst)
    return dst


def _read_index(src: Path) -> dict[str, Any]:
    try:
        return read_model_index(src / MODEL_INDEX_NAME)
    except DiffusersLayoutError as exc:
        raise ConversionError(str(exc)) from None


_Weights = tuple[list[Path], str | None]


def _is_pack(files: list[Path]) -> bool:
    """Whether a component's chosen weights are a FlashPack pack (adopted, not converted)."""
    return len(files) == 1 and files[0].name.endswith(f".{PACK_EXT}")


def _plan(src: Path, index: Mapping[str, Any], variant: str | None) -> dict[str, tuple[type, _Weights | None]]:
    """Component name -> (class, (its pack or safetensors files, their variant) or None for a
    non-torch component); every component is checked before anything is written."""
    plan: dict[str, tuple[type, _Weights | None]] = {}
    try:
        listed = components(index)
    except DiffusersLayoutError as exc:
        raise ConversionError(f"{src / MODEL_INDEX_NAME}: {exc}") from None
    for name, spec in listed.items():
        if spec is None:
            continue
        try:
            cls = resolve_class(*spec, where=str(src / MODEL_INDEX_NAME))
        except PipelineLoadError as exc:
            raise ConversionError(str(exc)) from None
        comp = src / name
        if not comp.is_dir():
            raise ConversionError(f"{comp}: component directory listed in model_index.json is missing")
        plan[name] = (cls, weight_files(comp, variant) if issubclass(cls, torch.nn.Module) else None)
    return plan


def _prepare_destination(dst: Path) -> None:
    if dst.exists():
        if not dst.is_dir():
            raise ConversionError(f"{dst}: exists and is not a directory")
        if any(dst.iterdir()):
            raise ConversionError(f"{dst}: not empty; convert into a new or empty directory")
    dst.mkdir(parents=True, exist_ok=True)


def weight_files(comp: Path, variant: str | None) -> tuple[list[Path], str | None]:
    """The weight files of one component and the variant they are, as ``choose_weights`` picks
    them: ``[<comp>/model.flashpack]`` for a packed component, else its safetensors files (all
    shards); ``([], variant)`` for ``.bin`` weights (loaded by their own ``from_pretrained``),
    ``([], None)`` if there are none."""
    names = os.listdir(comp)
    try:
        chosen = choose_weights(names, variant, comp.name)
    except DiffusersLayoutError as exc:
        raise ConversionError(f"{comp}: {exc}") from None
    if chosen is None:
        return [], None
    if chosen.is_pack:
        _say_pack_wins(comp, names, chosen.files[0], variant)
        return [comp / chosen.files[0]], chosen.variant
    if chosen.ext != "safetensors":
        return [], chosen.variant
    if chosen.shard_index is not None:
        return shard_files(comp / chosen.shard_index), chosen.variant
    return [comp / f for f in chosen.files], chosen.variant


def _say_pack_wins(comp: Path, names: list[str], pack: str, variant: str | None) -> None:
    """Log it when a packed component also holds the weights it would be converted from."""
    try:
        passed_over = choose_weights([n for n in names if not n.endswith(f".{PACK_EXT}")], variant, comp.name)
    except DiffusersLayoutError:  # only other variants besides the pack: nothing was passed over
        passed_over = None
    if passed_over is not None:
        logger.info("convert: %s holds both %s and %s; the pack wins (adopted, not converted)",
                    comp, pack, ", ".join(passed_over.files))


def _convert_model(
    name: str, cls: type, comp_src: Path, comp_dst: Path, dtype: torch.dtype | None,
    weights: _Weights, bar: tqdm, digests: dict[Path, PackDigest],
) -> int:
    """Write one torch component's pack and side files; returns the pack's payload bytes."""
    start = time.perf_counter()
    try:
        cls, config = model_class_and_config(cls, comp_src)
    except PipelineLoadError as exc:
        raise ConversionError(str(exc)) from None
    files, used_variant = weights
    model = build_empty_model(cls, config, torch.float32)
    keep_fp32 = keep_in_fp32_rule(model, dtype)
    pack_path = comp_dst / PACK_NAME
    comp_dst.mkdir(parents=True, exist_ok=True)

    layout = None
    how = "streamed"
    if _is_pack(files):
        layout, how = _adopt_pack(model, files[0], pack_path, dtype, keep_fp32, bar, digests)
    elif files:
        layout = _stream_safetensors(model, files, pack_path, dtype, keep_fp32, bar, digests)
    if layout is None:
        how = "loaded"
        layout = _load_and_write(cls, comp_src, used_variant, model, pack_path, dtype, keep_fp32, files, bar,
                                 digests)
    for f in sorted(comp_src.iterdir()):
        if f.is_file() and not is_weight_file(f.name):
            _copy_file(f, comp_dst / f.name)
    fsync_dir(comp_dst)
    elapsed = time.perf_counter() - start
    nbytes = layout.payload_bytes
    logger.info("convert: %s (%s, %s) %s", name, cls.__name__, how, rate_text(nbytes, elapsed))
    return nbytes


def _target(dtype: torch.dtype | None, keep_fp32: Callable[[str], bool]) -> Callable[[str, torch.dtype], torch.dtype]:
    def stored(name: str, src: torch.dtype) -> torch.dtype:
        if dtype is None or not src.is_floating_point:
            return src
        return torch.float32 if keep_fp32(name) else dtype

    return stored


def _stream_safetensors(model, files, pack_path, dtype, keep_fp32, bar, digests):
    """Stream tensors file to pack if the files' keys fit the model (after the renames its
    library applies on load, e.g. a legacy prefix); None when they don't."""
    index = index_safetensors(files)
    try:
        file_shapes = {key: (shape, dt) for key, (_, shape, dt) in index.items()}
        renamed = checkpoint_key_map(model, list(file_shapes))
        if renamed is None:
            logger.info("convert: %s needs weight conversion ops; loading it instead", files[0].parent)
            return None
        ignored = ignored_on_load(model)
        renamed = {old: new for old, new in renamed.items() if not ignored(new)}
        shapes = {new: file_shapes[old] for old, new in renamed.items()}
        if len(shapes) != len(renamed):
            logger.info("convert: %s: two checkpoint keys map to one name; loading it instead", files[0].parent)
            return None
        try:
            chosen = check_tensors(model, shapes, str(files[0].parent))
        except StateDictMismatchError as exc:
            logger.info(
                "convert: %s does not match %s (%s); loading it instead", files[0].parent, type(model).__name__, exc
            )
            return None
        source_key = {new: old for old, new in renamed.items()}
        stored = _target(dtype, keep_fp32)
        specs = [(k, shape, stored(k, dt)) for k, (shape, dt) in shapes.items() if chosen[k] == k]

        def get(key: str) -> torch.Tensor:
            old = source_key[key]
            t = index[old][0].get_tensor(old)
            bar.update(t.nbytes)
            return t

        return write_pack(specs, get, pack_path, digests=digests)
    finally:
        index.clear()  # close the shard handles now, not at garbage collection


def _adopt_pack(
    model: torch.nn.Module, pack: Path, pack_path: Path, dtype: torch.dtype | None,
    keep_fp32: Callable[[str], bool], bar: tqdm, digests: dict[Path, PackDigest],
) -> tuple[PackLayout, str]:
    """Take a component's own pack as its converted pack: validated (footer, then its tensors
    against ``model``), then copied, or rewritten cast where a tensor is stored in another dtype
    than ``dtype`` asks for. Returns the written pack's layout and how it was taken."""
    try:
        layout = read_layout(pack)
    except FlashPackFormatError as exc:
        raise ConversionError(_unreadable_pack_message(pack, exc)) from None
    shapes = {e.name: (e.shape, layout.blocks[e.block].dtype) for e in layout.entries}
    try:
        chosen = check_tensors(model, shapes, str(pack))
    except StateDictMismatchError as exc:
        raise ConversionError(
            f"{exc}. The pack was not saved from this model class with this config.json: convert the "
            f"component's original weights instead (remove {pack.name} and put its safetensors in {pack.parent})"
        ) from None
    stored = _target(dtype, keep_fp32)
    if all(stored(name, dt) == dt for name, (_, dt) in shapes.items()):
        _copy_pack(pack, pack_path, bar, digests)
        return layout, "pack copied"
    specs = [(k, shape, stored(k, dt)) for k, (shape, dt) in shapes.items() if chosen[k] == k]
    entries = {e.name: e for e in layout.entries}
    with open(pack, "rb", buffering=0) as f:

        def get(name: str) -> torch.Tensor:
            entry = entries[name]
            block = layout.blocks[entry.block]
            size = element_size(block.dtype)
            data = _read_at(f, block.offset_bytes + entry.offset * size, entry.length * size, pack)
            bar.update(len(data))
            return torch.frombuffer(data, dtype=torch.uint8).view(block.dtype).reshape(entry.shape)

        written = write_pack(specs, get, pack_path, digests=digests)
    return written, f"pack cast to {dtype_name(dtype)}"  # dtype is set: without one nothing is cast


def _read_at(f, offset: int, nbytes: int, path: Path) -> bytearray:
    """Exactly ``nbytes`` bytes of the open file ``f`` from ``offset`` (one tensor of a pack)."""
    data = bytearray(nbytes)
    view = memoryview(data)
    f.seek(offset)
    done = 0
    while done < nbytes:
        n = _readinto(f, view[done:], path)
        if not n:
            raise ConversionError(f"{path}: ended at byte {offset + done} while a tensor was read (changed meanwhile?)")
        done += n
    return data


def _readinto(f, buf, path: Path) -> int:
    """``f.readinto(buf)``; a read error is a ConversionError naming ``path`` (inside
    ``atomic_file``, an OSError would be reported as a failed write)."""
    try:
        return f.readinto(buf)
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _copy_pack(src: Path, dst: Path, bar: tqdm, digests: dict[Path, PackDigest]) -> None:
    """Copy a pack, hashing its bytes (sha256 and the load-time checksum) as they pass, so the
    manifest reads neither file again."""
    sha256, segments = hashlib.sha256(), SegmentHasher()
    buf = bytearray(_COPY_CHUNK)
    view = memoryview(buf)
    try:
        f = open(src, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise ConversionError(f"cannot read {src}: {exc.strerror or exc}") from exc
    with f, atomic_file(dst) as out:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        size = os.fstat(f.fileno()).st_size
        copied = 0
        while n := _readinto(f, buf, src):
            sha256.update(view[:n])
            segments.update(view[:n])
            out.write(view[:n])
            copied += n
            bar.update(n)
        if copied != size:
            raise ConversionError(f"{src}: {copied} bytes read, {size} expected (changed while it was copied)")
    digests[dst] = (sha256.hexdigest(), segments.result())


def _unreadable_pack_message(pack: Path, exc: FlashPackFormatError) -> str:
    """What a pack our parser refuses is, and what to do about it."""
    newer = _newer_flashpack_feature(pack)
    if newer is not None:
        return (
            f"{pack}: a pack with {newer}, written by a flashpack newer than the one this app reads: it reads the "
            f"uncompressed {FORMAT_V3} and {FORMAT_V4} packs that flashpack 0.4.5 writes. Save the component again "
            f"with flashpack 0.4.5 (diffusers' save_pretrained(use_flashpack=True)), or convert its original "
            f"weights instead (remove {pack.name} and put its safetensors in {pack.parent})"
        )
    return (
        f"{exc}. The pack is damaged (truncated or overwritten): save the component again (diffusers' "
        f"save_pretrained(use_flashpack=True)), or convert its original weights instead (remove {pack.name} "
        f"and put its safetensors in {pack.parent})"
    )


def _newer_flashpack_feature(pack: Path) -> str | None:
    """What in a pack's (well-formed JSON) footer only a newer flashpack writes: a format other
    than v3/v4, or zstd-compressed blocks (``fpz``); None for anything else (damage)."""
    try:
        with open(pack, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - TRAILER.size))
            payload_end, footer_len = footer_span(size, f.read(TRAILER.size), str(pack))
            f.seek(payload_end)
            meta = loads_bounded(f.read(footer_len), max_bytes=MAX_FOOTER_BYTES)
    except (OSError, ValueError):  # FlashPackFormatError, JSONLimitError and bad JSON are ValueErrors
        return None
    if not isinstance(meta, dict):
        return None
    fmt = meta.get("format")
    if isinstance(fmt, str) and fmt.startswith("flashpack_") and fmt not in (FORMAT_V3, FORMAT_V4):
        return f"format {fmt!r}"
    blocks = meta.get("macroblocks")
    if fmt == FORMAT_V4 and isinstance(blocks, list) and any(isinstance(b, dict) and "fpz" in b for b in blocks):
        return "zstd-compressed blocks ('fpz')"
    return None


def ignored_on_load(model: torch.nn.Module) -> Callable[[str], bool]:
    """Checkpoint names ``from_pretrained`` skips without complaint: the model's non-persistent
    buffers (old checkpoints saved ``position_ids``) and its ``_keys_to_ignore_on_load_unexpected``."""
    buffers = non_persistent_buffer_names(model)
    patterns = private_api.keys_ignored_on_load(model)
    regex = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    return lambda name: name in buffers or (regex is not None and regex.search(name) is not None)


def checkpoint_key_map(model: torch.nn.Module, keys: list[str]) -> dict[str, str] | None:
    """Checkpoint key -> the model's name for it, with the renames ``from_pretrained`` applies:
    diffusers' deprecated attention names; transformers' key renamings and base-model prefix.
    None when a key needs a transformers weight *converter* (fused/split tensors)."""
    if is_diffusers_model(type(model)):
        return private_api.diffusers_key_renames(model, keys)
    if is_transformers_model(type(model)):
        return private_api.transformers_key_renames(model, keys)
    return {k: k for k in keys}


def _load_and_write(cls, comp_src, variant, model, pack_path, dtype, keep_fp32, files, bar, digests):
    """Load the component with its own ``from_pretrained`` on the CPU and write its state dict."""
    kwargs: dict[str, Any] = {"local_files_only": True}
    if variant:
        kwargs["variant"] = variant
    load_dtype = dtype if dtype is not None else _dominant_float_dtype(files)
    if is_transformers_model(cls):
        kwargs["dtype"] = load_dtype if load_dtype is not None else "auto"
    elif is_diffusers_model(cls):
        kwargs["low_cpu_mem_usage"] = True
        if load_dtype is not None:
            kwargs["torch_dtype"] = load_dtype
    try:
        loaded = cls.from_pretrained(str(comp_src), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        variants = variants_present(os.listdir(comp_src))
        hint = f" (it has variant weights {variants}: pass variant=)" if variants and not variant else ""
        raise ConversionError(f"{comp_src}: cannot load {cls.__name__} weights{hint}: {exc}") from exc
    state = loaded.state_dict()
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
    try:
        chosen = check_tensors(model, shapes, str(comp_src))
    except StateDictMismatchError as exc:
        raise ConversionError(str(exc)) from exc
    stored = _target(dtype, keep_fp32)
    specs = [(k, shape, stored(k, dt)) for k, (shape, dt) in shapes.items() if chosen[k] == k]

    def get(key: str) -> torch.Tensor:
        t = state[key]
        bar.update(t.nbytes)
        return t

    return write_pack(specs, get, pack_path, digests=digests)


def _dominant_float_dtype(files: list[Path]) -> torch.dtype | None:
    """The floating dtype holding most elements of these safetensors files (headers only)."""
    counts: dict[torch.dtype, int] = {}
    for _, shape, dt in index_safetensors(files).values():
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + math.prod(shape)
    return max(counts, key=counts.__getitem__) if counts else None


def _copy_file(src: Path, dst: Path) -> None:
    """Copy (following symlinks, as in a Hub snapshot) and fsync."""
    try:
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
    except OSError as exc:
        raise ConversionError(f"cannot copy {src} to {dst}: {exc.strerror or exc}") from exc


def _copy_tree(src: Path, dst: Path) -> None:
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs.sort()
        out = dst / Path(root).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            path = Path(root) / name
            if path.is_symlink() and not path.exists():
                warn_broken_symlink(path)  # nothing to copy; a component that needs it says so on load
                continue
            _copy_file(path, out / name)
        fsync_dir(out)
