"""A caller's https URL (a request's LoRA or input image) fetched to a file, bounded in every way.

- **Refused in-process first**: not https, no host, a host that does not resolve or resolves to a
  private, loopback or link-local address (fal's ``resolve_and_validate_host``): no child starts.
- **Fetched in a killable child** (``https_child.py``) through fal's SSRF-safe client: https on
  every hop (a redirect to http:// is refused), public addresses only, at most ``max_bytes``
  (declared or received), ``read_timeout_s`` per read.
- **An overall deadline** (``deadline_s``): a server that drips bytes slowly enough to beat every
  read timeout is stopped there. **Cancellable**: ``cancelled()`` is polled; the child is killed
  and the partial file removed at once.
- **Never retried**: a caller's URL that fails fails the request (the caller can retry); every
  failure is a :class:`CallerUrlError` (``conversion.errors``) with a short reason and a ``kind``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from ..errors import CallerUrlError, DiskFullError, FetchCancelled

_CHILD = Path(__file__).with_name("https_child.py")
_POLL_S = 0.05


@dataclass(frozen=True)
class FetchLimits:
    """How much of a caller's URL is fetched and for how long."""

    max_bytes: int
    deadline_s: float  # the whole fetch, redirects and body included
    read_timeout_s: float = 10.0  # the connection and each read


class StopWhen:
    """What ends a caller's fetch early: its deadline passing (from now), or its request cancelled."""

    def __init__(self, deadline_s: float | None, cancelled: Callable[[], bool] | None = None) -> None:
        self.deadline_s, self.cancelled = deadline_s, cancelled
        self.at = time.monotonic() + deadline_s if deadline_s is not None else None

    def check(self) -> None:
        """Raise FetchCancelled, or CallerUrlError ``deadline``, when the fetch must stop now."""
        if self.cancelled is not None and self.cancelled():
            raise FetchCancelled("the request was cancelled while its file was being fetched")
        if self.at is not None and time.monotonic() > self.at:
            raise CallerUrlError("deadline", f"not fetched within {self.deadline_s:g} s")


def check_url(url: str) -> None:
    """Refuse, before any request, a URL that is not https or whose host is not a public address."""
    from fal.toolkit.utils.ssrf import SSRFError, resolve_and_validate_host

    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise CallerUrlError("not_https", "only https:// URLs are fetched")
    try:
        port = parts.port
    except ValueError:
        raise CallerUrlError("bad_url", "the URL's port is not a number") from None
    if not parts.hostname:
        raise CallerUrlError("bad_url", "the URL has no host name")
    try:
        resolve_and_validate_host(parts.hostname, port)
    except SSRFError as exc:
        if "non-routable" in str(exc):
            raise CallerUrlError("private_host", "its host is a private, loopback or link-local address") from None
        raise CallerUrlError("no_host", "its host name does not resolve") from None
    except (UnicodeError, OSError) as exc:
        raise CallerUrlError("no_host", f"its host name cannot be resolved ({exc})") from None


def fetch_to_file(url: str, target: Path, limits: FetchLimits,
                  cancelled: Callable[[], bool] = lambda: False) -> int:
    """Fetch ``url`` into ``target`` (its directory must exist); the body's size in bytes.

    Raises :class:`CallerUrlError`, :class:`FetchCancelled` or :class:`DiskFullError`; on any
    failure ``target`` and the child's temporary file are gone.
    """
    stop = StopWhen(limits.deadline_s, cancelled)
    check_url(url)
    request = {"url": url, "target": os.fspath(target), "max_bytes": limits.max_bytes,
               "read_timeout_s": limits.read_timeout_s, "ssrf_module": _ssrf_module_path(),
               "parent_pid": os.getpid()}
    proc = subprocess.Popen([sys.executable, "-I", "-S", os.fspath(_CHILD)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ok = False
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(request).encode())
        proc.stdin.close()
        while proc.poll() is None:
            stop.check()
            time.sleep(_POLL_S)
        result = _result(proc.stdout.read())
        if not result.get("ok"):
            kind, message = str(result.get("kind")), str(result.get("message"))
            if kind == "disk_full":
                raise DiskFullError(f"{message}; free space on the volume")
            if kind == "too_large":
                message = f"larger than the limit of {limits.max_bytes} bytes"
            raise CallerUrlError(kind, message)
        ok = True
        return int(result["size"])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if not ok:
            remove_partials(target)


def remove_partials(target: Path) -> None:
    """Delete ``target`` and the temporary files fal's client makes beside it (``.<name>.tmp.*``)."""
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            if entry.name.startswith(f".{target.name}.tmp."):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def data_uri_payload(url: str) -> bytes:
    """The bytes a ``data:`` URI holds (base64 or percent-encoded); :class:`CallerUrlError` when it
    is malformed. It is bounded by the request body that carried it."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not url.startswith("data:") or not comma:
        raise CallerUrlError("data_uri", "not a valid data: URI (no comma before the data)")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise CallerUrlError("data_uri", "a data: URI whose base64 data is invalid") from None
    return unquote_to_bytes(payload)


def _result(out: bytes) -> dict:
    text = out.decode("utf-8", "replace").strip()
    try:
        return json.loads(text.splitlines()[-1]) if text else {"ok": False, "kind": "crash",
                                                               "message": "the fetch process exited without a result"}
    except json.JSONDecodeError:
        return {"ok": False, "kind": "crash", "message": "the fetch process gave an unreadable result"}


def _ssrf_module_path() -> str:
    import fal.toolkit.utils.ssrf as ssrf

    return os.fspath(ssrf.__file__)
