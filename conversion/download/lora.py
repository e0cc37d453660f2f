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

from ..config import ConversionConfig
from ..durable import NO_SPACE_ERRNOS, remove_tree, write_atomic
from ..errors import CallerUrlError, DownloadError, SourceError, TooLargeError
from ..sources.lora import HubLora, LoraPathError, LoraRef, UrlLora, choose_lora_file, repo_cache_dir, snapshot_dir
from ..sources.url import url_hash
from .caller_url import FetchLimits, data_uri_payload, fetch_to_file
from .child import dir_state, remove_stale_partials, run_child
from .lora_files import LORA_FILE, LoraFile, LoraFiles
from .policy import DownloadPolicy, fal_weights_dir, hub_cache_dir, redact_secrets
from .preread import preread
from .url import fetch_fal_file

log = logging.getLogger("conversion.download")
MB = 1024 * 1024


@dataclass(frozen=True)
class FetchedLora:
    """A LoRA file on the volume and what it was fetched as (``url:<sha256>``, ``hub:org/name@<commit>/<file>``)."""

    path: Path
    identity: str


def fetch_lora(ref: LoraRef, root: Path, *, max_mb: int | None = None, policy: DownloadPolicy | None = None,
               config: ConversionConfig | None = None) -> FetchedLora:
    """The file of ``ref`` on the volume, downloaded only when it is not there yet.

    ``max_mb``: the largest file accepted (MiB, fal's unit); a larger one is a :class:`TooLargeError`.
    A missing repo, file or URL is a :class:`SourceError` (or :class:`AuthError`), network trouble
    a :class:`DownloadError`.
    """
    config = config or ConversionConfig.from_env()
    policy = policy or DownloadPolicy.from_config(config)
    if isinstance(ref, UrlLora):
        return _fetch_url(ref, root, max_mb, policy)
    return _fetch_hub(ref, root, max_mb, policy, config)


def fetch_request_lora(ref: LoraRef, files: LoraFiles, *, max_mb: int, deadline_s: float,
                       cancelled: Callable[[], bool], config: ConversionConfig) -> LoraFile:
    """The file of a request's LoRA (an https URL or a Hub file): its entry in ``files`` when it is
    there, else fetched now into a new entry (see the module docstring). Raises
    :class:`CallerUrlError` (the URL's problem, or the deadline), FetchCancelled,
    :class:`TooLargeError`, SourceError/AuthError, DownloadError or DiskFullError."""
    if isinstance(ref, UrlLora) and ref.is_data_uri:
        raise ValueError("a data: URI LoRA is read from the request, not stored")
    key = ref.key_text()
    found = files.lookup(key)
    if found is not None:
        return found
    limits = FetchLimits(max_bytes=max_mb * MB, deadline_s=deadline_s)
    with files.building(key) as partial:
        if isinstance(ref, UrlLora):
            try:
                fetch_to_file(ref.url, partial / LORA_FILE, limits, cancelled)
            except CallerUrlError as exc:
                if exc.kind == "too_large":
                    raise TooLargeError(too_large(ref, None, max_mb)) from None
                raise
            identity = key
        else:
            identity = _fetch_hub_into(ref, partial, limits, max_mb, cancelled, config)
        return files.publish(partial, key, identity)


def _fetch_hub_into(ref: HubLora, partial: Path, limits: FetchLimits, max_mb: int, cancelled: Callable[[], bool],
                    config: ConversionConfig) -> str:
    """Download a Hub LoRA file into ``partial/lora.safetensors`` (through a Hub cache inside
    ``partial``, checked against its checksum), in one attempt; its identity ``hub:org/name@<commit>/<file>``."""
    cache_dir = partial / "hub"
    policy = replace(DownloadPolicy.from_config(config), attempts=1,
                     stall_timeout_s=min(config.stall_timeout_s, limits.deadline_s))
    path, identity = _download_hub_lora(ref, cache_dir, max_mb, policy, cleanup=lambda: None,
                                        deadline_s=limits.deadline_s, cancelled=cancelled)
    os.replace(path.resolve(), partial / LORA_FILE)
    remove_tree(cache_dir)
    return identity


