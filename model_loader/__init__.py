"""FlashPack format and the stream-pipelined loader."""

from .format import FlashPackFormatError, PackLayout, read_layout
from .pipeline import load_model, load_pipeline
from .prefetch import Prefetch, prefetch
from .reader import PackData, load_state_dict, read_pack

__all__ = [
    "FlashPackFormatError",
    "PackData",
    "PackLayout",
    "Prefetch",
    "load_model",
    "load_pipeline",
    "load_state_dict",
    "prefetch",
    "read_layout",
    "read_pack",
]
