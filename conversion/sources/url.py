"""A single-file checkpoint at an ``https://`` (or ``data:``) URL, fetched with fal's
``download_model_weights`` and turned into a diffusers directory by ``from_single_file``."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from model_loader.rates import rate_text

from ..errors import SourceError
from .base import Prepared, Source, Workspace

if TYPE_CHECKING:
    from ..download import DownloadPolicy

log = logging.getLogger("conversion.sources")

DEFAULT_PIPELINE_CLASS = "StableDiffusionPipeline"


def redact_url(url: str) -> str:
    """The URL without query string, fragment or user info (signed URLs carry secrets there)."""
    parts = urlsplit(url)
    if parts.scheme == "data":
        return f"data:...({len(url)} chars, sha256 {url_hash(url)[:12]})"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def url_hash(url: str) -> str:
    """sha256 of the URL: what fal's download_model_weights names its folder after."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class UrlSource(Source):
    url: str
    pipeline_class: str = DEFAULT_PIPELINE_CLASS  # the diffusers pipeline class for from_single_file
    config: str | None = None  # a local diffusers directory or Hub repo id with the configs

    kind = "url"
    _ref_field = "url"

    @property
    def display(self) -> str:
        return redact_url(self.url)

    def key_ref(self) -> str:
        return url_hash(self.url)

    def describe(self) -> dict:
        return {**super().describe(), "ref": redact_url(self.url), "url_sha256": url_hash(self.url)}

    def slug(self) -> str:
        tail = self.url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] if "://" in self.url else "data"
        return "url--" + tail.rsplit(".", 1)[0]

    def records_ref(self) -> bool:
        return False  # the URL's hash is its identity

    def offline_identity(self, workspace: Workspace) -> str | None:
        return url_hash(self.url)

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..download import fetch_url
        from .hub import HubSource
        from .parse import parse_source

        cls = self._pipeline_class()  # before downloading gigabytes for a typo
        checkpoint = fetch_url(self, workspace.root, policy)
        config = self.config
        if config and not Path(config).expanduser().is_dir():
            cfg_source = parse_source(config)
            if not isinstance(cfg_source, HubSource):
                raise SourceError(f"config {config!r} must be a local diffusers directory or a Hub repo id")
            from ..download import fetch_hub

            snap = fetch_hub(cfg_source, workspace.root, cfg_source.offline_identity(workspace), policy,
                             weights=False, config=workspace.config)
            workspace.write_ref(cfg_source, snap.identity)
            config = str(snap.path)
        work = workspace.private_dir(f"url--{url_hash(self.url)[:16]}")
        try:
            path = _single_file_to_diffusers(self, cls, checkpoint, config, work, workspace)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return Prepared(path, url_hash(self.url), [work])

    def _pipeline_class(self) -> type:
        import diffusers

        cls = getattr(diffusers, self.pipeline_class or "", None)
        if not isinstance(cls, type) or not hasattr(cls, "from_single_file"):
            raise SourceError(
                f"pipeline_class {self.pipeline_class!r} is not a diffusers pipeline with from_single_file "
                "(e.g. StableDiffusionPipeline, StableDiffusionXLPipeline)"
            )
        return cls


def _single_file_to_diffusers(
    source: UrlSource, cls: type, checkpoint: Path, config: str | None, work: Path, workspace: Workspace
) -> Path:
    """Load a single-file checkpoint with diffusers' ``from_single_file`` and save it as a
    diffusers directory. With ``config`` (a local diffusers directory) nothing is fetched;
    without it diffusers fetches the matching configs from the Hub."""
    from ..checkpoint import is_safetensors
    from ..download import hub_cache_dir

    work.mkdir(parents=True, exist_ok=True)
    link = work / ("checkpoint.safetensors" if is_safetensors(checkpoint) else "checkpoint.ckpt")
    os.symlink(os.path.realpath(checkpoint), link)
    t0 = time.monotonic()
    try:
        pipe = cls.from_single_file(
            str(link),
            config=config,
            local_files_only=config is not None,
            cache_dir=str(hub_cache_dir(workspace.root, workspace.config)),
        )
    except Exception as exc:  # diffusers raises many types here (SingleFileComponentError, KeyError, ...)
        raise SourceError(f"{source.display}: diffusers cannot load it as {cls.__name__}: {exc}") from exc
    out = work / "pipeline"
    pipe.save_pretrained(out, safe_serialization=True)
    del pipe
    log.info("single-file: %s (%s -> diffusers)", rate_text(os.path.getsize(checkpoint), time.monotonic() - t0),
             cls.__name__)
    return out
