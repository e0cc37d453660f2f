"""A single-file checkpoint on the volume in fal's ``download_model_weights`` layout
(``<root>/.fal/model_weights/<sha256 of the URL>/<file>``), reused while it is intact."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..cache_layout import fal_weights_dir
from ..checkpoint import checkpoint_problem
from ..config import ConversionConfig
from ..durable import NO_SPACE_ERRNOS
from ..errors import DownloadError, SourceError
from .policy import DownloadPolicy, redact_secrets
from .preread import preread
from .watch import dir_state, remove_stale_partials, run_child

log = logging.getLogger("conversion.download")


def fetch_url(url: str, display: str, root: Path, policy: DownloadPolicy, config: ConversionConfig) -> Path:
    """The checkpoint file behind ``url`` (``display``: its name in logs and errors, no secrets) on
    the volume ``root`` (see :func:`fetch_fal_file`), pre-read."""
    request = {"op": "url", "url": url, "display": display, "root": str(root)}
    path, _ = fetch_fal_file(url, root, request, display, policy, config)
    preread([path], policy.preread_workers, check_blobs=False)
    return path


def fetch_fal_file(url: str, root: Path, request: dict[str, Any], display: str, policy: DownloadPolicy,
                   config: ConversionConfig) -> tuple[Path, bool]:
    """The intact file of ``url`` in fal's layout, and whether it was already there.

    A cached file is used without a request; one that is visibly damaged (truncated: its
    safetensors header or zip directory says so) is deleted and downloaded again, in the watched
    child with ``request``; fal's downloader keeps no checksum to check it against. A damaged
    download is deleted and a DownloadError.
    """
    weights_dir = fal_weights_dir(root, url)
    existing = _existing_weights(weights_dir)
    if existing is not None:
        problem = checkpoint_problem(existing)
        if problem is None:
            log.info("cache: %s found at %s (no network)", display, existing)
            return existing, True
        log.warning("cache: %s is damaged (%s); downloading it again", existing, problem)
        existing.unlink(missing_ok=True)
    result = run_child(
        request,
        probe=lambda: dir_state(weights_dir),
        cleanup=lambda: remove_stale_partials(weights_dir, policy),
        what=f"download {display}",
        policy=policy,
        config=config,
    )
    path = Path(result["path"])
    problem = checkpoint_problem(path)
    if problem is not None:
        path.unlink(missing_ok=True)
        raise SourceError(f"{display}: the downloaded file is not a valid checkpoint ({problem})")
    return path, False


# fal's own files beside a download: download_file's temporary file (mkstemp's prefix), the one fal's
# SSRF-safe client writes beside that (".<target name>.tmp."), and download_model_weights' marker.
_FAL_TEMP_PREFIXES = (".fal_download.tmp.", "..fal_download.tmp.")
_FAL_MARKER = ".fal_used"


def _existing_weights(weights_dir: Path) -> Path | None:
    """The file a download left in ``weights_dir``, whatever the server named it (even ``.fal...``);
    fal's own temporary files and marker are not it."""
    try:
        names = sorted(p for p in weights_dir.iterdir()
                       if p.name != _FAL_MARKER and not p.name.startswith(_FAL_TEMP_PREFIXES) and p.is_file())
    except FileNotFoundError:
        return None
    return names[0] if names else None


def download_url(url: str, display: str, root: Path, config: ConversionConfig) -> Path:
    """Download in this process (the child): ``download_model_weights`` where the volume is fal's
    own ``/data``; elsewhere fal's ``download_file`` into the same layout under ``root`` (fal's
    paths are module constants; they are never rewritten)."""
    from fal.toolkit.utils import download_utils

    headers = None
    host = (url.split("/")[2] if "://" in url else "").lower()
    if config.hf_token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
        headers = {"Authorization": f"Bearer {config.hf_token}"}
    target = fal_weights_dir(root, url)
    try:
        if target.parent == Path(download_utils.FAL_MODEL_WEIGHTS_DIR):
            return Path(download_utils.download_model_weights(url, request_headers=headers))
        return Path(download_utils.download_file(url, target_dir=target, request_headers=headers))
    except download_utils.DownloadError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in NO_SPACE_ERRNOS:
            raise cause from None
        raise DownloadError(f"{display}: {redact_secrets(str(exc), config)}") from None