def _fetch_url(ref: UrlLora, root: Path, max_mb: int | None, policy: DownloadPolicy) -> FetchedLora:
    request = {"op": "lora-url", "kind": ref.kind, "source": asdict(ref), "root": str(root), "max_mb": max_mb}
    path, cached = fetch_fal_file(ref.url, root, request, f"LoRA {ref.display}", policy)
    _check_size(path, max_mb, ref, remove=not cached)
    return FetchedLora(path, ref.key_text())


def _fetch_hub(ref: HubLora, root: Path, max_mb: int | None, policy: DownloadPolicy,
               config: ConversionConfig) -> FetchedLora:
    cache_dir = hub_cache_dir(root, config)
    identity = ref.offline_identity(root, cache_dir)
    if identity is not None:
        commit, filename = identity.removeprefix(f"hub:{ref.repo}@").split("/", 1)
        path = snapshot_dir(cache_dir, ref.repo, commit) / filename
        _check_size(path, max_mb, ref)
        if not preread([path], policy.preread_workers, check_blobs=True):
            log.info("cache: LoRA %s @ %s found in %s (no network)", ref.display, commit[:12], cache_dir)
            return FetchedLora(path, identity)
        log.warning("cache: LoRA %s is corrupt in the Hub cache; downloading it again", path)
        _drop(path)
    path, identity = _download_hub_lora(
        ref, cache_dir, max_mb, policy,
        cleanup=lambda: remove_stale_partials(repo_cache_dir(cache_dir, ref.repo) / "blobs", policy))
    return FetchedLora(path, identity)


def _download_hub_lora(ref: HubLora, cache_dir: Path, max_mb: int | None, policy: DownloadPolicy,
                       cleanup: Callable[[], None], deadline_s: float | None = None,
                       cancelled: Callable[[], bool] | None = None) -> tuple[Path, str]:
    """The LoRA file of ``ref`` downloaded into the Hub cache ``cache_dir`` in the watched child,
    within ``max_mb`` and checked against its checksum (a bad file is removed); (path, identity)."""
    result = run_child(
        {"op": "hub-lora", "kind": ref.kind, "source": asdict(ref), "cache_dir": str(cache_dir), "max_mb": max_mb},
        probe=lambda: dir_state(repo_cache_dir(cache_dir, ref.repo) / "blobs"),
        cleanup=cleanup,
        what=f"download LoRA {ref.display}",
        policy=policy,
        deadline_s=deadline_s,
        cancelled=cancelled,
    )
    path = Path(result["path"])
    _check_size(path, max_mb, ref, remove=True)
    if preread([path], policy.preread_workers, check_blobs=True):
        _drop(path)
        raise DownloadError(f"{ref.display}: the downloaded file does not match its checksum; retry later")
    return path, str(result["identity"])


def _check_size(path: Path, max_mb: int | None, ref: LoraRef, remove: bool = False) -> None:
    size = path.stat().st_size
    if max_mb is not None and size > max_mb * MB:
        if remove:
            _drop(path)
        raise TooLargeError(too_large(ref, size, max_mb))


def too_large(ref: LoraRef, size: int | None, max_mb: int) -> str:
    what = f"{size / MB:.1f} MiB" if size is not None else "larger than that"
    return f"{ref.display} is {what}, more than the limit of {max_mb} MiB for a LoRA file ([lora] max_file_mb)"


def _drop(path: Path) -> None:
    """Remove a fetched file (and the Hub blob behind a snapshot link)."""
    with contextlib.suppress(OSError):
        blob = path.resolve()
        if blob != path:
            blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The child's side (conversion.download.child runs these)


