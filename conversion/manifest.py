"""The manifest of a converted directory: what it was built from, every file's size and sha256,
and for each pack the per-segment checksum the loader checks while it reads.

Written last (atomically), so its presence means the conversion finished. Three checks:
``verify_converted(full=True)`` (every sha256; ``python -m conversion verify``), ``full=False``
(sizes and pack footers) and ``check_warm`` (the warm start's: sizes, the small files' sha256,
checksums present; the packs themselves are checked by the loader as it reads them). Publication
runs the last two (the packs' digests were taken as they were written). All of them refuse a file
the manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from model_loader.bounded_json import load_file_bounded
from model_loader.checksum import Checksum, SegmentHasher
from model_loader.errors import JSONLimitError

from .durable import is_temp_name, write_atomic
from .errors import ConversionError

MANIFEST_NAME = "flashpack_manifest.json"
# Version of the converted-directory layout; bump on any incompatible change so old stores are
# rebuilt instead of misread.
FORMAT_VERSION = 1
# A manifest lists one line per file (an SDXL one is ~10 KB); anything this large is not ours.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

_READ_CHUNK = 8 << 20
_MAX_HASH_THREADS = 8
_TOOLS = ("torch", "diffusers", "transformers", "safetensors", "flashpack")


class VerificationError(ConversionError):
    """A converted directory does not match its manifest; the message names the file and problem."""


def list_files(converted_dir: str | os.PathLike[str]) -> list[str]:
    """Relative posix paths of every file under ``converted_dir`` except the manifest and temp files."""
    root = Path(converted_dir)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_temp_name(d)]
        for name in filenames:
            if is_temp_name(name):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def is_pack(rel: str) -> bool:
    return rel.endswith(".flashpack")


def hash_file(path: str | os.PathLike[str], segments: bool = False) -> tuple[str, Checksum | None]:
    """Hex sha256 of a file and, with ``segments``, its load-time checksum, in one read (hashlib
    and xxhash release the GIL, so threads scale)."""
    digest = hashlib.sha256()
    hasher = SegmentHasher() if segments else None
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            digest.update(view[:n])
            if hasher is not None:
                hasher.update(view[:n])
    return digest.hexdigest(), hasher.result() if hasher is not None else None


def _hash_all(root: Path, rel_paths: list[str], segments: bool = False) -> dict[str, tuple[str, Checksum | None]]:
    """sha256 (and, with ``segments``, each pack's checksum) of each file, largest first, on a thread pool."""
    if not rel_paths:
        return {}
    order = sorted(rel_paths, key=lambda r: (root / r).stat().st_size, reverse=True)
    workers = min(_MAX_HASH_THREADS, len(order), (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256") as pool:
        digests = pool.map(lambda r: hash_file(root / r, segments and is_pack(r)), order)
        return dict(zip(order, digests, strict=True))


def _file_record(root: Path, rel: str, sha256: str, checksum: Checksum | None) -> dict[str, Any]:
    record: dict[str, Any] = {"size": (root / rel).stat().st_size, "sha256": sha256}
    if checksum is not None:
        record["checksum"] = checksum.to_json()
    return record


def _tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _json_default(value: object) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"manifest source field of type {type(value).__name__} is not JSON-serializable")


def write_manifest(
    converted_dir: str | os.PathLike[str],
    source: dict,
    known: Mapping[Path, tuple[str, Checksum]] | None = None,
) -> dict:
    """Record every file's size and sha256 plus ``source`` in ``converted_dir``'s manifest.

    ``known`` holds packs hashed as they were written (path -> sha256 and segment checksum, see
    :func:`conversion.writer.write_pack`); they are not read again when their size still matches.
    Call it last: the manifest is written atomically (temp file, fsync, rename, directory
    fsync), so a directory with a manifest is a finished conversion.
    """
    root = Path(converted_dir)
    rel_paths = list_files(root)
    known = known or {}
    reuse = {rel: known[root / rel] for rel in rel_paths
             if root / rel in known and known[root / rel][1].size == (root / rel).stat().st_size}
    digests = {**_hash_all(root, [r for r in rel_paths if r not in reuse], segments=True), **reuse}
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "tools": _tool_versions(),
        "files": {rel: _file_record(root, rel, *digests[rel]) for rel in rel_paths},
    }
    body = json.dumps(manifest, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    write_atomic(root / MANIFEST_NAME, body)
    return json.loads(body)


def read_manifest(converted_dir: str | os.PathLike[str]) -> dict:
    """The parsed, shape-checked manifest of ``converted_dir`` (raises VerificationError)."""
    root = Path(converted_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise VerificationError(f"{root}: not a directory")
    try:
        manifest = load_file_bounded(path, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise VerificationError(
            f"{path}: missing (the conversion did not finish, or {root} is not a converted directory); convert again"
        ) from None
    except OSError as exc:
        raise VerificationError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except JSONLimitError as exc:
        raise VerificationError(f"{path}: not a manifest (JSON {exc}); convert again") from None
    except ValueError as exc:  # UnicodeDecodeError, json.JSONDecodeError
        raise VerificationError(f"{path}: not valid JSON ({exc}); convert again") from None

    def fail(problem: str) -> VerificationError:
        return VerificationError(f"{path}: {problem}; convert again")

    if not isinstance(manifest, dict):
        raise fail(f"expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise fail(f"format_version {version!r}, this code reads version {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise fail("'files' must be an object mapping relative paths to size and sha256")
    for rel, entry in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or PurePosixPath(rel).is_absolute() or ".." in parts or rel == MANIFEST_NAME:
            raise fail(f"file path {rel!r} is not a relative path inside the directory")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or isinstance(entry.get("size"), bool)
            or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
        ):
            raise fail(f"entry for {rel!r} must be {{'size': int >= 0, 'sha256': 64 hex chars}}")
        if "checksum" in entry:
            try:
                Checksum.from_json(entry["checksum"], entry["size"])
            except ValueError as exc:
                raise fail(f"checksum of {rel!r}: {exc}") from None
    return manifest


def pack_checksums(manifest: dict) -> dict[str, Checksum]:
    """The load-time checksum of every pack a (read_manifest-checked) manifest records."""
    return {
        rel: Checksum.from_json(entry["checksum"], entry["size"])
        for rel, entry in manifest["files"].items()
        if is_pack(rel) and "checksum" in entry
    }


def _check_files(root: Path, files: dict[str, dict]) -> None:
    """Every listed file exists as a regular file of its listed size; no other file is there."""
    for rel, entry in files.items():
        file = root / rel
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            raise VerificationError(f"{file}: listed in the manifest but missing") from None
        except OSError as exc:
            raise VerificationError(f"{file}: cannot stat ({exc.strerror or exc})") from exc
        if not stat.S_ISREG(st.st_mode):
            raise VerificationError(f"{file}: listed in the manifest but not a regular file")
        if st.st_size != entry["size"]:
            raise VerificationError(
                f"{file}: size {st.st_size} bytes, the manifest says {entry['size']} (truncated or modified since conversion)"
            )
    unlisted = sorted(set(list_files(root)) - set(files))
    if unlisted:
        raise VerificationError(
            f"{root / unlisted[0]}: not in the manifest ({len(unlisted)} unlisted file(s)); the directory was "
            "modified since conversion"
        )


def check_warm(path: str | os.PathLike[str]) -> dict:
    """The warm start's check of a converted directory; returns its manifest.

    The listing and sizes as in :func:`verify_converted`, the sha256 of every file that is not a
    pack (configs, tokenizers, schedulers: kilobytes), and a load-time checksum for every pack
    (the loader checks the packs' bytes as it reads them). Torch-free and reads no pack.
    """
    root = Path(path)
    manifest = read_manifest(root)
    files: dict[str, dict] = manifest["files"]
    _check_files(root, files)
    for rel, entry in files.items():
        if is_pack(rel) and "checksum" not in entry:
            raise VerificationError(
                f"{root / rel}: converted before packs carried load-time checksums; this entry is rebuilt once"
            )
    try:
        digests = _hash_all(root, [rel for rel in files if not is_pack(rel)])
    except OSError as exc:
        raise VerificationError(f"{exc.filename}: cannot read ({exc.strerror or exc})") from exc
    _compare_sha256(root, files, digests)
    return manifest


def _compare_sha256(root: Path, files: dict[str, dict], digests: dict[str, tuple[str, Checksum | None]]) -> None:
    for rel, (sha256, _) in digests.items():
        if sha256 != files[rel]["sha256"]:
            raise VerificationError(f"{root / rel}: sha256 mismatch (contents changed since conversion); convert again")


def verify_converted(path: str | os.PathLike[str], full: bool = True) -> None:
    """Check ``path`` against its manifest; raise VerificationError naming the file and problem.

    Always: the manifest parses and has our format version, every listed file exists with its
    listed size, no unlisted file is there, every ``*.flashpack`` footer is valid.
    ``full=True`` also hashes every file (sha256); ``full=False`` reads nothing beyond footers.
    """
    root = Path(path)
    files: dict[str, dict] = read_manifest(root)["files"]
    _check_files(root, files)
    # Imported here: the format needs torch, and the store's warm lookup must not wait for it.
    from model_loader.errors import FlashPackFormatError
    from model_loader.format import read_layout

    for rel in files:
        if rel.endswith(".flashpack"):
            try:
                read_layout(root / rel)
            except FlashPackFormatError as exc:
                raise VerificationError(str(exc)) from exc
    if not full:
        return
    try:
        digests = _hash_all(root, list(files))
    except OSError as exc:
        raise VerificationError(f"{exc.filename}: cannot read ({exc.strerror or exc})") from exc
    _compare_sha256(root, files, digests)


def verify_digests(path: str | os.PathLike[str]) -> dict[str, tuple[str, Checksum | None]]:
    """:func:`verify_converted` in full, the packs' load-time checksums compared too (a manifest
    that came from elsewhere must hold what its files do); returns each file's digests, for a new
    manifest of the same files (``write_manifest``'s ``known``) without a second read."""
    root = Path(path)
    verify_converted(root, full=False)
    files: dict[str, dict] = read_manifest(root)["files"]
    try:
        digests = _hash_all(root, list(files), segments=True)
    except OSError as exc:
        raise VerificationError(f"{exc.filename}: cannot read ({exc.strerror or exc})") from exc
    _compare_sha256(root, files, digests)
    for rel, (_, checksum) in digests.items():
        recorded = files[rel].get("checksum")
        if checksum is not None and (recorded is None or Checksum.from_json(recorded, files[rel]["size"]) != checksum):
            raise VerificationError(f"{root / rel}: its checksum does not match the manifest's (contents changed "
                                    "since conversion); convert again")
    return digests


def packs_to_read(converted_dir: str | os.PathLike[str]) -> list[tuple[str, Path, Checksum | None]]:
    """``(component, path, checksum)`` of every pack of a converted directory, from its manifest,
    for :func:`model_loader.start_pack_reads`."""
    root = Path(converted_dir)
    manifest = read_manifest(root)
    checksums = pack_checksums(manifest)
    return [
        (PurePosixPath(rel).parent.as_posix(), root / rel, checksums.get(rel))
        for rel in manifest["files"]
        if is_pack(rel)
    ]
