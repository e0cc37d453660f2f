"""The child that fetches one caller's https URL (run by ``caller_url.fetch_to_file``, as a script).

Stdlib only, plus fal's SSRF-safe client loaded from its file (``fal.toolkit.utils.ssrf``
imports nothing else), so the child starts in tens of milliseconds: importing ``fal`` would take
half a second and 70 MB. Reads one JSON request on stdin (``url``, ``target``, ``max_bytes``,
``read_timeout_s``, ``ssrf_module``, ``parent_pid``), writes the body to ``target`` (fal's client
writes a temporary file beside it and renames it) and answers one JSON line on stdout:
``{"ok": true, "size": n}`` or ``{"ok": false, "kind": ..., "message": ...}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import json
import os
import signal
import socket
import sys

# fal's SSRF messages (fal.toolkit.utils.ssrf) and what each means for a caller's URL.
_REFUSALS = (
    ("URL scheme", "not_https", "a URL or a redirect that is not https:// is refused"),
    ("non-routable", "private_host", "its host (or a redirect's) is a private, loopback or link-local address"),
    ("DNS resolution failed", "no_host", "its host name does not resolve"),
    ("did not resolve", "no_host", "its host name does not resolve"),
    ("Too many redirects", "redirects", "too many redirects (more than 5)"),
    ("missing Location", "redirects", "a redirect without a Location header"),
    ("exceeded", "too_large", "larger than the limit"),
    ("over the limit", "too_large", "larger than the limit"),
    ("no hostname", "bad_url", "the URL has no host name"),
    ("Invalid URL", "bad_url", "not a valid URL"),
)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def fetch(request: dict, ssrf) -> dict:
    """Run fal's ``ssrf_safe_get_to_file`` for ``request``: https on every hop, public addresses only."""
    try:
        ssrf.ssrf_safe_get_to_file(request["url"], request["target"], timeout=float(request["read_timeout_s"]),
                                   max_size=int(request["max_bytes"]), allowed_schemes=frozenset({"https"}))
    except ssrf.SSRFHTTPStatusError as exc:
        return {"ok": False, "kind": "status", "status": exc.status_code,
                "message": f"the server answered HTTP {exc.status_code}"}
    except ssrf.SSRFConnectionError as exc:
        return classify_connection(exc)
    except ssrf.SSRFError as exc:
        text = str(exc)
        for needle, kind, message in _REFUSALS:
            if needle in text:
                return {"ok": False, "kind": kind, "message": message}
        return {"ok": False, "kind": "refused", "message": text[:200]}
    except OSError as exc:
        return classify_os_error(exc)
    return {"ok": True, "size": os.path.getsize(request["target"])}


def classify_connection(exc: BaseException) -> dict:
    """A connection that failed, or closed before the body was whole (fal: "All validated addresses failed")."""
    if "less data than expected" in str(exc):
        return {"ok": False, "kind": "truncated",
                "message": "the server closed the connection before sending the whole body"}
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return classify_os_error(cause)
    if cause is not None and "less data than expected" in str(cause):
        return {"ok": False, "kind": "truncated",
                "message": "the server closed the connection before sending the whole body"}
    return {"ok": False, "kind": "connection", "message": f"the connection failed ({cause or exc})"[:200]}


def classify_os_error(exc: OSError) -> dict:
    if exc.errno in _NO_SPACE:
        return {"ok": False, "kind": "disk_full", "message": f"no space left writing it ({os.strerror(exc.errno)})"}
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return {"ok": False, "kind": "timeout", "message": "the server sent nothing within the read timeout"}
    if isinstance(exc, ConnectionRefusedError):
        return {"ok": False, "kind": "connection", "message": "the server refused the connection"}
    name = type(exc).__name__
    if name.startswith("SSL") or "CERTIFICATE" in str(exc).upper():
        return {"ok": False, "kind": "tls", "message": f"its TLS certificate or handshake failed ({str(exc)[:120]})"}
    return {"ok": False, "kind": "connection", "message": f"the connection failed ({name}: {str(exc)[:120]})"}


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("fal_ssrf", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fal_ssrf"] = module  # dataclasses looks the module up by name
    spec.loader.exec_module(module)
    return module


def main() -> int:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    request = json.loads(sys.stdin.read())
    with contextlib.suppress(OSError, AttributeError):  # SIGKILL when the parent dies: no fetch outlives it
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != request.get("parent_pid", os.getppid()):
        return 1
    result = fetch(request, load_module(request["ssrf_module"]))
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
