"""What the single-file sources (an ``https://`` or ``data:`` URL, a Hub file) share: the pipeline
class (given, or detected from the checkpoint's tensor names), its configs (a local diffusers
directory or a Hub repo, fetched offline first), the components the file does not hold (loaded from
those configs' directory) and diffusers' ``from_single_file`` into a diffusers directory in scratch.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_loader.diffusers_layout import components, read_model_index
from model_loader.errors import DiffusersLayoutError
from model_loader.rates import rate_text

from ..errors import SourceError
from .base import Prepared, Source, Workspace
from .hub import HubSource, repo_and_revision

if TYPE_CHECKING:
    from ..download import DownloadPolicy
    from ..download.hub import HubFiles

log = logging.getLogger("conversion.sources")

CLASSES_HINT = "StableDiffusionPipeline, StableDiffusionXLPipeline or FluxPipeline"


@dataclass(frozen=True)
class HubConfigSource(HubSource):
    """The configs of a single-file checkpoint in a Hub diffusers repo: ``model_index.json``, each
    component's configs, tokenizers and scheduler, and the weights of the components the checkpoint
    does not hold (``weights_of``; a Flux file holds its transformer alone)."""

    weights_of: tuple[str, ...] = ()

    kind = "hub-config"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights_of", tuple(self.weights_of))  # given as a list too: kept hashable

    def slug(self) -> str:
        return "config--" + super().slug()

    def hub_files(self) -> HubFiles:
        """What to fetch of the repo: the configs, and the weights of ``weights_of`` only."""
        from ..download.hub import HubFiles

        return HubFiles(self.repo, self.revision, self.display, "configs", variant=self.variant,
                        subfolder=self.subfolder, weights_of=self.weights_of)


class SingleFileSource(Source):
    """A single-file checkpoint: its subclasses fetch the file; converting it is shared."""

    pipeline_class: str | None  # None: detected from the checkpoint's tensor names
    config: str | None  # a local diffusers directory or a Hub repo id (org/name[@revision]) with the configs

    @abstractmethod
    def fetch_checkpoint(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> tuple[Path, str]:
        """(the checkpoint file on the volume, its identity)."""

    @abstractmethod
    def scratch_name(self) -> str:
        """The name of its scratch directory in the store."""

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        if self.pipeline_class is not None:
            pipeline_type(self.pipeline_class)  # before downloading gigabytes for a typo
        checkpoint, identity = self.fetch_checkpoint(workspace, policy, refresh)
        work = workspace.private_dir(self.scratch_name())
        try:
            path = checkpoint_to_diffusers(self, checkpoint, work, workspace, policy, refresh)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return Prepared(path, identity, [work])


def pipeline_type(name: str) -> type:
    """The diffusers pipeline class ``name``, which must load single files."""
    import diffusers

    cls = getattr(diffusers, name or "", None)
    if not isinstance(cls, type) or not hasattr(cls, "from_single_file"):
        raise SourceError(f"pipeline_class {name!r} is not a diffusers pipeline with from_single_file (e.g. {CLASSES_HINT})")
    return cls


def checkpoint_class(source: SingleFileSource, checkpoint: Path) -> tuple[str, dict[str, list[int]] | None]:
    """(the pipeline class for ``checkpoint``, its tensor names and shapes or None for a pickle):
    ``source.pipeline_class``, else detected from the names in its safetensors header (no tensor
    is read)."""
    from ..checkpoint import HeaderError, NotDetected, detect_pipeline_class, tensor_shapes

    try:
        shapes = tensor_shapes(checkpoint)
    except HeaderError as exc:
        raise SourceError(f"{source.display}: unreadable safetensors header ({exc})") from None
    if source.pipeline_class is not None:
        return source.pipeline_class, shapes
    if shapes is None:
        raise SourceError(
            f"{source.display}: not a safetensors file (a pickled .ckpt?): its tensor names cannot be read without "
            f"unpickling it, so its pipeline is not detected; set model.pipeline_class ({CLASSES_HINT}), or use "
            "the .safetensors file"
        )
    try:
        name, what = detect_pipeline_class(shapes)
    except NotDetected as exc:
        raise SourceError(
            f"{source.display}: cannot tell which pipeline this checkpoint is for: it is {exc}; set "
            f"model.pipeline_class ({CLASSES_HINT}) and model.config"
        ) from None
    log.info("single-file: %s looks like %s by its tensor names: %s", source.display, what, name)
    return name, shapes


def checkpoint_to_diffusers(source: SingleFileSource, checkpoint: Path, work: Path, workspace: Workspace,
                            policy: DownloadPolicy, refresh: bool = False) -> Path:
    """``checkpoint`` as a diffusers directory in ``work`` (``work/pipeline``), by diffusers'
    ``from_single_file``. With ``source.config`` nothing comes from elsewhere: the configs, and the
    components the file lacks, are read from that directory (a Hub repo is fetched into the cache
    first, offline when it is there). Without it, diffusers fetches the configs of the checkpoint's
    family from the Hub itself (and a checkpoint lacking components is refused)."""
    from ..cache_layout import hub_cache_dir
    from ..checkpoint import COMPONENT_PREFIXES, is_safetensors, missing_components

    name, shapes = checkpoint_class(source, checkpoint)
    cls = pipeline_type(name)
    missing = missing_components(name, shapes) if shapes is not None else None
    missing = missing or []
    if missing and missing[0] == next(iter(COMPONENT_PREFIXES[name])):
        prefixes = " or ".join(COMPONENT_PREFIXES[name][missing[0]])
        raise SourceError(
            f"{source.display}: holds no {missing[0]} weights for {name} (no tensor name starts with {prefixes}); "
            f"is model.pipeline_class right? ({CLASSES_HINT})"
        )
    if missing and not source.config:
        raise SourceError(
            f"{source.display}: the checkpoint holds no weights for {', '.join(missing)}; set model.config to a "
            "diffusers pipeline (a Hub repo id or a directory) that holds them, e.g. the base model's repo"
        )
    config = _config_dir(source, missing, workspace, policy, refresh)
    passed = _load_components(source, config, missing) if config is not None else {}
    work.mkdir(parents=True, exist_ok=True)
    link = work / ("checkpoint.safetensors" if is_safetensors(checkpoint) else "checkpoint.ckpt")
    os.symlink(os.path.realpath(checkpoint), link)
    t0 = time.monotonic()
    try:
        pipe = cls.from_single_file(
            str(link),
            config=str(config) if config is not None else None,
            local_files_only=config is not None,
            cache_dir=str(hub_cache_dir(workspace.root, workspace.config)),
            **passed,
        )
    except Exception as exc:  # diffusers raises many types here (SingleFileComponentError, KeyError, ...)
        raise SourceError(f"{source.display}: diffusers cannot load it as {cls.__name__}: {exc}") from exc
    out = work / "pipeline"
    pipe.save_pretrained(out, safe_serialization=True)
    del pipe, passed
    log.info("single-file: %s (%s -> diffusers%s)", rate_text(os.path.getsize(checkpoint), time.monotonic() - t0),
             cls.__name__, f"; {', '.join(missing)} from {source.config}" if missing else "")
    return out


def _config_dir(source: SingleFileSource, missing: list[str], workspace: Workspace, policy: DownloadPolicy,
                refresh: bool) -> Path | None:
    """The local diffusers directory of ``source.config`` (None without one): the directory
    itself, or a Hub repo's snapshot (configs, and the weights of ``missing``) in the cache."""
    from .local import require_pipeline_dir

    if not source.config:
        return None
    local = Path(source.config).expanduser()
    if local.is_dir():
        return require_pipeline_dir(local)
    try:
        repo, revision = repo_and_revision(source.config, None)
    except SourceError:
        raise SourceError(f"config {source.config!r} must be a local diffusers directory or a Hub repo id (org/name)") from None
    from ..download import fetch_hub

    cfg = HubConfigSource(repo, revision, weights_of=tuple(missing))
    commit = None if refresh else cfg.offline_identity(workspace)
    snap = fetch_hub(cfg.hub_files(), workspace.root, commit, policy, workspace.config, refresh=refresh)
    workspace.write_ref(cfg, snap.identity)
    return snap.path


def _load_components(source: SingleFileSource, config: Path, names: list[str]) -> dict[str, Any]:
    """The components ``names`` from the diffusers directory ``config``, for ``from_single_file``
    (diffusers would look for a transformers model's weights there under diffusers' file names
    only, and never for a diffusers model's)."""
    try:
        specs = components(read_model_index(config))
    except DiffusersLayoutError as exc:
        raise SourceError(f"config {source.config}: {exc}") from None
    loaded: dict[str, Any] = {}
    for name in names:
        spec = specs.get(name)
        if spec is None:
            raise SourceError(f"{source.display}: the checkpoint holds no {name} weights, and model.config "
                              f"({source.config}) has no {name} component either")
        library, class_name = spec
        cls = getattr(importlib.import_module(library), class_name)
        try:
            loaded[name] = cls.from_pretrained(str(config), subfolder=name, local_files_only=True)
        except Exception as exc:  # OSError (no weights), ValueError, ...: transformers and diffusers differ
            raise SourceError(f"{source.display}: the checkpoint holds no {name} weights, and model.config "
                              f"({source.config}) cannot provide them: {exc}") from exc
    return loaded
