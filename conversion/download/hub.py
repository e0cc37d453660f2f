"""A Hub repo's files (a pipeline's, a safety checker's, a single file's configs, or one file:
:class:`HubFiles` says which) in the Hugging Face cache on the volume, verified.

The cache first with ``local_files_only`` (no network; fal's "speed up model files check"), the
Hub only when something is missing, and then in the watched child (``child.py``).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from model_loader.diffusers_layout import (
    MODEL_INDEX_NAME,
    select_files,
    select_model_folder_files,
    select_safety_checker_files,
)
from model_loader.errors import DiffusersLayoutError
from model_loader.module import MODULE_WEIGHT_SUFFIXES

from ..cache_layout import cached_commit, hub_cache_dir, is_commit, repo_cache_dir
from ..config import ConversionConfig
from ..errors import DownloadError, SourceError
from ..manifest import MANIFEST_NAME, VerificationError, is_pack, read_manifest
from .policy import DownloadPolicy
from .preread import preread
from .watch import dir_state, remove_stale_partials, run_child

log = logging.getLogger("conversion.download")

# Which files of a repo are fetched (see select_hub_files):
# - "pipeline": a diffusers pipeline's side files and one set of weights per component (model_index.json decides)
# - "safety_checker": a checker's config, weights and preprocessor config (the repo's listing decides)
# - "configs": a pipeline's side files, and the weights of the components in ``weights_of`` only
# - "model_folder": one model's config.json and weights at the repo's root or in ``subfolder`` (a ControlNet)
# - "module_weights": one torch module's safetensors files (and shard index) at the repo's root or in ``subfolder``
# - "file": the one file ``filename``
Rule = Literal["pipeline", "safety_checker", "model_folder", "configs", "module_weights", "file"]


@dataclass(frozen=True)
class HubFiles:
    """What to fetch of a Hub repo, in plain values (the watched child gets them as JSON)."""

    repo: str
    revision: str | None  # branch, tag or commit (None = "main")
    display: str  # its name in logs and errors
    rule: Rule = "pipeline"
    variant: str | None = None  # weight variant such as "fp16"
    subfolder: str | None = None  # the pipeline lives in this folder of the repo
    weights_of: tuple[str, ...] = ()  # "configs": the components whose weights are fetched too
    filename: str | None = None  # "file": its path in the repo

    def __post_init__(self) -> None:
        if self.rule not in get_args(Rule):
            raise ValueError(f"unknown Hub file rule {self.rule!r}")
        if self.rule == "file" and not self.filename:
            raise ValueError("the 'file' rule needs a filename")
        object.__setattr__(self, "weights_of", tuple(self.weights_of))  # a list after a JSON round trip

    @property
    def ref(self) -> str:
        """What errors call the repo: the repo id, or the repo's file (``org/name/file``)."""
        return f"{self.repo}/{self.filename}" if self.rule == "file" else self.repo

    def index_file(self) -> str | None:
        """The repo file whose contents decide which files to fetch (``model_index.json``); None
        when the repo's file listing alone decides."""
        if self.rule in ("safety_checker", "model_folder", "module_weights", "file"):
            return None
        return f"{self.subfolder}/{MODEL_INDEX_NAME}" if self.subfolder else MODEL_INDEX_NAME


def select_hub_files(files: HubFiles, repo_files: list[str], index: dict[str, Any] | None, weights: bool) -> list[str]:
    """The repo files to fetch by ``files.rule`` (``index`` is its :meth:`~HubFiles.index_file`
    parsed); ``weights=False``: the configs and tokenizers only. Raises DiffusersLayoutError (or
    SourceError for a missing file) when the repo does not hold what the rule asks for."""
    if files.rule == "pipeline":
        return select_files(repo_files, index or {}, files.variant, files.subfolder, weights)
    if files.rule == "safety_checker":
        parts = select_safety_checker_files(repo_files, files.variant, files.subfolder, weights)
        return sorted(path for paths in parts.values() for path in paths)
    if files.rule == "model_folder":
        return select_model_folder_files(repo_files, files.variant, files.subfolder, weights)
    if files.rule == "configs":
        index = index or {}
        chosen = set(select_files(repo_files, index, files.variant, files.subfolder, weights=False))
        if weights and files.weights_of:
            wanted = {name: spec for name, spec in index.items() if name in files.weights_of}
            chosen |= set(select_files(repo_files, wanted, files.variant, files.subfolder, weights=True))
        return sorted(chosen)
    if files.rule == "module_weights":
        prefix = f"{files.subfolder}/" if files.subfolder else ""
        chosen = [f for f in repo_files if f.startswith(prefix) and "/" not in f[len(prefix):]
                  and (f.endswith(MODULE_WEIGHT_SUFFIXES) or f.endswith(".safetensors.index.json"))]
        if not any(f.endswith(MODULE_WEIGHT_SUFFIXES) for f in chosen):
            where = f"folder {files.subfolder!r} of repo {files.repo}" if files.subfolder else f"repo {files.repo}"
            raise SourceError(f"{where} has no .safetensors file at revision {files.revision or 'main'!r}")
        return sorted(chosen) if weights else []
    if files.filename not in repo_files:
        raise SourceError(f"repo {files.repo} has no file {files.filename} at revision {files.revision or 'main'!r}")
    return [files.filename]  # type: ignore[list-item]


