"""The once-only, crash-safe store of converted pipelines on the persistent volume.

Layout under ``<root>/flashpack/`` (``<root>`` is ``/data`` on fal, ``$APP_DATA_ROOT`` elsewhere)::

    <slug>-<key16>/            a published converted directory (diffusers layout + manifest)
    .refs/<slug>-<h>.json      last resolved commit of a branch/tag (or fingerprint of a local dir)
    .locks/<slug>-<h>.lock     flock taken while a runner builds that source
    .tmp-<entry>.<host>.<pid>.<rand>/   a build in progress (private to its builder)
    .work-<entry>.<host>.<pid>.<rand>/  scratch (single-file checkpoint -> diffusers)

An entry is keyed by source, resolved commit (or URL hash, or directory fingerprint), variant,
subfolder, dtype and conversion.manifest.FORMAT_VERSION. A warm start computes the key offline
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
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from model_loader.bounded_json import load_file_bounded

from .durable import fsync_dir
from .errors import ConversionError, DiskFullError, SourceError, StoreError, is_disk_full, os_error_code
from .locking import FileLock, host_tag, pid_alive
from .manifest import FORMAT_VERSION, VerificationError, check_warm, read_manifest, verify_converted
from .sources import Source, directory_fingerprint, is_commit, parse_source, require_pipeline_dir, url_hash

if TYPE_CHECKING:
    import torch

    from .download import DownloadPolicy

log = logging.getLogger("conversion.store")

STORE_DIRNAME = "flashpack"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_REF_BYTES = 64 * 1024  # a ref file is one small JSON object
Verify = Literal["cheap", "full"]

_DTYPE_ALIASES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The persistent volume: ``root``, else ``$APP_DATA_ROOT``, else ``/data`` when it exists
    and is writable (fal), else ``<repo>/.data``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("APP_DATA_ROOT")
    if env:
        return Path(env)
    data = Path("/data")
    if data.is_dir() and os.access(data, os.W_OK):
        return data
    return _REPO_ROOT / ".data"


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
    """
    src = source if isinstance(source, Source) else parse_source(source)
    store = Store(resolve_root(root))
    return store.ensure(src, dtype, verify=verify_mode(verify), refresh=refresh, policy=policy)


def convert_source(
    src: str,
    dst: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    revision: str | None = None,
    variant: str | None = None,
    root: str | os.PathLike[str] | None = None,
    refresh: bool = False,
) -> Path:
    """``python -m conversion convert``: into the store (``dst`` None) or into a new ``dst``."""
    source = parse_source(src, revision=revision, variant=variant)
    store = Store(resolve_root(root))
    if dst is None:
        return store.ensure(source, dtype, verify=verify_mode(None), refresh=refresh)
    return store.convert_to(source, Path(dst), dtype, refresh=refresh)


def verify_mode(verify: str | None = None) -> Verify:
    """``verify``, else ``$APP_STORE_VERIFY``, else ``cheap``: how an existing entry is checked."""
    mode = verify or os.environ.get("APP_STORE_VERIFY") or "cheap"
    if mode not in ("cheap", "full"):
        raise ConversionError(f"verify must be 'cheap' or 'full', got {mode!r}")
    return mode  # type: ignore[return-value]


def dtype_name(dtype: Any) -> str:
    """The name of a dtype (``"float16"``, a torch dtype, an alias such as ``"fp16"``) in store
    keys; ``"source"`` for None (keep the source's dtypes). Torch-free: the warm lookup uses it."""
    if dtype is None:
        return "source"
    name = _DTYPE_ALIASES.get(str(dtype).removeprefix("torch.").strip().lower())
    if name is None:
        raise ConversionError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPE_ALIASES)})")
    return name


def dtype_key(dtype: Any) -> tuple[Any, str]:
    """(torch dtype or None, its name in store keys): None keeps the source's dtypes."""
    name = dtype_name(dtype)
    if name == "source":
        return None, name
    import torch

    return getattr(torch, name), name


@dataclass(frozen=True)
class Entry:
    """One store entry: its key (what it was built from) and where it lives."""

    key: dict[str, Any]
    digest: str
    path: Path


@dataclass
class Prepared:
    """A local diffusers directory ready to convert, and the scratch to remove afterwards."""

    path: Path
    identity: str
    scratch: list[Path]


