"""FlashPack format and the stream-pipelined loader."""

from .format import FlashPackFormatError, PackLayout, read_layout
from .reader import PackData, load_state_dict, read_pack

__all__ = [
    "FlashPackFormatError",
    "PackData",
    "PackLayout",
    "load_state_dict",
    "read_layout",
    "read_pack",
]
