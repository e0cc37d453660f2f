"""Write FlashPack files byte-identical to ``flashpack.pack_to_file``, one tensor at a time.

The file is built as a temporary sibling, fsynced, renamed into place and the directory fsynced,
so a reader sees either the old file, the complete new one, or nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from model_loader.bounded_json import load_file_bounded
from model_loader.checksum import Checksum, SegmentHasher
from model_loader.diffusers_layout import MAX_CONFIG_BYTES
from model_loader.format import (
    DEFAULT_ALIGN_BYTES,
    PackLayout,
    encode_footer,
    plan_layout,
    storage_dtype,
)

from .durable import atomic_file
from .errors import ConversionError

_ZEROS = bytes(1 << 16)
# What a pack's bytes hashed to as they were written: (sha256 hex, load-time segment checksum).
PackDigest = tuple[str, Checksum]


class _HashingFile:
    """Hashes every byte written through it (sha256 and the segment checksum), so the manifest
    needs no second read of the pack (on a network volume, a read back through the mount)."""

    def __init__(self, f):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.segments = SegmentHasher()

    def write(self, data) -> int:
        self.sha256.update(data)
        self.segments.update(data)
        return self.f.write(data)

    def digest(self) -> PackDigest:
        return self.sha256.hexdigest(), self.segments.result()


def stored_dtype(dtype: torch.dtype, target_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written as: ``target_dtype`` for floating-point tensors only.

    Integer and bool tensors (token ids, position ids, masks) are never cast: fp16 cannot hold
    every int64 id above 2048.
    """
    if target_dtype is not None and dtype.is_floating_point:
        return target_dtype
    return dtype


def write_pack(
    specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
    get_tensor: Callable[[str], torch.Tensor],
    path: str | os.PathLike[str],
    target_dtype: torch.dtype | None = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
    digests: dict[Path, PackDigest] | None = None,
) -> PackLayout:
    """Write a FlashPack file from tensor specs ``(name, shape, dtype)`` and a per-name getter.

    ``get_tensor`` is called once per tensor, in file order, so peak memory is one tensor (plus
    its cast), never the whole state dict. With ``digests``, the pack's :data:`PackDigest` is
    stored there under ``path`` once the file is in place.
    """
    path = Path(path)
    planned = [(n, shape, stored_dtype(dtype, target_dtype)) for n, shape, dtype in specs]
    layout = plan_layout(planned, align_bytes)
    with atomic_file(path) as f:
        out = _HashingFile(f) if digests is not None else f
        _write_payload(out, layout, get_tensor)
        out.write(encode_footer(layout))
    if digests is not None:
        digests[path] = out.digest()
    return layout


def pack_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    target_dtype: torch.dtype | None = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
) -> PackLayout:
    """Write ``state_dict`` to ``path`` as FlashPack (what ``flashpack.pack_to_file`` writes)."""
    specs = [(name, tuple(t.shape), t.dtype) for name, t in state_dict.items()]
    return write_pack(specs, state_dict.__getitem__, path, target_dtype, align_bytes)


def pack_module(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    target_dtype: torch.dtype | None = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
) -> PackLayout:
    """Write the state dict of ``module`` (parameters and persistent buffers) to ``path`` as FlashPack.

    What ``flashpack.pack_to_file(module, ...)`` writes, except that a tied tensor (one tensor
    under two names) is stored once, under its first name (``model_loader.fill_module`` fills
    every name of it from there), and ``target_dtype`` casts floating-point tensors only.
    ``model_loader.load_module`` / ``fill_module`` read it back.
    """
    unique: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():  # the module's own objects: ties show
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.is_meta:
            raise ConversionError(
                f"{type(module).__name__}: tensor {name!r} is on the meta device (no values to write); "
                "load or initialize the module's weights before packing it"
            )
        unique[name] = tensor
    return pack_state_dict(unique, path, target_dtype, align_bytes)


def pack_safetensors(
    sources: Iterable[str | os.PathLike[str]],
    path: str | os.PathLike[str],
    target_dtype: torch.dtype | None = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
) -> PackLayout:
    """Pack one or more safetensors files (shards of one state dict) without loading them whole."""
    index = index_safetensors(sources)
    specs = [(name, shape, dtype) for name, (_, shape, dtype) in index.items()]
    return write_pack(specs, lambda n: index[n][0].get_tensor(n), path, target_dtype, align_bytes)


def shard_files(index: Path) -> list[Path]:
    """The shards a ``*.safetensors.index.json`` names (its ``weight_map``'s files), each a file in
    the index's own folder; a ConversionError naming the index (or the missing shard) otherwise."""
    try:
        weight_map = load_file_bounded(index, max_bytes=MAX_CONFIG_BYTES)["weight_map"]
        names = sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConversionError(f"{index}: not a valid safetensors index ({exc})") from None
    outside = [n for n in names if "/" in n or "\\" in n or n in ("", ".", "..")]
    if outside:
        raise ConversionError(f"{index}: names shard(s) that are not in {index.parent}: {', '.join(outside)}")
    files = [index.parent / name for name in names]
    for f in files:
        if not f.is_file():
            raise ConversionError(f"{f}: shard listed in {index.name} is missing")
    return files


def index_safetensors(
    sources: Iterable[str | os.PathLike[str]],
) -> dict[str, tuple[Any, tuple[int, ...], torch.dtype]]:
    """``name -> (open handle, shape, dtype)`` over the shards of one state dict; reads headers only.

    A file that is not safetensors, or a name in two shards, raises ConversionError naming it.
    """
    from safetensors import safe_open

    index: dict[str, tuple[Any, tuple[int, ...], torch.dtype]] = {}
    for src in sources:
        try:
            handle = safe_open(os.fspath(src), framework="pt")
        except Exception as exc:  # safetensors raises its own types for bad headers
            raise ConversionError(f"{src}: not a readable safetensors file ({exc})") from exc
        for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            if name in index:
                raise ConversionError(f"{src}: tensor {name!r} appears in more than one shard")
            sl = handle.get_slice(name)
            index[name] = (handle, tuple(sl.get_shape()), safetensors_dtype(sl.get_dtype()))
    return index


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}


def safetensors_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``F16`` -> ``torch.float16``)."""
    try:
        return _SAFETENSORS_DTYPES[name]
    except KeyError:
        raise ConversionError(f"safetensors dtype {name} is not supported") from None


def _write_payload(f, layout: PackLayout, get_tensor: Callable[[str], torch.Tensor]) -> None:
    cursor = 0
    for block_id, block in enumerate(layout.blocks):
        cursor = _pad_to(f, cursor, block.offset_bytes)
        esize = block.length_bytes // block.length_elems if block.length_elems else 0
        for entry in (e for e in layout.entries if e.block == block_id):
            cursor = _pad_to(f, cursor, block.offset_bytes + entry.offset * esize)
            if entry.length == 0:
                continue
            src = get_tensor(entry.name)
            if tuple(src.shape) != entry.shape:
                raise ConversionError(
                    f"tensor {entry.name!r} has shape {tuple(src.shape)}, expected {entry.shape}"
                )
            data = src.detach().to(device="cpu", dtype=block.dtype).reshape(-1).contiguous()
            raw = data.view(storage_dtype(block.dtype)).view(torch.uint8).numpy()
            f.write(memoryview(raw))
            cursor += raw.nbytes
    _pad_to(f, cursor, layout.payload_bytes)


def _pad_to(f, cursor: int, target: int) -> int:
    while cursor < target:
        n = min(target - cursor, len(_ZEROS))
        f.write(_ZEROS[:n])
        cursor += n
    return cursor
