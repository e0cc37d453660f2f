"""A LoRA file on the volume, fetched once.

- A request's LoRA (:func:`fetch_request_lora`): an https URL or a Hub file in :class:`LoraFiles`
  (the byte-budgeted directory every runner shares), fetched under ``[lora] fetch_timeout_s`` in
  all, never retried, stopped when the request is cancelled (the child killed, the partial
  directory removed). A URL goes through ``caller_url`` (SSRF refused in-process, https on every
  hop). A ``data:`` URI is never stored: serving reads its bytes from the request.
- A LoRA fused at setup (``[[model.loras]]``, :func:`fetch_lora`): a URL in fal's
  ``download_model_weights`` layout (``<root>/.fal/model_weights/<sha256 of the URL>/<file>``), a
  Hub repo file in the Hub cache, with the model downloads' stall watch and retries.

Offline first, as for models: a file already on the volume is used without a request (a Hub file
is found through the cache's ``refs/`` and ``snapshots/``); the network is used only when it is
missing, in the watched child (``child.py``), with the size limit checked before the body is
fetched (the Hub's file metadata; fal's ``download_file(filesize_limit=...)``, which refuses a
declared size over the limit and stops a body that grows past it).

A LoRA is named by a :class:`LoraLocation` (plain values: a URL, or a repo, file and revision);
``conversion.sources.lora``'s ``UrlLora`` and ``HubLora`` give theirs with ``location()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..cache_layout import (
    cached_lora_file,
    choose_lora_file,
    fal_weights_dir,
    hub_cache_dir,
    hub_file_identity,
    repo_cache_dir,
    snapshot_dir,
    url_hash,
)
from ..config import ConversionConfig
from ..durable import NO_SPACE_ERRNOS, remove_tree, write_atomic
from ..errors import CallerUrlError, DownloadError, SourceError, TooLargeError
from .caller_url import FetchLimits, data_uri_payload, fetch_to_file
from .lora_files import LORA_FILE, LoraFile, LoraFiles
from .policy import DownloadPolicy, redact_secrets
from .preread import preread
from .url import fetch_fal_file
from .watch import dir_state, remove_stale_partials, run_child

log = logging.getLogger("conversion.download")
MB = 1024 * 1024


@dataclass(frozen=True)
class LoraLocation:
    """Where a LoRA file is, in plain values: an ``https://`` URL (or a ``data:`` URI), or a file in
    a Hugging Face repo (``filename`` None: the repo's LoRA file, as :func:`choose_lora_file` picks it)."""

    display: str  # its name in logs and errors (no secrets)
    key: str  # what it is keyed by: ``url:<sha256 of the URL>``, ``hub:org/name[@rev][/file]``
    url: str | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None  # branch, tag or commit (None = "main")

    def __post_init__(self) -> None:
        if (self.url is None) == (self.repo is None):
            raise ValueError("a LoRA location is a URL or a Hub repo file, exactly one of them")

    @property
    def is_data_uri(self) -> bool:
        """A ``data:`` URI: its bytes come with the request."""
        return self.url is not None and self.url.startswith("data:")


@dataclass(frozen=True)
class FetchedLora:
    """A LoRA file on the volume and what it was fetched as (``url:<sha256>``, ``hub:org/name@<commit>/<file>``)."""

    path: Path
    identity: str


def fetch_lora(lora: LoraLocation, root: Path, *, policy: DownloadPolicy, config: ConversionConfig,
               max_mb: int | None = None) -> FetchedLora:
    """The file of ``lora`` on the volume ``root``, downloaded only when it is not there yet.

    ``max_mb``: the largest file accepted (MiB, fal's unit); a larger one is a :class:`TooLargeError`.
    A missing repo, file or URL is a :class:`SourceError` (or :class:`AuthError`), network trouble
    a :class:`DownloadError`.
    """
    if lora.url is not None:
        return _fetch_url(lora, root, max_mb, policy, config)
    return _fetch_hub(lora, root, max_mb, policy, config)


def fetch_request_lora(lora: LoraLocation, files: LoraFiles, *, max_mb: int, deadline_s: float,
                       cancelled: Callable[[], bool], config: ConversionConfig) -> LoraFile:
    """The file of a request's LoRA (an https URL or a Hub file): its entry in ``files`` when it is there, else fetched now into a new entry (see the
    module docstring). Raises :class:`CallerUrlError` (the URL's problem, or the deadline),
    FetchCancelled, :class:`TooLargeError`, SourceError/AuthError, DownloadError or DiskFullError."""
    if lora.is_data_uri:
        raise ValueError("a data: URI LoRA is read from the request, not stored")
    key = lora.key
    found = files.lookup(key)
    if found is not None:
        return found
    limits = FetchLimits(max_bytes=max_mb * MB, deadline_s=deadline_s)
    with files.building(key) as partial:
        if lora.url is not None:
            try:
                fetch_to_file(lora.url, partial / LORA_FILE, limits, cancelled)
            except CallerUrlError as exc:
                if exc.kind == "too_large":
                    raise TooLargeError(too_large(lora.display, None, max_mb)) from None
                raise
            identity = key
        else:
            identity = _fetch_hub_into(lora, partial, limits, max_mb, cancelled, config)
        return files.publish(partial, key, identity)


def _fetch_hub_into(lora: LoraLocation, partial: Path, limits: FetchLimits, max_mb: int,
                    cancelled: Callable[[], bool], config: ConversionConfig) -> str:
    """Download a Hub LoRA file into ``partial/lora.safetensors`` (through a Hub cache inside
    ``partial``, checked against its checksum), in one attempt; its identity ``hub:org/name@<commit>/<file>``."""
    cache_dir = partial / "hub"
    policy = replace(DownloadPolicy.from_config(config), attempts=1,
                     stall_timeout_s=min(config.stall_timeout_s, limits.deadline_s))
    path, identity = _download_hub_lora(lora, cache_dir, max_mb, policy, config, cleanup=lambda: None,
                                        deadline_s=limits.deadline_s, cancelled=cancelled)
    os.replace(path.resolve(), partial / LORA_FILE)
    remove_tree(cache_dir)
    return identity


def _fetch_url(lora: LoraLocation, root: Path, max_mb: int | None, policy: DownloadPolicy,
               config: ConversionConfig) -> FetchedLora:
    assert lora.url is not None
    request = {"op": "lora-url", "lora": asdict(lora), "root": str(root), "max_mb": max_mb}
    path, cached = fetch_fal_file(lora.url, root, request, f"LoRA {lora.display}", policy, config)
    _check_size(path, max_mb, lora.display, remove=not cached)
    return FetchedLora(path, lora.key)


def _fetch_hub(lora: LoraLocation, root: Path, max_mb: int | None, policy: DownloadPolicy,
               config: ConversionConfig) -> FetchedLora:
    assert lora.repo is not None
    repo = lora.repo
    cache_dir = hub_cache_dir(root, config)
    found = cached_lora_file(cache_dir, repo, lora.revision, lora.filename)
    if found is not None:
        commit, filename = found
        path = snapshot_dir(cache_dir, repo, commit) / filename
        _check_size(path, max_mb, lora.display)
        if not preread([path], policy.preread_workers, check_blobs=True):
            log.info("cache: LoRA %s @ %s found in %s (no network)", lora.display, commit[:12], cache_dir)
            return FetchedLora(path, hub_file_identity(repo, commit, filename))
        log.warning("cache: LoRA %s is corrupt in the Hub cache; downloading it again", path)
        _drop(path)
    path, identity = _download_hub_lora(
        lora, cache_dir, max_mb, policy, config,
        cleanup=lambda: remove_stale_partials(repo_cache_dir(cache_dir, repo) / "blobs", policy))
    return FetchedLora(path, identity)


def _download_hub_lora(lora: LoraLocation, cache_dir: Path, max_mb: int | None, policy: DownloadPolicy,
                       config: ConversionConfig, cleanup: Callable[[], None], deadline_s: float | None = None,
                       cancelled: Callable[[], bool] | None = None) -> tuple[Path, str]:
    """The LoRA file of ``lora`` downloaded into the Hub cache ``cache_dir`` in the watched child,
    within ``max_mb`` and checked against its checksum (a bad file is removed); (path, identity)."""
    assert lora.repo is not None
    repo = lora.repo
    result = run_child(
        {"op": "hub-lora", "lora": asdict(lora), "cache_dir": str(cache_dir), "max_mb": max_mb},
        probe=lambda: dir_state(repo_cache_dir(cache_dir, repo) / "blobs"),
        cleanup=cleanup,
        what=f"download LoRA {lora.display}",
        policy=policy,
        config=config,
        deadline_s=deadline_s,
        cancelled=cancelled,
    )
    path = Path(result["path"])
    _check_size(path, max_mb, lora.display, remove=True)
    if preread([path], policy.preread_workers, check_blobs=True):
        _drop(path)
        raise DownloadError(f"{lora.display}: the downloaded file does not match its checksum; retry later")
    return path, str(result["identity"])


def _check_size(path: Path, max_mb: int | None, display: str, remove: bool = False) -> None:
    size = path.stat().st_size
    if max_mb is not None and size > max_mb * MB:
        if remove:
            _drop(path)
        raise TooLargeError(too_large(display, size, max_mb))


def too_large(display: str, size: int | None, max_mb: int) -> str:
    """The message for a LoRA file (named ``display``) of ``size`` bytes (None: unknown) over ``max_mb``."""
    what = f"{size / MB:.1f} MiB" if size is not None else "larger than that"
    return f"{display} is {what}, more than the limit of {max_mb} MiB for a LoRA file ([lora] max_file_mb)"


def _drop(path: Path) -> None:
    """Remove a fetched file (and the Hub blob behind a snapshot link)."""
    with contextlib.suppress(OSError):
        blob = path.resolve()
        if blob != path:
            blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The child's side (conversion.download.child runs these)


def download_url_lora(lora: LoraLocation, root: Path, max_mb: int | None, config: ConversionConfig) -> Path:
    """Download in the child: into fal's ``download_model_weights`` layout under ``root``, through
    fal's SSRF-safe client with https on every hop (``download_file`` would follow a redirect to
    http://), at most ``max_mb``; a ``data:`` URI's bytes are written as they are."""
    from fal.toolkit.utils.ssrf import SSRFError, SSRFHTTPStatusError, ssrf_safe_get_to_file

    url, display = lora.url, lora.display
    assert url is not None
    target_dir = fal_weights_dir(root, url)
    target_dir.mkdir(parents=True, exist_ok=True)
    if lora.is_data_uri:
        try:
            payload = data_uri_payload(url)
        except CallerUrlError as exc:
            raise SourceError(f"{display}: {exc}") from None
        if max_mb is not None and len(payload) > max_mb * MB:
            raise TooLargeError(too_large(display, len(payload), max_mb))
        target = target_dir / url_hash(url)
        write_atomic(target, payload)
        return target
    target = target_dir / (Path(urlsplit(url).path).name or url_hash(url))
    headers = None
    host = (urlsplit(url).hostname or "").lower()
    if config.hf_token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
        headers = {"Authorization": f"Bearer {config.hf_token}"}
    try:
        ssrf_safe_get_to_file(url, target, headers=headers, max_size=max_mb * MB if max_mb is not None else None,
                              allowed_schemes=frozenset({"https"}))
    except SSRFHTTPStatusError as exc:
        if 400 <= exc.status_code < 500:
            raise SourceError(f"{display}: the server answered HTTP {exc.status_code}") from None
        raise DownloadError(f"cannot download {display}: the server answered HTTP {exc.status_code}") from None
    except SSRFError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in NO_SPACE_ERRNOS:
            raise cause from None
        text = str(exc)
        if "exceeded" in text:
            raise TooLargeError(too_large(display, None, max_mb or 0)) from None
        if "scheme" in text or "non-routable" in text:
            raise SourceError(f"{display}: refused: {text} (https:// on every hop, public addresses only)") from None
        reason = redact_secrets(f"{text} {cause or ''}".strip(), config)
        raise DownloadError(f"cannot download {display}: {reason}") from None
    return target


def hub_lora_file(lora: LoraLocation, cache_dir: Path, max_mb: int | None, token: str | None,
                  on_phase: Any) -> dict[str, Any]:
    """Download in the child: the LoRA file of ``lora`` into the Hub cache, after checking it exists
    and its size (the Hub's metadata) is within ``max_mb``."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    repo = lora.repo
    assert repo is not None
    rev = lora.revision or "main"
    info = HfApi(token=token).model_info(repo, revision=rev)
    on_phase("resolved")
    commit = info.sha
    files = [s.rfilename for s in info.siblings or []]
    filename = lora.filename or choose_lora_file(files, repo)
    if filename not in files:
        raise SourceError(f"repo {repo} has no file {filename} at revision {rev!r}")
    if max_mb is not None:
        size = get_hf_file_metadata(hf_hub_url(repo, filename, revision=commit), token=token).size
        if size is not None and size > max_mb * MB:
            # named with the file chosen (a location without one names the repo and revision only)
            shown = lora.display if lora.filename else f"{lora.display}/{filename}"
            raise TooLargeError(too_large(shown, size, max_mb))
    on_phase("listed")
    # By the revision asked for, so the cache records the branch's commit (refs/<revision>) and the
    # next lookup finds the file offline; the commit is read back from the snapshot path.
    path = Path(hf_hub_download(repo, filename, revision=rev, cache_dir=os.fspath(cache_dir), token=token))
    commit = path.relative_to(repo_cache_dir(cache_dir, repo) / "snapshots").parts[0]
    return {"path": str(path), "identity": hub_file_identity(repo, commit, filename)}
