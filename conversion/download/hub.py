"""A Hub repo's pipeline files (or a safety checker's: the source's ``select`` decides) in the
Hugging Face cache on the volume, verified.

The cache first with ``local_files_only`` (no network; fal's "speed up model files check"), the
Hub only when something is missing, and then in the watched child (``child.py``).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from model_loader.errors import DiffusersLayoutError

from ..config import ConversionConfig
from ..errors import DownloadError, SourceError
from ..sources.hub import HubSource, is_commit
from ..sources.hub_file import HubFileSource
from .child import dir_state, remove_stale_partials, run_child
from .policy import DownloadPolicy, hub_cache_dir
from .preread import preread

log = logging.getLogger("conversion.download")

# What is fetched from the Hub: a repo's pipeline (or checker, or configs) files, or one file.
HubFetchable = HubSource | HubFileSource


@dataclass(frozen=True)
class Snapshot:
    """A complete local copy of the files a pipeline needs."""

    path: Path  # the pipeline directory (the snapshot, or its subfolder)
    identity: str  # the commit hash
    files: tuple[str, ...]  # paths relative to the snapshot root that were selected
    root: Path  # the snapshot root


def fetch_hub(
    source: HubFetchable,
    root: Path,
    commit: str | None,
    policy: DownloadPolicy,
    weights: bool = True,
    refresh: bool = False,
    config: ConversionConfig | None = None,
) -> Snapshot:
    """The pipeline files of ``source`` on the volume, verified; downloads only when needed."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    config = config or ConversionConfig.from_env()
    cache_dir = hub_cache_dir(root, config)
    blobs = cache_dir / _repo_folder(source.repo) / "blobs"
    for round_ in (1, 2):
        try:
            if refresh and commit is None:
                raise LocalEntryNotFoundError("refresh: resolve the revision on the Hub")
            snap = hub_snapshot(source, cache_dir, commit=commit, local_only=True, weights=weights, config=config)
            log.info("cache: %s @ %s found in %s (no network)", source.display, snap.identity[:12], cache_dir)
        except LocalEntryNotFoundError:
            result = run_child(
                {"op": "hub", "kind": source.kind, "source": asdict(source), "cache_dir": str(cache_dir),
                 "commit": commit, "max_workers": policy.max_workers, "weights": weights, "refresh": refresh and commit is None},
                probe=lambda: dir_state(blobs),
                cleanup=lambda: remove_stale_partials(blobs, policy),
                what=f"download {source.display}",
                policy=policy,
            )
            snap = Snapshot(Path(result["path"]), result["identity"], tuple(result["files"]), Path(result["root"]))
        bad = preread([snap.root / f for f in snap.files], policy.preread_workers, check_blobs=True)
        if not bad:
            return snap
        if round_ == 2:
            raise DownloadError(
                f"{source.display}: files still fail their checksum after a fresh download: "
                + ", ".join(str(p) for p in bad)
            )
        log.warning("cache: %d corrupt file(s) in the Hub cache, removing and downloading again: %s",
                    len(bad), ", ".join(str(p) for p in bad))
        for pointer in bad:
            _drop_cached_file(pointer)
        commit = snap.identity
    raise AssertionError("unreachable")


