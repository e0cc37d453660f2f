"""conversion.entry: a served model's store entry from lookup to loaded, in two calls; damage
healed once on the same start, anything else raised as it is."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conversion.config import ConversionConfig
from conversion.entry import lookup
from conversion.errors import StoreError
from conversion.sources.module import parse_module_source
from conversion.store import Store
from model_loader import load_module


def build() -> nn.Module:
    return nn.Linear(4, 3)


@pytest.fixture()
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "linear.safetensors"
    save_file({k: v.detach().clone() for k, v in build().state_dict().items()}, path)
    return path


@pytest.fixture()
def store(tmp_path):
    return Store(tmp_path / "volume", ConversionConfig())


def loader(path, reads):
    return load_module(build, path, "cpu", reads=reads)


def flip_first_payload_byte(path):
    pack = path / "module" / "model.flashpack"
    data = bytearray(pack.read_bytes())
    data[0] ^= 0xFF
    pack.write_bytes(bytes(data))


def test_lookup_without_an_entry_starts_nothing_and_load_converts_once(store, weights):
    entry = lookup(store, parse_module_source(str(weights)), "float32", "cpu")
    assert entry.path is None and entry.reads is None
    module = entry.load(loader, "cpu")
    assert entry.origin == "converted on this start" and isinstance(module, nn.Linear)


def test_lookup_of_a_warm_entry_starts_its_pack_reads_before_load(store, weights):
    source = parse_module_source(str(weights))
    path = store.ensure(source, "float32")
    entry = lookup(store, source, "float32", "cpu")
    assert entry.path == path and entry.reads is not None and entry.reads.names == ["module"]
    entry.load(loader, "cpu")
    assert entry.origin == "found in lookup" and entry.reads is None  # nothing keeps the blocks but the module


def test_lookup_without_a_known_device_leaves_the_reads_to_load(store, weights):
    source = parse_module_source(str(weights))
    store.ensure(source, "float32")
    entry = lookup(store, source, "float32", None)
    assert entry.path is not None and entry.reads is None
    assert isinstance(entry.load(loader, "cpu"), nn.Linear)


def test_a_pack_failing_its_checksum_is_moved_aside_rebuilt_and_loaded_on_the_same_call(store, weights, caplog):
    source = parse_module_source(str(weights))
    flip_first_payload_byte(store.ensure(source, "float32"))
    entry = lookup(store, source, "float32", "cpu")
    with caplog.at_level(logging.ERROR, "conversion.entry"):
        module = entry.load(loader, "cpu")
    [message] = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert "checksum" in message and "moving it aside and rebuilding it from the source" in message
    reference = build()
    reference.load_state_dict(load_file(weights))
    assert torch.equal(module.weight, reference.weight)


def test_a_load_error_of_an_intact_entry_is_raised_as_it_is_and_nothing_is_rebuilt(store, weights):
    source = parse_module_source(str(weights))
    path = store.ensure(source, "float32")
    entry = lookup(store, source, "float32", "cpu")

    def wrong_module(path, reads):
        return load_module(lambda: nn.Linear(5, 3), path, "cpu", reads=reads)

    with pytest.raises(Exception, match="shape/dtype mismatch") as raised:
        entry.load(wrong_module, "cpu")
    assert type(raised.value).__name__ == "StateDictMismatchError"
    assert path.is_dir() and entry.path == path


def test_a_damaged_entry_whose_source_is_gone_says_so_and_what_to_do(store, weights):
    source = parse_module_source(str(weights))
    flip_first_payload_byte(store.ensure(source, "float32"))
    entry = lookup(store, source, "float32", "cpu")
    weights.unlink()
    with pytest.raises(StoreError, match=r"was damaged .* and has been moved aside, but rebuilding it failed: .*"
                                         r"Make the source .* reachable; the next start rebuilds it"):
        entry.load(loader, "cpu")
