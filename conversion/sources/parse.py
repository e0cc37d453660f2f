"""Which source a text names (fal.toml's ``[model]`` table, the CLI): offline and cheap."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from model_loader.diffusers_layout import is_variant_name

from ..errors import SourceError
from .base import Source
from .demo import DEMO_SOURCE, DemoSource
from .hub import HubSource
from .local import LocalSource
from .safety_checker import DEMO_CHECKER_SOURCE, DemoCheckerSource, HubCheckerSource, LocalCheckerSource
from .url import DEFAULT_PIPELINE_CLASS, UrlSource, redact_url

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_source(
    text: str,
    revision: str | None = None,
    variant: str | None = None,
    *,
    subfolder: str | None = None,
    pipeline_class: str | None = None,
    config: str | None = None,
) -> Source:
    """Parse a source as given in fal.toml or on the CLI.

    ``demo`` is the embedded demo model, ``org/name`` (optionally ``org/name@revision``) a Hub
    repo, ``https://...`` (or ``data:``) a single-file checkpoint, and an existing directory (or
    anything starting with ``/``, ``.`` or ``~``) a local pipeline directory.
    """
    if not isinstance(text, str) or not text.strip():
        raise SourceError("model source is empty: give a Hub repo id (org/name), an https:// URL or a directory")
    text = text.strip()
    if variant is not None and not is_variant_name(variant):
        raise SourceError(f"variant {variant!r} is not a weight variant name such as 'fp16'")
    if text == DEMO_SOURCE:
        if revision or variant or subfolder:
            raise SourceError("the demo source takes no revision, variant or subfolder")
        return DemoSource()
    scheme = urlsplit(text).scheme.lower()
    if scheme in ("https", "data"):
        if revision or variant or subfolder:
            raise SourceError(f"{redact_url(text)}: revision, variant and subfolder apply to Hub repos, not URLs")
        return UrlSource(text, pipeline_class=pipeline_class or DEFAULT_PIPELINE_CLASS, config=config)
    if scheme in ("http", "ftp", "file", "s3", "gs"):
        raise SourceError(f"{redact_url(text)}: only https:// URLs are supported for single-file checkpoints")
    path = Path(text).expanduser()
    if path.is_dir() or text.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise SourceError(f"{text}: no such directory (a local source must be a diffusers pipeline directory)")
        if revision or variant:
            raise SourceError(f"{text}: revision and variant apply to Hub repos, not local directories")
        return LocalSource(str(path.resolve()), subfolder=_clean_subfolder(subfolder))
    repo, _, inline_rev = text.partition("@")
    if not _REPO_ID.match(repo) or ".." in repo:
        raise SourceError(
            f"{text!r} is neither a Hub repo id (org/name), an https:// URL nor an existing directory"
        )
    if inline_rev and revision and inline_rev != revision:
        raise SourceError(f"{text}: revision given twice ({inline_rev!r} and {revision!r})")
    rev = revision or inline_rev or None
    return HubSource(repo, revision=rev, variant=variant, subfolder=_clean_subfolder(subfolder))


def parse_checker_source(text: str, revision: str | None = None, subfolder: str | None = None) -> Source:
    """Parse the safety checker's source as given in fal.toml's ``[safety_checker]``.

    ``demo`` is the embedded demo checker; otherwise the rules of :func:`parse_source`: ``org/name``
    (optionally ``org/name@revision``) is a Hub repo holding a checker (a checker repo such as
    ``CompVis/stable-diffusion-safety-checker``, or an SD 1.x pipeline repo), an existing directory
    (or anything starting with ``/``, ``.`` or ``~``) a local one laid out the same way, checked
    here. ``subfolder`` is where in the repo or directory the checker is. URLs are refused.
    """
    if not isinstance(text, str) or not text.strip():
        raise SourceError("safety checker source is empty: give a Hub repo id (org/name), a directory or 'demo'")
    text = text.strip()
    if text == DEMO_CHECKER_SOURCE:
        if revision or subfolder:
            raise SourceError("the demo safety checker takes no revision or subfolder")
        return DemoCheckerSource()
    if urlsplit(text).scheme:
        raise SourceError(f"{redact_url(text)}: a safety checker is a Hub repo or a directory, not a URL")
    source = parse_source(text, revision=revision, subfolder=subfolder)
    if isinstance(source, LocalSource):
        checker = LocalCheckerSource(source.path, subfolder=source.subfolder)
        checker.pipeline_dir()  # a directory without a checker is refused now, not at the first start
        return checker
    assert isinstance(source, HubSource), source
    return HubCheckerSource(source.repo, revision=source.revision, subfolder=source.subfolder)


def _clean_subfolder(subfolder: str | None) -> str | None:
    if not subfolder:
        return None
    parts = [p for p in subfolder.strip("/").split("/") if p]
    if any(p in (".", "..") for p in parts) or not parts:
        raise SourceError(f"subfolder {subfolder!r} must be a relative folder inside the repo")
    return "/".join(parts)
