"""Network downloads in a watched child process: ``python -m conversion.download.child``.

The parent sends one request (JSON on stdin) and watches the bytes on disk; when they stop
growing for ``stall_timeout_s`` the child is killed and started again (the Hub cache and fal's
downloader keep whole files, so a restart resumes at the first missing file), up to
``attempts`` times. The child answers with one JSON line on stdout, failures classified
(auth, source, disk full, network, offline) and without the token.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_loader.rates import rate_text

from ..config import ConversionConfig
from ..durable import NO_SPACE_ERRNOS
from ..errors import (
    AuthError,
    ConversionError,
    DiskFullError,
    DownloadError,
    DownloadStalledError,
    SourceError,
    TooLargeError,
)
from ..sources.base import Source
from .caller_url import StopWhen
from .policy import DownloadPolicy, redact_secrets, xet_environment

log = logging.getLogger("conversion.download")

_STARTUP_S = 60.0  # the child's interpreter start and imports, before the stall clock runs
_REPO_ROOT = Path(__file__).resolve().parents[2]
_ERROR_KINDS: dict[str, type[ConversionError]] = {"auth": AuthError, "source": SourceError, "disk_full": DiskFullError,
                                                  "too_large": TooLargeError}

Probe = Callable[[], tuple[int, int]]


def run_child(request: dict[str, Any], probe: Probe, cleanup: Callable[[], None], what: str,
              policy: DownloadPolicy, deadline_s: float | None = None,
              cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run one download in a child, restarting it when its bytes on disk stop growing.

    ``deadline_s``: the whole download, attempts included (a caller's fetch: CallerUrlError
    ``deadline``); ``cancelled``: polled, FetchCancelled once it is true. Either kills the child.
    """
    from tqdm.auto import tqdm

    stop = StopWhen(deadline_s, cancelled)

    config = ConversionConfig.from_env()
    env = xet_environment(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the parent draws one bar for all files
    request = {**request, "parent_pid": os.getpid()}
    cleanup()  # partial files of runners killed earlier
    start_bytes = probe()[0]
    t0 = time.monotonic()
    bar = tqdm(desc=what, unit="B", unit_scale=True, disable=not config.show_progress,
               mininterval=1.0 if sys.stderr.isatty() else 15.0)  # a log line every 15 s on fal
    try:
        for attempt in range(1, policy.attempts + 1):
            outcome = _watch_once(request, env, probe, policy, bar, stop)
            if outcome is None:  # stalled and killed
                cleanup()
                if attempt < policy.attempts:
                    log.warning("%s: no progress for %g s, restarting (attempt %d of %d)",
                                what, policy.stall_timeout_s, attempt + 1, policy.attempts)
                continue
            if outcome.get("ok"):
                bar.close()
                done = max(probe()[0] - start_bytes, 0)
                log.info("download: %s (%s)", rate_text(done, time.monotonic() - t0), what.removeprefix("download "))
                return outcome
            kind, message = outcome.get("kind"), redact_secrets(str(outcome.get("message")), config)
            error = _ERROR_KINDS.get(kind or "", DownloadError)(message)
            if kind == "network" and attempt < policy.attempts:
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


def _watch_once(request: dict, env: dict[str, str], probe: Probe, policy: DownloadPolicy, bar: Any,
                stop: StopWhen) -> dict | None:
    """One child run: its result, or None when it was killed for making no progress.

    The stall clock starts when the child says it has started (after its imports), so a slow
    interpreter start is not mistaken for a stalled download; the child also reports each
    metadata step once, and new bytes on disk count as progress.
    """
    fd, status = tempfile.mkstemp(prefix="fetch-", suffix=".status")
    os.close(fd)
    os.unlink(status)
    proc = subprocess.Popen([sys.executable, "-m", "conversion.download.child"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, cwd=str(_REPO_ROOT))
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({**request, "status_path": status}).encode())
        proc.stdin.close()
        last, last_change, steps = probe(), time.monotonic(), 0
        while proc.poll() is None:
            time.sleep(policy.poll_s)
            stop.check()
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


def dir_state(directory: Path) -> tuple[int, int]:
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


def remove_stale_partials(directory: Path, policy: DownloadPolicy) -> None:
    """Delete partial files of killed downloads: ``*.incomplete`` (Hub), ``.fal_download.tmp*`` and
    its client's ``..fal_download.tmp*`` (fal) untouched for longer than the stall timeout (a live
    download keeps writing to its own)."""
    cutoff = time.time() - policy.stall_timeout_s
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if not (entry.name.endswith(".incomplete") or entry.name.startswith((".fal_download.tmp", "..fal_download.tmp"))):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)