def hub_snapshot(
    source: HubFetchable,
    cache_dir: Path,
    commit: str | None = None,
    local_only: bool = False,
    max_workers: int = 32,
    weights: bool = True,
    refresh: bool = False,
    on_phase: Callable[[str], None] = lambda name: None,
    config: ConversionConfig | None = None,
) -> Snapshot:
    """The pipeline files of a Hub repo from the cache, downloading what is missing.

    A known ``commit`` (from the store's ref file) is fetched as is, even if the branch has
    moved since. ``weights=False`` fetches the configs and tokenizers only; ``refresh``
    resolves a branch on the Hub even when the cache knows a commit for it. ``on_phase`` hears
    of each metadata step of a download (the child tells its watcher).
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    rev = source.revision or "main"
    if commit is None and (is_commit(rev) or not refresh):
        commit = rev if is_commit(rev) else _cached_hf_ref(cache_dir, source.repo, rev)
    if commit is not None:
        try:
            return _local_snapshot(source, cache_dir, commit, weights)
        except LocalEntryNotFoundError:
            if local_only:
                raise
    elif local_only:
        raise LocalEntryNotFoundError(f"{source.display}: no cached commit for revision {rev!r}")
    token = (config or ConversionConfig.from_env()).hf_token
    return _download_snapshot(source, cache_dir, max_workers, commit, weights, token, on_phase)


def _cached_hf_ref(cache_dir: Path, repo: str, rev: str) -> str | None:
    try:
        value = (cache_dir / _repo_folder(repo) / "refs" / rev).read_text().strip()
    except OSError:
        return None
    return value if is_commit(value) else None


def _repo_folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


def _escape(paths: Iterable[str]) -> list[str]:
    return [glob.escape(p) for p in paths]


def _select(source: HubFetchable, repo_files: list[str], index_path: str | Path | None, weights: bool) -> list[str]:
    from model_loader.diffusers_layout import read_model_index

    try:
        return source.select(repo_files, read_model_index(index_path) if index_path is not None else None, weights)
    except DiffusersLayoutError as exc:
        raise SourceError(f"{source.display}: {exc}") from None


def _local_snapshot(source: HubFetchable, cache_dir: Path, commit: str, weights: bool) -> Snapshot:
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError

    index_file = source.index_file()
    index = cache_dir / _repo_folder(source.repo) / "snapshots" / commit / index_file if index_file else None
    if index is not None and not index.is_file():
        raise LocalEntryNotFoundError(f"{index} is not cached")
    try:
        tree = get_cached_repo_tree(source.repo, revision=commit, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError as exc:
        raise LocalEntryNotFoundError(str(exc)) from exc
    files = _select(source, [f.path for f in tree], index, weights)
    path = snapshot_download(source.repo, revision=commit, cache_dir=cache_dir, allow_patterns=_escape(files),
                             local_files_only=True)
    return _snapshot(Path(path), commit, files, source)


def _snapshot(root: Path, identity: str, files: Sequence[str], source: HubFetchable) -> Snapshot:
    path = root / source.subfolder if source.subfolder else root
    return Snapshot(path=path, identity=identity, files=tuple(files), root=root)


def _download_snapshot(source: HubFetchable, cache_dir: Path, max_workers: int, commit: str | None, weights: bool,
                       token: str | None, on_phase: Callable[[str], None]) -> Snapshot:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    rev = commit or source.revision or "main"
    info = HfApi(token=token).model_info(source.repo, revision=rev)
    on_phase("resolved")
    commit = info.sha
    if not commit or not is_commit(commit):
        raise DownloadError(f"{source.display}: the Hub returned no commit for revision {rev!r}")
    repo_files = [s.rfilename for s in info.siblings or []]
    index_file = source.index_file()
    if index_file is not None and index_file not in repo_files:
        raise SourceError(
            f"repo {source.repo} has no {index_file}: it is not a diffusers pipeline "
            "(for a single-file checkpoint give the file: org/name/file.safetensors)"
        )
    index = (hf_hub_download(source.repo, index_file, revision=commit, cache_dir=cache_dir, token=token)
             if index_file is not None else None)
    on_phase("listed")
    files = _select(source, repo_files, index, weights)
    path = snapshot_download(source.repo, revision=commit, cache_dir=cache_dir, allow_patterns=_escape(files),
                             max_workers=max_workers, token=token)
    return _snapshot(Path(path), commit, files, source)


def _drop_cached_file(pointer: Path) -> None:
    """Remove a cached file: its blob and the snapshot link to it."""
    try:
        blob = pointer.resolve()
        if blob != pointer:
            blob.unlink(missing_ok=True)
        pointer.unlink(missing_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot remove corrupt cache file {pointer}: {exc.strerror or exc}") from exc
