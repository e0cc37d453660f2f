"""conversion.checkpoint: a safetensors header is read within limits and checked field by field, so a
hostile or damaged header is reported as a damaged file (never a TypeError from deep inside)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from conversion.checkpoint import (
    HeaderError,
    checkpoint_problem,
    safetensors_header,
    safetensors_header_of_bytes,
    tensor_shapes,
)


def raw_safetensors(header: dict, payload: bytes = b"\0" * 16) -> bytes:
    """A safetensors file with this header, as is (no field checked)."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload


def tensor(**fields) -> dict:
    """The header of one tensor 'w' of 4 float32 values, with ``fields`` replaced."""
    return {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **fields}}


BAD_OFFSETS = ["0,16", [16], [0, "16"], [16, 0], [-1, 15], None, True, [0, True], [0, 16, 32], [0.0, 16.0]]


@pytest.mark.parametrize("offsets", BAD_OFFSETS, ids=repr)
def test_data_offsets_other_than_two_ordered_integers_are_an_unreadable_header_naming_tensor_and_field(
        tmp_path, offsets):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(tensor(data_offsets=offsets)))
    assert checkpoint_problem(path) == (
        "unreadable safetensors header: tensor 'w': data_offsets must be two integers 0 <= begin <= end")


def test_a_tensor_without_data_offsets_is_an_unreadable_header(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors({"w": {"dtype": "F32", "shape": [4]}}))
    assert checkpoint_problem(path) == (
        "unreadable safetensors header: tensor 'w': data_offsets must be two integers 0 <= begin <= end")


@pytest.mark.parametrize("dtype", [None, 4, ["F32"], {"name": "F32"}], ids=repr)
def test_a_dtype_that_is_not_a_string_is_an_unreadable_header(tmp_path, dtype):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(tensor(dtype=dtype)))
    assert checkpoint_problem(path) == "unreadable safetensors header: tensor 'w': dtype must be a string"


@pytest.mark.parametrize("shape", [None, "4", 4, [4, "a"], [-4], [True], [2.0, 2]], ids=repr)
def test_a_shape_that_is_not_a_list_of_sizes_is_an_unreadable_header(tmp_path, shape):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(tensor(shape=shape)))
    assert checkpoint_problem(path) == (
        "unreadable safetensors header: tensor 'w': shape must be a list of integers >= 0")


@pytest.mark.parametrize("entry", [3, "F32", [0, 16], None], ids=repr)
def test_a_tensor_entry_that_is_not_an_object_is_an_unreadable_header(tmp_path, entry):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors({"w": entry}))
    assert checkpoint_problem(path) == (
        "unreadable safetensors header: tensor 'w' must be a JSON object (dtype, shape, data_offsets)")


@pytest.mark.parametrize("metadata", [[], "x", {"a": 1}, {"a": None}], ids=repr)
def test_metadata_that_is_not_an_object_of_strings_is_an_unreadable_header(tmp_path, metadata):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors({"__metadata__": metadata, **tensor()}))
    assert checkpoint_problem(path) == (
        "unreadable safetensors header: __metadata__ must be a JSON object of strings")


def test_a_long_tensor_name_is_shown_cut_at_100_characters(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors({"w" * 5000: {"dtype": "F32", "shape": [4], "data_offsets": "x"}}))
    assert checkpoint_problem(path) == (
        f"unreadable safetensors header: tensor {'w' * 100!r}...: data_offsets must be two integers 0 <= begin <= end")


def test_tensor_shapes_of_a_header_with_a_bad_field_raise_a_header_error_naming_it(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(tensor(shape="4")))
    with pytest.raises(HeaderError) as err:
        tensor_shapes(path)
    assert str(err.value) == "tensor 'w': shape must be a list of integers >= 0"


def test_the_header_of_bytes_is_the_header_of_the_same_file(tmp_path):
    data = save({"w": torch.arange(4, dtype=torch.float32)}, metadata={"format": "pt"})
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert safetensors_header_of_bytes(data) == safetensors_header(path)


def test_bytes_that_are_not_safetensors_have_no_header():
    assert safetensors_header_of_bytes(b"\x80\x02 a pickle, not safetensors") is None


def test_the_header_of_bytes_is_checked_field_by_field_too():
    with pytest.raises(HeaderError) as err:
        safetensors_header_of_bytes(raw_safetensors(tensor(data_offsets=[1])))
    assert str(err.value) == "tensor 'w': data_offsets must be two integers 0 <= begin <= end"
