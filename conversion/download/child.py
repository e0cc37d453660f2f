"""The download child's side: ``python -m conversion.download.child``, started and watched by
:func:`conversion.download.watch.run_child`. It reads one request (JSON on stdin), runs the Hub,
URL or LoRA download it names, and answers with one JSON line on stdout: the result, or the failure
classified (auth, source, disk full, network, offline) and without the token. It dies with its
parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
from pathlib import Path

from ..config import ConversionConfig
from ..durable import NO_SPACE_ERRNOS
from ..errors import AuthError, ConversionError, DiskFullError, SourceError, TooLargeError
from .policy import redact_secrets


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
    op = request["op"]
    if op in ("url", "lora-url"):
        import fal.toolkit.utils.download_utils  # noqa: F401
    from huggingface_hub import HfApi, snapshot_download  # noqa: F401

    from .hub import HubFiles, hub_snapshot
    from .lora import LoraLocation, download_url_lora, hub_lora_file
    from .url import download_url

    report = PhaseReporter(request.get("status_path"))
    report("started")
    config = ConversionConfig.from_env()  # this process's entry point: its token (HF_TOKEN), read once
    # What errors name: (its display name, the repo or URL, the revision).
    if op == "hub":
        files = HubFiles(**request["files"])
        names = (files.display, files.ref, files.revision)
    elif op in ("hub-lora", "lora-url"):
        lora = LoraLocation(**request["lora"])
        names = (lora.display, lora.repo or lora.url or "", lora.revision)
    elif op == "url":
        names = (request["display"], request["url"], None)
    else:
        raise ValueError(f"unknown download op {op!r}")
    try:
        if op == "hub":
            snap = hub_snapshot(files, Path(request["cache_dir"]), token=config.hf_token, commit=request.get("commit"),
                                max_workers=int(request.get("max_workers", 32)),
                                weights=bool(request.get("weights", True)),
                                refresh=bool(request.get("refresh", False)), on_phase=report)
            result = {"ok": True, "path": str(snap.path), "identity": snap.identity,
                      "files": list(snap.files), "root": str(snap.root)}
        elif op == "hub-lora":
            result = {"ok": True, **hub_lora_file(lora, Path(request["cache_dir"]), request.get("max_mb"),
                                                  config.hf_token, report)}
        elif op == "lora-url":
            result = {"ok": True, "path": str(download_url_lora(lora, Path(request["root"]), request.get("max_mb"),
                                                                config))}
        else:
            result = {"ok": True, "path": str(download_url(request["url"], request["display"], Path(request["root"]),
                                                           config))}
    except BaseException as exc:  # every failure is reported, classified, without the token
        kind, message = classify_error(exc, *names, config)
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


def classify_error(exc: BaseException, display: str, repo: str, revision: str | None,
                   config: ConversionConfig) -> tuple[str, str]:
    """(kind, message) for a download failure of ``display`` (``repo``: the repo, repo file or URL
    it names; ``revision``: the one asked for): what went wrong and what to do, no token."""
    from huggingface_hub import errors as hf

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
        return "source", f"revision {revision or 'main'!r} does not exist in repo {repo}"
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
            f"no space left while downloading {display} ({exc.strerror}); free space on the volume and retry"
        )
    if isinstance(exc, hf.OfflineModeIsEnabled) or (isinstance(exc, hf.LocalEntryNotFoundError)
                                                    and "HF_HUB_OFFLINE" in str(exc)):
        return "offline", f"{display} is not in the cache and HF_HUB_OFFLINE is set: unset it to download"
    if isinstance(exc, hf.HfHubHTTPError):
        return "network", f"the Hub answered HTTP {status} for {display}: {_first_line(exc)}"
    if isinstance(exc, (hf.LocalEntryNotFoundError, ConnectionError, TimeoutError, OSError)) or \
            type(exc).__module__.startswith("httpx"):
        return "network", f"cannot download {display}: {_first_line(exc)}"
    return "crash", f"downloading {display} failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


if __name__ == "__main__":
    raise SystemExit(_child_main())