class Store:
    """The store under ``<root>/flashpack``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / STORE_DIRNAME

    # -- keys ----------------------------------------------------------------------------------

    def entry(self, source: Source, identity: str, dtype_name: str) -> Entry:
        key = {
            "format_version": FORMAT_VERSION,
            "kind": source.kind,
            "ref": source.ref if source.kind != "url" else url_hash(source.ref),
            "identity": identity,
            "variant": source.variant,
            "subfolder": source.subfolder,
            "pipeline_class": source.pipeline_class,
            "config": source.config,
            "dtype": dtype_name,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return Entry(key, digest, self.dir / f"{_slug(source)}-{digest[:16]}")

    def _source_id(self, source: Source, *extra: str) -> str:
        ident = json.dumps([source.kind, source.ref, source.revision or "", source.subfolder or "", *extra])
        return f"{_slug(source)}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"

    def ref_path(self, source: Source) -> Path:
        return self.dir / ".refs" / f"{self._source_id(source)}.json"

    def lock_path(self, source: Source, dtype_name: str) -> Path:
        extra = [source.variant or "", source.pipeline_class or "", source.config or "", dtype_name, str(FORMAT_VERSION)]
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
        """Record ``identity`` for the source's revision (atomic; best effort)."""
        if source.kind == "url" or (source.kind == "hub" and is_commit(source.revision)):
            return
        if self.read_ref(source) == identity:
            return
        path = self.ref_path(source)
        body = json.dumps({"source": source.display, "revision": source.revision or "main",
                           "identity": identity, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("store: cannot record %s -> %s in %s: %s", source.display, identity[:12], path, exc)

    def offline_identity(self, source: Source) -> str | None:
        """The entry's identity when it is known without the network, else None."""
        if source.kind == "url":
            return url_hash(source.ref)
        if source.kind == "hub":
            return source.revision if is_commit(source.revision) else self.read_ref(source)
        if Path(source.ref).is_dir():
            return directory_fingerprint(_pipeline_dir(source))
        return self.read_ref(source)

    def warm(self, source: Source, dtype: Any = None, verify: Verify = "cheap") -> Path | None:
        """The checked entry for ``source`` when the store already has it, found offline; None
        when it must be built (missing, or damaged: then it is rebuilt by ``ensure``). No network,
        no torch, no download code."""
        t0 = time.monotonic()
        hit = self._warm(source, dtype_name(dtype), verify)
        if hit is not None:
            log.info("store: ready %s (%s check in %.2f s, no network)", hit, verify, time.monotonic() - t0)
        return hit

    # -- the entry point -------------------------------------------------------------------------

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
        timeout = float(os.environ.get("APP_STORE_LOCK_TIMEOUT_S", 3 * 3600))
        with FileLock(self.lock_path(source, dtype_name), source.display, timeout) as lock:
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
                info = {**source.describe(), "identity": prepared.identity, "dtype": dtype_name,
                        "store_key": entry.digest}
                path = self.build(prepared.path, entry, torch_dtype, info, source.variant)
                self.write_ref(source, prepared.identity)
                log.info("store: %s ready in %.2f s", path, time.monotonic() - t0)
                return path
            finally:
                for scratch in prepared.scratch:
                    shutil.rmtree(scratch, ignore_errors=True)

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
            info = {**source.describe(), "identity": prepared.identity, "dtype": dtype_name,
                    "store_key": entry.digest}
            return self.build(
                prepared.path, Entry(entry.key, entry.digest, dst.resolve()), torch_dtype, info, source.variant
            )
        finally:
            for scratch in prepared.scratch:
                shutil.rmtree(scratch, ignore_errors=True)

    def _converted_into(self, dst: Path, source: Source, dtype_name: str) -> bool:
        """Whether ``dst`` holds a conversion of ``source`` as it is now (same store key, found
        offline) that verifies in full."""
        identity = self.offline_identity(source)
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
        identity = self.offline_identity(source)
        if identity is None:
            return None
        entry = self.entry(source, identity, dtype_name)
        problem = self.check(entry, verify)
        if problem is None:
            if source.kind == "local" and not Path(source.ref).is_dir():
                log.warning("store: local source %s is gone; serving its last conversion", source.ref)
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
        """None when ``entry`` is complete and intact, ``"missing"``, or what is wrong with it."""
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
        trash = self.dir / f".trash-{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
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
        _fsync_dir_quietly(self.dir)
        shutil.rmtree(trash, ignore_errors=True)

    def cleanup_stale(self, stale_after_s: float | None = None) -> None:
        """Remove leftovers of dead builders (``.tmp-*``, ``.work-*``) and moved-aside entries.

        A builder's directory is stale when its owner (host and pid are in its name) is a dead
        process on this machine, or when nothing in it changed for ``stale_after_s`` (builders on
        other machines sharing the volume; default 2 h, ``$APP_STORE_STALE_AFTER_S``).
        """
        if stale_after_s is None:
            stale_after_s = float(os.environ.get("APP_STORE_STALE_AFTER_S", 2 * 3600))
        me = host_tag()
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return
        for e in entries:
            if e.name.startswith(".trash-"):
                _remove_leftover(e)
                continue
            if not e.name.startswith((".tmp-", ".work-")):
                continue
            try:
                _, host, pid, _ = e.name.rsplit(".", 3)
                owner_dead = host == me and not pid_alive(int(pid))
            except ValueError:
                owner_dead = False
            # A symlink is never a build in progress (builders make directories): its own mtime decides.
            try:
                mtime = os.lstat(e.path).st_mtime if e.is_symlink() else _newest_mtime(Path(e.path))
            except FileNotFoundError:  # another runner removed it meanwhile
                continue
            if owner_dead or time.time() - mtime > stale_after_s:
                log.info("store: removing leftover %s of an interrupted build", e.path)
                _remove_leftover(e)

    # -- building --------------------------------------------------------------------------------

    def _private_dir(self, kind: str, name: str) -> Path:
        return self.dir / f".{kind}-{name}.{host_tag()}.{os.getpid()}.{secrets.token_hex(4)}"

    def build(
        self, src_dir: Path, entry: Entry, torch_dtype: Any, info: dict[str, Any], variant: str | None = None
    ) -> Path:
        """Convert ``src_dir`` in a private directory, verify it fully, fsync it, publish it."""
        from .convert import convert_pipeline

        target = entry.path
        tmp = (self._private_dir("tmp", target.name) if target.parent == self.dir
               else target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
        try:
            convert_pipeline(src_dir, tmp, dtype=torch_dtype, source=info, variant=variant)
            nbytes = _tree_size(tmp)
            t1 = time.monotonic()
            try:
                verify_converted(tmp, full=True)
            except VerificationError as exc:
                raise ConversionError(f"the conversion of {src_dir} does not verify: {exc}") from exc
            _fsync_tree(tmp)
            _log_rate("verify", nbytes, time.monotonic() - t1, " (sha256 of every file, fsync)")
            return self._publish(tmp, entry)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc):  # an OSError, or safetensors' SafetensorError (save_pretrained)
                raise DiskFullError(
                    f"no space left writing {target} ({os.strerror(os_error_code(exc))}); free space on {self.root} and retry"
                ) from exc
            raise

    def _publish(self, tmp: Path, entry: Entry) -> Path:
        target = entry.path
        for _ in range(3):
            try:
                os.rename(tmp, target)
                fsync_dir(target.parent)
                log.info("publish: %s", target)
                return target
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
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

    # -- fetching --------------------------------------------------------------------------------

    def _prepare(self, source: Source, policy: DownloadPolicy | None, refresh: bool) -> Prepared:
        """The source as a local diffusers directory (downloaded and pre-read as needed)."""
        try:
            return self._prepare_kind(source, policy, refresh)
        except Exception as exc:  # OSError, or SafetensorError from a single-file checkpoint's save_pretrained
            if is_disk_full(exc):
                raise DiskFullError(
                    f"no space left preparing {source.display} ({os.strerror(os_error_code(exc))}); "
                    f"free space on {self.root} and retry"
                ) from exc
            raise

    def _prepare_kind(self, source: Source, policy: DownloadPolicy | None, refresh: bool) -> Prepared:
        if source.kind == "local":
            path = _pipeline_dir(source)
            from .download import DownloadPolicy, preread

            pol = policy or DownloadPolicy.from_env()
            identity = directory_fingerprint(path)
            preread([p for p in path.rglob("*") if p.is_file()], pol.preread_workers, check_blobs=False)
            return Prepared(path, identity, [])
        from .download import DownloadPolicy

        pol = policy or DownloadPolicy.from_env()
        if source.kind == "hub":
            return self._prepare_hub(source, pol, refresh)
        return self._prepare_url(source, pol)

    def _prepare_hub(self, source: Source, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from .download import fetch_hub

        commit = None if refresh else self.offline_identity(source)
        snap = fetch_hub(source, self.root, commit, policy, refresh=refresh)
        self.write_ref(source, snap.identity)  # a crash from here on resumes offline
        return Prepared(snap.path, snap.identity, [])

    def _prepare_url(self, source: Source, policy: DownloadPolicy) -> Prepared:
        from .download import fetch_hub, fetch_url

        cls = _pipeline_class(source)  # before downloading gigabytes for a typo
        checkpoint = fetch_url(source, self.root, policy)
        config = source.config
        if config and not Path(config).expanduser().is_dir():
            cfg_source = parse_source(config)
            if cfg_source.kind != "hub":
                raise SourceError(f"config {config!r} must be a local diffusers directory or a Hub repo id")
            snap = fetch_hub(cfg_source, self.root, self.offline_identity(cfg_source), policy, weights=False)
            self.write_ref(cfg_source, snap.identity)
            config = str(snap.path)
        identity = url_hash(source.ref)
        work = self._private_dir("work", self.entry(source, identity, "any").path.name)
        try:
            path = _single_file_to_diffusers(source, cls, checkpoint, config, work, self.root)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return Prepared(path, identity, [work])


# ---------------------------------------------------------------------------------------------
# Source preparation helpers


def _local_dir(source: Source) -> Path:
    path = Path(source.ref)
    return path / source.subfolder if source.subfolder else path


def _pipeline_dir(source: Source) -> Path:
    """The local source's directory, checked to be a pipeline before anything reads it."""
    return require_pipeline_dir(_local_dir(source))


def _pipeline_class(source: Source) -> type:
    import diffusers

    cls = getattr(diffusers, source.pipeline_class or "", None)
    if not isinstance(cls, type) or not hasattr(cls, "from_single_file"):
        raise SourceError(
            f"pipeline_class {source.pipeline_class!r} is not a diffusers pipeline with from_single_file "
            "(e.g. StableDiffusionPipeline, StableDiffusionXLPipeline)"
        )
    return cls


def _single_file_to_diffusers(
    source: Source, cls: type, checkpoint: Path, config: str | None, work: Path, root: Path
) -> Path:
    """Load a single-file checkpoint with diffusers' ``from_single_file`` and save it as a
    diffusers directory. With ``config`` (a local diffusers directory) nothing is fetched;
    without it diffusers fetches the matching configs from the Hub."""
    from .download import hub_cache_dir

    work.mkdir(parents=True, exist_ok=True)
    with open(checkpoint, "rb") as f:
        head = f.read(16)
    is_safetensors = len(head) >= 9 and head[8:9] == b"{"
    link = work / ("checkpoint.safetensors" if is_safetensors else "checkpoint.ckpt")
    os.symlink(os.path.realpath(checkpoint), link)
    t0 = time.monotonic()
    try:
        pipe = cls.from_single_file(
            str(link),
            config=config,
            local_files_only=config is not None,
            cache_dir=str(hub_cache_dir(root)),
        )
    except Exception as exc:  # diffusers raises many types here (SingleFileComponentError, KeyError, ...)
        raise SourceError(f"{source.display}: diffusers cannot load it as {cls.__name__}: {exc}") from exc
    out = work / "pipeline"
    pipe.save_pretrained(out, safe_serialization=True)
    del pipe
    _log_rate("single-file", os.path.getsize(checkpoint), time.monotonic() - t0, f" ({cls.__name__} -> diffusers)")
    return out


# ---------------------------------------------------------------------------------------------
# Small helpers


def _slug(source: Source) -> str:
    if source.kind == "hub":
        base = source.ref.replace("/", "--")
    elif source.kind == "url":
        tail = source.ref.split("?")[0].rstrip("/").rsplit("/", 1)[-1] if "://" in source.ref else "data"
        base = "url--" + tail.rsplit(".", 1)[0]
    else:
        base = "local--" + Path(source.ref).name
    return _SLUG_UNSAFE.sub("_", base).strip("._-")[:64] or "model"


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove_leftover(entry: os.DirEntry) -> None:
    """Delete a leftover in the store: a directory tree, or a symlink or file itself (never what a
    symlink points to; rmtree refuses symlinks)."""
    with contextlib.suppress(OSError):  # gone already, or not ours to remove: best effort, as before
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def _newest_mtime(path: Path) -> float:
    newest = 0.0
    for dirpath, _dirs, files in os.walk(path):
        for name in [".", *files]:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (the rename that publishes it comes after)."""
    for dirpath, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _fsync_dir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        fsync_dir(path)


def _log_rate(phase: str, nbytes: int, seconds: float, extra: str = "") -> None:
    rate = nbytes / 1e9 / seconds if seconds > 0 else 0.0
    log.info("%s: %.2f GB in %.2f s (%.2f GB/s)%s", phase, nbytes / 1e9, seconds, rate, extra)

