"""Convert a local diffusers pipeline directory into a converted (FlashPack) directory.

Each torch component becomes ``<comp>/model.flashpack`` beside its ``config.json``. When the
component's safetensors tensors fit its model class exactly (checked on a meta-device model, after
the key renames ``from_pretrained`` would apply), they are streamed file to file one at a time, so
peak memory is one tensor; otherwise (``.bin`` weights, fused/split weight conversions) the model
is loaded on the CPU with its own ``from_pretrained`` and its state dict is written. Tokenizers,
schedulers and other files are copied. The manifest is written last.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from model_loader import private_api
from model_loader.assemble import (
    build_empty_model,
    check_tensors,
    is_diffusers_model,
    is_transformers_model,
    keep_in_fp32_rule,
    non_persistent_buffer_names,
)
from model_loader.bounded_json import load_file_bounded
from model_loader.diffusers_layout import (
    MAX_CONFIG_BYTES,
    MODEL_INDEX_NAME,
    PACK_NAME,
    choose_weights,
    components,
    is_weight_file,
    read_model_index,
    variants_present,
)
from model_loader.errors import DiffusersLayoutError, PipelineLoadError, StateDictMismatchError
from model_loader.format import dtype_name
from model_loader.pipeline import model_class_and_config, resolve_class
from model_loader.rates import rate_text

from .durable import fsync_dir
from .errors import ConversionError
from .symlinks import warn_broken_symlink
from .writer import PackDigest, index_safetensors, write_pack

logger = logging.getLogger("conversion.convert")


def convert_pipeline(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    source: dict | None = None,
    variant: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Convert the diffusers pipeline at ``src_dir`` into ``dst_dir`` (absent or empty).

    ``dtype`` casts floating-point weights (never integer/bool buffers; modules the model class
    keeps in float32 stay float32, as with ``from_pretrained(torch_dtype=...)``). ``variant``
    (e.g. ``"fp16"``) reads ``*.fp16.safetensors`` where a component has them. ``source`` is
    recorded in the manifest with ``dtype`` and ``variant``. ``show_progress``: draw a progress
    bar (on a terminal; ``ConversionConfig.show_progress`` says whether). Returns ``dst_dir``.
    """
    from .manifest import write_manifest

    start = time.perf_counter()
    src, dst = Path(src_dir), Path(dst_dir)
    index = _read_index(src)
    components = _plan(src, index, variant)
    _prepare_destination(dst)

    total_source = sum(f.stat().st_size for _, w in components.values() if w for f in w[0])
    written = 0
    digests: dict[Path, PackDigest] = {}  # each pack hashed as it is written: the manifest reads none back
    with tqdm(total=total_source, unit="B", unit_scale=True, desc="convert", disable=not show_progress or None) as bar:
        for name, (cls, weights) in components.items():
            comp_src, comp_dst = src / name, dst / name
            if weights is None:
                _copy_tree(comp_src, comp_dst)
                continue
            bar.set_postfix_str(name)
            if variant and weights[1] is None:
                logger.info("convert: %s has no %s variant; using its default weights", name, variant)
            written += _convert_model(name, cls, comp_src, comp_dst, dtype, weights, bar, digests)
    _copy_file(src / MODEL_INDEX_NAME, dst / MODEL_INDEX_NAME)
    fsync_dir(dst)

    info = dict(source or {})
    info["dtype"] = dtype_name(dtype) if dtype is not None else None
    info["variant"] = variant
    write_manifest(dst, info, digests)
    elapsed = time.perf_counter() - start
    logger.info("convert: %s %s -> %s", rate_text(written, elapsed), src, dst)
    return dst


def _read_index(src: Path) -> dict[str, Any]:
    try:
        return read_model_index(src / MODEL_INDEX_NAME)
    except DiffusersLayoutError as exc:
        raise ConversionError(str(exc)) from None


_Weights = tuple[list[Path], str | None]


def _plan(src: Path, index: Mapping[str, Any], variant: str | None) -> dict[str, tuple[type, _Weights | None]]:
    """Component name -> (class, (safetensors files, their variant) or None for a non-torch
    component); every component is checked before anything is written."""
    plan: dict[str, tuple[type, _Weights | None]] = {}
    try:
        listed = components(index)
    except DiffusersLayoutError as exc:
        raise ConversionError(f"{src / MODEL_INDEX_NAME}: {exc}") from None
    for name, spec in listed.items():
        if spec is None:
            continue
        try:
            cls = resolve_class(*spec, where=str(src / MODEL_INDEX_NAME))
        except PipelineLoadError as exc:
            raise ConversionError(str(exc)) from None
        comp = src / name
        if not comp.is_dir():
            raise ConversionError(f"{comp}: component directory listed in model_index.json is missing")
        plan[name] = (cls, weight_files(comp, variant) if issubclass(cls, torch.nn.Module) else None)
    return plan


def _prepare_destination(dst: Path) -> None:
    if dst.exists():
        if not dst.is_dir():
            raise ConversionError(f"{dst}: exists and is not a directory")
        if any(dst.iterdir()):
            raise ConversionError(f"{dst}: not empty; convert into a new or empty directory")
    dst.mkdir(parents=True, exist_ok=True)


def weight_files(comp: Path, variant: str | None) -> tuple[list[Path], str | None]:
    """The safetensors files of one component (all shards) and the variant they are, as
    ``choose_weights`` picks them; ``([], variant)`` for ``.bin`` weights (loaded by their own
    ``from_pretrained``), ``([], None)`` if there are none."""
    try:
        chosen = choose_weights(os.listdir(comp), variant, comp.name)
    except DiffusersLayoutError as exc:
        raise ConversionError(f"{comp}: {exc}") from None
    if chosen is None:
        return [], None
    if chosen.ext != "safetensors":
        return [], chosen.variant
    if chosen.shard_index is not None:
        return _shards(comp / chosen.shard_index), chosen.variant
    return [comp / f for f in chosen.files], chosen.variant


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = load_file_bounded(index, max_bytes=MAX_CONFIG_BYTES)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConversionError(f"{index}: not a valid safetensors index ({exc})") from None
    files = [index.parent / n for n in names]
    for f in files:
        if not f.is_file():
            raise ConversionError(f"{f}: shard listed in {index.name} is missing")
    return files


def _convert_model(
    name: str, cls: type, comp_src: Path, comp_dst: Path, dtype: torch.dtype | None,
    weights: _Weights, bar: tqdm, digests: dict[Path, PackDigest],
) -> int:
    """Write one torch component's pack and side files; returns the pack's payload bytes."""
    start = time.perf_counter()
    try:
        cls, config = model_class_and_config(cls, comp_src)
    except PipelineLoadError as exc:
        raise ConversionError(str(exc)) from None
    files, used_variant = weights
    model = build_empty_model(cls, config, torch.float32)
    keep_fp32 = keep_in_fp32_rule(model, dtype)
    pack_path = comp_dst / PACK_NAME
    comp_dst.mkdir(parents=True, exist_ok=True)

    layout = None
    how = "streamed"
    if files:
        layout = _stream_safetensors(model, files, pack_path, dtype, keep_fp32, bar, digests)
    if layout is None:
        how = "loaded"
        layout = _load_and_write(cls, comp_src, used_variant, model, pack_path, dtype, keep_fp32, files, bar,
                                 digests)
    for f in sorted(comp_src.iterdir()):
        if f.is_file() and not is_weight_file(f.name):
            _copy_file(f, comp_dst / f.name)
    fsync_dir(comp_dst)
    elapsed = time.perf_counter() - start
    nbytes = layout.payload_bytes
    logger.info("convert: %s (%s, %s) %s", name, cls.__name__, how, rate_text(nbytes, elapsed))
    return nbytes


def _target(dtype: torch.dtype | None, keep_fp32: Callable[[str], bool]) -> Callable[[str, torch.dtype], torch.dtype]:
    def stored(name: str, src: torch.dtype) -> torch.dtype:
        if dtype is None or not src.is_floating_point:
            return src
        return torch.float32 if keep_fp32(name) else dtype

    return stored


