"""Single-file checkpoints: which format a file is, and whether it is visibly damaged (truncated).

Torch-free: the header is parsed within limits (``model_loader.bounded_json``), never executed.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from model_loader.bounded_json import loads_bounded

_MAX_HEADER_BYTES = 100 << 20  # safetensors caps its header at 100 MB


class HeaderError(ValueError):
    """A file starts like safetensors but its header cannot be read."""


def safetensors_header(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any]] | None:
    """(header length, parsed header) of a safetensors file; None when the file is not safetensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9 or head[8:9] != b"{":
            return None
        n = int.from_bytes(head[:8], "little")
        if not 0 < n < min(size, _MAX_HEADER_BYTES):
            return None
        try:
            header = loads_bounded(b"{" + f.read(n - 1), max_bytes=n)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HeaderError(str(exc)) from None
    if not isinstance(header, dict):
        raise HeaderError("not a JSON object")
    return n, header


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts like a safetensors file (8-byte header length, then ``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def checkpoint_problem(path: Path) -> str | None:
    """Why a single-file checkpoint is visibly damaged (truncated), or None.

    safetensors: the header must parse and the file must end where its last tensor ends.
    ``.ckpt`` (a zip): the central directory at the end must be there. Other formats pass.
    """
    try:
        parsed = safetensors_header(path)
    except HeaderError:
        return "unreadable safetensors header"
    size = os.path.getsize(path)
    if parsed is not None:
        n, header = parsed
        ends = [v["data_offsets"][1] for k, v in header.items()
                if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
        expected = 8 + n + max(ends, default=0)
        if size != expected:
            return f"safetensors file is {size} bytes, its header says {expected}"
        return None
    with open(path, "rb") as f:
        if f.read(2) == b"PK" and not zipfile.is_zipfile(path):
            return "zip (.ckpt) file without its central directory"
    return None
