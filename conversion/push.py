"""A converted directory pushed to the Hugging Face Hub once, so every deployment starts from it
without converting (``python -m conversion push PATH org/name``).

The repo gets the directory as it is (``model_index.json``, each component's configs and
``model.flashpack``, tokenizers, schedulers and our manifest: sizes, sha256, load-time checksums,
what it was built from), a model card, and, so that diffusers' own
``DiffusionPipeline.from_pretrained(<its snapshot>, use_flashpack=True)`` loads it too, each transformers
component's weights as ``model.safetensors`` beside its pack (diffusers reads FlashPack for its own
models only; this costs the text encoders' size once more in the repo, and this app never fetches
them). Everything goes up in one commit: an interrupted push leaves the branch as it was. A
directory that fails its full check is refused before anything is uploaded.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_loader.diffusers_layout import MODEL_INDEX_NAME, PACK_NAME, components, read_model_index

from .config import ConversionConfig
from .errors import AuthError, ConversionError, SourceError
from .manifest import MANIFEST_NAME, VerificationError, read_manifest, verify_converted
from .sources.hub import repo_and_revision

log = logging.getLogger("conversion.push")

MODEL_CARD_NAME = "README.md"


@dataclass(frozen=True)
class Pushed:
    """What a push made: the repo, the branch and its new commit."""

    repo: str
    revision: str
    commit: str
    url: str


def push_to_hub(path: str | Path, repo: str, config: ConversionConfig, *, revision: str | None = None,
                private: bool = False, diffusers_weights: bool = True) -> Pushed:
    """Push the converted directory ``path`` to the Hub repo ``repo`` (created when missing, as
    ``private``), on ``revision`` (a branch, created from main when missing; default main), in one
    commit, with ``config.hf_token``. ``diffusers_weights``: add the safetensors diffusers needs."""
    from huggingface_hub import CommitOperationAdd, HfApi

    path = Path(path)
    repo_id, inline = repo_and_revision(repo, revision)
    branch = inline or "main"
    try:
        verify_converted(path, full=True)
    except VerificationError as exc:
        raise ConversionError(f"{path} does not verify, so nothing was pushed: {exc}") from None
    manifest = read_manifest(path)
    api = HfApi(token=config.hf_token or False)  # False: no token, not even one the client finds itself
    with tempfile.TemporaryDirectory(prefix="flashpack-push-") as scratch:
        operations = [CommitOperationAdd(rel, str(path / rel)) for rel in [*sorted(manifest["files"]), MANIFEST_NAME]]
        if diffusers_weights:
            for rel, file in _diffusers_safetensors(path, Path(scratch)):
                operations.append(CommitOperationAdd(rel, str(file)))
        operations.append(CommitOperationAdd(MODEL_CARD_NAME, model_card(repo_id, manifest, diffusers_weights).encode()))
        nbytes = sum(Path(op.path_or_fileobj).stat().st_size for op in operations if isinstance(op.path_or_fileobj, str))
        log.info("push: %s -> %s@%s: %d file(s), %.2f GB, one commit", path, repo_id, branch, len(operations), nbytes / 1e9)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.create_commit(repo_id, operations, commit_message=f"FlashPack conversion ({_built_from(manifest)})",
                                     revision=branch)
        except Exception as exc:
            raise _push_error(exc, repo_id, config) from exc
    log.info("push: %s@%s is commit %s (%s)", repo_id, branch, info.oid, info.commit_url)
    return Pushed(repo_id, branch, info.oid, str(url))


def _diffusers_safetensors(path: Path, scratch: Path) -> list[tuple[str, Path]]:
    """``(path in repo, file)`` of each transformers component's weights as safetensors, written
    from its pack into ``scratch``."""
    from safetensors.torch import save_file

    from model_loader import load_state_dict

    found = []
    for name, spec in components(read_model_index(path / MODEL_INDEX_NAME)).items():
        pack = path / name / PACK_NAME
        if spec is None or spec[0] != "transformers" or not pack.is_file():
            continue
        out = scratch / name / "model.safetensors"
        out.parent.mkdir(parents=True)
        tensors = load_state_dict(pack)
        save_file({k: t.clone() for k, t in tensors.items()}, str(out), metadata={"format": "pt"})  # no shared storage
        del tensors
        found.append((f"{name}/model.safetensors", out))
    return found


def _built_from(manifest: dict[str, Any]) -> str:
    source = manifest.get("source") or {}
    parts = [str(source.get("ref", "?"))]
    if source.get("identity"):
        parts.append(f"@ {str(source['identity'])[:12]}")
    if source.get("dtype"):
        parts.append(str(source["dtype"]))
    return " ".join(parts)


def model_card(repo: str, manifest: dict[str, Any], diffusers_weights: bool) -> str:
    """The repo's README: what it is, where it came from, and how to serve it."""
    source = manifest.get("source") or {}
    packs = sorted(rel for rel in manifest["files"] if rel.endswith(".flashpack"))
    size = sum(entry["size"] for entry in manifest["files"].values())
    diffusers = (
        "\nWith diffusers itself (its FlashPack support reads the diffusers components' packs, from a local "
        "directory; the transformers components are loaded from the `model.safetensors` files beside their packs):\n\n"
        "```python\nfrom diffusers import DiffusionPipeline\nfrom huggingface_hub import snapshot_download\n\n"
        f'pipe = DiffusionPipeline.from_pretrained(snapshot_download("{repo}"), use_flashpack=True)\n```\n'
        if diffusers_weights else "")
    return f"""---
tags:
- flashpack
- diffusers
---

# {repo}

A FlashPack conversion of `{source.get("ref", "?")}` (revision `{source.get("identity", "?")}`, dtype
`{source.get("dtype") or "as the source"}`): {len(packs)} pack(s), {size / 1e9:.2f} GB. Each component's
weights are one `model.flashpack` beside its `config.json`; `{MANIFEST_NAME}` records every file's size
and sha256, each pack's load-time checksums, and what it was built from.

Serve it with the flashpack-t2i fal app: in `fal.toml`, `[model] source = "{repo}"` and
`revision = "<this commit>"`. The first start fetches these files onto the persistent volume and
checks them against the manifest; nothing is converted, and every later start finds them offline.
{diffusers}"""


def _push_error(exc: Exception, repo: str, config: ConversionConfig) -> Exception:
    """A push failure as an error saying what to do (the token never appears)."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf.HfHubHTTPError) and status in (401, 403):
        if not config.hf_token:
            return AuthError(f"pushing to {repo} needs a Hugging Face token with write access: set HF_TOKEN")
        return AuthError(f"the Hugging Face token in HF_TOKEN was refused for {repo} (HTTP {status}): it needs "
                         "write access to the repo (or to create it)")
    if isinstance(exc, hf.HfHubHTTPError):
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        return SourceError(f"the Hub refused the push to {repo} (HTTP {status}): {first}; the repo is as it was")
    first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    cause = f" ({str(exc.__cause__).strip().splitlines()[0]})" if exc.__cause__ is not None and str(exc.__cause__).strip() else ""
    return ConversionError(f"cannot push to {repo}: {first}{cause}; the repo is as it was (its one commit was not "
                           "made): push again")
