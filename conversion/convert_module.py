"""Convert a torch module's safetensors weights (one file, or the shards of one state dict) into a
converted module directory: ``module/model.flashpack`` (model_loader.module's layout) and the
manifest. Tensors are streamed one at a time (peak memory is one tensor), floating ones cast to the
store's dtype. What the module's class is stays the app's business: the pack is checked against it
when it is loaded (strict key and shape checks there)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from model_loader.diffusers_layout import PACK_NAME
from model_loader.format import dtype_name
from model_loader.module import MODULE_DIR, MODULE_WEIGHT_SUFFIXES
from model_loader.rates import rate_text

from .durable import fsync_dir
from .errors import ConversionError
from .writer import PackDigest, index_safetensors, shard_files, write_pack

log = logging.getLogger("conversion.convert")



def weight_files(path: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a module's weights at ``path``: the file itself, or a directory's
    shards (those its ``*.safetensors.index.json`` names, else every ``*.safetensors`` in it)."""
    path = Path(path)
    if path.is_file():
        return [path]  # named by its source (a URL's download may have no suffix): its header decides
    if not path.is_dir():
        raise ConversionError(f"{path}: no such file or directory of module weights")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{path}: more than one shard index ({', '.join(p.name for p in indexes)}); "
                              "keep the one of these weights")
    if indexes:
        return shard_files(indexes[0])
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(MODULE_WEIGHT_SUFFIXES))
    if not files:
        raise ConversionError(f"{path}: no .safetensors file in this directory of module weights")
    return files


def convert_module(src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: torch.dtype | None = None,
                   source: dict[str, Any] | None = None) -> Path:
    """Pack the module weights at ``src`` (a safetensors file or a directory of shards) into the new
    directory ``dst``, with the manifest recording ``source`` and ``dtype``. Returns ``dst``."""
    from .manifest import write_manifest

    start = time.perf_counter()
    files = weight_files(src)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst}: already exists and is not empty")
    (dst / MODULE_DIR).mkdir(parents=True, exist_ok=True)
    index = index_safetensors(files)
    if not index:
        raise ConversionError(f"{src}: the weights hold no tensor")
    digests: dict[Path, PackDigest] = {}
    pack = dst / MODULE_DIR / PACK_NAME
    specs = [(name, shape, stored) for name, (_, shape, stored) in index.items()]
    layout = write_pack(specs, lambda name: index[name][0].get_tensor(name), pack, dtype, digests=digests)
    fsync_dir(dst)
    write_manifest(dst, {**(source or {}), "dtype": dtype_name(dtype) if dtype is not None else None}, digests)
    log.info("convert: %s %s -> %s (%d tensors)", rate_text(layout.payload_bytes, time.perf_counter() - start),
             src, dst, len(specs))
    return dst