# ---------------------------------------------------------------------------------------------
# The child's side


class PhaseReporter:
    """Tells the watching parent that the child got past a step (once per step, not a heartbeat)."""

    def __init__(self, status_path: str | None) -> None:
        self.status_path = status_path

    def __call__(self, name: str) -> None:
        if self.status_path:
            with open(self.status_path, "a") as f:
                f.write(name + "\n")


def _child_main() -> int:
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints (fal's download_file) go to stderr; stdout carries the result
    request = json.loads(sys.stdin.read())
    _die_with_parent(request.get("parent_pid"))
    # the slow imports, before the stall clock starts
    if request.get("op") in ("url", "lora-url"):
        import fal.toolkit.utils.download_utils  # noqa: F401
    from huggingface_hub import HfApi, snapshot_download  # noqa: F401

    from ..sources import HubCheckerSource, HubConfigSource, HubFileSource, HubSource, UrlSource
    from ..sources.lora import HubLora, UrlLora
    from .hub import hub_snapshot
    from .lora import download_url_lora, hub_lora_file
    from .url import download_url

    report = PhaseReporter(request.get("status_path"))
    report("started")
    kinds: dict[str, type] = {
        cls.kind: cls
        for cls in (HubSource, HubCheckerSource, HubConfigSource, HubFileSource, UrlSource, HubLora, UrlLora)}
    source = kinds[request.get("kind", request["op"])](**request["source"])
    config = ConversionConfig.from_env()
    try:
        if request["op"] == "hub":
            snap = hub_snapshot(source, Path(request["cache_dir"]), commit=request.get("commit"),  # type: ignore[arg-type]
                                max_workers=int(request.get("max_workers", 32)),
                                weights=bool(request.get("weights", True)),
                                refresh=bool(request.get("refresh", False)), on_phase=report, config=config)
            result = {"ok": True, "path": str(snap.path), "identity": snap.identity,
                      "files": list(snap.files), "root": str(snap.root)}
        elif request["op"] == "hub-lora":
            result = {"ok": True, **hub_lora_file(source, Path(request["cache_dir"]), request.get("max_mb"),  # type: ignore[arg-type]
                                                  config.hf_token, report)}
        elif request["op"] == "lora-url":
            result = {"ok": True, "path": str(download_url_lora(source, Path(request["root"]),  # type: ignore[arg-type]
                                                                request.get("max_mb"), config))}
        else:
            result = {"ok": True, "path": str(download_url(source, Path(request["root"]), config))}  # type: ignore[arg-type]
    except BaseException as exc:  # every failure is reported, classified, without the token
        kind, message = classify_error(exc, source, config)
        result = {"ok": False, "kind": kind, "message": redact_secrets(message, config)}
    result_out.write(json.dumps(result) + "\n")
    result_out.flush()
    return 0


def _die_with_parent(parent_pid: int | None) -> None:
    """Get SIGKILL when the parent dies (a killed runner must not leave a download running)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no parent-death signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def classify_error(exc: BaseException, source: Source, config: ConversionConfig) -> tuple[str, str]:
    """(kind, message) for a download failure: what went wrong and what to do, no token."""
    from huggingface_hub import errors as hf

    repo = source.ref
    has_token = bool(config.hf_token)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, ConversionError):
        kind = {AuthError: "auth", SourceError: "source", DiskFullError: "disk_full",
                TooLargeError: "too_large"}.get(type(exc), "network")
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
    if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
        return "disk_full", (
            f"no space left while downloading {source.display} ({exc.strerror}); free space on the volume and retry"
        )
    if isinstance(exc, hf.OfflineModeIsEnabled) or (isinstance(exc, hf.LocalEntryNotFoundError)
                                                    and "HF_HUB_OFFLINE" in str(exc)):
        return "offline", f"{source.display} is not in the cache and HF_HUB_OFFLINE is set: unset it to download"
    if isinstance(exc, hf.HfHubHTTPError):
        return "network", f"the Hub answered HTTP {status} for {source.display}: {_first_line(exc)}"
    if isinstance(exc, (hf.LocalEntryNotFoundError, ConnectionError, TimeoutError, OSError)) or \
            type(exc).__module__.startswith("httpx"):
        return "network", f"cannot download {source.display}: {_first_line(exc)}"
    return "crash", f"downloading {source.display} failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


if __name__ == "__main__":
    raise SystemExit(_child_main())
