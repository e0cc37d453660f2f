"""The once-only, crash-safe store of converted pipelines on the persistent volume.

Layout under ``<root>/flashpack/`` (``<root>`` is ``/data`` on fal, ``$APP_DATA_ROOT`` elsewhere)::

    <slug>-<key16>/            a published converted directory (diffusers layout + manifest)
    .refs/<slug>-<h>.json      last resolved commit of a branch/tag (or fingerprint of a local dir)
    .locks/<slug>-<h>.lock     the lock a runner holds while it builds that source (conversion.lock)
    .<entry>.<host>.<pid>.<rand>.tmp/    a build in progress (private to its builder; conversion.durable
    .<name>.<host>.<pid>.<rand>.work/    scratch: a demo or single-file checkpoint as diffusers  names them)
    .<entry>.<host>.<pid>.<rand>.trash/  an entry moved aside, being deleted

An entry is keyed by source, resolved commit (or URL hash, or directory fingerprint), variant,
subfolder, dtype and conversion.manifest.FORMAT_VERSION. What an identity is, how it is found
offline and how a source is fetched is the source's business (conversion.sources); the store
keeps keys, refs, the lock, checks, building, publication, quarantine and cleanup. A warm start computes the key offline
(a commit revision is the key; a branch goes through its ref file), checks the entry cheaply
(sizes and pack footers) and returns it: no network, no Hub metadata call, no download code.

A cold start takes the source's lock, looks again, fetches, builds in a private temporary
directory beside the entry, verifies it fully (sha256), fsyncs it and publishes it with one
rename. Correctness does not depend on the lock: two builders each build their own copy, the
first rename wins and the loser discards its copy. A directory that fails verification is moved
aside atomically and rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from model_loader.bounded_json import load_file_bounded

from .config import ConversionConfig
from .dtypes import dtype_key, dtype_name
from .durable import (
    disk_full_error,
    fsync_dir,
    fsync_tree,
    parse_temp_name,
    publish_dir,
    remove_tree,
    temp_path,
    write_atomic,
)
from .errors import ConversionError, StoreError
from .manifest import FORMAT_VERSION, VerificationError, check_warm, read_manifest, verify_converted
from .sources import Prepared, Source, parse_source

if TYPE_CHECKING:
    import torch

    from .download import DownloadPolicy

log = logging.getLogger("conversion.store")

STORE_DIRNAME = "flashpack"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_REF_BYTES = 64 * 1024  # a ref file is one small JSON object
# Leftovers of builders from before conversion.durable named every temporary thing alike.
_LEGACY_LEFTOVER = re.compile(r"^\.(tmp|work|trash)-")
Verify = Literal["cheap", "full"]


def resolve_root(root: str | os.PathLike[str] | None, config: ConversionConfig) -> Path:
    """The persistent volume: ``root``, else ``config.data_root`` (``$APP_DATA_ROOT``), else fal's
    volume ``config.fal_data_root`` (``/data``) when it is a writable directory.

    Without it, on a fal runner (``config.on_fal_runner``) a :class:`StoreError`: a store anywhere
    else dies with the runner, so every cold start would download and convert again. Off fal,
    ``<repo>/.data``, with a warning naming it.
    """
    if root is not None:
        return Path(root)
    configured = config.data_root
    if configured is not None:
        return configured
    volume = config.fal_data_root
    if volume.is_dir() and os.access(volume, os.W_OK):
        return volume
    state = ("does not exist" if not volume.exists() else "is not a directory" if not volume.is_dir()
             else "is not writable")
    if config.on_fal_runner:
        raise StoreError(
            f"{volume} {state} on this fal runner: the store belongs on fal's persistent volume there; anywhere "
            "else it is lost with the runner and every cold start would download and convert again. Mount the "
            f'volume at {volume} (the fal.App attribute data_mounts, e.g. ["{volume}"]) or set APP_DATA_ROOT to '
            "a writable directory on a persistent volume"
        )
    fallback = _REPO_ROOT / ".data"
    log.warning("%s %s (not a fal runner): the store and caches go under %s (set APP_DATA_ROOT to choose)",
                volume, state, fallback)
    return fallback


def ensure_converted(
    source: Source | str,
    root: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    verify: Verify | None = None,
    refresh: bool = False,
    policy: DownloadPolicy | None = None,
) -> Path:
    """A verified converted directory for ``source``, built once per key and reused after.

    ``verify``: ``"cheap"`` (default, or ``$APP_STORE_VERIFY``) checks sizes and pack footers of
    an existing entry; ``"full"`` also its sha256s (reads everything). A failing entry is rebuilt.
    ``refresh``: resolve a branch on the Hub again instead of using its ref file.

    An entry point: the environment is read here, once (``ConversionConfig.from_env``).
    """
    src = source if isinstance(source, Source) else parse_source(source)
    config = ConversionConfig.from_env()
    store = Store(resolve_root(root, config), config)
    return store.ensure(src, dtype, verify=verify_mode(verify or config.store_verify), refresh=refresh, policy=policy)


def convert_source(
    src: str,
    dst: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    revision: str | None = None,
    variant: str | None = None,
    root: str | os.PathLike[str] | None = None,
    refresh: bool = False,
    pipeline_class: str | None = None,
    config: str | None = None,
) -> Path:
    """``python -m conversion convert``: into the store (``dst`` None) or into a new ``dst``.

    An entry point: the environment is read here, once (``ConversionConfig.from_env``); ``config``
    is a single file's configs (a directory or a Hub repo), as in ``parse_source``.
    """
    source = parse_source(src, revision=revision, variant=variant, pipeline_class=pipeline_class, config=config)
    conversion_config = ConversionConfig.from_env()
    store = Store(resolve_root(root, conversion_config), conversion_config)
    if dst is None:
        return store.ensure(source, dtype, verify=store.config.store_verify, refresh=refresh)
    return store.convert_to(source, Path(dst), dtype, refresh=refresh)


def verify_mode(verify: str) -> Verify:
    """``verify`` checked: how an existing entry is checked, ``cheap`` or ``full`` (a caller with
    none passes its config's ``store_verify``)."""
    mode = verify
    if mode not in ("cheap", "full"):
        raise ConversionError(f"verify must be 'cheap' or 'full', got {mode!r}")
    return mode  # type: ignore[return-value]


@dataclass(frozen=True)
class Entry:
    """One store entry: its key (what it was built from) and where it lives."""

    key: dict[str, Any]
    digest: str
    path: Path


class Store:
    """The store under ``<root>/flashpack``; also the workspace its sources fetch into.

    ``config``: the settings everything beneath it uses (its sources get them as
    ``workspace.config``, downloads as an argument); whoever makes the store reads it
    (``ConversionConfig.from_env()`` at an entry point such as conversion.entry.open_store).
    """

    def __init__(self, root: Path, config: ConversionConfig) -> None:
        self.root = Path(root)
        self.dir = self.root / STORE_DIRNAME
        self.config = config

    # -- keys and refs -----------------------------------------------------------------------

    def entry(self, source: Source, identity: str, dtype_name: str) -> Entry:
        key = {"format_version": FORMAT_VERSION, **source.key_fields(), "identity": identity, "dtype": dtype_name}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return Entry(key, digest, self.dir / f"{_slug(source)}-{digest[:16]}")

    def _source_id(self, source: Source, *extra: str) -> str:
        ident = json.dumps([source.kind, source.ref, source.revision or "", source.key_fields()["subfolder"] or "",
                            *extra])
        return f"{_slug(source)}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"

    def ref_path(self, source: Source) -> Path:
        return self.dir / ".refs" / f"{self._source_id(source)}.json"

    def lock_path(self, source: Source, dtype_name: str) -> Path:
        key = source.key_fields()
        extra = [key["variant"] or "", key["pipeline_class"] or "", key["config"] or "", dtype_name, str(FORMAT_VERSION)]
        return self.dir / ".locks" / f"{self._source_id(source, *extra)}.lock"

    def read_ref(self, source: Source) -> str | None:
        """The identity recorded for a branch/tag or local directory, or None."""
        try:
            data = load_file_bounded(self.ref_path(source), max_bytes=_MAX_REF_BYTES)
        except (OSError, ValueError):  # missing, unreadable, not JSON, too large or too deep
            return None
        value = data.get("identity") if isinstance(data, dict) else None
        return value if isinstance(value, str) and value else None

    def write_ref(self, source: Source, identity: str) -> None:
        """Record ``identity`` for the source's name (atomic; best effort)."""
        if not source.records_ref() or self.read_ref(source) == identity:
            return
        path = self.ref_path(source)
        body = json.dumps({"source": source.display, "revision": source.revision or "main",
                           "identity": identity, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        try:
            write_atomic(path, body)
        except (OSError, ConversionError) as exc:
            log.warning("store: cannot record %s -> %s in %s: %s", source.display, identity[:12], path, exc)

    def private_dir(self, name: str) -> Path:
        """A scratch directory in the store for this process (removed by cleanup if it dies)."""
        return temp_path(self.dir / name, "work")

    # -- the entry points ------------------------------------------------------------------------

    def warm(self, source: Source, dtype: Any = None, verify: Verify = "cheap") -> Path | None:
        """The checked entry for ``source`` when the store already has it, found offline; None
        when it must be built (missing, or damaged: then it is rebuilt by ``ensure``). No network,
        no torch, no download code."""
        t0 = time.monotonic()
        hit = self._warm(source, dtype_name(dtype), verify)
        if hit is not None:
            log.info("store: ready %s (%s check in %.2f s, no network)", hit, verify, time.monotonic() - t0)
        return hit

    def ensure(
        self,
        source: Source,
        dtype: Any = None,
        *,
        verify: Verify = "cheap",
        refresh: bool = False,
        policy: DownloadPolicy | None = None,
    ) -> Path:
        torch_dtype, dtype_name = dtype_key(dtype)
        t0 = time.monotonic()
        if not refresh:
            hit = self.warm(source, dtype, verify)
            if hit is not None:
                return hit
        self._ensure_writable()
        from .lock import BuildLock  # the cold path only: a warm start never imports filelock

        with BuildLock(self.lock_path(source, dtype_name), source.display, self.config.lock_timeout_s) as lock:
            if not refresh:  # another runner may have published while we waited for the lock
                hit = self._warm(source, dtype_name, verify, report=False)  # said once already
                if hit is not None:
                    log.info("store: ready %s (built by another runner; waited %.1f s)", hit, lock.waited_s)
                    return hit
            prepared = self._prepare(source, policy, refresh)
            try:
                entry = self.entry(source, prepared.identity, dtype_name)
                problem = self.check(entry, verify)
                if problem is None:
                    self.write_ref(source, prepared.identity)
                    log.info("store: ready %s (%s check)", entry.path, verify)
                    return entry.path
                if problem != "missing":
                    self.quarantine(entry.path, problem)
                self.cleanup_stale()
                path = self.build(prepared, source, entry, torch_dtype)
                self.write_ref(source, prepared.identity)
                log.info("store: %s ready in %.2f s", path, time.monotonic() - t0)
                return path
            finally:
                _remove_scratch(prepared)

    def convert_to(self, source: Source, dst: Path, dtype: Any = None, refresh: bool = False) -> Path:
        """Convert ``source`` into a new directory ``dst`` (outside the store)."""
        torch_dtype, dtype_name = dtype_key(dtype)
        if dst.exists() and any(dst.iterdir()):
            if self._converted_into(dst, source, dtype_name):
                log.info("convert: %s is already a verified conversion of %s", dst, source.display)
                return dst.resolve()
            raise ConversionError(f"{dst}: already exists and is not empty; remove it or choose another destination")
        self._ensure_writable()
        prepared = self._prepare(source, None, refresh)
        try:
            entry = self.entry(source, prepared.identity, dtype_name)
            return self.build(prepared, source, Entry(entry.key, entry.digest, dst.resolve()), torch_dtype)
        finally:
            _remove_scratch(prepared)

    def _converted_into(self, dst: Path, source: Source, dtype_name: str) -> bool:
        """Whether ``dst`` holds a conversion of ``source`` as it is now (same store key, found
        offline) that verifies in full."""
        identity = source.offline_identity(self)
        if identity is None:
            return False
        try:
            recorded = read_manifest(dst).get("source")
            if not isinstance(recorded, dict) or recorded.get("store_key") != self.entry(source, identity, dtype_name).digest:
                return False
            verify_converted(dst, full=True)
        except VerificationError:
            return False
        return True

    def _warm(self, source: Source, dtype_name: str, verify: Verify, report: bool = True) -> Path | None:
        identity = source.offline_identity(self)
        if identity is None:
            return None
        entry = self.entry(source, identity, dtype_name)
        problem = self.check(entry, verify)
        if problem is None:
            return entry.path
        if problem != "missing" and report:
            log.warning("store: %s failed verification, rebuilding it: %s", entry.path, problem)
        return None

    def _ensure_writable(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store at {self.dir}: {exc.strerror or exc} (set APP_DATA_ROOT to a writable directory)"
            ) from exc
        if not os.access(self.dir, os.W_OK):
            raise StoreError(f"the store at {self.dir} is not writable (set APP_DATA_ROOT to a writable directory)")

    # -- checks ----------------------------------------------------------------------------------

    def check(self, entry: Entry, verify: Verify = "cheap") -> str | None:
        """None when ``entry`` is complete and intact, ``"missing"``, or what is wrong with it.

        A problem is checked again when this host was looking at an out-of-date ``entry.path``
        (:func:`_current_inode`): what another host has just published is judged, never the
        directory it replaced, which a rename by name (quarantine) would then take for it.
        """
        seen = _inode(entry.path)
        problem = self._check(entry, verify)
        if problem is not None and _current_inode(entry.path) != seen:
            problem = self._check(entry, verify)
        return problem

    def _check(self, entry: Entry, verify: Verify) -> str | None:
        if not entry.path.exists():
            return "missing"
        try:
            if verify == "full":
                verify_converted(entry.path, full=True)
            recorded = check_warm(entry.path).get("source")
        except VerificationError as exc:
            return str(exc)
        if isinstance(recorded, dict) and recorded.get("store_key") not in (None, entry.digest):
            return f"{entry.path}: built for another store key ({recorded.get('store_key')!r})"
        return None

    def quarantine(self, path: Path, reason: str) -> None:
        """Move a bad entry aside (one atomic rename, so no reader ever sees half of it), then delete it."""
        trash = temp_path(path, "trash")
        log.warning("store: moving aside %s: %s", path, reason)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return  # someone else moved it already
        except OSError as exc:
            raise StoreError(
                f"{path} failed verification ({reason}) and cannot be moved aside ({exc.strerror or exc}); "
                "remove it by hand"
            ) from exc
        with contextlib.suppress(OSError):  # the rename happened; durability of a deletion is best effort
            fsync_dir(path.parent)
        remove_tree(trash)

    def cleanup_stale(self, stale_after_s: float | None = None) -> None:
        """Remove leftovers of dead builders (their ``tmp`` and ``work`` directories) and moved-aside
        entries (``trash``), as conversion.durable names them.

        A builder's directory is stale when its owner (host and pid are in its name) is a dead
        process on this machine, or when nothing in it changed for ``stale_after_s`` (builders on
        other machines sharing the volume; default ``$APP_STORE_STALE_AFTER_S``, 2 h).
        """
        if stale_after_s is None:
            stale_after_s = self.config.stale_after_s
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return
        for e in entries:
            temp = parse_temp_name(e.name)
            legacy = temp is None and _LEGACY_LEFTOVER.match(e.name)
            if temp is None and not legacy:
                continue
            if (temp is not None and temp.purpose == "trash") or (legacy and e.name.startswith(".trash-")):
                remove_tree(e.path)
                continue
            # A symlink is never a build in progress (builders make directories): its own mtime decides.
            try:
                mtime = os.lstat(e.path).st_mtime if e.is_symlink() else _newest_mtime(Path(e.path))
            except FileNotFoundError:  # another runner removed it meanwhile
                continue
            if (temp is not None and temp.owner_dead()) or time.time() - mtime > stale_after_s:
                log.info("store: removing leftover %s of an interrupted build", e.path)
                remove_tree(e.path)

    # -- building --------------------------------------------------------------------------------

    def build(self, prepared: Prepared, source: Source, entry: Entry, torch_dtype: Any) -> Path:
        """Convert the prepared source in a private directory, verify it, fsync it, publish it.

        The packs' digests were taken from the bytes as they were written, so the check before
        publishing reads no pack back (on a network volume that read costs as much as the copy and
        mostly checks the node's cache, not the durable copy): the listing, sizes, every pack's
        footer and the small files' sha256. Every load then checks each pack byte against its
        segment checksum, and a damaged entry is moved aside and rebuilt once.
        """
        target = entry.path
        tmp = temp_path(target)
        info = {**source.describe(), "identity": prepared.identity, "dtype": entry.key["dtype"],
                "store_key": entry.digest}
        try:
            source.convert(prepared, tmp, torch_dtype, info, self.config)
            nbytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            t1 = time.monotonic()
            try:
                verify_converted(tmp, full=False)
                check_warm(tmp)
            except VerificationError as exc:
                raise ConversionError(f"the conversion of {prepared.path} does not verify: {exc}") from exc
            fsync_tree(tmp)
            log.info("verify: %.2f GB in %.2f s (listing, sizes, pack footers, small files' sha256; fsync)",
                     nbytes / 1e9, time.monotonic() - t1)
            return self._publish(tmp, entry)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = disk_full_error(exc, f"writing {target}", self.root)  # OSError, or safetensors' SafetensorError
            if error is not None:
                raise error from exc
            raise

    def _publish(self, tmp: Path, entry: Entry) -> Path:
        target = entry.path
        for _ in range(3):
            try:
                publish_dir(tmp, target)
                log.info("publish: %s", target)
                return target
            except ConversionError:
                pass
            # Someone published first (the lock was not honoured, or this is convert_to's dst).
            if target.parent != self.dir:
                raise ConversionError(f"{target}: created by someone else during the conversion")
            problem = self.check(entry, "cheap")
            if problem is None:
                log.info("publish: %s was published by another runner first; using it", target)
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            if problem != "missing":
                self.quarantine(target, problem)
        raise StoreError(f"cannot publish {target}: it keeps reappearing in a bad state")

    def _prepare(self, source: Source, policy: DownloadPolicy | None, refresh: bool) -> Prepared:
        """The source as a local diffusers directory, fetched by the source itself."""
        from .download import DownloadPolicy

        try:
            return source.prepare(self, policy or DownloadPolicy.from_config(self.config), refresh)
        except Exception as exc:  # OSError, or SafetensorError from a single-file checkpoint's save_pretrained
            error = disk_full_error(exc, f"preparing {source.display}", self.root)
            if error is not None:
                raise error from exc
            raise


def _slug(source: Source) -> str:
    return _SLUG_UNSAFE.sub("_", source.slug()).strip("._-")[:64] or "model"


def _remove_scratch(prepared: Prepared) -> None:
    for scratch in prepared.scratch:
        shutil.rmtree(scratch, ignore_errors=True)


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


def _current_inode(path: Path, wait_s: float = 2.0) -> int | None:
    """The inode ``path`` names now, with this host's view of the name brought up to date.

    On a volume that hosts share, the kernel keeps what a name resolved to for a while (JuiceFS: 1 s
    for names and attributes): a host may still see the directory another host has just moved aside
    and replaced. Listing the parent refreshes the names it returns (FUSE's readdirplus); where it
    does not, this waits, at most ``wait_s``, until the name resolves to the inode the listing reports.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with os.scandir(path.parent) as listing:
                listed = next((e.inode() for e in listing if e.name == path.name), None)
        except OSError:
            return _inode(path)
        now = _inode(path)
        if now == listed or time.monotonic() >= deadline:
            return now
        time.sleep(0.05)


def _newest_mtime(path: Path) -> float:
    newest = 0.0
    for dirpath, _dirs, files in os.walk(path):
        for name in [".", *files]:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest
