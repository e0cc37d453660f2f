"""Load diffusers pipelines and single models from a converted directory.

A converted directory has diffusers' layout: ``model_index.json``; per torch component
``<comp>/config.json`` + ``<comp>/model.flashpack``; tokenizer/scheduler files as saved. Torch
components are built on the meta device while their packs are read straight to the target device,
then assembled from views of the loaded blocks; the others use their own ``from_pretrained``.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import private_api
from .assemble import build_empty_model, construction_dtype, fill_model, is_diffusers_model, is_transformers_model
from .background import PackReads, start_pack_reads
from .bounded_json import load_file_bounded
from .config import LoaderConfig
from .diffusers_layout import CONFIG_NAME, MAX_CONFIG_BYTES, MODEL_INDEX_NAME, PACK_NAME, components
from .diffusers_layout import read_model_index as read_index_file
from .errors import DiffusersLayoutError, PipelineLoadError
from .format import read_layout
from .host_read import HostFile
from .rates import rate_text
from .reader import PackData, pack_on_device, read_pack, resolve_device

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


logger = logging.getLogger("model_loader.pipeline")


def resolve_class(library: str, class_name: str, where: str = MODEL_INDEX_NAME) -> type:
    """The class a ``model_index.json`` entry ``[library, class_name]`` names, as diffusers does.

    ``library`` is ``diffusers``, ``transformers``, another importable module, or the name of a
    diffusers pipeline module (``stable_diffusion`` for its safety checker).
    """
    import diffusers.pipelines

    class_name = class_name.removeprefix("FlashPack")  # diffusers accepts this spelling too
    if hasattr(diffusers.pipelines, library):
        module: Any = getattr(diffusers.pipelines, library)
    else:
        try:
            module = importlib.import_module(library)
        except ImportError as exc:
            raise PipelineLoadError(f"{where}: library {library!r} cannot be imported ({exc})") from None
        if library == "transformers":
            class_name = private_api.remap_transformers_class(class_name)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise PipelineLoadError(f"{where}: {library!r} has no class {class_name!r}")
    return cls


def load_model(
    component_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    torch_dtype: torch.dtype | None = None,
    reads: PackReads | None = None,
    config: LoaderConfig | None = None,
) -> torch.nn.Module:
    """Load one converted torch component (``config.json`` + ``model.flashpack``) onto ``device``.

    The class comes from the parent's ``model_index.json`` entry for this directory, else from
    ``config.json`` (diffusers ``_class_name`` or transformers ``architectures``). ``reads``: pack
    reads already running that include this component (named as its directory), as for
    :func:`load_pipeline`; the model is built on the meta device while its pack is read.
    ``config``: the loader's settings for a pack read here (by default the environment, read once).
    """
    if config is None:
        config = LoaderConfig.from_env()
    comp = Path(component_dir)
    cls, model_config = model_class_and_config(_component_class(comp), comp)
    pack_path = _pack_path(comp)
    model = _empty_model(cls, model_config, pack_path, torch_dtype)
    if reads is not None and comp.name in reads:
        device = resolve_device(device)
        return _fill(model, as_pack(reads.result(comp.name), device), device, torch_dtype, pack_path)
    return _fill(model, read_pack(pack_path, device, config=config), device, torch_dtype, pack_path)


def load_pipeline(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    reads: PackReads | None = None,
    config: LoaderConfig | None = None,
) -> DiffusionPipeline:
    """Load the diffusers pipeline of the converted directory ``path`` with weights on ``device``.

    Without ``torch_dtype`` weights keep their stored dtype. ``reads`` are pack reads already
    running (see :func:`model_loader.background.start_pack_reads`, which the app starts before the
    heavy imports); packs it lacks are read here, in the background, one after another, while the
    modules are built on the meta device and the other components load. ``config``: the loader's
    settings for those reads (by default the environment, read once).
    """
    start = time.perf_counter()
    if config is None:
        config = LoaderConfig.from_env()
    root = Path(path)
    device = resolve_device(device)
    index = read_model_index(root)
    packed = [name for name in index if not name.startswith("_") and (root / name / PACK_NAME).is_file()]
    missing = [(name, root / name / PACK_NAME, None) for name in packed if reads is None or name not in reads]
    own_reads = start_pack_reads(missing, str(device), config) if missing else None  # before importing diffusers
    try:
        pipeline_cls = _pipeline_class(index, root)
        expected, optional_kwargs = private_api.pipeline_init_keys(pipeline_cls)
        specs = _component_specs(index, root, expected, pipeline_cls)
        where = str(root / MODEL_INDEX_NAME)
        classes = {name: resolve_class(*spec, where=where) for name, spec in specs.items() if spec}
        imported = time.perf_counter()
        components: dict[str, Any] = {name: None for name, spec in specs.items() if spec is None}
        empty: dict[str, torch.nn.Module] = {}
        for name, cls in classes.items():
            comp = root / name
            if not comp.is_dir():
                raise PipelineLoadError(f"{comp}: component directory listed in model_index.json is missing")
            if issubclass(cls, torch.nn.Module):
                model_cls, model_config = model_class_and_config(cls, comp)
                empty[name] = _empty_model(model_cls, model_config, _pack_path(comp), torch_dtype)
            else:
                components[name] = _load_plain_component(cls, comp)
        built = time.perf_counter()
        total_bytes = 0
        waited = 0.0
        order = {name: i for i, name in enumerate(reads.names)} if reads is not None else {}
        for name in sorted(empty, key=lambda n: order.get(n, len(order))):  # as the reads finish
            source = own_reads if own_reads is not None and name in own_reads else reads
            t0 = time.perf_counter()
            result = source.result(name)
            waited += time.perf_counter() - t0
            pack = as_pack(result, device)
            total_bytes += pack.layout.payload_bytes
            components[name] = _fill(empty[name], pack, device, torch_dtype, root / name / PACK_NAME)
            del pack, result
    except BaseException:
        if own_reads is not None:
            own_reads.cancel()
        raise

    init_kwargs = {k: v for k, v in index.items() if k in optional_kwargs and not k.startswith("_")}
    try:
        pipe = pipeline_cls(**components, **init_kwargs)
    except (TypeError, ValueError) as exc:
        raise PipelineLoadError(f"{root}: cannot construct {pipeline_cls.__name__}: {exc}") from exc
    private_api.set_diffusers_name_or_path(pipe, str(root))
    end = time.perf_counter()
    all_reads = [r for r in (reads, own_reads) if r is not None]
    read_span = max((r.finished or end) for r in all_reads) - min(r.started for r in all_reads) if all_reads else 0.0
    logger.info(
        "load: %s %s -> %s (imports %.2f s, build %.2f s, waiting for reads %.2f s, assemble %.2f s; "
        "reads took %.2f s from their start)",
        rate_text(total_bytes, end - start), root, device,
        imported - start, built - imported, waited, end - built - waited, read_span,
    )
    return pipe


def as_pack(result: HostFile | PackData, device: torch.device) -> PackData:
    """A pack read's result as a :class:`PackData` on ``device``."""
    return result if isinstance(result, PackData) else pack_on_device(result, device)


