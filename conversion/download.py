"""Weights onto the persistent volume: Hub snapshots and single-file URLs, restarted when stalled.

Network downloads run in a child process (``python -m conversion.download``) watched by the
caller: when the bytes on disk stop growing for ``stall_timeout_s`` the child is killed and
started again (the Hub cache and fal's downloader keep whole files, so a restart resumes at the
first missing file), up to ``attempts`` times. A child is the only way to stop a download stuck
in a socket read or in hf_xet (xet-core #850) and it lets the hf_xet settings be set before
hf_xet starts. Lookups in the local cache need no network and run in-process.

After a download the files are read once in parallel (fal's "sequential vs parallel reading":
it fills the page cache and pulls network-volume blocks concurrently) and Hub blobs are checked
against the checksum they are named after, so a corrupted cache is never converted.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model_loader.bounded_json import loads_bounded

from .errors import (
    AuthError,
    ConversionError,
    DiskFullError,
    DownloadError,
    DownloadStalledError,
    SourceError,
)
from .sources import Source, is_commit, read_model_index, select_files, url_hash

log = logging.getLogger("conversion.download")

_NO_SPACE_ERRNOS = (28, 122, 27)  # ENOSPC, EDQUOT, EFBIG
_READ_CHUNK = 8 << 20
_HIGH_PERFORMANCE_MIN_RAM = 64 * 1024**3
_STARTUP_S = 60.0  # the child's interpreter start and imports, before the stall clock runs
_REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class DownloadPolicy:
    """How downloads are run and restarted; every field has an environment override."""

    stall_timeout_s: float = 180.0  # no new bytes for this long -> restart (APP_DOWNLOAD_STALL_TIMEOUT_S)
    attempts: int = 3  # tries before giving up (APP_DOWNLOAD_ATTEMPTS)
    max_workers: int = 32  # parallel file downloads, as fal's docs suggest (APP_DOWNLOAD_WORKERS)
    poll_s: float = 0.5  # how often progress is sampled
    preread_workers: int = 16  # threads for the parallel pre-read (APP_PREREAD_WORKERS)

    @classmethod
    def from_env(cls, **overrides: Any) -> DownloadPolicy:
        env = {
            "stall_timeout_s": ("APP_DOWNLOAD_STALL_TIMEOUT_S", float),
            "attempts": ("APP_DOWNLOAD_ATTEMPTS", int),
            "max_workers": ("APP_DOWNLOAD_WORKERS", int),
            "preread_workers": ("APP_PREREAD_WORKERS", int),
        }
        values: dict[str, Any] = {}
        for field, (var, cast) in env.items():
            raw = os.environ.get(var)
            if raw:
                try:
                    values[field] = cast(raw)
                except ValueError:
                    raise ConversionError(f"environment variable {var}={raw!r} is not a number") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        policy = cls(**values)
        if policy.stall_timeout_s <= 0 or policy.attempts < 1 or policy.max_workers < 1:
            raise ConversionError(f"invalid download settings: {policy}")
        return policy


def xet_environment(env: dict[str, str], total_ram: int | None = None) -> dict[str, str]:
    """Set fal's hf_xet tuning in ``env`` (a child's environment: hf_xet reads it at start).

    Explicit user settings win. ``HF_XET_HIGH_PERFORMANCE`` only where the host has >= 64 GB of
    RAM (it raises xet's buffers toward 64 GB). With hf_xet 1.8, ``HF_XET_CHUNK_CACHE_SIZE_BYTES``
    sizes a chunk cache that downloads no longer read by default, and
    ``HF_XET_NUM_CONCURRENT_RANGE_GETS`` is no longer read at all (adaptive concurrency replaced
    it in hf_xet 1.3); both are set because fal's docs recommend them and they are harmless.
    """
    ram = total_ram if total_ram is not None else usable_memory_bytes()
    if ram >= _HIGH_PERFORMANCE_MIN_RAM:
        env.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
    env.setdefault("HF_XET_CHUNK_CACHE_SIZE_BYTES", "1000000000000")
    env.setdefault("HF_XET_NUM_CONCURRENT_RANGE_GETS", "32")
    return env


def usable_memory_bytes() -> int:
    """Physical RAM, capped by the cgroup (container) limit when there is one."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            ram = min(ram, int(raw)) if ram else int(raw)
    return ram


def hub_cache_dir(root: Path) -> Path:
    """The Hugging Face cache on the persistent volume (fal sets HF_HOME=/data/.cache/huggingface)."""
    explicit = os.environ.get("HF_HUB_CACHE")
    return Path(explicit) if explicit else root / ".cache" / "huggingface" / "hub"


def fal_weights_dir(root: Path, url: str) -> Path:
    """Where fal's download_model_weights keeps ``url`` (its layout, rooted at ``root``)."""
    return root / ".fal" / "model_weights" / url_hash(url)


def redact_secrets(text: str) -> str:
    """``text`` with the Hugging Face token (if any) replaced by ``***``."""
    token = os.environ.get("HF_TOKEN") or ""
    if len(token) >= 4:
        text = text.replace(token, "***")
    return text


def _progress_disabled() -> bool:
    return os.environ.get("APP_PROGRESS", "1") == "0" or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Snapshot:
    """A complete local copy of the files a pipeline needs."""

    path: Path  # the pipeline directory (the snapshot, or its subfolder)
    identity: str  # the commit hash (hub) or the URL's sha256 (url)
    files: tuple[str, ...]  # paths relative to the snapshot root that were selected
    root: Path  # the snapshot root


# ---------------------------------------------------------------------------------------------
# Hub


def hub_snapshot(
    source: Source,
    cache_dir: Path,
    commit: str | None = None,
    local_only: bool = False,
    max_workers: int = 32,
    weights: bool = True,
    refresh: bool = False,
) -> Snapshot:
    """The pipeline files of a Hub repo from the cache, downloading what is missing.

    With ``local_files_only=True`` first (no network; fal's "speed up model files check"); the
    Hub only on ``LocalEntryNotFoundError`` and only when ``local_only`` is False. A known
    ``commit`` (from the store's ref file) is fetched as is, even if the branch has moved since.
    ``weights=False`` fetches the configs and tokenizers only; ``refresh`` resolves a branch on
    the Hub even when the cache knows a commit for it.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    rev = source.revision or "main"
    if commit is None and (is_commit(rev) or not refresh):
        commit = rev if is_commit(rev) else _cached_hf_ref(cache_dir, source.ref, rev)
    if commit is not None:
        try:
            return _local_snapshot(source, cache_dir, commit, weights)
        except LocalEntryNotFoundError:
            if local_only:
                raise
    elif local_only:
        raise LocalEntryNotFoundError(f"{source.display}: no cached commit for revision {rev!r}")
    return _download_snapshot(source, cache_dir, max_workers, commit, weights)


def _cached_hf_ref(cache_dir: Path, repo: str, rev: str) -> str | None:
    ref = cache_dir / _repo_folder(repo) / "refs" / rev
    try:
        value = ref.read_text().strip()
    except OSError:
        return None
    return value if is_commit(value) else None


def _repo_folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


def _escape(paths: Iterable[str]) -> list[str]:
    return [glob.escape(p) for p in paths]


def _local_snapshot(source: Source, cache_dir: Path, commit: str, weights: bool) -> Snapshot:
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError

    prefix = f"{source.subfolder}/" if source.subfolder else ""
    snap = cache_dir / _repo_folder(source.ref) / "snapshots" / commit
    index = snap / f"{prefix}model_index.json"
    if not index.is_file():
        raise LocalEntryNotFoundError(f"{index} is not cached")
    try:
        tree = get_cached_repo_tree(source.ref, revision=commit, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError as exc:
        raise LocalEntryNotFoundError(str(exc)) from exc
    files = select_files([f.path for f in tree], read_model_index(index), source.variant, source.subfolder, weights)
    path = snapshot_download(
        source.ref,
        revision=commit,
        cache_dir=cache_dir,
        allow_patterns=_escape(files),
        local_files_only=True,
    )
    return _snapshot(Path(path), commit, files, source)


def _snapshot(root: Path, identity: str, files: Sequence[str], source: Source) -> Snapshot:
    path = root / source.subfolder if source.subfolder else root
    return Snapshot(path=path, identity=identity, files=tuple(files), root=root)


def _download_snapshot(
    source: Source, cache_dir: Path, max_workers: int, commit: str | None, weights: bool
) -> Snapshot:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    token = os.environ.get("HF_TOKEN") or None
    rev = commit or source.revision or "main"
    info = HfApi(token=token).model_info(source.ref, revision=rev)
    _phase("resolved")
    commit = info.sha
    if not commit or not is_commit(commit):
        raise DownloadError(f"{source.display}: the Hub returned no commit for revision {rev!r}")
    prefix = f"{source.subfolder}/" if source.subfolder else ""
    repo_files = [s.rfilename for s in info.siblings or []]
    if f"{prefix}model_index.json" not in repo_files:
        raise SourceError(
            f"repo {source.ref} has no {prefix}model_index.json: it is not a diffusers pipeline "
            "(for a single-file checkpoint give the https:// URL of the file)"
        )
    index = hf_hub_download(
        source.ref, f"{prefix}model_index.json", revision=commit, cache_dir=cache_dir, token=token
    )
    _phase("listed")
    files = select_files(repo_files, read_model_index(index), source.variant, source.subfolder, weights)
    path = snapshot_download(
        source.ref,
        revision=commit,
        cache_dir=cache_dir,
        allow_patterns=_escape(files),
        max_workers=max_workers,
        token=token,
    )
    return _snapshot(Path(path), commit, files, source)


def fetch_hub(
    source: Source,
    root: Path,
    commit: str | None,
    policy: DownloadPolicy,
    weights: bool = True,
    refresh: bool = False,
) -> Snapshot:
    """The pipeline files of ``source`` on the volume, verified; downloads only when needed."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = hub_cache_dir(root)
    for round_ in (1, 2):
        try:
            if refresh and commit is None:
                raise LocalEntryNotFoundError("refresh: resolve the revision on the Hub")
            snap = hub_snapshot(source, cache_dir, commit=commit, local_only=True, weights=weights)
            log.info("cache: %s @ %s found in %s (no network)", source.display, snap.identity[:12], cache_dir)
        except LocalEntryNotFoundError:
            result = _run_child(
                {"op": "hub", "source": asdict(source), "cache_dir": str(cache_dir), "commit": commit,
                 "max_workers": policy.max_workers, "weights": weights, "refresh": refresh and commit is None},
                probe=lambda: _dir_state(cache_dir / _repo_folder(source.ref) / "blobs"),
                cleanup=lambda: _remove_stale_partials(cache_dir / _repo_folder(source.ref) / "blobs", policy),
                what=f"download {source.display}",
                policy=policy,
            )
            snap = Snapshot(Path(result["path"]), result["identity"], tuple(result["files"]), Path(result["root"]))
        bad = preread([snap.root / f for f in snap.files], policy.preread_workers, check_blobs=True)
        if not bad:
            return snap
        if round_ == 2:
            raise DownloadError(
                f"{source.display}: files still fail their checksum after a fresh download: "
                + ", ".join(str(p) for p in bad)
            )
        log.warning("cache: %d corrupt file(s) in the Hub cache, removing and downloading again: %s",
                    len(bad), ", ".join(str(p) for p in bad))
        for pointer in bad:
            _drop_cached_file(pointer)
        commit = snap.identity
    raise AssertionError("unreachable")


def _drop_cached_file(pointer: Path) -> None:
    """Remove a cached file: its blob and the snapshot link to it."""
    try:
        blob = pointer.resolve()
        if blob != pointer:
            blob.unlink(missing_ok=True)
        pointer.unlink(missing_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot remove corrupt cache file {pointer}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------------------------------
# URL (single-file checkpoints, through fal's download_model_weights)


def fetch_url(source: Source, root: Path, policy: DownloadPolicy) -> Path:
    """The checkpoint file behind ``source.ref`` on the volume (fal's model_weights layout).

    A cached file that is truncated (its safetensors header or zip directory says so) is
    deleted and downloaded again; fal's downloader keeps no checksum to check it against.
    """
    weights_dir = fal_weights_dir(root, source.ref)
    existing = _existing_weights(weights_dir)
    if existing is not None:
        problem = checkpoint_problem(existing)
        if problem is None:
            log.info("cache: %s found at %s (no network)", source.display, existing)
            preread([existing], policy.preread_workers, check_blobs=False)
            return existing
        log.warning("cache: %s is damaged (%s); downloading it again", existing, problem)
        existing.unlink(missing_ok=True)
    result = _run_child(
        {"op": "url", "source": asdict(source), "root": str(root)},
        probe=lambda: _dir_state(weights_dir),
        cleanup=lambda: _remove_stale_partials(weights_dir, policy),
        what=f"download {source.display}",
        policy=policy,
    )
    path = Path(result["path"])
    problem = checkpoint_problem(path)
    if problem is not None:
        path.unlink(missing_ok=True)
        raise DownloadError(f"{source.display}: the downloaded file is damaged ({problem}); retry later")
    preread([path], policy.preread_workers, check_blobs=False)
    return path


def checkpoint_problem(path: Path) -> str | None:
    """Why a single-file checkpoint is visibly damaged (truncated), or None.

    safetensors: the header must parse and the file must end where its last tensor ends.
    ``.ckpt`` (a zip): the central directory at the end must be there. Other formats pass.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8 and 0 < (n := int.from_bytes(head, "little")) < min(size, 100 << 20):
            first = f.read(1)
            if first == b"{":
                try:
                    header = loads_bounded(first + f.read(n - 1), max_bytes=n)
                except (ValueError, UnicodeDecodeError):
                    return "unreadable safetensors header"
                ends = [v["data_offsets"][1] for k, v in header.items()
                        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
                expected = 8 + n + max(ends, default=0)
                if size != expected:
                    return f"safetensors file is {size} bytes, its header says {expected}"
                return None
    if head.startswith(b"PK"):
        import zipfile

        return None if zipfile.is_zipfile(path) else "zip (.ckpt) file without its central directory"
    return None


def _existing_weights(weights_dir: Path) -> Path | None:
    """The file download_model_weights would return without a request (not its .fal* temp files)."""
    try:
        names = sorted(p for p in weights_dir.iterdir() if not p.name.startswith(".fal") and p.is_file())
    except FileNotFoundError:
        return None
    return names[0] if names else None


def configure_fal_paths(root: Path) -> None:
    """Point fal's download helpers (hard-coded to /data) at ``root``."""
    from fal.toolkit.utils import download_utils

    download_utils.FAL_PERSISTENT_DIR = root  # type: ignore[assignment]
    download_utils.FAL_REPOSITORY_DIR = root / ".fal" / "repos"  # type: ignore[assignment]
    download_utils.FAL_MODEL_WEIGHTS_DIR = root / ".fal" / "model_weights"  # type: ignore[assignment]


def _download_url(source: Source, root: Path) -> Path:
    from fal.toolkit.utils import download_utils

    configure_fal_paths(root)
    headers = None
    token = os.environ.get("HF_TOKEN")
    host = (source.ref.split("/")[2] if "://" in source.ref else "").lower()
    if token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
        headers = {"Authorization": f"Bearer {token}"}
    try:
        return Path(download_utils.download_model_weights(source.ref, request_headers=headers))
    except download_utils.DownloadError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE_ERRNOS:
            raise cause from None
        raise DownloadError(f"{source.display}: {redact_secrets(str(exc))}") from None


# ---------------------------------------------------------------------------------------------
# The watched child process


def _run_child(
    request: dict[str, Any],
    probe: Callable[[], tuple[int, int]],
    cleanup: Callable[[], None],
    what: str,
    policy: DownloadPolicy,
) -> dict[str, Any]:
    """Run one download in a child, restarting it when its bytes on disk stop growing."""
    from tqdm.auto import tqdm

    env = xet_environment(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the parent draws one bar for all files
    request = {**request, "parent_pid": os.getpid()}
    cleanup()  # partial files of runners killed earlier
    start_bytes = probe()[0]
    t0 = time.monotonic()
    interactive = sys.stderr.isatty()
    bar = tqdm(desc=what, unit="B", unit_scale=True, disable=_progress_disabled(),
               mininterval=1.0 if interactive else 15.0)  # a log line every 15 s on fal
    try:
        for attempt in range(1, policy.attempts + 1):
            outcome = _watch_once(request, env, probe, policy, bar)
            if outcome is None:  # stalled and killed
                cleanup()
                if attempt < policy.attempts:
                    log.warning(
                        "%s: no progress for %g s, restarting (attempt %d of %d)",
                        what, policy.stall_timeout_s, attempt + 1, policy.attempts,
                    )
                continue
            if outcome.get("ok"):
                bar.close()
                done = max(probe()[0] - start_bytes, 0)
                _log_rate(log, "download", done, time.monotonic() - t0, f" ({what.removeprefix('download ')})")
                return outcome
            error = _error_from_child(outcome)
            if isinstance(error, DownloadError) and outcome.get("kind") == "network" and attempt < policy.attempts:
                log.warning("%s: %s; retrying (attempt %d of %d)", what, error, attempt + 1, policy.attempts)
                time.sleep(min(2.0 * attempt, 10.0))
                continue
            raise error
    finally:
        bar.close()
    raise DownloadStalledError(
        f"{what}: no progress for {policy.stall_timeout_s:g} s on each of {policy.attempts} attempts; "
        "the network or the server is stalling (raise APP_DOWNLOAD_STALL_TIMEOUT_S or "
        "APP_DOWNLOAD_ATTEMPTS, or retry later)"
    )


def _watch_once(
    request: dict, env: dict[str, str], probe: Callable[[], tuple[int, int]], policy: DownloadPolicy, bar
) -> dict | None:
    """One child run: its result, or None when it was killed for making no progress.

    The stall clock starts when the child says it has started (after its imports), so a slow
    interpreter start is not mistaken for a stalled download; the child also reports each
    metadata step once, and new bytes on disk count as progress.
    """
    fd, status = tempfile.mkstemp(prefix="fetch-", suffix=".status")
    os.close(fd)
    os.unlink(status)
    proc = subprocess.Popen(
        [sys.executable, "-m", "conversion.download"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=str(_REPO_ROOT),
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({**request, "status_path": status}).encode())
        proc.stdin.close()
        last, last_change, steps = probe(), time.monotonic(), 0
        while proc.poll() is None:
            time.sleep(policy.poll_s)
            now, now_steps = probe(), _size(status)
            if now_steps != steps:
                steps, last_change = now_steps, time.monotonic()
            if now != last:
                bar.update(max(now[0] - last[0], 0))
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > (policy.stall_timeout_s if steps else max(policy.stall_timeout_s, _STARTUP_S)):
                proc.kill()
                proc.wait()
                return None
        out = proc.stdout.read().decode("utf-8", "replace").strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status)
    if not out:
        return {"ok": False, "kind": "crash",
                "message": f"the download process exited with status {proc.returncode} and no result"}
    try:
        return json.loads(out.splitlines()[-1])
    except json.JSONDecodeError:
        return {"ok": False, "kind": "crash", "message": f"unreadable result from the download process: {out[-200:]!r}"}


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _error_from_child(outcome: dict) -> ConversionError:
    kind, message = outcome.get("kind"), redact_secrets(str(outcome.get("message")))
    classes: dict[str, type[ConversionError]] = {
        "auth": AuthError, "source": SourceError, "disk_full": DiskFullError,
    }
    return classes.get(kind or "", DownloadError)(message)


def _dir_state(directory: Path) -> tuple[int, int]:
    """(total size, newest mtime in ns) of the files directly in ``directory``, partial
    downloads included: any write moves one of them, even into a preallocated file."""
    total = newest = 0
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        total += st.st_size
                        newest = max(newest, st.st_mtime_ns)
                except FileNotFoundError:
                    pass
    except FileNotFoundError:
        pass
    return total, newest


def _remove_stale_partials(directory: Path, policy: DownloadPolicy) -> None:
    """Delete partial files of killed downloads: ``*.incomplete`` (Hub) and ``.fal_download.tmp*``
    (fal) untouched for longer than the stall timeout (a live download keeps writing to its own)."""
    cutoff = time.time() - policy.stall_timeout_s
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if not (entry.name.endswith(".incomplete") or entry.name.startswith(".fal_download.tmp")):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
        except FileNotFoundError:
            pass


def _log_rate(logger: logging.Logger, phase: str, nbytes: int, seconds: float, extra: str = "") -> None:
    rate = nbytes / 1e9 / seconds if seconds > 0 else 0.0
    logger.info("%s: %.2f GB in %.2f s (%.2f GB/s)%s", phase, nbytes / 1e9, seconds, rate, extra)


# ---------------------------------------------------------------------------------------------
# Parallel pre-read


def preread(paths: Sequence[Path], workers: int = 16, check_blobs: bool = True) -> list[Path]:
    """Read every file once on ``workers`` threads; return the Hub files whose contents do not
    match the checksum their cache blob is named after (sha256 for LFS files, git's sha1 else).
    """
    t0 = time.monotonic()
    sizes = []
    for p in paths:
        try:
            sizes.append(os.path.getsize(p))
        except OSError as exc:
            raise DownloadError(f"{p}: cannot read downloaded file ({exc.strerror or exc})") from exc
    order = sorted(range(len(paths)), key=lambda i: sizes[i], reverse=True)
    n = max(1, min(workers, len(paths)))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="preread") as pool:
        results = list(pool.map(lambda i: _read_one(paths[i], check_blobs), order))
    _log_rate(log, "preread", sum(sizes), time.monotonic() - t0, f" ({len(paths)} files, {n} threads)")
    return [paths[i] for i, ok in zip(order, results, strict=True) if not ok]


def _read_one(path: Path, check_blobs: bool) -> bool:
    expected, hasher = None, None
    if check_blobs:
        blob = os.path.basename(os.path.realpath(path))
        if len(blob) == 64 and _is_hex(blob):
            expected, hasher = blob, hashlib.sha256()
        elif len(blob) == 40 and _is_hex(blob):
            expected, hasher = blob, hashlib.sha1()
            hasher.update(f"blob {os.path.getsize(path)}\0".encode())
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if hasher is not None:
                    hasher.update(view[:n])
    except OSError as exc:
        raise DownloadError(f"{path}: cannot read downloaded file ({exc.strerror or exc})") from exc
    return hasher is None or hasher.hexdigest() == expected


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


# ---------------------------------------------------------------------------------------------
# Child entry point: python -m conversion.download  (request JSON on stdin, result JSON on stdout)


def _child_main() -> int:
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints (fal's download_file) go to stderr; stdout carries the result
    request = json.loads(sys.stdin.read())
    _die_with_parent(request.get("parent_pid"))
    # the slow imports, before the stall clock starts
    if request.get("op") == "url":
        import fal.toolkit.utils.download_utils  # noqa: F401
    import huggingface_hub._snapshot_download  # noqa: F401
    import huggingface_hub.hf_api  # noqa: F401

    global _status_path
    _status_path = request.get("status_path")
    _phase("started")
    try:
        source = Source(**request["source"])
        if request["op"] == "hub":
            snap = hub_snapshot(source, Path(request["cache_dir"]), commit=request.get("commit"),
                                max_workers=int(request.get("max_workers", 32)),
                                weights=bool(request.get("weights", True)),
                                refresh=bool(request.get("refresh", False)))
            result = {"ok": True, "path": str(snap.path), "identity": snap.identity,
                      "files": list(snap.files), "root": str(snap.root)}
        elif request["op"] == "url":
            result = {"ok": True, "path": str(_download_url(source, Path(request["root"])))}
        else:
            result = {"ok": False, "kind": "crash", "message": f"unknown op {request['op']!r}"}
    except BaseException as exc:  # every failure is reported, classified, without the token
        kind, message = classify_error(exc, Source(**request["source"]))
        result = {"ok": False, "kind": kind, "message": redact_secrets(message)}
    result_out.write(json.dumps(result) + "\n")
    result_out.flush()
    return 0


_status_path: str | None = None


def _phase(name: str) -> None:
    """Tell the watching parent that the child got past a step (once per step, not a heartbeat)."""
    if _status_path:
        with open(_status_path, "a") as f:
            f.write(name + "\n")


def _die_with_parent(parent_pid: int | None) -> None:
    """Get SIGKILL when the parent dies (a killed runner must not leave a download running)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no parent-death signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def classify_error(exc: BaseException, source: Source) -> tuple[str, str]:
    """(kind, message) for a download failure: what went wrong and what to do, no token."""
    from huggingface_hub import errors as hf

    repo = source.ref
    has_token = bool(os.environ.get("HF_TOKEN"))
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, ConversionError):
        kind = {AuthError: "auth", SourceError: "source", DiskFullError: "disk_full"}.get(type(exc), "network")
        return kind, str(exc)
    if isinstance(exc, hf.GatedRepoError):
        return "auth", (
            f"repo {repo} is gated: accept its terms on https://huggingface.co/{repo} with the account "
            "whose token is in HF_TOKEN" + ("" if has_token else ", and set HF_TOKEN (fal secrets set HF_TOKEN=...)")
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return "source", f"revision {source.revision or 'main'!r} does not exist in repo {repo}"
    if isinstance(exc, hf.RepositoryNotFoundError):
        if not has_token:
            return "auth", (
                f"repo {repo} needs a Hugging Face token (it is private, gated or does not exist): "
                "set HF_TOKEN (fal secrets set HF_TOKEN=...)"
            )
        return "source", f"repo {repo} does not exist, or the token in HF_TOKEN has no access to it"
    if isinstance(exc, hf.HfHubHTTPError) and status in (401, 403):
        if has_token:
            return "auth", f"the Hugging Face token in HF_TOKEN was refused for repo {repo} (HTTP {status}): check it is valid and has read access"
        return "auth", f"repo {repo} needs a Hugging Face token: set HF_TOKEN (fal secrets set HF_TOKEN=...)"
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
        return "disk_full", (
            f"no space left while downloading {source.display} ({exc.strerror}); free space on the volume and retry"
        )
    if isinstance(exc, hf.OfflineModeIsEnabled) or (isinstance(exc, hf.LocalEntryNotFoundError)
                                                    and "HF_HUB_OFFLINE" in str(exc)):
        return "offline", f"{source.display} is not in the cache and HF_HUB_OFFLINE is set: unset it to download"
    if isinstance(exc, hf.HfHubHTTPError):
        return "network", f"the Hub answered HTTP {status} for {source.display}: {_first_line(exc)}"
    if isinstance(exc, (hf.LocalEntryNotFoundError, ConnectionError, TimeoutError)) or type(exc).__module__.startswith("httpx"):
        return "network", f"cannot download {source.display}: {_first_line(exc)}"
    if isinstance(exc, OSError):
        return "network", f"cannot download {source.display}: {_first_line(exc)}"
    return "crash", f"downloading {source.display} failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


if __name__ == "__main__":
    raise SystemExit(_child_main())
