"""Model sources: a Hugging Face repo id, an ``https://`` URL of a single-file checkpoint, or a
local diffusers directory; and which files of a Hub repo a pipeline needs.

Everything here is offline and cheap: parsing, the identity a store entry is keyed by (a commit,
a URL hash, a directory fingerprint), and the file selection for ``allow_patterns``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from model_loader.bounded_json import load_file_bounded

from .errors import SourceError

log = logging.getLogger("conversion.sources")

Kind = Literal["hub", "url", "local"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_VARIANT = re.compile(r"^[A-Za-z0-9_]+$")
_SHARD = re.compile(r"-\d{5}-of-\d{5}")
_INDEX = re.compile(r"^(?P<stem>[^.]+)\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$")
WEIGHT_EXTS = ("safetensors", "bin")
# Per-component files copied as-is: configs, tokenizers (BPE, sentencepiece, tiktoken), schedulers.
_SIDE_FILE = re.compile(r"\.(json|txt|model|tiktoken)$")
DEFAULT_PIPELINE_CLASS = "StableDiffusionPipeline"
# A model_index.json names a few components (~1 KB); far larger is not one.
MAX_MODEL_INDEX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Source:
    """Where a pipeline comes from; ``ref`` is the repo id, the URL or the absolute directory."""

    kind: Kind
    ref: str
    revision: str | None = None  # hub: branch, tag or commit (None = "main")
    variant: str | None = None  # hub: weight variant such as "fp16"
    subfolder: str | None = None  # hub: the pipeline lives in this folder of the repo
    pipeline_class: str | None = None  # url: diffusers pipeline class for from_single_file
    config: str | None = None  # url: local diffusers config dir or Hub repo id with the configs

    @property
    def display(self) -> str:
        """A short name for logs and errors (URLs without their query string)."""
        if self.kind == "url":
            return redact_url(self.ref)
        if self.kind == "hub":
            rev = f"@{self.revision}" if self.revision else ""
            sub = f" ({self.subfolder}/)" if self.subfolder else ""
            return f"{self.ref}{rev}{sub}"
        return self.ref

    def describe(self) -> dict[str, Any]:
        """The source as recorded in a manifest: no secrets (URL query strings are dropped)."""
        info = {k: v for k, v in asdict(self).items() if v is not None}
        if self.kind == "url":
            info["ref"] = redact_url(self.ref)
            info["url_sha256"] = url_hash(self.ref)
        return info


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

    ``org/name`` (optionally ``org/name@revision``) is a Hub repo, ``https://...`` (or ``data:``)
    a single-file checkpoint, and an existing directory (or anything starting with ``/``, ``.``
    or ``~``) a local pipeline directory.
    """
    if not isinstance(text, str) or not text.strip():
        raise SourceError("model source is empty: give a Hub repo id (org/name), an https:// URL or a directory")
    text = text.strip()
    if variant is not None and not _VARIANT.match(variant):
        raise SourceError(f"variant {variant!r} is not a weight variant name such as 'fp16'")
    scheme = urlsplit(text).scheme.lower()
    if scheme in ("https", "data"):
        if revision or variant or subfolder:
            raise SourceError(f"{redact_url(text)}: revision, variant and subfolder apply to Hub repos, not URLs")
        return Source("url", text, pipeline_class=pipeline_class or DEFAULT_PIPELINE_CLASS, config=config)
    if scheme in ("http", "ftp", "file", "s3", "gs"):
        raise SourceError(f"{redact_url(text)}: only https:// URLs are supported for single-file checkpoints")
    path = Path(text).expanduser()
    if path.is_dir() or text.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise SourceError(f"{text}: no such directory (a local source must be a diffusers pipeline directory)")
        if revision or variant:
            raise SourceError(f"{text}: revision and variant apply to Hub repos, not local directories")
        return Source("local", str(path.resolve()), subfolder=_clean_subfolder(subfolder))
    repo, _, inline_rev = text.partition("@")
    if not _REPO_ID.match(repo) or ".." in repo:
        raise SourceError(
            f"{text!r} is neither a Hub repo id (org/name), an https:// URL nor an existing directory"
        )
    if inline_rev and revision and inline_rev != revision:
        raise SourceError(f"{text}: revision given twice ({inline_rev!r} and {revision!r})")
    rev = revision or inline_rev or None
    return Source("hub", repo, revision=rev, variant=variant, subfolder=_clean_subfolder(subfolder))


def source_from_config(settings: Mapping[str, Any]) -> Source:
    """A Source from a config table: ``source`` plus optional ``revision``, ``variant``,
    ``subfolder``, ``pipeline_class`` and ``config`` keys (the ``[model]`` table of fal.toml)."""
    if "source" not in settings:
        raise SourceError("model settings need a 'source' (Hub repo id, https:// URL or directory)")
    known = {"source", "revision", "variant", "subfolder", "pipeline_class", "config"}
    return parse_source(
        str(settings["source"]),
        **{k: (str(v) if v is not None else None) for k, v in settings.items() if k in known - {"source"}},
    )


def _clean_subfolder(subfolder: str | None) -> str | None:
    if not subfolder:
        return None
    parts = [p for p in subfolder.strip("/").split("/") if p]
    if any(p in (".", "..") for p in parts) or not parts:
        raise SourceError(f"subfolder {subfolder!r} must be a relative folder inside the repo")
    return "/".join(parts)


