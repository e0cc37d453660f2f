"""Any torch module through the store: its safetensors weights (a file, a folder of shards, a data:
URL, a Hub repo or a Hub file) converted once into ``module/model.flashpack`` and loaded by our
loader into a module its factory builds."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from safetensors.torch import save, save_file
from torch import nn

from conversion.config import ConversionConfig
from conversion.errors import ConversionError, SourceError
from conversion.manifest import read_manifest, verify_converted
from conversion.sources.module import HubWeightsSource, LocalWeightsSource, ModuleSource, parse_module_source
from conversion.store import Store
from model_loader import StateDictMismatchError, load_module
from tests.hub_server import HubRepo, HubServer, use_hub


class Upscaler(nn.Module):
    """A small module of no model library: convolutions, a norm, and a tied pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv_out = nn.Conv2d(8, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv_out(torch.relu(self.norm(self.conv_in(x)))))


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in Upscaler().state_dict().items()}


def reference_output(x: torch.Tensor) -> torch.Tensor:
    module = Upscaler()
    module.load_state_dict(weights())
    return module.eval()(x)


X = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def convert_and_load(source: ModuleSource, root, dtype: str = "float32") -> tuple[object, nn.Module]:
    store = Store(root, ConversionConfig())
    path = store.ensure(source, dtype)
    return path, load_module(Upscaler, path, "cpu", torch_dtype=getattr(torch, dtype))


def test_a_safetensors_file_is_converted_into_one_module_pack_and_loaded_into_the_factorys_module(tmp_path):
    save_file(weights(), tmp_path / "upscaler.safetensors")
    source = parse_module_source(str(tmp_path / "upscaler.safetensors"))
    path, module = convert_and_load(source, tmp_path / "volume")
    verify_converted(path, full=True)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        "flashpack_manifest.json", "module/model.flashpack"]
    assert read_manifest(path)["source"]["kind"] == "module"
    assert torch.equal(module(X), reference_output(X))


def test_a_folder_of_shards_with_an_index_is_one_module(tmp_path):
    state = weights()
    names = sorted(state)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file({k: state[k] for k in first}, folder / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in second}, folder / "model-00002-of-00002.safetensors")
    weight_map = {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(second, "model-00002-of-00002.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, module = convert_and_load(parse_module_source(str(folder)), tmp_path / "volume")
    assert torch.equal(module(X), reference_output(X))


def test_the_store_dtype_casts_floating_weights(tmp_path):
    save_file(weights(), tmp_path / "upscaler.safetensors")
    _, module = convert_and_load(parse_module_source(str(tmp_path / "upscaler.safetensors")), tmp_path / "v", "bfloat16")
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


def test_a_data_url_of_safetensors_is_module_weights(tmp_path):
    url = "data:application/octet-stream;base64," + base64.b64encode(save(weights())).decode()
    path, module = convert_and_load(parse_module_source(url), tmp_path / "volume")
    assert read_manifest(path)["source"]["ref"].startswith("data:...(")
    assert torch.equal(module(X), reference_output(X))


def test_a_hub_repo_of_module_weights_is_fetched_once_and_found_offline_after(tmp_path, monkeypatch):
    repo = HubRepo("org/upscaler")
    repo.push({"weights/model.safetensors": save(weights()), "README.md": b"an upscaler",
               "other.safetensors": save({"x": torch.zeros(1)})})
    with HubServer([repo]) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        source = parse_module_source("org/upscaler", subfolder="weights")
        assert source.weights == HubWeightsSource("org/upscaler", subfolder="weights")
        path, module = convert_and_load(source, tmp_path / "volume")
        assert server.downloaded() == {"weights/model.safetensors"}
    assert torch.equal(module(X), reference_output(X))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Store(tmp_path / "volume", ConversionConfig()).warm(source, "float32") == path


def test_a_hub_file_of_module_weights_is_fetched_by_commit(tmp_path, monkeypatch):
    repo = HubRepo("org/upscaler")
    commit = repo.push({"upscaler.safetensors": save(weights())})
    with HubServer([repo]) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        path, module = convert_and_load(parse_module_source("org/upscaler/upscaler.safetensors", revision=commit),
                                        tmp_path / "volume")
    assert read_manifest(path)["source"]["identity"] == commit
    assert torch.equal(module(X), reference_output(X))


def test_a_local_file_is_keyed_by_its_fingerprint_so_new_weights_are_a_new_entry(tmp_path):
    file = tmp_path / "upscaler.safetensors"
    save_file(weights(), file)
    store = Store(tmp_path / "volume", ConversionConfig())
    source = parse_module_source(str(file))
    first = store.ensure(source, "float32")
    state = weights()
    state["conv_in.bias"] += 1
    save_file(state, file)
    assert store.warm(source, "float32") is None
    assert store.ensure(source, "float32") != first


def test_weights_that_do_not_fit_the_module_are_refused_at_load_naming_the_keys(tmp_path):
    state = weights()
    del state["conv_out.bias"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "bad.safetensors")
    path = Store(tmp_path / "volume", ConversionConfig()).ensure(parse_module_source(str(tmp_path / "bad.safetensors")))
    with pytest.raises(StateDictMismatchError, match=r"missing \(1\): conv_out.bias.*unexpected \(1\): extra.weight"):
        load_module(Upscaler, path)


def test_pickled_weights_are_refused_by_name(tmp_path):
    torch.save(weights(), tmp_path / "upscaler.bin")
    with pytest.raises(SourceError, match="must be a .safetensors file"):
        parse_module_source(str(tmp_path / "upscaler.bin"))


def test_a_folder_without_safetensors_is_refused_when_converting(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no .safetensors file in this directory"):
        Store(tmp_path / "volume", ConversionConfig()).ensure(parse_module_source(str(tmp_path / "empty")))


def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file(weights(), tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(ConversionError, match=r"names shard\(s\) that are not in .*: \.\./outside.safetensors"):
        Store(tmp_path / "volume", ConversionConfig()).ensure(parse_module_source(str(folder)))


def test_a_missing_local_path_is_refused_when_parsed():
    with pytest.raises(SourceError, match="no such file or directory"):
        parse_module_source("./no/such/weights.safetensors")


def test_a_local_source_keeps_its_absolute_path(tmp_path):
    save_file(weights(), tmp_path / "w.safetensors")
    source = parse_module_source(str(tmp_path / "w.safetensors"))
    assert source == ModuleSource(LocalWeightsSource(str((tmp_path / "w.safetensors").resolve())))
