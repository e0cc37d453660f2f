"""A single-file checkpoint at an ``https://`` (or ``data:``) URL, fetched with fal's
``download_model_weights`` and turned into a diffusers directory by ``from_single_file``
(``single_file.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from ..cache_layout import url_hash
from .base import Workspace
from .single_file import SingleFileSource

if TYPE_CHECKING:
    from ..download import DownloadPolicy

__all__ = ["UrlSource", "redact_url", "url_hash"]


def redact_url(url: str) -> str:
    """The URL without query string, fragment or user info (signed URLs carry secrets there)."""
    parts = urlsplit(url)
    if parts.scheme == "data":
        return f"data:...({len(url)} chars, sha256 {url_hash(url)[:12]})"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class UrlSource(SingleFileSource):
    url: str
    pipeline_class: str | None = None  # the diffusers pipeline class; None: detected from the checkpoint
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

    def scratch_name(self) -> str:
        return f"url--{url_hash(self.url)[:16]}"

    def fetch_checkpoint(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> tuple[Path, str]:
        from ..download import fetch_url

        path = fetch_url(self.url, self.display, workspace.root, policy, workspace.config)
        return path, url_hash(self.url)
