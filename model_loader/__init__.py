"""FlashPack format and the stream-pipelined loader.

Names are imported on first use (PEP 562), so ``import model_loader.prefetch`` does not pull in
torch: the app starts the prefetch before the heavy imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FlashPackFormatError": "errors",
    "PackLayout": "format",
    "read_layout": "format",
    "PackReadError": "io",
    "StateDictMismatchError": "assemble",
    "PipelineLoadError": "pipeline",
    "load_model": "pipeline",
    "load_pipeline": "pipeline",
    "Prefetch": "prefetch",
    "start_prefetch": "prefetch",
    "PackData": "reader",
    "ReadStats": "reader",
    "load_state_dict": "reader",
    "read_pack": "reader",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .assemble import StateDictMismatchError
    from .errors import FlashPackFormatError
    from .format import PackLayout, read_layout
    from .io import PackReadError
    from .pipeline import PipelineLoadError, load_model, load_pipeline
    from .prefetch import Prefetch
    from .prefetch import prefetch as start_prefetch
    from .reader import PackData, ReadStats, load_state_dict, read_pack


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model_loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), "prefetch" if name == "start_prefetch" else name)
    globals()[name] = value
    return value
