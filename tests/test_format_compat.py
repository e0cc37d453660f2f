"""Compatibility with flashpack 0.4.5 in both directions, byte for byte and bit for bit."""

from __future__ import annotations

import flashpack
import pytest
import torch
from flashpack.deserialization import revert_from_file

from conversion.writer import pack_state_dict
from model_loader import load_state_dict, read_layout
from model_loader.format import encode_footer, plan_layout, storage_dtype

ALIGNS = [0, 64, 128, 4096]


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """Every dtype family, a 0-dim and an empty tensor, unicode names, and element-count ties."""
    g = torch.Generator().manual_seed(0)
    return {
        "down.0.weight": _randn(g, 8, 3, 3),  # 72 elements, the largest
        "tie.fp32_a": _randn(g, 6),  # ties at 6 elements: state-dict order must be kept
        "tie.fp16": _randn(g, 2, 3, dtype=torch.float16),
        "tie.fp32_b": _randn(g, 3, 2),
        "tie.bf16": _randn(g, 6, dtype=torch.bfloat16),
        "fp8.e4m3": _randn(g, 5, 7, dtype=torch.float8_e4m3fn),
        "fp8.e5m2": _randn(g, 9, dtype=torch.float8_e5m2),
        "position_ids": torch.arange(3000, 3017).view(1, 17),
        "mask": torch.tensor([True, False, True, True]),
        "rotary": torch.randn(5, generator=g, dtype=torch.complex64),
        "scale": torch.tensor(0.125),  # 0-dim
        "empty": torch.empty(0, 4),
        "ünïcode.wëight": _randn(g, 2, 2),
        "名前.bias": _randn(g, 3, dtype=torch.float16),
    }


