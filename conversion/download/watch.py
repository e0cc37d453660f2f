"""Network downloads in a watched child process (``python -m conversion.download.child``), the
parent's side.

The parent sends one request (JSON on stdin: an ``op`` and plain values, the repo, revision and
files, or the URL, and the directories to write to) and watches the bytes on disk; when they stop
growing for ``stall_timeout_s`` the child is killed and started again (the Hub cache and fal's
downloader keep whole files, so a restart resumes at the first missing file), up to
``attempts`` times. The child answers with one JSON line on stdout, failures classified
(auth, source, disk full, network, offline) and without the token. The Hugging Face token
reaches the child in its environment (``HF_TOKEN``, the parent's config's token when it has one),
never in the request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_loader.rates import rate_text

from ..config import ConversionConfig
from ..errors import (
    AuthError,
    ConversionError,
    DiskFullError,
    DownloadError,
    DownloadStalledError,
    SourceError,
    TooLargeError,
)
from .caller_url import StopWhen
from .policy import DownloadPolicy, redact_secrets, xet_environment

log = logging.getLogger("conversion.download")

_STARTUP_S = 60.0  # the child's interpreter start and imports, before the stall clock runs
_REPO_ROOT = Path(__file__).resolve().parents[2]
_ERROR_KINDS: dict[str, type[ConversionError]] = {"auth": AuthError, "source": SourceError, "disk_full": DiskFullError,
                                                  "too_large": TooLargeError}

Probe = Callable[[], tuple[int, int]]


def run_child(request: dict[str, Any], probe: Probe, cleanup: Callable[[], None], what: str,
              policy: DownloadPolicy, config: ConversionConfig, deadline_s: float | None = None,
              cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run one download in a child, restarting it when its bytes on disk stop growing.

    ``config``: its progress bar and its Hugging Face token (given to the child, kept out of
    messages). ``deadline_s``: the whole download, attempts included (a caller's fetch:
    CallerUrlError ``deadline``); ``cancelled``: polled, FetchCancelled once it is true. Either
    kills the child.
    """
    from tqdm.auto import tqdm

    stop = StopWhen(deadline_s, cancelled)

    env = xet_environment(dict(os.environ))
    if config.hf_token:
        env["HF_TOKEN"] = config.hf_token
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
