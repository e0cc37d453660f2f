"""Which source a text names (fal.toml's ``[model]`` table, the CLI): offline and cheap."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from model_loader.diffusers_layout import is_variant_name

from ..errors import SourceError
from .base import Source
from .demo import DEMO_SOURCE, RANDOM_DEMO_SOURCE, DemoSource, RandomDemoSource
from .hub import HubSource, repo_and_revision
from .hub_file import CHECKPOINT_SUFFIXES, HubFileSource
from .local import LocalSource, require_pipeline_dir
from .safety_checker import DEMO_CHECKER_SOURCE, DemoCheckerSource, HubCheckerSource, LocalCheckerSource
from .url import UrlSource, redact_url


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

    ``demo`` is the embedded demo model (trained; ``demo-random``: random weights), ``org/name`` (optionally ``org/name@revision``) a Hub
    repo, ``org/name/path/file.safetensors`` (or ``.sft``, ``.ckpt``; or its
    ``https://huggingface.co/org/name/blob/<revision>/<path>`` page) a single-file checkpoint in a
    Hub repo, ``https://...`` (or ``data:``) a single-file checkpoint at a URL, and an existing
    directory (or anything starting with ``/``, ``.`` or ``~``) a local pipeline directory.
    ``pipeline_class`` and ``config`` apply to single-file checkpoints only (a local ``config``
    directory is checked here and recorded by its absolute path).
    """
    if not isinstance(text, str) or not text.strip():
        raise SourceError("model source is empty: give a Hub repo id (org/name), an https:// URL or a directory")
    text = text.strip()
    if variant is not None and not is_variant_name(variant):
        raise SourceError(f"variant {variant!r} is not a weight variant name such as 'fp16'")
    if text in (DEMO_SOURCE, RANDOM_DEMO_SOURCE):
        if revision or variant or subfolder:
            raise SourceError(f"the {text} source takes no revision, variant or subfolder")
        if pipeline_class or config:
            raise SourceError(f"the {text} source takes no pipeline_class or config")
        return DemoSource() if text == DEMO_SOURCE else RandomDemoSource()
    single_file = _single_file(text, revision, variant, subfolder)
    if single_file is not None:
        repo, filename, rev = single_file
        cfg = _clean_config(config)
        if repo is None:
            return UrlSource(text, pipeline_class=pipeline_class or None, config=cfg)
        return HubFileSource(repo, filename, revision=rev, pipeline_class=pipeline_class or None, config=cfg)
    if pipeline_class or config:
        raise SourceError(
            f"{text}: pipeline_class and config apply to single-file checkpoints (an https:// URL or a Hub file "
            "such as org/name/model.safetensors), not to a Hub repo or a directory: a diffusers pipeline names "
            "its own class and holds its configs"
        )
    path = Path(text).expanduser()
    if path.is_dir() or text.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise SourceError(f"{text}: no such directory (a local source must be a diffusers pipeline directory)")
        if revision or variant:
            raise SourceError(f"{text}: revision and variant apply to Hub repos, not local directories")
        return LocalSource(str(path.resolve()), subfolder=_clean_subfolder(subfolder))
    repo, rev = repo_and_revision(text, revision)
    return HubSource(repo, revision=rev, variant=variant, subfolder=_clean_subfolder(subfolder))


_HUB_HOSTS = ("huggingface.co", "hf.co", "www.huggingface.co")


def _single_file(text: str, revision: str | None, variant: str | None,
                 subfolder: str | None) -> tuple[str | None, str, str | None] | None:
    """(repo, file, revision) of a Hub file, (None, url, None) of a URL, or None when ``text``
    names no single file; what a single file cannot take is refused."""
    scheme = urlsplit(text).scheme.lower()
    if scheme in ("http", "ftp", "file", "s3", "gs"):
        raise SourceError(f"{redact_url(text)}: only https:// URLs are supported for single-file checkpoints")
    if scheme in ("https", "data"):
        parts = urlsplit(text)
        bits = parts.path.strip("/").split("/")
        if (scheme == "https" and (parts.hostname or "").lower() in _HUB_HOSTS and len(bits) >= 5
                and bits[2] == "blob" and not parts.query):
            # A Hub file's page (what from_single_file users write): the file is fetched from the Hub
            # cache, keyed by commit. resolve/ URLs are files: they are downloaded as URLs.
            if revision and revision != bits[3]:
                raise SourceError(f"{redact_url(text)}: revision given twice ({bits[3]!r} and {revision!r})")
            repo_text, filename, revision = f"{bits[0]}/{bits[1]}", "/".join(bits[4:]), bits[3]
        else:
            if revision or variant or subfolder:
                raise SourceError(f"{redact_url(text)}: revision, variant and subfolder apply to Hub repos, not URLs")
            return None, text, None
    elif text.lower().endswith(CHECKPOINT_SUFFIXES) and text.count("/") >= 2 and not text.startswith(("/", ".", "~")):
        org, name, filename = text.split("/", 2)
        repo_text = f"{org}/{name}"
    else:
        return None
    repo, rev = repo_and_revision(repo_text, revision)
    if any(p in ("", ".", "..") for p in filename.split("/")) or not filename.lower().endswith(CHECKPOINT_SUFFIXES):
        raise SourceError(f"{text}: {filename!r} is not a checkpoint file in the repo "
                          f"(a relative path ending with {', '.join(CHECKPOINT_SUFFIXES)})")
    if variant or subfolder:
        raise SourceError(f"{text}: variant and subfolder apply to Hub repos, not to a single file "
                          "(put the folder in the file's path)")
    return repo, filename, rev


def _clean_config(config: str | None) -> str | None:
    """``config`` checked: an existing diffusers directory (as its absolute path) or a Hub repo id."""
    if not config:
        return None
    config = config.strip()
    path = Path(config).expanduser()
    if path.is_dir() or config.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise SourceError(f"config {config!r}: no such directory (a local config must be a diffusers pipeline directory)")
        return str(require_pipeline_dir(path).resolve())
    if urlsplit(config).scheme:
        raise SourceError(f"config {redact_url(config)!r} must be a local diffusers directory or a Hub repo id (org/name)")
    try:
        repo_and_revision(config, None)
    except SourceError:
        raise SourceError(
            f"config {config!r} must be a local diffusers directory or a Hub repo id (org/name[@revision])"
        ) from None
    return config


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
    if isinstance(source, HubFileSource):
        raise SourceError(f"{text}: a safety checker is a Hub repo or a directory, not a single file")
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
