"""The dtype names a user may give (fal.toml's ``model.dtype``, the CLI's ``--dtype``), in one place.

Torch-free until a torch dtype is asked for: the warm lookup keys the store by ``dtype_name``.
"""

from __future__ import annotations

from typing import Any

from .errors import ConversionError

DTYPE_ALIASES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


def dtype_name(dtype: Any) -> str:
    """The canonical name of a dtype (``"fp16"``, ``torch.float16``, ...) as store keys record it;
    ``"source"`` for None (keep the source's dtypes)."""
    if dtype is None:
        return "source"
    name = DTYPE_ALIASES.get(str(dtype).removeprefix("torch.").strip().lower())
    if name is None:
        raise ConversionError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_ALIASES)})")
    return name


def dtype_key(dtype: Any) -> tuple[Any, str]:
    """(torch dtype or None, its canonical name): None keeps the source's dtypes."""
    name = dtype_name(dtype)
    if name == "source":
        return None, name
    import torch

    return getattr(torch, name), name