def download_url_lora(ref: UrlLora, root: Path, max_mb: int | None, config: ConversionConfig) -> Path:
    """Download in the child: into fal's ``download_model_weights`` layout under ``root``, through
    fal's SSRF-safe client with https on every hop (``download_file`` would follow a redirect to
    http://), at most ``max_mb``; a ``data:`` URI's bytes are written as they are."""
    from fal.toolkit.utils.ssrf import SSRFError, SSRFHTTPStatusError, ssrf_safe_get_to_file

    target_dir = fal_weights_dir(root, ref.url)
    target_dir.mkdir(parents=True, exist_ok=True)
    if ref.is_data_uri:
        try:
            payload = data_uri_payload(ref.url)
        except CallerUrlError as exc:
            raise SourceError(f"{ref.display}: {exc}") from None
        if max_mb is not None and len(payload) > max_mb * MB:
            raise TooLargeError(too_large(ref, len(payload), max_mb))
        target = target_dir / url_hash(ref.url)
        write_atomic(target, payload)
        return target
    target = target_dir / (Path(urlsplit(ref.url).path).name or url_hash(ref.url))
    headers = None
    host = (urlsplit(ref.url).hostname or "").lower()
    if config.hf_token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
        headers = {"Authorization": f"Bearer {config.hf_token}"}
    try:
        ssrf_safe_get_to_file(ref.url, target, headers=headers, max_size=max_mb * MB if max_mb is not None else None,
                              allowed_schemes=frozenset({"https"}))
    except SSRFHTTPStatusError as exc:
        if 400 <= exc.status_code < 500:
            raise SourceError(f"{ref.display}: the server answered HTTP {exc.status_code}") from None
        raise DownloadError(f"cannot download {ref.display}: the server answered HTTP {exc.status_code}") from None
    except SSRFError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in NO_SPACE_ERRNOS:
            raise cause from None
        text = str(exc)
        if "exceeded" in text:
            raise TooLargeError(too_large(ref, None, max_mb or 0)) from None
        if "scheme" in text or "non-routable" in text:
            raise SourceError(f"{ref.display}: refused: {text} (https:// on every hop, public addresses only)") from None
        reason = redact_secrets(f"{text} {cause or ''}".strip(), config)
        raise DownloadError(f"cannot download {ref.display}: {reason}") from None
    return target


def hub_lora_file(ref: HubLora, cache_dir: Path, max_mb: int | None, token: str | None,
                  on_phase: Any) -> dict[str, Any]:
    """Download in the child: the LoRA file of ``ref`` into the Hub cache, after checking it exists
    and its size (the Hub's metadata) is within ``max_mb``."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    rev = ref.revision or "main"
    info = HfApi(token=token).model_info(ref.repo, revision=rev)
    on_phase("resolved")
    commit = info.sha
    files = [s.rfilename for s in info.siblings or []]
    try:
        filename = ref.filename or choose_lora_file(files, ref.repo)
    except LoraPathError as exc:
        raise SourceError(str(exc)) from None
    if filename not in files:
        raise SourceError(f"repo {ref.repo} has no file {filename} at revision {rev!r}")
    if max_mb is not None:
        size = get_hf_file_metadata(hf_hub_url(ref.repo, filename, revision=commit), token=token).size
        if size is not None and size > max_mb * MB:
            raise TooLargeError(too_large(HubLora(ref.repo, filename, ref.revision), size, max_mb))
    on_phase("listed")
    # By the revision asked for, so the cache records the branch's commit (refs/<revision>) and the
    # next lookup finds the file offline; the commit is read back from the snapshot path.
    path = Path(hf_hub_download(ref.repo, filename, revision=rev, cache_dir=os.fspath(cache_dir), token=token))
    commit = path.relative_to(repo_cache_dir(cache_dir, ref.repo) / "snapshots").parts[0]
    return {"path": str(path), "identity": f"hub:{ref.repo}@{commit}/{filename}"}