def float_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "w": _randn(g, 16, 5),
        "tie.a": _randn(g, 7, dtype=torch.float16),
        "tie.b": _randn(g, 7, dtype=torch.bfloat16),
        "tie.c": _randn(g, 7),
        "f8": _randn(g, 33, dtype=torch.float8_e4m3fn),
        "s": torch.tensor(2.0),
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so bf16/fp8 (and NaNs) compare exactly."""
    return t.contiguous().view(storage_dtype(t.dtype))


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, flat_scalars=False):
    assert list(sorted(got)) == list(sorted(want))
    for name, w in want.items():
        t = got[name]
        assert t.dtype == w.dtype, name
        if flat_scalars and w.dim() == 0:  # flashpack's reader returns 0-dim tensors as shape (1,)
            assert tuple(t.shape) == (1,), name
            t = t.reshape(())
        assert t.shape == w.shape, name
        assert torch.equal(bits(t), bits(w)), name


@pytest.mark.parametrize("align", ALIGNS)
def test_mixed_dtypes_byte_identical_to_flashpack(tmp_path, align):
    sd = mixed_state_dict()
    flashpack.pack_to_file(sd, str(tmp_path / "ref.flashpack"), None, align_bytes=align)
    pack_state_dict(sd, tmp_path / "ours.flashpack", align_bytes=align)
    assert (tmp_path / "ours.flashpack").read_bytes() == (tmp_path / "ref.flashpack").read_bytes()


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("target", [torch.float16, torch.bfloat16, torch.float32])
def test_float_tensors_with_target_dtype_byte_identical_to_flashpack(tmp_path, align, target):
    sd = float_state_dict()
    flashpack.pack_to_file(sd, str(tmp_path / "ref.flashpack"), target, align_bytes=align)
    pack_state_dict(sd, tmp_path / "ours.flashpack", target_dtype=target, align_bytes=align)
    assert (tmp_path / "ours.flashpack").read_bytes() == (tmp_path / "ref.flashpack").read_bytes()


def test_target_dtype_keeps_int64_ids_above_2048_where_flashpack_corrupts_them(tmp_path):
    ids = torch.arange(2040, 2100).view(1, -1)  # fp16 cannot hold odd integers above 2048
    sd = {"w": torch.ones(4, 4), "position_ids": ids}
    pack_state_dict(sd, tmp_path / "ours.flashpack", target_dtype=torch.float16)
    flashpack.pack_to_file(sd, str(tmp_path / "ref.flashpack"), torch.float16)

    ours = load_state_dict(tmp_path / "ours.flashpack")
    assert ours["position_ids"].dtype == torch.int64
    assert torch.equal(ours["position_ids"], ids)
    assert ours["w"].dtype == torch.float16

    theirs = revert_from_file(str(tmp_path / "ref.flashpack"))
    assert theirs["position_ids"].dtype == torch.float16
    assert not torch.equal(theirs["position_ids"].long(), ids)


@pytest.mark.parametrize("align", ALIGNS)
def test_files_written_by_flashpack_load_bit_exactly(tmp_path, align):
    sd = mixed_state_dict()
    flashpack.pack_to_file(sd, str(tmp_path / "ref.flashpack"), None, align_bytes=align)
    assert_same_tensors(load_state_dict(tmp_path / "ref.flashpack"), sd)


@pytest.mark.parametrize("align", ALIGNS)
def test_our_files_read_bit_exactly_by_flashpack(tmp_path, align):
    sd = mixed_state_dict()
    pack_state_dict(sd, tmp_path / "ours.flashpack", align_bytes=align)
    assert_same_tensors(revert_from_file(str(tmp_path / "ours.flashpack")), sd, flat_scalars=True)


def test_our_target_dtype_file_read_by_flashpack_as_cast_values(tmp_path):
    sd = float_state_dict()
    pack_state_dict(sd, tmp_path / "ours.flashpack", target_dtype=torch.bfloat16)
    want = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    assert_same_tensors(revert_from_file(str(tmp_path / "ours.flashpack")), want, flat_scalars=True)


def test_ties_in_element_count_keep_state_dict_order():
    specs = [
        ("b", (6,), torch.float32),
        ("a", (2, 3), torch.float32),
        ("big", (7,), torch.float32),
        ("c", (3, 2), torch.float32),
    ]
    layout = plan_layout(specs, align_bytes=0)
    assert layout.names() == ["big", "b", "a", "c"]
    assert [e.offset for e in layout.entries] == [0, 7, 13, 19]


def test_block_order_follows_first_appearance_in_size_order():
    specs = [("small16", (2,), torch.float16), ("big32", (9,), torch.float32), ("mid16", (5,), torch.float16)]
    layout = plan_layout(specs, align_bytes=128)
    assert [b.dtype for b in layout.blocks] == [torch.float32, torch.float16]
    assert [b.offset_bytes for b in layout.blocks] == [0, 128]
    # fp16 tensors start at multiples of 128 // gcd(128, 2) = 64 elements.
    assert [(e.name, e.block, e.offset) for e in layout.entries] == [
        ("big32", 0, 0),
        ("mid16", 1, 0),
        ("small16", 1, 64),
    ]


@pytest.mark.parametrize(
    "specs",
    [
        pytest.param([("a", (3, 4), torch.float32), ("b", (), torch.float32)], id="one-block-v3"),
        pytest.param(
            [
                ("a", (3, 4), torch.float32),
                ("b", (5,), torch.bfloat16),
                ("c", (0, 2), torch.int8),
                ("d", (2,), torch.float8_e5m2),
            ],
            id="four-blocks-v4",
        ),
    ],
)
@pytest.mark.parametrize("align", ALIGNS)
def test_plan_encode_read_round_trip(tmp_path, specs, align):
    layout = plan_layout(specs, align_bytes=align)
    path = tmp_path / "zeros.flashpack"
    path.write_bytes(bytes(layout.payload_bytes) + encode_footer(layout))
    assert read_layout(path) == layout


def test_encode_footer_matches_flashpack_footer(tmp_path):
    sd = mixed_state_dict()
    flashpack.pack_to_file(sd, str(tmp_path / "ref.flashpack"), None)
    layout = plan_layout([(k, tuple(v.shape), v.dtype) for k, v in sd.items()])
    footer = encode_footer(layout)
    data = (tmp_path / "ref.flashpack").read_bytes()
    assert data[-len(footer) :] == footer
    assert len(data) == layout.payload_bytes + len(footer)
