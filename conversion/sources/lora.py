"""Where a LoRA comes from: the ``path`` of a request's ``loras[i]`` or of fal.toml's ``[[model.loras]]``.

fal's convention (its ``LoraWeight``: "URL or the path to the LoRA weights"): an ``https://`` URL
of a ``.safetensors`` file (or a ``data:`` URI, as fal accepts for every file input), or a Hugging
Face repo: ``org/name`` (its ``pytorch_lora_weights.safetensors``, diffusers' default name, else its
only ``.safetensors`` file at the root), ``org/name/dir/file.safetensors`` (that file), either with
``@revision`` after the repo name (``org/name@<commit>/file.safetensors``). A URL is fetched through
fal's ``download_model_weights`` layout, a repo file through the Hub cache (conversion.download.lora).

Torch-free and offline: the schema checks a request's paths with :func:`parse_lora_path`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..cache_layout import cached_lora_file, hub_file_identity, url_hash
from ..errors import SourceError, shown
from .url import redact_url

if TYPE_CHECKING:
    from ..download.lora import LoraLocation

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
# Lengths past which a Hub path names nothing (and would reach the filesystem as a too-long name):
MAX_REPO_PART_CHARS = 96  # huggingface_hub's validate_repo_id: a repo name has 1 to 96 characters
MAX_NAME_BYTES = 255  # a file or folder name (NAME_MAX on Linux)
MAX_REVISION_CHARS = 255
MAX_REPO_PATH_CHARS = 2048
MAX_URL_CHARS = 2048  # an https URL, as fal's own limit for one (fal.toolkit.types.MAX_HTTPS_URL_LENGTH)


class LoraPathError(SourceError):
    """A LoRA ``path`` that names nothing this app can fetch (the message says what is accepted)."""


@dataclass(frozen=True)
class UrlLora:
    """A LoRA at an ``https://`` URL or in a ``data:`` URI; keyed by the URL's sha256, like fal."""

    url: str

    kind = "url-lora"

    @property
    def display(self) -> str:
        return redact_url(self.url)

    @property
    def is_data_uri(self) -> bool:
        """A ``data:`` URI: its bytes come with the request (never fetched or stored)."""
        return self.url.startswith("data:")

    @property
    def ref(self) -> str:
        return self.url

    @property
    def revision(self) -> None:
        return None

    def key_text(self) -> str:
        """What a store key records of it: the URL's hash (signed URLs carry secrets)."""
        return f"url:{url_hash(self.url)}"

    def offline_identity(self, root: Path, hub_cache: Path) -> str:
        return self.key_text()

    def location(self) -> LoraLocation:
        """Where it is, in the plain values conversion.download fetches it by."""
        from ..download.lora import LoraLocation

        return LoraLocation(display=self.display, key=self.key_text(), url=self.url)


@dataclass(frozen=True)
class HubLora:
    """A LoRA file in a Hugging Face repo; ``filename`` None: the repo's LoRA file, found by name."""

    repo: str
    filename: str | None = None
    revision: str | None = None  # branch, tag or commit (None = "main")

    kind = "hub-lora"

    @property
    def display(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo}{rev}" + (f"/{self.filename}" if self.filename else "")

    @property
    def ref(self) -> str:
        return self.repo

    def key_text(self) -> str:
        return f"hub:{self.display}"

    def offline_identity(self, root: Path, hub_cache: Path) -> str | None:
        """``hub:org/name@<commit>/<file>`` when the Hub cache knows the commit and the file (no
        network), else None."""
        found = cached_lora_file(hub_cache, self.repo, self.revision, self.filename)
        if found is None:
            return None
        return hub_file_identity(self.repo, *found)

    def location(self) -> LoraLocation:
        """Where it is, in the plain values conversion.download fetches it by."""
        from ..download.lora import LoraLocation

        return LoraLocation(display=self.display, key=self.key_text(), repo=self.repo, filename=self.filename,
                            revision=self.revision)


LoraRef = UrlLora | HubLora


def parse_lora_path(text: str) -> LoraRef:
    """The LoRA a ``path`` names, checked offline; :class:`LoraPathError` saying what is accepted otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise LoraPathError("a LoRA path is empty: " + _ACCEPTED)
    text = text.strip()
    scheme = urlsplit(text).scheme.lower() if ":" in text.split("/", 1)[0] else ""
    if scheme in ("https", "data"):
        if scheme == "https" and len(text) > MAX_URL_CHARS:
            raise LoraPathError(f"{shown(text)}: an https URL is at most {MAX_URL_CHARS} characters")
        if scheme == "https" and not urlsplit(text).hostname:
            raise LoraPathError(f"{redact_url(text)} has no host name")
        return UrlLora(text)
    if scheme:
        raise LoraPathError(f"{redact_url(text)}: {scheme}: URLs are not accepted; " + _ACCEPTED)
    if len(text) > MAX_REPO_PATH_CHARS:
        raise LoraPathError(f"{shown(text)}: a Hugging Face repo path is at most {MAX_REPO_PATH_CHARS} characters, "
                            f"this one has {len(text)}")
    parts = text.split("/")
    if len(parts) < 2 or text.startswith(("/", ".", "~")):
        raise LoraPathError(f"{shown(text)} is neither an https:// URL nor a Hugging Face repo: " + _ACCEPTED)
    org, name = parts[0], parts[1]
    name, _, revision = name.partition("@")
    for what, piece in (("owner", org), ("name", name)):
        if not _REPO_PART.match(piece) or ".." in piece:
            raise LoraPathError(f"{shown(text)}: {shown(piece)} is not a valid Hugging Face repo id part; " + _ACCEPTED)
        if len(piece) > MAX_REPO_PART_CHARS:
            raise LoraPathError(f"{shown(text)}: the repo {what} {shown(piece)} is {len(piece)} characters long; "
                                f"Hugging Face allows at most {MAX_REPO_PART_CHARS}")
    if revision and (not _REVISION.match(revision) or ".." in revision):
        raise LoraPathError(f"{shown(text)}: {shown(revision)} is not a revision (a branch, tag or commit hash)")
    if len(revision) > MAX_REVISION_CHARS:
        raise LoraPathError(f"{shown(text)}: the revision is {len(revision)} characters long; "
                            f"at most {MAX_REVISION_CHARS}")
    rest = parts[2:]
    filename = None
    if rest:
        if any(p in ("", ".", "..") for p in rest):
            raise LoraPathError(f"{shown(text)}: the file inside the repo must be a relative path")
        for part in rest:
            size = len(part.encode("utf-8", "surrogatepass"))
            if size > MAX_NAME_BYTES:
                raise LoraPathError(f"{shown(text)}: {shown(part)} is {size} bytes long; a file or folder name in "
                                    f"the repo is at most {MAX_NAME_BYTES}")
        filename = "/".join(rest)
        if not filename.endswith(".safetensors"):
            raise LoraPathError(
                f"{shown(text)}: a LoRA file in a repo must be a .safetensors file (pickled .bin/.ckpt weights "
                "can run code and are not loaded)")
    return HubLora(f"{org}/{name}", filename=filename, revision=revision or None)


_ACCEPTED = ("give an https:// URL of a .safetensors file, a data: URI, a Hugging Face repo id (org/name) or a "
             "file in one (org/name/file.safetensors, optionally org/name@revision/...)")


def lora_key(refs_and_scales: list[tuple[LoraRef, float]]) -> list[list[object]]:
    """The part of a store key that LoRAs fused into an entry add: each one's key text and scale."""
    return [[ref.key_text(), float(scale)] for ref, scale in refs_and_scales]