@dataclass(frozen=True)
class Snapshot:
    """A complete local copy of the files a pipeline needs."""

    path: Path  # the pipeline directory (the snapshot, or its subfolder)
    identity: str  # the commit hash
    files: tuple[str, ...]  # paths relative to the snapshot root that were selected
    root: Path  # the snapshot root


def fetch_hub(
    files: HubFiles,
    root: Path,
    commit: str | None,
    policy: DownloadPolicy,
    config: ConversionConfig,
    weights: bool = True,
    refresh: bool = False,
) -> Snapshot:
    """The repo files ``files`` names on the volume ``root``, verified; downloads only when needed."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = hub_cache_dir(root, config)
    blobs = repo_cache_dir(cache_dir, files.repo) / "blobs"
    for round_ in (1, 2):
        try:
            if refresh and commit is None:
                raise LocalEntryNotFoundError("refresh: resolve the revision on the Hub")
            snap = hub_snapshot(files, cache_dir, commit=commit, local_only=True, weights=weights, token=config.hf_token)
            log.info("cache: %s @ %s found in %s (no network)", files.display, snap.identity[:12], cache_dir)
        except LocalEntryNotFoundError:
            result = run_child(
                {"op": "hub", "files": asdict(files), "cache_dir": str(cache_dir), "commit": commit,
                 "max_workers": policy.max_workers, "weights": weights, "refresh": refresh and commit is None},
                probe=lambda: dir_state(blobs),
                cleanup=lambda: remove_stale_partials(blobs, policy),
                what=f"download {files.display}",
                policy=policy,
                config=config,
            )
            snap = Snapshot(Path(result["path"]), result["identity"], tuple(result["files"]), Path(result["root"]))
        bad = preread([snap.root / f for f in snap.files], policy.preread_workers, check_blobs=True)
        if not bad:
            return snap
        if round_ == 2:
            raise DownloadError(
                f"{files.display}: files still fail their checksum after a fresh download: "
                + ", ".join(str(p) for p in bad)
            )
        log.warning("cache: %d corrupt file(s) in the Hub cache, removing and downloading again: %s",
                    len(bad), ", ".join(str(p) for p in bad))
        for pointer in bad:
            _drop_cached_file(pointer)
        commit = snap.identity
    raise AssertionError("unreachable")


def hub_snapshot(
    files: HubFiles,
    cache_dir: Path,
    *,
    token: str | None,
    commit: str | None = None,
    local_only: bool = False,
    max_workers: int = 32,
    weights: bool = True,
    refresh: bool = False,
    on_phase: Callable[[str], None] = lambda name: None,
) -> Snapshot:
    """The repo files ``files`` names from the Hub cache ``cache_dir``, downloading what is missing
    (with ``token``, the Hugging Face token or None).

    A known ``commit`` (from the store's ref file) is fetched as is, even if the branch has
    moved since. ``weights=False`` fetches the configs and tokenizers only; ``refresh``
    resolves a branch on the Hub even when the cache knows a commit for it. ``on_phase`` hears
    of each metadata step of a download (the child tells its watcher).
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    rev = files.revision or "main"
    if commit is None and (is_commit(rev) or not refresh):
        commit = cached_commit(cache_dir, files.repo, rev)
    if commit is not None:
        try:
            return _local_snapshot(files, cache_dir, commit, weights)
        except LocalEntryNotFoundError:
            if local_only:
                raise
    elif local_only:
        raise LocalEntryNotFoundError(f"{files.display}: no cached commit for revision {rev!r}")
    return _download_snapshot(files, cache_dir, max_workers, commit, weights, token, on_phase)


def _escape(paths: Iterable[str]) -> list[str]:
    return [glob.escape(p) for p in paths]


def _index_file(files: HubFiles, repo_files: Iterable[str]) -> str | None:
    """The repo file whose contents decide what to fetch: our manifest when a pipeline's folder
    carries one (a conversion pushed to the Hub: exactly its files are fetched), else the rule's."""
    if files.rule == "pipeline":
        manifest = f"{files.subfolder}/{MANIFEST_NAME}" if files.subfolder else MANIFEST_NAME
        if manifest in repo_files:
            return manifest
    return files.index_file()


def _manifest_files(files: HubFiles, repo_files: list[str], manifest_path: Path, weights: bool) -> list[str]:
    """The files a pushed conversion's manifest lists, as repo paths (and the manifest itself)."""
    try:
        listed = read_manifest(manifest_path.parent)["files"]
    except VerificationError as exc:
        raise SourceError(f"{files.display} carries a manifest this app cannot use: {exc}") from None
    prefix = f"{files.subfolder}/" if files.subfolder else ""
    wanted = [prefix + rel for rel in listed if weights or not is_pack(rel)]
    missing = sorted(set(wanted) - set(repo_files))
    if missing:
        raise SourceError(f"{files.display}: its {MANIFEST_NAME} lists file(s) the repo does not hold at this "
                          f"revision: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return sorted([*wanted, prefix + MANIFEST_NAME])


def _select(files: HubFiles, repo_files: list[str], index_path: str | Path | None, weights: bool) -> list[str]:
    from model_loader.diffusers_layout import read_model_index

    if index_path is not None and Path(index_path).name == MANIFEST_NAME:
        return _manifest_files(files, repo_files, Path(index_path), weights)
    try:
        return select_hub_files(files, repo_files, read_model_index(index_path) if index_path is not None else None,
                                weights)
    except DiffusersLayoutError as exc:
        raise SourceError(f"{files.display}: {exc}") from None


def _local_snapshot(files: HubFiles, cache_dir: Path, commit: str, weights: bool) -> Snapshot:
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError

    try:
        tree = [f.path for f in get_cached_repo_tree(files.repo, revision=commit, cache_dir=cache_dir)]
    except CachedRepoTreeNotFoundError as exc:
        raise LocalEntryNotFoundError(str(exc)) from exc
    index_file = _index_file(files, tree)
    index = repo_cache_dir(cache_dir, files.repo) / "snapshots" / commit / index_file if index_file else None
    if index is not None and not index.is_file():
        raise LocalEntryNotFoundError(f"{index} is not cached")
    selected = _select(files, tree, index, weights)
    path = snapshot_download(files.repo, revision=commit, cache_dir=cache_dir, allow_patterns=_escape(selected),
                             local_files_only=True)
    return _snapshot(Path(path), commit, selected, files)


def _snapshot(root: Path, identity: str, selected: Sequence[str], files: HubFiles) -> Snapshot:
    path = root / files.subfolder if files.subfolder else root
    return Snapshot(path=path, identity=identity, files=tuple(selected), root=root)


def _download_snapshot(files: HubFiles, cache_dir: Path, max_workers: int, commit: str | None, weights: bool,
                       token: str | None, on_phase: Callable[[str], None]) -> Snapshot:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    rev = commit or files.revision or "main"
    info = HfApi(token=token).model_info(files.repo, revision=rev)
    on_phase("resolved")
    commit = info.sha
    if not commit or not is_commit(commit):
        raise DownloadError(f"{files.display}: the Hub returned no commit for revision {rev!r}")
    repo_files = [s.rfilename for s in info.siblings or []]
    index_file = _index_file(files, repo_files)
    if index_file is not None and index_file not in repo_files:
        raise SourceError(
            f"repo {files.repo} has no {index_file}: it is not a diffusers pipeline "
            "(for a single-file checkpoint give the file: org/name/file.safetensors)"
        )
    index = (hf_hub_download(files.repo, index_file, revision=commit, cache_dir=cache_dir, token=token)
             if index_file is not None else None)
    on_phase("listed")
    selected = _select(files, repo_files, index, weights)
    path = snapshot_download(files.repo, revision=commit, cache_dir=cache_dir, allow_patterns=_escape(selected),
                             max_workers=max_workers, token=token)
    return _snapshot(Path(path), commit, selected, files)


def _drop_cached_file(pointer: Path) -> None:
    """Remove a cached file: its blob and the snapshot link to it."""
    try:
        blob = pointer.resolve()
        if blob != pointer:
            blob.unlink(missing_ok=True)
        pointer.unlink(missing_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot remove corrupt cache file {pointer}: {exc.strerror or exc}") from exc