def _stream_safetensors(model, files, pack_path, dtype, keep_fp32, bar, digests):
    """Stream tensors file to pack if the files' keys fit the model (after the renames its
    library applies on load, e.g. a legacy prefix); None when they don't."""
    index = index_safetensors(files)
    try:
        file_shapes = {key: (shape, dt) for key, (_, shape, dt) in index.items()}
        renamed = checkpoint_key_map(model, list(file_shapes))
        if renamed is None:
            logger.info("convert: %s needs weight conversion ops; loading it instead", files[0].parent)
            return None
        ignored = ignored_on_load(model)
        renamed = {old: new for old, new in renamed.items() if not ignored(new)}
        shapes = {new: file_shapes[old] for old, new in renamed.items()}
        if len(shapes) != len(renamed):
            logger.info("convert: %s: two checkpoint keys map to one name; loading it instead", files[0].parent)
            return None
        try:
            chosen = check_tensors(model, shapes, str(files[0].parent))
        except StateDictMismatchError as exc:
            logger.info(
                "convert: %s does not match %s (%s); loading it instead", files[0].parent, type(model).__name__, exc
            )
            return None
        source_key = {new: old for old, new in renamed.items()}
        stored = _target(dtype, keep_fp32)
        specs = [(k, shape, stored(k, dt)) for k, (shape, dt) in shapes.items() if chosen[k] == k]

        def get(key: str) -> torch.Tensor:
            old = source_key[key]
            t = index[old][0].get_tensor(old)
            bar.update(t.nbytes)
            return t

        return write_pack(specs, get, pack_path, digests=digests)
    finally:
        index.clear()  # close the shard handles now, not at garbage collection


def ignored_on_load(model: torch.nn.Module) -> Callable[[str], bool]:
    """Checkpoint names ``from_pretrained`` skips without complaint: the model's non-persistent
    buffers (old checkpoints saved ``position_ids``) and its ``_keys_to_ignore_on_load_unexpected``."""
    buffers = non_persistent_buffer_names(model)
    patterns = private_api.keys_ignored_on_load(model)
    regex = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    return lambda name: name in buffers or (regex is not None and regex.search(name) is not None)


def checkpoint_key_map(model: torch.nn.Module, keys: list[str]) -> dict[str, str] | None:
    """Checkpoint key -> the model's name for it, with the renames ``from_pretrained`` applies:
    diffusers' deprecated attention names; transformers' key renamings and base-model prefix.
    None when a key needs a transformers weight *converter* (fused/split tensors)."""
    if is_diffusers_model(type(model)):
        return private_api.diffusers_key_renames(model, keys)
    if is_transformers_model(type(model)):
        return private_api.transformers_key_renames(model, keys)
    return {k: k for k in keys}


def _load_and_write(cls, comp_src, variant, model, pack_path, dtype, keep_fp32, files, bar, digests):
    """Load the component with its own ``from_pretrained`` on the CPU and write its state dict."""
    kwargs: dict[str, Any] = {"local_files_only": True}
    if variant:
        kwargs["variant"] = variant
    load_dtype = dtype if dtype is not None else _dominant_float_dtype(files)
    if is_transformers_model(cls):
        kwargs["dtype"] = load_dtype if load_dtype is not None else "auto"
    elif is_diffusers_model(cls):
        kwargs["low_cpu_mem_usage"] = True
        if load_dtype is not None:
            kwargs["torch_dtype"] = load_dtype
    try:
        loaded = cls.from_pretrained(str(comp_src), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        variants = variants_present(os.listdir(comp_src))
        hint = f" (it has variant weights {variants}: pass variant=)" if variants and not variant else ""
        raise ConversionError(f"{comp_src}: cannot load {cls.__name__} weights{hint}: {exc}") from exc
    state = loaded.state_dict()
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
    try:
        chosen = check_tensors(model, shapes, str(comp_src))
    except StateDictMismatchError as exc:
        raise ConversionError(str(exc)) from exc
    stored = _target(dtype, keep_fp32)
    specs = [(k, shape, stored(k, dt)) for k, (shape, dt) in shapes.items() if chosen[k] == k]

    def get(key: str) -> torch.Tensor:
        t = state[key]
        bar.update(t.nbytes)
        return t

    return write_pack(specs, get, pack_path, digests=digests)


def _dominant_float_dtype(files: list[Path]) -> torch.dtype | None:
    """The floating dtype holding most elements of these safetensors files (headers only)."""
    counts: dict[torch.dtype, int] = {}
    for _, shape, dt in index_safetensors(files).values():
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + math.prod(shape)
    return max(counts, key=counts.__getitem__) if counts else None


def _copy_file(src: Path, dst: Path) -> None:
    """Copy (following symlinks, as in a Hub snapshot) and fsync."""
    try:
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
    except OSError as exc:
        raise ConversionError(f"cannot copy {src} to {dst}: {exc.strerror or exc}") from exc


def _copy_tree(src: Path, dst: Path) -> None:
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs.sort()
        out = dst / Path(root).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            path = Path(root) / name
            if path.is_symlink() and not path.exists():
                warn_broken_symlink(path)  # nothing to copy; a component that needs it says so on load
                continue
            _copy_file(path, out / name)
        fsync_dir(out)
