"""The FlashPack file format (as written by flashpack 0.4.5): layout planning, footer encoding,
and a footer parser that validates everything a reader relies on.

Layout: ``[block 0 | pad | block 1 | ...][footer JSON][u64le footer length][b"FLASHPK\\0"]``.
One block per dtype; tensors are views at element offsets inside their dtype's block.
See docs/FLASHPACK_FORMAT.md for the byte-level description.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from .bounded_json import loads_bounded
from .errors import FlashPackFormatError, JSONLimitError

MAGIC = b"FLASHPK\0"
TRAILER = struct.Struct("<Q8s")  # footer length, magic
FORMAT_V3 = "flashpack_v3"
FORMAT_V4 = "flashpack_v4"
DEFAULT_ALIGN_BYTES = 128
# A footer larger than this is not a FlashPack footer (an SDXL UNet's is ~250 KB).
MAX_FOOTER_BYTES = 256 * 1024 * 1024

_V3_KEYS = {"format", "target_dtype", "align_bytes", "total_elems", "index"}
_V4_KEYS = {"format", "align_bytes", "total_payload_bytes", "total_elems", "macroblocks", "index"}
_V3_ENTRY_KEYS = {"name", "shape", "offset", "length"}
_V4_ENTRY_KEYS = _V3_ENTRY_KEYS | {"macroblock"}
_BLOCK_KEYS = {"dtype", "offset_bytes", "length_bytes", "length_elems"}


def _supported_dtypes() -> dict[str, torch.dtype]:
    names = [
        "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
        "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    ]
    return {n: getattr(torch, n) for n in names if isinstance(getattr(torch, n, None), torch.dtype)}


DTYPES: dict[str, torch.dtype] = _supported_dtypes()
DTYPE_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``; raises for dtypes the format cannot store."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise FlashPackFormatError(f"dtype {dtype} cannot be stored in a FlashPack file") from None


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype with the same width, used to move raw bit patterns (bf16, fp8, ...)."""
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}[
        element_size(dtype)
    ]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: its element offset and count inside block ``block``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    length: int
    block: int


@dataclass(frozen=True)
class Block:
    """One contiguous run of bytes holding every tensor of one dtype."""

    dtype: torch.dtype
    offset_bytes: int
    length_elems: int

    @property
    def length_bytes(self) -> int:
        return self.length_elems * element_size(self.dtype)

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + self.length_bytes