def read_model_index(root: Path) -> dict[str, Any]:
    """The parsed ``model_index.json`` of ``root``; raises naming the file if absent or invalid."""
    if not root.is_dir():
        raise PipelineLoadError(f"{root}: not a directory (expected a converted pipeline directory)")
    try:
        return read_index_file(root / MODEL_INDEX_NAME)
    except DiffusersLayoutError as exc:
        raise PipelineLoadError(str(exc)) from None


def model_class_and_config(cls: type, component_dir: Path) -> tuple[type, Any]:
    """The class to build a torch component with, and its config.

    Like diffusers, a legacy class (``Transformer2DModel`` in older PixArt repos) is replaced by
    the class its config asks for.
    """
    config = load_component_config(cls, component_dir)
    if is_diffusers_model(cls) and isinstance(config, dict) and "norm_type" in config:
        cls = private_api.remap_legacy_model_class(cls, config)
    return cls, config


def load_component_config(cls: type, component_dir: Path) -> Any:
    """The config a torch component class is built from (diffusers dict or transformers config)."""
    config_path = component_dir / CONFIG_NAME
    if not config_path.is_file():
        raise PipelineLoadError(f"{config_path}: missing (every torch component needs its config.json)")
    try:
        if is_diffusers_model(cls):
            return cls.load_config(str(component_dir), local_files_only=True)
        if is_transformers_model(cls):
            return cls.config_class.from_pretrained(str(component_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PipelineLoadError(f"{config_path}: invalid config for {cls.__name__} ({exc})") from exc
    raise PipelineLoadError(
        f"{component_dir}: {cls.__module__}.{cls.__name__} is neither a diffusers nor a transformers "
        "model; only those can be loaded from FlashPack"
    )


def _empty_model(cls: type, config: Any, pack_path: Path, torch_dtype: torch.dtype | None) -> torch.nn.Module:
    """``cls`` on the meta device, its float buffers in the dtype the pack's weights will have."""
    return build_empty_model(cls, config, construction_dtype(read_layout(pack_path), torch_dtype))


def _fill(
    model: torch.nn.Module, pack: PackData, device: str | torch.device, torch_dtype: torch.dtype | None, pack_path: Path
) -> torch.nn.Module:
    """Fill ``model`` from ``pack`` and record its directory as where it was loaded from."""
    fill_model(model, pack, device, torch_dtype, where=str(pack_path))
    if is_diffusers_model(type(model)):
        private_api.set_diffusers_name_or_path(model, str(pack_path.parent))
    elif is_transformers_model(type(model)):
        model.config.name_or_path = str(pack_path.parent)
    return model


def _pack_path(component_dir: Path) -> Path:
    path = component_dir / PACK_NAME
    if not path.is_file():
        raise PipelineLoadError(
            f"{path}: missing; this directory has not been converted to FlashPack (run the "
            "conversion first)"
        )
    return path


def _pipeline_class(index: dict[str, Any], root: Path) -> type:
    import diffusers

    name = index["_class_name"]
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise PipelineLoadError(f"{root / MODEL_INDEX_NAME}: unknown pipeline class {name!r} (not in diffusers)")
    return cls


def _component_specs(
    index: dict[str, Any], root: Path, expected: list[str], pipeline_cls: type
) -> dict[str, tuple[str, str] | None]:
    """Component name -> ``(library, class)``, or ``None`` for one the pipeline gets as ``None``."""
    specs: dict[str, tuple[str, str] | None] = {}
    where = root / MODEL_INDEX_NAME
    for name in expected:
        entry = index.get(name)
        if entry is None:
            if name in private_api.optional_components(pipeline_cls):
                specs[name] = None
                continue
            raise PipelineLoadError(f"{where}: lacks the component {name!r} that {pipeline_cls.__name__} requires")
        if not (isinstance(entry, list) and len(entry) == 2):
            raise PipelineLoadError(f"{where}: component {name!r} must be [library, class], got {entry!r}")
        library, class_name = entry
        if library is None or class_name is None:
            specs[name] = None
        elif isinstance(library, str) and isinstance(class_name, str):
            specs[name] = (library, class_name)
        else:
            raise PipelineLoadError(f"{where}: component {name!r} must be [library, class], got {entry!r}")
    return specs


def _component_class(comp: Path) -> type:
    """Resolve a component directory's class from the parent model_index.json or its config.json."""
    index_path = comp.parent / MODEL_INDEX_NAME
    if index_path.is_file():
        try:
            spec = components(read_index_file(index_path)).get(comp.name)
        except DiffusersLayoutError:
            spec = None
        if spec is not None:
            return resolve_class(*spec, where=str(index_path))
    config_path = comp / CONFIG_NAME
    try:
        config = load_file_bounded(config_path, max_bytes=MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise PipelineLoadError(f"{config_path}: missing (every torch component needs its config.json)") from None
    except (OSError, ValueError) as exc:
        raise PipelineLoadError(f"{config_path}: cannot be read as JSON ({exc})") from None
    if isinstance(config, dict) and isinstance(config.get("_class_name"), str):
        return resolve_class("diffusers", config["_class_name"], where=str(config_path))
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return resolve_class("transformers", architectures[0], where=str(config_path))
    raise PipelineLoadError(
        f"{config_path}: names no model class (no '_class_name' or 'architectures', and no "
        f"entry for {comp.name!r} in {index_path})"
    )


def _load_plain_component(cls: type, comp: Path) -> Any:
    """Tokenizers, schedulers, feature extractors: their own ``from_pretrained``, local files only."""
    loader = getattr(cls, "from_pretrained", None)
    if loader is None:
        raise PipelineLoadError(f"{comp}: {cls.__name__} has no from_pretrained; cannot load it")
    kwargs = {"local_files_only": True} if cls.__module__.split(".")[0] in ("diffusers", "transformers") else {}
    try:
        return loader(str(comp), **kwargs)
    except (OSError, ValueError) as exc:
        raise PipelineLoadError(f"{comp}: cannot load {cls.__name__} ({exc})") from exc
