"""The FlashPack format and the loader that reads packs into torch modules and diffusers pipelines.

Modules, bottom up (the first eight are torch-free: the app starts reading packs before torch is
imported):

- ``errors``: every error type the loader raises.
- ``config``: :class:`LoaderConfig`, the ``MODEL_LOADER_*`` environment variables, read in one place.
- ``rates``: the ``X GB in Y s (Z GB/s)`` text of every log line that moves bytes.
- ``bounded_json``: JSON from files we did not write, parsed within size and depth limits.
- ``checksum``: per-segment xxh3 checksums, recorded at conversion, checked as packs are read.
- ``posix_io``: ``preadv``/O_DIRECT reads, page-cache residency (``mincore``), ``madvise`` hints.
- ``host_read``: a whole pack into host memory (mapped or read by parallel threads).
- ``background``: :func:`start_pack_reads`, which runs the reads of packs in the background (for
  a GPU through ``reader``, imported only then).
- ``format``: the FlashPack layout: planning (for the writer in ``conversion``), footer encoding,
  and the footer parser that validates everything a reader relies on (docs/FLASHPACK_FORMAT.md).
- ``pinned``: the process-wide pool of pinned staging buffers for CUDA loads.
- ``reader``: a pack into one flat tensor per dtype on the target device (:func:`read_pack`).
- ``private_api``: every private torch / transformers / diffusers API that the loader and
  ``conversion/convert.py`` use, with the versions it was checked against.
- ``assemble``: modules built on the meta device and filled with views of the loaded blocks.
- ``pipeline``: diffusers pipelines and single models from a converted directory.
- ``module``: any torch ``nn.Module`` from its own factory and a pack (:func:`load_module`).

Names below are imported on first use (PEP 562), so ``from model_loader import start_pack_reads``
does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "Checksum": "checksum",
    "ChecksumMismatchError": "errors",
    "ConfigError": "errors",
    "FlashPackFormatError": "errors",
    "HostFile": "host_read",
    "LoaderConfig": "config",
    "MODULE_DIR": "module",
    "PackData": "reader",
    "PackLayout": "format",
    "PackReadError": "errors",
    "PackReads": "background",
    "PipelineLoadError": "errors",
    "ReadStats": "host_read",
    "StateDictMismatchError": "errors",
    "build_empty_module": "module",
    "fill_module": "module",
    "load_model": "pipeline",
    "load_module": "module",
    "load_pipeline": "pipeline",
    "load_state_dict": "reader",
    "read_file": "host_read",
    "read_module_tensors": "module",
    "read_layout": "format",
    "read_pack": "reader",
    "start_pack_reads": "background",
}

__all__ = [
    "Checksum",
    "ChecksumMismatchError",
    "ConfigError",
    "FlashPackFormatError",
    "HostFile",
    "LoaderConfig",
    "MODULE_DIR",
    "PackData",
    "PackLayout",
    "PackReadError",
    "PackReads",
    "PipelineLoadError",
    "ReadStats",
    "StateDictMismatchError",
    "build_empty_module",
    "fill_module",
    "load_model",
    "load_module",
    "load_pipeline",
    "load_state_dict",
    "read_file",
    "read_module_tensors",
    "read_layout",
    "read_pack",
    "start_pack_reads",
]

if TYPE_CHECKING:
    from .background import PackReads, start_pack_reads
    from .checksum import Checksum
    from .config import LoaderConfig
    from .errors import (
        ChecksumMismatchError,
        ConfigError,
        FlashPackFormatError,
        PackReadError,
        PipelineLoadError,
        StateDictMismatchError,
    )
    from .format import PackLayout, read_layout
    from .host_read import HostFile, ReadStats, read_file
    from .module import MODULE_DIR, build_empty_module, fill_module, load_module
    from .pipeline import load_model, load_pipeline
    from .reader import PackData, load_state_dict, read_pack


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model_loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
