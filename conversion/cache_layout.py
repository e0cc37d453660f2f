"""Where fetched files are on the volume, known by name alone: the Hugging Face cache's layout,
fal's ``download_model_weights`` folders, and the names that key them (commit hashes, URL hashes).

Stdlib only and outside ``conversion.download``: the sources find their identities offline with
it on a warm start, which imports no download code; ``conversion.download`` writes by the same
rules. Nothing here touches the network; the only reads are a ref file or a directory listing of
the Hub cache.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SourceError

if TYPE_CHECKING:
    from .config import ConversionConfig

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# diffusers' default LoRA file name (what save_lora_weights writes, what load_lora_weights looks for).
DEFAULT_LORA_FILE = "pytorch_lora_weights.safetensors"


def is_commit(revision: str | None) -> bool:
    """A full 40-hex commit hash (immutable: its store key is known without asking the Hub)."""
    return bool(revision and _COMMIT.match(revision))


def url_hash(url: str) -> str:
    """sha256 of the URL: what fal's download_model_weights names its folder after."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def fal_weights_dir(root: Path, url: str) -> Path:
    """Where fal's download_model_weights keeps ``url`` (its layout, rooted at ``root``)."""
    return root / ".fal" / "model_weights" / url_hash(url)


def hub_cache_dir(root: Path, config: ConversionConfig) -> Path:
    """The Hugging Face cache on the persistent volume: ``config.hub_cache`` (``HF_HUB_CACHE``),
    else ``<root>/.cache/huggingface/hub`` (fal sets HF_HOME=/data/.cache/huggingface)."""
    explicit = config.hub_cache
    return explicit if explicit is not None else root / ".cache" / "huggingface" / "hub"


# -- the Hub cache (huggingface_hub's layout: models--org--name/{blobs,refs,snapshots}) -------------


def repo_cache_dir(hub_cache: Path, repo: str) -> Path:
    return Path(hub_cache) / ("models--" + repo.replace("/", "--"))


def snapshot_dir(hub_cache: Path, repo: str, commit: str) -> Path:
    return repo_cache_dir(hub_cache, repo) / "snapshots" / commit


def cached_commit(hub_cache: Path, repo: str, revision: str | None) -> str | None:
    """The commit a revision names, without the network: itself when it is a commit hash, else
    what the Hub cache recorded for the branch or tag (``refs/<revision>``); None when unknown."""
    if is_commit(revision):
        return revision
    try:
        value = (repo_cache_dir(hub_cache, repo) / "refs" / (revision or "main")).read_text().strip()
    except OSError:
        return None
    return value if is_commit(value) else None


# -- a LoRA file in a Hub repo -------------------------------------------------------------------


def choose_lora_file(repo_files: list[str], repo: str) -> str:
    """The LoRA file of a repo given without one: diffusers' ``pytorch_lora_weights.safetensors``
    when present, else the only ``.safetensors`` file at the repo's root; otherwise a
    :class:`SourceError` listing the candidates."""
    root_files = sorted(f for f in repo_files if "/" not in f and f.endswith(".safetensors"))
    if DEFAULT_LORA_FILE in root_files:
        return DEFAULT_LORA_FILE
    if len(root_files) == 1:
        return root_files[0]
    if not root_files:
        nested = sorted(f for f in repo_files if f.endswith(".safetensors"))[:5]
        hint = f"; name one of its files: {', '.join(f'{repo}/{f}' for f in nested)}" if nested else ""
        raise SourceError(f"repo {repo} has no .safetensors file at its root{hint}")
    shown = ", ".join(f"{repo}/{f}" for f in root_files[:5])
    raise SourceError(f"repo {repo} has {len(root_files)} .safetensors files and none is named "
                      f"{DEFAULT_LORA_FILE}: name the one to use, e.g. {shown}")


def hub_file_identity(repo: str, commit: str, filename: str) -> str:
    """What a LoRA file of a Hub repo was fetched as: ``hub:org/name@<commit>/<file>``."""
    return f"hub:{repo}@{commit}/{filename}"


def cached_lora_file(hub_cache: Path, repo: str, revision: str | None,
                     filename: str | None) -> tuple[str, str] | None:
    """(commit, file) of a Hub LoRA (``filename`` None: the file :func:`choose_lora_file` picks
    among the commit's files) when the Hub cache holds it, found without the network; else None."""
    commit = cached_commit(hub_cache, repo, revision)
    if commit is None:
        return None
    root = snapshot_dir(hub_cache, repo, commit)
    if filename is None:
        try:
            names = [p.name for p in root.iterdir() if p.is_file()]
            filename = choose_lora_file(names, repo)
        except (OSError, SourceError):
            return None
    if not (root / filename).is_file():
        return None
    return commit, filename
