"""A directory that already carries our manifest (a convert output, or a conversion pulled from the
Hub) becomes a store entry with nothing converted: linked, checked in full, its manifest rewritten
for this store; one that does not hold what its manifest says is refused, naming the file."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from conversion.config import ConversionConfig
from conversion.convert import convert_pipeline
from conversion.errors import ConversionError
from conversion.manifest import read_manifest, verify_converted
from conversion.sources import parse_source
from conversion.store import Store
from model_loader import load_state_dict


@pytest.fixture()
def packed(tmp_path, tiny_sd_dir):
    """A fresh convert output of the tiny SD pipeline, float32."""
    return convert_pipeline(tiny_sd_dir, tmp_path / "packed", dtype=torch.float32,
                            source={"kind": "local", "ref": str(tiny_sd_dir)})


def store(tmp_path) -> Store:
    return Store(tmp_path / "volume", ConversionConfig())


def test_a_convert_output_becomes_an_entry_with_nothing_converted(tmp_path, packed, caplog):
    with caplog.at_level(logging.INFO):
        entry = store(tmp_path).ensure(parse_source(str(packed)), "float32")
    verify_converted(entry, full=True)
    assert not [r for r in caplog.records if r.name == "conversion.convert"]
    assert any(r.name == "conversion.adopt" and "nothing converted" in r.getMessage() for r in caplog.records)
    for pack in packed.glob("*/model.flashpack"):
        got, want = load_state_dict(entry / pack.parent.name / pack.name), load_state_dict(pack)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_entry_manifest_says_what_it_is_now_and_what_it_was_built_from(tmp_path, packed):
    entry = store(tmp_path).ensure(parse_source(str(packed)), "float32")
    source = read_manifest(entry)["source"]
    assert source["kind"] == "local" and source["ref"] == str(packed) and source["dtype"] == "float32"
    assert source["converted_from"] == read_manifest(packed)["source"]
    assert entry.name.endswith("-" + source["store_key"][:16])


def test_another_dtype_is_converted_from_the_packs_not_adopted(tmp_path, packed, caplog):
    with caplog.at_level(logging.INFO):
        entry = store(tmp_path).ensure(parse_source(str(packed)), "float16")
    assert not any(r.name == "conversion.adopt" for r in caplog.records)
    assert load_state_dict(entry / "unet" / "model.flashpack")["conv_in.weight"].dtype == torch.float16


def test_a_pack_that_differs_from_the_manifest_is_refused_naming_it(tmp_path, packed):
    pack = packed / "unet" / "model.flashpack"
    data = bytearray(pack.read_bytes())
    data[0] ^= 0xFF
    pack.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"does not hold what its manifest says: .*unet/model.flashpack: sha256 mismatch"):
        store(tmp_path).ensure(parse_source(str(packed)), "float32")
    assert not list((tmp_path / "volume" / "flashpack").glob("local--*"))


def test_a_file_the_manifest_lists_but_the_directory_lacks_is_refused(tmp_path, packed):
    shutil.rmtree(packed / "scheduler")
    with pytest.raises(ConversionError, match=r"scheduler/scheduler_config.json: listed in the manifest but missing"):
        store(tmp_path).ensure(parse_source(str(packed)), "float32")