@dataclass(frozen=True)
class PackLayout:
    """Where every tensor lives in a pack: the parsed (or planned) footer."""

    align_bytes: int
    blocks: tuple[Block, ...]
    entries: tuple[TensorEntry, ...]

    @property
    def payload_bytes(self) -> int:
        return max((b.end_bytes for b in self.blocks), default=0)

    @property
    def total_elems(self) -> int:
        return sum(b.length_elems for b in self.blocks)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def plan_layout(
    tensors: Iterable[tuple[str, Sequence[int], torch.dtype]],
    align_bytes: int = DEFAULT_ALIGN_BYTES,
) -> PackLayout:
    """Plan the layout flashpack 0.4.5 writes for ``(name, shape, stored dtype)`` in state-dict order.

    Tensors are stably sorted by element count (largest first); one block per dtype in order of
    first appearance; block starts aligned to ``lcm(align, elem)``; tensor starts to
    ``align // gcd(align, elem)`` elements.
    """
    if align_bytes < 0:
        raise ValueError(f"align_bytes must be >= 0, got {align_bytes}")
    items = [(name, tuple(int(s) for s in shape), dtype) for name, shape, dtype in tensors]
    if not items:
        raise ValueError("nothing to pack: the state dict has no tensors")
    seen: set[str] = set()
    for name, _, dtype in items:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        dtype_name(dtype)
    items.sort(key=lambda item: _numel(item[1]), reverse=True)

    by_dtype: dict[torch.dtype, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape, dtype in items:
        by_dtype.setdefault(dtype, []).append((name, shape))

    blocks: list[Block] = []
    entries: list[TensorEntry] = []
    cursor = 0
    for block_id, (dtype, members) in enumerate(by_dtype.items()):
        esize = element_size(dtype)
        block_align = _lcm(align_bytes, esize) if align_bytes else esize
        cursor += (-cursor) % block_align
        align_elems = align_bytes // math.gcd(align_bytes, esize) if align_bytes else 0
        elems = 0
        for name, shape in members:
            if align_elems:
                elems += (-elems) % align_elems
            entries.append(TensorEntry(name, shape, elems, _numel(shape), block_id))
            elems += _numel(shape)
        blocks.append(Block(dtype, cursor, elems))
        cursor += elems * esize
    if cursor == 0:
        raise ValueError("nothing to pack: every tensor is empty")
    return PackLayout(align_bytes, tuple(blocks), tuple(entries))


def encode_footer(layout: PackLayout) -> bytes:
    """The footer JSON, length and magic exactly as flashpack 0.4.5 writes them."""
    if len(layout.blocks) == 1:
        block = layout.blocks[0]
        meta: dict = {
            "format": FORMAT_V3,
            "target_dtype": dtype_name(block.dtype),
            "align_bytes": layout.align_bytes,
            "total_elems": block.length_elems,
            "index": [
                {"name": e.name, "shape": list(e.shape), "offset": e.offset, "length": e.length}
                for e in layout.entries
            ],
        }
    else:
        meta = {
            "format": FORMAT_V4,
            "align_bytes": layout.align_bytes,
            "total_payload_bytes": layout.payload_bytes,
            "total_elems": layout.total_elems,
            "macroblocks": [
                {
                    "dtype": dtype_name(b.dtype),
                    "offset_bytes": b.offset_bytes,
                    "length_bytes": b.length_bytes,
                    "length_elems": b.length_elems,
                }
                for b in layout.blocks
            ],
            "index": [
                {
                    "name": e.name,
                    "shape": list(e.shape),
                    "offset": e.offset,
                    "length": e.length,
                    "macroblock": e.block,
                }
                for e in layout.entries
            ],
        }
    body = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return body + TRAILER.pack(len(body), MAGIC)


# ----------------------------------------------------------------------------------------------
# Reading and validating


def read_layout(path: str | os.PathLike[str]) -> PackLayout:
    """Read and validate the footer of the FlashPack file at ``path``.

    Every check of docs/FLASHPACK_FORMAT.md is applied: magic, footer bounds, JSON object, known keys,
    known dtypes, integer ranges, shapes matching lengths, duplicate names, tensors inside their
    block, blocks inside the payload and not overlapping, tensors not overlapping.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - TRAILER.size))
            payload_end, footer_len = footer_span(size, f.read(TRAILER.size), path)
            f.seek(payload_end)
            raw = f.read(footer_len)
    except OSError as exc:
        raise FlashPackFormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return parse_footer(raw, payload_end, path)


def layout_from_bytes(data: memoryview | bytes, path: str = "<pack>") -> PackLayout:
    """Validate the footer of a whole FlashPack file already in memory (``data`` = its bytes)."""
    size = len(data)
    payload_end, footer_len = footer_span(size, bytes(data[max(0, size - TRAILER.size) :]), path)
    return parse_footer(bytes(data[payload_end : payload_end + footer_len]), payload_end, path)


def footer_span(size: int, trailer: bytes, path: str) -> tuple[int, int]:
    """``(payload_end, footer_len)`` of a ``size``-byte file whose last 16 bytes are ``trailer``."""
    if size < TRAILER.size:
        raise FlashPackFormatError(f"{path}: not a FlashPack file (only {size} bytes; truncated or empty)")
    footer_len, magic = TRAILER.unpack(trailer)
    if magic != MAGIC:
        raise FlashPackFormatError(
            f"{path}: not a FlashPack file (no FLASHPK magic at the end; truncated or another format)"
        )
    if footer_len > min(size - TRAILER.size, MAX_FOOTER_BYTES):
        raise FlashPackFormatError(f"{path}: footer length {footer_len} does not fit in a {size}-byte file")
    return size - TRAILER.size - footer_len, footer_len


def parse_footer(raw: bytes, payload_end: int, path: str = "<pack>") -> PackLayout:
    """Validate footer bytes of a file whose payload occupies bytes ``[0, payload_end)``."""

    def fail(problem: str) -> FlashPackFormatError:
        return FlashPackFormatError(f"{path}: invalid FlashPack footer: {problem}")

    try:
        meta = loads_bounded(raw, max_bytes=MAX_FOOTER_BYTES)
    except JSONLimitError as exc:
        raise fail(f"JSON {exc}") from None
    except ValueError as exc:  # UnicodeDecodeError, json.JSONDecodeError
        raise fail(f"not UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise fail(f"expected a JSON object, got {type(meta).__name__}")

    def integer(value: object, what: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"{what} must be an integer, got {value!r}")
        if value < minimum:
            raise fail(f"{what} must be >= {minimum}, got {value}")
        return value

    def check_keys(obj: object, allowed: set[str], what: str) -> dict:
        if not isinstance(obj, dict):
            raise fail(f"{what} must be an object, got {obj!r}")
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise fail(f"{what} has unsupported key(s) {unknown} (written by a newer flashpack?)")
        missing = sorted(allowed - set(obj))
        if missing:
            raise fail(f"{what} lacks key(s) {missing}")
        return obj

    fmt = meta.get("format")
    if fmt == FORMAT_V3:
        check_keys(meta, _V3_KEYS, "footer")
        dtype = _dtype_field(meta["target_dtype"], fail, "target_dtype")
        blocks_meta = [(dtype, 0, None, integer(meta["total_elems"], "total_elems"))]
        entry_keys = _V3_ENTRY_KEYS
    elif fmt == FORMAT_V4:
        check_keys(meta, _V4_KEYS, "footer")
        if not isinstance(meta["macroblocks"], list) or not meta["macroblocks"]:
            raise fail("macroblocks must be a non-empty list")
        blocks_meta = []
        for i, b in enumerate(meta["macroblocks"]):
            check_keys(b, _BLOCK_KEYS, f"macroblock {i}")
            blocks_meta.append(
                (
                    _dtype_field(b["dtype"], fail, f"macroblock {i} dtype"),
                    integer(b["offset_bytes"], f"macroblock {i} offset_bytes"),
                    integer(b["length_bytes"], f"macroblock {i} length_bytes"),
                    integer(b["length_elems"], f"macroblock {i} length_elems"),
                )
            )
        entry_keys = _V4_ENTRY_KEYS
    else:
        raise fail(f"unknown format {fmt!r} (expected {FORMAT_V3!r} or {FORMAT_V4!r})")
    align = integer(meta["align_bytes"], "align_bytes")

    blocks: list[Block] = []
    for i, (dtype, offset, length_bytes, length_elems) in enumerate(blocks_meta):
        block = Block(dtype, offset, length_elems)
        if length_bytes is not None and length_bytes != block.length_bytes:
            raise fail(
                f"macroblock {i} length_bytes {length_bytes} != length_elems {length_elems} x "
                f"{element_size(dtype)} bytes"
            )
        if offset % element_size(dtype):
            raise fail(f"macroblock {i} offset {offset} is not a multiple of its element size")
        if block.end_bytes > payload_end:
            raise fail(
                f"macroblock {i} ends at byte {block.end_bytes}, past the payload end "
                f"{payload_end} (file truncated?)"
            )
        blocks.append(block)
    ordered = sorted(range(len(blocks)), key=lambda i: blocks[i].offset_bytes)
    for a, b in pairwise(ordered):
        if blocks[a].end_bytes > blocks[b].offset_bytes:
            raise fail(f"macroblocks {a} and {b} overlap")
    if fmt == FORMAT_V4:
        total_payload = integer(meta["total_payload_bytes"], "total_payload_bytes")
        if total_payload != payload_end:
            raise fail(
                f"total_payload_bytes {total_payload} != {payload_end} bytes before the footer "
                "(file truncated or extended?)"
            )
    # flashpack ends the payload exactly at the last block: extra bytes (v3 has no
    # total_payload_bytes) mean bytes were inserted, and later tensors would read shifted data.
    blocks_end = max(b.end_bytes for b in blocks)
    if blocks_end != payload_end:
        raise fail(
            f"the blocks end at byte {blocks_end} but {payload_end} payload bytes precede the "
            "footer (bytes inserted or appended before the footer?)"
        )

    index = meta["index"]
    if not isinstance(index, list) or not index:
        raise fail("index must be a non-empty list")
    entries: list[TensorEntry] = []
    names: set[str] = set()
    for i, e in enumerate(index):
        check_keys(e, entry_keys, f"index entry {i}")
        name = e["name"]
        if not isinstance(name, str) or not name:
            raise fail(f"index entry {i} has an invalid name {name!r}")
        if name in names:
            raise fail(f"duplicate tensor name {name!r}")
        names.add(name)
        shape = e["shape"]
        if not isinstance(shape, list):
            raise fail(f"{name!r}: shape must be a list, got {shape!r}")
        dims = tuple(integer(d, f"{name!r} shape dimension") for d in shape)
        offset = integer(e["offset"], f"{name!r} offset")
        length = integer(e["length"], f"{name!r} length")
        if _numel(dims) != length:
            raise fail(f"{name!r}: shape {list(dims)} holds {_numel(dims)} elements, length says {length}")
        block_id = integer(e["macroblock"], f"{name!r} macroblock") if "macroblock" in e else 0
        if block_id >= len(blocks):
            raise fail(f"{name!r}: macroblock {block_id} does not exist ({len(blocks)} blocks)")
        if offset + length > blocks[block_id].length_elems:
            raise fail(
                f"{name!r}: elements [{offset}, {offset + length}) lie outside macroblock "
                f"{block_id} ({blocks[block_id].length_elems} elements)"
            )
        entries.append(TensorEntry(name, dims, offset, length, block_id))

    spans = sorted((e.block, e.offset, e.offset + e.length, e.name) for e in entries if e.length)
    for (b1, _, end1, n1), (b2, start2, _, n2) in pairwise(spans):
        if b1 == b2 and end1 > start2:
            raise fail(f"tensors {n1!r} and {n2!r} overlap")
    return PackLayout(align, tuple(blocks), tuple(entries))


def _dtype_field(value: object, fail, what: str) -> torch.dtype:
    if not isinstance(value, str) or value not in DTYPES:
        raise fail(f"{what} {value!r} is not a supported dtype")
    return DTYPES[value]