def is_commit(revision: str | None) -> bool:
    """A full 40-hex commit hash (immutable: its store key is known without asking the Hub)."""
    return bool(revision and _COMMIT.match(revision))


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


def require_pipeline_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` when it holds a ``model_index.json``, else a SourceError saying it does not.

    Checked before anything else reads a local source, so ``/etc`` is told just that.
    """
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise SourceError(f"{path}: no model_index.json; a local source must be a diffusers pipeline directory")
    return path


def directory_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a local directory's contents: every file's path, size and mtime.

    Only ``stat`` calls, so a warm start stays fast; editing, adding or removing a file changes it.
    A broken symlink has no contents: it is left out (with one warning per link and process); if
    the pipeline needed it, the conversion names the missing file.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError as exc:
                if not os.path.islink(full):
                    raise SourceError(f"{full}: cannot read ({exc.strerror or exc})") from exc
                warn_broken_symlink(full)
                continue
            rel = os.path.relpath(full, root)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


_warned_links: set[str] = set()


def warn_broken_symlink(path: str | os.PathLike[str]) -> None:
    """Log once per process that the broken symlink ``path`` of a local source is skipped."""
    key = os.fspath(path)
    if key not in _warned_links:
        _warned_links.add(key)
        try:
            target = os.readlink(key)
        except OSError:
            target = "?"
        log.warning("source: skipping the broken symlink %s (to %s)", key, target)


def with_revision(source: Source, revision: str) -> Source:
    return replace(source, revision=revision)


# ---------------------------------------------------------------------------------------------
# Which files of a Hub repo a pipeline needs


@dataclass(frozen=True)
class WeightName:
    """A parsed weight file name: ``diffusion_pytorch_model.fp16-00001-of-00002.safetensors``."""

    stem: str
    variant: str | None
    ext: str
    sharded: bool


def parse_weight_name(name: str) -> WeightName | None:
    """Split a weight file name into stem, variant, extension; None for anything else."""
    base, dot, ext = name.rpartition(".")
    if not dot or ext not in WEIGHT_EXTS or not base:
        return None
    sharded = bool(_SHARD.search(base))
    base = _SHARD.sub("", base)
    stem, _, variant = base.partition(".")
    if not stem or (variant and not _VARIANT.match(variant)):
        return None
    return WeightName(stem, variant or None, ext, sharded)


def pipeline_components(model_index: Mapping[str, Any]) -> list[str]:
    """Names of the components a ``model_index.json`` lists with a library and class."""
    comps = []
    for name, value in model_index.items():
        if name.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            comps.append(name)
    return sorted(comps)


def select_files(
    files: Iterable[str],
    model_index: Mapping[str, Any],
    variant: str | None = None,
    subfolder: str | None = None,
    weights: bool = True,
) -> list[str]:
    """The repo files a diffusers pipeline needs, for ``allow_patterns``.

    ``model_index.json``; every component's configs, tokenizer and scheduler files; and the
    weights of one format and variant per component: safetensors over ``.bin``, the requested
    variant where the component has it (else its default weights, as diffusers does), never
    onnx/flax/msgpack files, other variants or root single-file checkpoints.
    """
    prefix = f"{subfolder}/" if subfolder else ""
    by_dir: dict[str, list[str]] = {}
    for path in files:
        if not path.startswith(prefix):
            continue
        comp, sep, name = path[len(prefix):].partition("/")
        if sep and "/" not in name:
            by_dir.setdefault(comp, []).append(name)
    chosen = [f"{prefix}model_index.json"]
    for comp in pipeline_components(model_index):
        names = by_dir.get(comp, [])
        chosen += [f"{prefix}{comp}/{n}" for n in _side_files(names)]
        if weights:
            chosen += [f"{prefix}{comp}/{n}" for n in _component_weights(comp, names, variant)]
    return sorted(set(chosen))


def _side_files(names: list[str]) -> list[str]:
    return [n for n in names if _SIDE_FILE.search(n) and not _INDEX.match(n)]


def _component_weights(comp: str, names: list[str], variant: str | None) -> list[str]:
    parsed = {n: w for n in names if (w := parse_weight_name(n)) is not None}
    if not parsed:
        return []

    def pick(v: str | None) -> list[str]:
        cands = [n for n, w in parsed.items() if w.variant == v]
        safetensors = [n for n in cands if parsed[n].ext == "safetensors"]
        return sorted(safetensors or cands)

    used = variant
    picked = pick(variant) if variant else []
    if not picked:
        used, picked = None, pick(None)
    if not picked:
        found = sorted({w.variant for w in parsed.values() if w.variant})
        wanted = f"variant {variant!r}" if variant else "default (non-variant) weights"
        raise SourceError(
            f"component {comp!r} has no {wanted}; it has variants {found}: set variant to one of them"
        )
    ext = parsed[picked[0]].ext
    for n in names:
        m = _INDEX.match(n)
        if m and m["ext"] == ext and (m["variant"] or None) == used:
            picked.append(n)
    return picked


def read_model_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a ``model_index.json`` (a SourceError names the file when it is not one)."""
    try:
        data = load_file_bounded(path, max_bytes=MAX_MODEL_INDEX_BYTES)
    except FileNotFoundError:
        raise SourceError(f"{path}: missing; the source is not a diffusers pipeline") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 JSON, too large or too deep
        raise SourceError(f"{path}: not a readable model_index.json ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data
