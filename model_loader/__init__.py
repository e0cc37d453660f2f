"""FlashPack format and the stream-pipelined loader.

Names are imported on first use (PEP 562), so ``from model_loader import start_pack_reads`` does
not pull in torch: the app starts reading the packs before the heavy imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Checksum": "checksum",
    "ChecksumMismatchError": "errors",
    "FlashPackFormatError": "errors",
    "HostFile": "host_read",
    "PackReads": "host_read",
    "read_file": "host_read",
    "start_pack_reads": "host_read",
    "PackLayout": "format",
    "read_layout": "format",
    "PackReadError": "io",
    "StateDictMismatchError": "assemble",
    "PipelineLoadError": "pipeline",
    "load_model": "pipeline",
    "load_pipeline": "pipeline",
    "PackData": "reader",
    "ReadStats": "host_read",
    "load_state_dict": "reader",
    "read_pack": "reader",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .assemble import StateDictMismatchError
    from .checksum import Checksum
    from .errors import ChecksumMismatchError, FlashPackFormatError
    from .format import PackLayout, read_layout
    from .host_read import HostFile, PackReads, ReadStats, read_file, start_pack_reads
    from .io import PackReadError
    from .pipeline import PipelineLoadError, load_model, load_pipeline
    from .reader import PackData, load_state_dict, read_pack


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model_loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
