"""Any torch ``nn.Module`` from a FlashPack file: the counterpart of flashpack's ``assign_from_file``.

The module comes from the caller's own factory (``lambda: MyNet(width=64)``), built with its
parameters on the meta device (no memory, no random init) and its buffers real, then filled with
views of the pack's flat per-dtype blocks, as the diffusers and transformers components are (see
:mod:`model_loader.assemble`). ``conversion.writer.pack_module`` writes such a pack.

A converted *module* directory keeps its pack at ``<dir>/module/model.flashpack``; background
reads started for it (:func:`model_loader.start_pack_reads`) are named ``"module"``.

Importing this file does not import torch (:data:`MODULE_DIR` and :func:`module_pack_path` serve
the torch-free lookup that starts the reads); the loading functions import what they use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Union

from .diffusers_layout import PACK_NAME
from .errors import PipelineLoadError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .background import PackReads
    from .reader import PackData

# The subdirectory of a converted module directory that holds its pack, and the name of the pack
# read started for it.
MODULE_DIR = "module"
# What a module's weight files (safetensors) end with, wherever they come from.
MODULE_WEIGHT_SUFFIXES = (".safetensors", ".sft")

PackSource = Union[str, os.PathLike, "PackData"]


def module_pack_path(path: str | os.PathLike[str], must_exist: bool = True) -> Path:
    """The pack of ``path``: ``path`` itself if it is a file, else ``<path>/module/model.flashpack``.

    Raises :class:`PipelineLoadError` naming the path when there is no such file (and
    ``must_exist``).
    """
    path = Path(path)
    pack = path / MODULE_DIR / PACK_NAME if path.is_dir() else path
    if must_exist and not pack.is_file():
        where = f"{pack} (in the converted module directory {path})" if pack != path else str(pack)
        raise PipelineLoadError(f"{where}: no FlashPack file here; pack the module first (conversion.writer.pack_module)")
    return pack


def build_empty_module(factory: Callable[[], nn.Module], dtype: torch.dtype | None = None) -> nn.Module:
    """``factory()`` with its parameters on the meta device and its buffers real.

    Nothing is allocated or randomly initialized for the parameters; buffers (position ids, rotary
    frequencies) get the values ``__init__`` computes, floating ones in ``dtype`` (the default dtype
    while the factory runs), as :func:`model_loader.assemble.build_empty_model` does. Weights tied
    in ``__init__`` stay tied (see :func:`model_loader.assemble.meta_parameters`).
    """
    from torch import nn

    from .assemble import _default_dtype, is_transformers_model, meta_parameters

    with _default_dtype(dtype), meta_parameters():
        module = factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"the module factory returned {type(module).__name__}, not a torch nn.Module")
    if is_transformers_model(type(module)):
        module.tie_weights()  # as build_empty_model: ties the meta parameters before filling
    return module


def fill_module(
    module: nn.Module,
    source: PackSource,
    device: str | torch.device = "cpu",
    *,
    torch_dtype: torch.dtype | None = None,
    strict: bool = True,
    reads: PackReads | None = None,
) -> nn.Module:
    """Make the tensors of a pack the parameters and persistent buffers of ``module``; eval mode.

    ``source``: a ``.flashpack`` file, a converted module directory (its
    ``module/model.flashpack``), or a :class:`PackData` (moved to ``device`` if it is elsewhere).
    ``reads``: background pack reads; when they include ``"module"`` their result is used instead
    of reading ``source`` again. ``module`` may be on the meta device (see
    :func:`build_empty_module`) or on a real one. Parameters become views of the pack's flat
    per-dtype blocks, no copy; with ``torch_dtype`` floating-point tensors are cast first (each
    block once; a :class:`PackData` source gets the cast blocks). Tied parameters stay one
    ``Parameter``; non-persistent buffers move to ``device``.

    ``strict=True``: a missing, unexpected or ill-shaped name raises
    :class:`~model_loader.errors.StateDictMismatchError` naming each, before anything is assigned.
    ``strict=False``: names the module lacks are ignored and a tensor the pack lacks keeps the
    module's own value (moved to ``device``), unless it is on the meta device (an error: it has
    no value); shape and dtype mismatches are still errors.
    """
    from .assemble import fill_model
    from .pipeline import as_pack
    from .reader import PackData, read_pack, resolve_device

    device = resolve_device(device)
    if isinstance(source, PackData):
        pack, where = _on_device(source, device), "<PackData>"
    elif _has_read(reads):
        # The read's bytes are the pack: the file is not opened again (it may be gone by now).
        pack, where = as_pack(reads.result(MODULE_DIR), device), str(module_pack_path(source, must_exist=False))
    else:
        path = module_pack_path(source)
        pack, where = read_pack(path, device), str(path)
    return fill_model(module, pack, device, torch_dtype, where, strict=strict)


def load_module(
    factory: Callable[[], nn.Module],
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    torch_dtype: torch.dtype | None = None,
    reads: PackReads | None = None,
    strict: bool = True,
) -> nn.Module:
    """``factory()`` built on the meta device and filled from the pack at ``path`` (a file or a
    converted module directory): :func:`build_empty_module` + :func:`fill_module`.

    Floating buffers are built in ``torch_dtype``, else in the floating dtype holding most of the
    pack's elements, as :func:`model_loader.load_model` does: read from the pack's footer while
    ``reads`` still run, so the module is built meanwhile (from the read itself if the file is gone).
    """
    module = build_empty_module(factory, _construction_dtype(path, torch_dtype, reads))
    return fill_module(module, path, device, torch_dtype=torch_dtype, strict=strict, reads=reads)


def _has_read(reads: PackReads | None) -> bool:
    return reads is not None and MODULE_DIR in reads


def _construction_dtype(
    path: str | os.PathLike[str], torch_dtype: torch.dtype | None, reads: PackReads | None
) -> torch.dtype | None:
    from .assemble import construction_dtype
    from .format import read_layout
    from .reader import PackData, pack_from_host

    if torch_dtype is not None:
        return torch_dtype
    pack_path = module_pack_path(path, must_exist=not _has_read(reads))
    if pack_path.is_file():
        layout = read_layout(pack_path)
    else:  # only with a read of it: its layout, once that read has finished
        result = reads.result(MODULE_DIR)
        layout = result.layout if isinstance(result, PackData) else pack_from_host(result).layout
    return construction_dtype(layout, None)


def _on_device(pack: PackData, device: torch.device) -> PackData:
    from .reader import PackData

    if all(block.device == device for block in pack.blocks):
        return pack
    return PackData(pack.layout, [block.to(device) for block in pack.blocks], pack.stats)


def read_module_tensors(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, reads: PackReads | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a converted module directory's pack (or a ``.flashpack`` file) by name, each a
    view into its dtype's flat block on ``device``: for weights a library loads from a state dict
    (an IP-Adapter's), checked by the pack's checksums as they are read. ``reads``: background
    pack reads; when they include ``"module"`` their result is used instead of reading again."""
    from .pipeline import as_pack
    from .reader import read_pack, resolve_device

    device = resolve_device(device)
    if _has_read(reads):
        return as_pack(reads.result(MODULE_DIR), device).tensors()
    return read_pack(module_pack_path(path), device).tensors()
