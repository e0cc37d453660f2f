"""Every way a FlashPack file can be broken is rejected with a message naming the file and problem.

Corrupt files are made by editing the footer of a valid file (rewriting JSON and length) or by
cutting/inserting bytes, one defect per case.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from conversion.writer import pack_state_dict
from model_loader import FlashPackFormatError, load_state_dict, read_layout
from model_loader.format import MAGIC, TRAILER

# v4 base: block 0 float32 [a: 16 elems at 0, b: 8 at 32] = 160 bytes at 0;
#          block 1 float16 [c: 6 elems at 0] = 12 bytes at 256; payload 268 bytes.
V4_STATE = {
    "a": torch.arange(16, dtype=torch.float32).view(4, 4),
    "b": torch.arange(8, dtype=torch.float32),
    "c": torch.arange(6, dtype=torch.float16),
}
# v3 base: one float32 block [a: 16 at 0, b: 8 at 32] = 160 bytes.
V3_STATE = {"a": V4_STATE["a"], "b": V4_STATE["b"]}


def split(data: bytes) -> tuple[bytes, dict]:
    """(payload, footer JSON) of a valid file."""
    footer_len, _ = TRAILER.unpack(data[-TRAILER.size :])
    end = len(data) - TRAILER.size - footer_len
    return data[:end], json.loads(data[end : -TRAILER.size])


def assemble(payload: bytes, footer: bytes | dict) -> bytes:
    raw = footer if isinstance(footer, bytes) else json.dumps(footer, ensure_ascii=False).encode()
    return payload + raw + TRAILER.pack(len(raw), MAGIC)


def edit(fn: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    """A corruption that mutates the footer JSON in place and rewrites footer and length."""

    def apply(data: bytes) -> bytes:
        payload, meta = split(data)
        fn(meta)
        return assemble(payload, meta)

    return apply


def set_in(*path_and_value):
    *keys, value = path_and_value

    def fn(meta: dict) -> None:
        obj = meta
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value

    return edit(fn)


def footer_bytes(raw: bytes) -> Callable[[bytes], bytes]:
    return lambda data: assemble(split(data)[0], raw)


def cut_payload(n: int) -> Callable[[bytes], bytes]:
    """Remove n bytes from the middle of the payload (a torn or truncated copy)."""

    def apply(data: bytes) -> bytes:
        payload, meta = split(data)
        mid = len(payload) // 2
        return assemble(payload[:mid] + payload[mid + n :], meta)

    return apply


def insert_payload(n: int) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        payload, meta = split(data)
        mid = len(payload) // 2
        return assemble(payload[:mid] + bytes(n) + payload[mid:], meta)

    return apply


@dataclass
class Case:
    base: str  # "v3" or "v4"
    corrupt: Callable[[bytes], bytes]
    message: str  # exact substring of the error


def _del(key):
    return edit(lambda meta: meta.pop(key))


def _drop_trailer_magic(data: bytes) -> bytes:
    return data[:-8] + b"NOTMAGIC"


def _footer_len_past_start(data: bytes) -> bytes:
    return data[: -TRAILER.size] + TRAILER.pack(len(data), MAGIC)


CASES: dict[str, Case] = {
    "empty-file": Case("v4", lambda d: b"", "only 0 bytes; truncated or empty"),
    "shorter-than-trailer": Case("v4", lambda d: d[-10:], "only 10 bytes; truncated or empty"),
    "bad-magic": Case("v4", _drop_trailer_magic, "no FLASHPK magic at the end"),
    "footer-length-larger-than-file": Case(
        "v4", _footer_len_past_start, "footer length 734 does not fit in a 734-byte file"
    ),
    "footer-not-utf8": Case("v4", footer_bytes(b'{"format":"\xff\xfe"}'), "not UTF-8 JSON"),
    "footer-not-json": Case("v4", footer_bytes(b"{'format': flashpack_v4"), "not UTF-8 JSON"),
    "footer-nested-100000-deep": Case(
        "v4", footer_bytes(b"[" * 100_000 + b"]" * 100_000), "invalid FlashPack footer: JSON nested more than 64 levels deep"
    ),
    "footer-100000-unclosed-brackets": Case(
        "v4", footer_bytes(b'{"format": ' + b"[" * 100_000), "invalid FlashPack footer: JSON nested more than 64 levels deep"
    ),
    "footer-json-list": Case("v4", footer_bytes(b"[1, 2]"), "expected a JSON object, got list"),
    "footer-json-number": Case("v4", footer_bytes(b"42"), "expected a JSON object, got int"),
    "unknown-format": Case("v4", set_in("format", "flashpack_v9"), "unknown format 'flashpack_v9'"),
    "missing-format": Case("v4", _del("format"), "unknown format None"),
    "missing-key": Case("v4", _del("align_bytes"), "footer lacks key(s) ['align_bytes']"),
    "missing-key-v3": Case("v3", _del("total_elems"), "footer lacks key(s) ['total_elems']"),
    "unknown-top-level-key": Case("v4", set_in("checksum", "abc"), "footer has unsupported key(s) ['checksum']"),
    "unknown-block-key-fpz": Case(
        "v4",
        set_in("macroblocks", 0, "fpz", {"codec": "zstd"}),
        "macroblock 0 has unsupported key(s) ['fpz'] (written by a newer flashpack?)",
    ),
    "unknown-index-key": Case(
        "v4", set_in("index", 0, "stride", [4, 1]), "index entry 0 has unsupported key(s) ['stride']"
    ),
    "macroblock-key-in-v3-index": Case(
        "v3", set_in("index", 0, "macroblock", 0), "index entry 0 has unsupported key(s) ['macroblock']"
    ),
    "unknown-dtype-v4": Case(
        "v4",
        set_in("macroblocks", 1, "dtype", "float7"),
        "macroblock 1 dtype 'float7' is not a supported dtype",
    ),
    "unknown-dtype-v3": Case(
        "v3",
        set_in("target_dtype", "torch.float32"),
        "target_dtype 'torch.float32' is not a supported dtype",
    ),
    "negative-offset": Case("v4", set_in("index", 1, "offset", -1), "'b' offset must be >= 0, got -1"),
    "offset-float": Case("v4", set_in("index", 1, "offset", 32.0), "'b' offset must be an integer, got 32.0"),
    "offset-bool": Case("v4", set_in("index", 1, "offset", True), "'b' offset must be an integer, got True"),
    "offset-str": Case("v4", set_in("index", 1, "offset", "32"), "'b' offset must be an integer, got '32'"),
    "negative-block-offset": Case(
        "v4", set_in("macroblocks", 1, "offset_bytes", -256), "macroblock 1 offset_bytes must be >= 0, got -256"
    ),
    "negative-shape-dimension": Case(
        "v4", set_in("index", 0, "shape", [-4, -4]), "'a' shape dimension must be >= 0, got -4"
    ),
    "tensor-past-block-end": Case(
        "v4",
        set_in("index", 2, "offset", 1),
        "'c': elements [1, 7) lie outside macroblock 1 (6 elements)",
    ),
    "block-past-payload-end": Case(
        "v4",
        edit(lambda m: m["macroblocks"][1].update(length_elems=106, length_bytes=212)),
        "macroblock 1 ends at byte 468, past the payload end 268 (file truncated?)",
    ),
    "block-past-payload-end-v3": Case(
        "v3", set_in("total_elems", 41), "macroblock 0 ends at byte 164, past the payload end 160"
    ),
    "overlapping-blocks": Case("v4", set_in("macroblocks", 1, "offset_bytes", 128), "macroblocks 0 and 1 overlap"),
    "block-offset-not-element-aligned": Case(
        "v4",
        set_in("macroblocks", 1, "offset_bytes", 255),
        "macroblock 1 offset 255 is not a multiple of its element size",
    ),
    "overlapping-tensors": Case("v4", set_in("index", 1, "offset", 8), "tensors 'a' and 'b' overlap"),
    "length-bytes-not-elems-times-size": Case(
        "v4",
        set_in("macroblocks", 0, "length_bytes", 164),
        "macroblock 0 length_bytes 164 != length_elems 40 x 4 bytes",
    ),
    "shape-product-not-length": Case(
        "v4", set_in("index", 0, "shape", [4, 5]), "'a': shape [4, 5] holds 20 elements, length says 16"
    ),
    "duplicate-names": Case("v4", set_in("index", 1, "name", "a"), "duplicate tensor name 'a'"),
    "empty-name": Case("v4", set_in("index", 1, "name", ""), "index entry 1 has an invalid name ''"),
    "macroblock-index-out-of-range": Case(
        "v4", set_in("index", 2, "macroblock", 5), "'c': macroblock 5 does not exist (2 blocks)"
    ),
    "total-payload-bytes-mismatch": Case(
        "v4",
        set_in("total_payload_bytes", 269),
        "total_payload_bytes 269 != 268 bytes before the footer",
    ),
    "macroblocks-empty": Case("v4", set_in("macroblocks", []), "macroblocks must be a non-empty list"),
    "index-not-a-list": Case("v4", set_in("index", {"a": 0}), "index must be a non-empty list"),
    "index-empty": Case("v4", set_in("index", []), "index must be a non-empty list"),
    "truncated-payload-v4": Case(
        "v4", cut_payload(8), "macroblock 1 ends at byte 268, past the payload end 260 (file truncated?)"
    ),
    "truncated-payload-v3": Case(
        "v3", cut_payload(8), "macroblock 0 ends at byte 160, past the payload end 152 (file truncated?)"
    ),
    "bytes-inserted-in-payload-v3": Case(
        "v3",
        insert_payload(8),
        "the blocks end at byte 160 but 168 payload bytes precede the footer",
    ),
}


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("valid")
    pack_state_dict(V4_STATE, d / "v4.flashpack")
    pack_state_dict(V3_STATE, d / "v3.flashpack")
    return {"v4": (d / "v4.flashpack").read_bytes(), "v3": (d / "v3.flashpack").read_bytes()}


def test_base_files_are_the_documented_layouts(valid_files):
    assert split(valid_files["v4"])[1]["format"] == "flashpack_v4"
    assert split(valid_files["v4"])[1]["total_payload_bytes"] == 268
    assert len(valid_files["v4"]) == 734
    assert split(valid_files["v3"])[1]["format"] == "flashpack_v3"
    assert len(split(valid_files["v3"])[0]) == 160


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_corrupt_file_rejected_naming_file_and_problem(tmp_path, valid_files, case):
    path = tmp_path / "corrupt.flashpack"
    path.write_bytes(case.corrupt(valid_files[case.base]))
    with pytest.raises(FlashPackFormatError) as info:
        read_layout(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert case.message in message
    with pytest.raises(FlashPackFormatError, match=re.escape(case.message)):
        load_state_dict(path)


def test_missing_file_rejected_naming_file(tmp_path):
    with pytest.raises(FlashPackFormatError, match=re.escape(f"{tmp_path / 'nope.flashpack'}: cannot read")):
        read_layout(tmp_path / "nope.flashpack")


@pytest.mark.parametrize("base", ["v3", "v4"])
def test_reassembled_valid_file_still_loads(tmp_path, valid_files, base):
    """The editing helpers themselves do not corrupt: an unchanged footer re-encoded stays valid."""
    path = tmp_path / "same.flashpack"
    path.write_bytes(edit(lambda meta: None)(valid_files[base]))
    state = V4_STATE if base == "v4" else V3_STATE
    loaded = load_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
