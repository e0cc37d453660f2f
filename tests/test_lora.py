"""Per-request LoRAs on the demo pipeline as the loader builds it: applied and fully removed, checked
against the architecture, fetched once (data: URIs through fal's layout, repo files through a
loopback Hub), kept in a cache bounded by bytes."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import conversion.download.lora as lora_download
from conversion.config import ConversionConfig
from conversion.download.lora_files import LoraFile
from conversion.errors import LoraError
from conversion.lora import LoraTargets, load_adapter, read_lora, read_lora_bytes
from conversion.sources import url_hash
from model_loader import load_pipeline
from serving.generate import GenerationParams, run_generation
from serving.lora import LoraLibrary, LoraRequestError
from serving.lora_adapters import adapters, remove_adapters
from serving.settings import LoraSettings
from tests.hub_server import HubRepo, HubServer, use_hub
from tests.tiny_models import data_uri, make_tiny_lora, tiny_sdxl_pipeline

MB = 1024 * 1024


@pytest.fixture(scope="module")
def pipe(converted_sd_dir):
    pipe = load_pipeline(converted_sd_dir, device="cpu", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    """LoRA files: for the demo's unet (two seeds), unet + text encoder, one recording lora_alpha = 2 x
    rank in its metadata, one for the tiny SDXL unet (another architecture), and files that are no LoRA."""
    root = tmp_path_factory.mktemp("loras")
    sdxl = tiny_sdxl_pipeline()
    weights = root / "unet-weights.safetensors"
    save_file({k: v.clone() for k, v in pipe.unet.state_dict().items()}, weights)
    text = root / "notes.safetensors"
    text.write_bytes(b"a LoRA, honestly\n" * 10)
    foreign = root / "transformer-lora.safetensors"
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, foreign)
    return SimpleNamespace(
        demo=make_tiny_lora(root / "demo", pipe.unet, seed=1),
        other_seed=make_tiny_lora(root / "demo-2", pipe.unet, seed=2),
        with_text=make_tiny_lora(root / "with-text", pipe.unet, pipe.text_encoder, seed=3),
        alpha_meta=make_tiny_lora(root / "alpha", pipe.unet, seed=4, lora_alpha=8, metadata=True),
        sdxl=make_tiny_lora(root / "sdxl", sdxl.unet, seed=1),
        big=make_tiny_lora(root / "big", pipe.unet, rank=80),  # about 1.3 MiB
        weights=weights, text=text, foreign=foreign,
    )


def image(pipe, seed: int = 3) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe("a cat on a horse", num_inference_steps=2, width=64, height=64, generator=generator,
                output_type="np").images[0]


def weights_of(path: Path):
    return read_lora(path, path.parent.name, f"test:{path.parent.name}")


def lora_layers(pipe) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [f"{name}.{module_name}" for name in ("unet", "text_encoder")
            for module_name, module in getattr(pipe, name).named_modules() if isinstance(module, BaseTunerLayer)]


# --------------------------------------------------------------------------------------------------
# Applied for one generation, then gone


def test_the_image_after_a_lora_is_removed_is_identical_to_the_image_before_any_lora(pipe, files):
    before = image(pipe)
    with adapters(pipe, [(weights_of(files.demo), 1.0)]):
        with_lora = image(pipe)
    after = image(pipe)
    assert np.array_equal(after, before)
    assert np.abs(with_lora - before).max() > 0.01


def test_the_scale_weights_the_lora(pipe, files):
    lora = weights_of(files.demo)
    images = []
    for scale in (0.0, 0.5, 1.0):
        with adapters(pipe, [(lora, scale)]):
            images.append(image(pipe))
    zero, half, full = images
    assert np.abs(zero - image(pipe)).max() < 1e-6  # scale 0: the base model's image
    assert np.abs(half - zero).max() > 0.005 and np.abs(full - half).max() > 0.005


def test_removing_loras_leaves_the_loaders_parameters_and_modules_as_they_were(pipe, files):
    components = (pipe.unet, pipe.text_encoder)
    pointers = [{n: p.data_ptr() for n, p in c.named_parameters()} for c in components]
    modules = [{n: id(m) for n, m in c.named_modules()} for c in components]
    with adapters(pipe, [(weights_of(files.with_text), 1.0), (weights_of(files.demo), 0.5)]):
        assert len(lora_layers(pipe)) == 32 + 8  # both unet LoRAs wrap the same 32 modules; 8 in the text encoder
    assert [{n: p.data_ptr() for n, p in c.named_parameters()} for c in components] == pointers
    assert [{n: id(m) for n, m in c.named_modules()} for c in components] == modules
    assert lora_layers(pipe) == [] and not hasattr(pipe.unet, "peft_config")
    assert not getattr(pipe.text_encoder, "_hf_peft_config_loaded", False)


def test_a_generation_that_fails_with_a_lora_still_removes_it(pipe, files):
    from serving.lora import RequestLoras

    before = image(pipe)
    lock = threading.Lock()

    class Failing:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, **kwargs):
            assert len(lora_layers(pipe)) == 32  # the LoRA is in while the pipeline runs
            raise RuntimeError("out of memory, say")

    loras = RequestLoras(((0, weights_of(files.demo), 1.0),))
    with pytest.raises(RuntimeError, match="out of memory, say"):
        run_generation(Failing(), lock, GenerationParams("a cat", "", 64, 64, 2, 5.0, seeds=(3,)), request="t",
                       loras=loras)
    assert lora_layers(pipe) == [] and not lock.locked()
    assert np.array_equal(image(pipe), before)


def test_a_generation_cancelled_with_a_lora_still_removes_it(pipe, files):
    from serving.cancel import CancelFlag
    from serving.generate import GenerationCancelled
    from serving.lora import RequestLoras

    before, flag, seen = image(pipe), CancelFlag(), []

    def on_step(step):
        seen.append(len(lora_layers(pipe)))
        flag.cancel("test")

    loras = RequestLoras(((0, weights_of(files.demo), 1.0),))
    with pytest.raises(GenerationCancelled):
        run_generation(pipe, threading.Lock(), GenerationParams("a cat", "", 64, 64, 4, 5.0, seeds=(3,)), request="t",
                       flag=flag, on_step=on_step, loras=loras)
    assert seen == [32] and lora_layers(pipe) == []
    assert np.array_equal(image(pipe), before)


def test_a_lora_that_fails_to_load_half_way_leaves_nothing_behind(pipe, files):
    before = image(pipe)
    broken = weights_of(files.demo)
    broken.state_dict = {**broken.state_dict}
    key = next(k for k in broken.state_dict if k.endswith("lora_B.weight"))
    broken.state_dict[key] = torch.zeros(3, 3)  # past the check: diffusers itself refuses the shape
    with pytest.raises(LoraError, match="diffusers cannot load it"), \
            adapters(pipe, [(weights_of(files.demo), 1.0), (broken, 1.0)]):
        pass
    assert lora_layers(pipe) == []
    assert np.array_equal(image(pipe), before)


def test_the_lora_alpha_in_a_files_metadata_applies_to_its_weights_in_memory(pipe, files):
    lora = weights_of(files.alpha_meta)
    assert lora.metadata["unet.lora_alpha"] == 8 and lora.metadata["unet.r"] == 4
    pipe.load_lora_weights(str(files.alpha_meta.parent), weight_name=files.alpha_meta.name, adapter_name="file")
    from_file = image(pipe)
    remove_adapters(pipe)
    with adapters(pipe, [(lora, 1.0)]):
        from_memory = image(pipe)
    lora.metadata = None  # what diffusers would do with the same tensors in memory: alpha = rank
    with adapters(pipe, [(lora, 1.0)]):
        without_metadata = image(pipe)
    assert np.array_equal(from_memory, from_file)
    assert np.abs(without_metadata - from_file).max() > 0.005


def test_the_loaded_adapter_is_the_cached_tensors_not_a_copy_of_them_on_the_cpu(pipe, files):
    lora = weights_of(files.demo)
    before = {k: v.clone() for k, v in lora.state_dict.items()}
    load_adapter(pipe, lora, "x")
    remove_adapters(pipe)
    assert all(torch.equal(lora.state_dict[k], v) for k, v in before.items())  # left intact for the next request


# --------------------------------------------------------------------------------------------------
# Checked against the architecture


def test_a_lora_for_another_architecture_is_refused_naming_modules_and_shapes(pipe, files):
    with pytest.raises(LoraError) as refused:
        LoraTargets.of(pipe).check(weights_of(files.sdxl))
    message = str(refused.value)
    assert message.startswith("sdxl: not a LoRA for this model's architecture: 40 of its 64 LoRA layers name modules "
                              "StableDiffusionPipeline does not have (e.g. 'unet down_blocks.1.attentions.0")
    assert "24 do not fit their module's shape (e.g. unet mid_block.attentions.0.transformer_blocks.0.attn1.to_k: " \
           "lora_A takes 32 inputs, the linear module has 64" in message


def test_model_weights_are_not_a_lora(pipe, files):
    with pytest.raises(LoraError, match=r"^unet-weights.safetensors: not a LoRA: none of its \d+ tensors is a LoRA "
                                        r"weight \(e\.g\. '"):
        LoraTargets.of(pipe).check(read_lora(files.weights, "unet-weights.safetensors", "t"))


def test_a_file_that_is_not_safetensors_is_refused_before_anything_reads_it_as_weights(files):
    with pytest.raises(LoraError, match=r"^notes: not a safetensors file \(LoRAs are read from \.safetensors only"):
        read_lora(files.text, "notes", "t")


def test_a_lora_for_a_component_the_pipeline_lacks_is_refused_naming_what_it_takes(pipe, files):
    with pytest.raises(LoraError, match=r"has weights for 'transformer', which StableDiffusionPipeline has no "
                                        r"LoRA-loadable component of \(it takes unet, text_encoder\)"):
        LoraTargets.of(pipe).check(read_lora(files.foreign, "foreign", "t"))


def test_a_lora_for_this_architecture_passes_and_counts_its_layers_per_component(pipe, files):
    assert LoraTargets.of(pipe).check(weights_of(files.with_text)) == {"unet": 32, "text_encoder": 8}


# --------------------------------------------------------------------------------------------------
# Refused when its values would wreck the image (NaN, infinity, absurd magnitudes)

LORA_B = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"


def rewritten(src: Path, dst: Path, tensors: dict | None = None, metadata: dict | None = None) -> Path:
    """The LoRA file ``src`` written to ``dst`` with ``tensors`` replacing or adding some of its
    own and ``metadata`` merged into its header's (a hostile or broken file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(src), "pt") as f:
        header = f.metadata() or {}
    save_file({**load_file(src), **(tensors or {})}, dst, metadata={**header, **(metadata or {})})
    return dst


def one_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out.view(-1)[out.numel() // 2] = value
    return out


def lora_b(files) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(files.demo), "pt") as f:
        return f.get_tensor(LORA_B)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_a_lora_with_one_nan_or_infinite_value_is_refused_naming_the_file_and_tensor(files, tmp_path, value):
    path = rewritten(files.demo, tmp_path / "bad.safetensors", {LORA_B: one_value(lora_b(files), value)})
    with pytest.raises(LoraError) as refused:
        read_lora(path, "bad.safetensors", "t")
    assert str(refused.value) == f"bad.safetensors: tensor {LORA_B!r} holds NaN or infinite values"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_half_precision_lora_with_a_nan_is_refused(files, tmp_path, dtype):
    path = rewritten(files.demo, tmp_path / "half.safetensors", {LORA_B: one_value(lora_b(files), float("nan")).to(dtype)})
    with pytest.raises(LoraError) as refused:
        read_lora(path, "half", "t")
    assert str(refused.value) == f"half: tensor {LORA_B!r} holds NaN or infinite values"


def test_a_float8_lora_with_an_infinite_value_is_refused(files, tmp_path):
    spoilt = one_value(lora_b(files), float("inf")).to(torch.float8_e5m2)
    path = rewritten(files.demo, tmp_path / "f8.safetensors", {LORA_B: spoilt})
    with pytest.raises(LoraError) as refused:
        read_lora(path, "f8", "t")
    assert str(refused.value) == f"f8: tensor {LORA_B!r} holds NaN or infinite values"


def test_a_lora_whose_weights_are_all_infinite_is_refused(tmp_path):
    path = tmp_path / "inf.safetensors"
    save_file({"unet.a.to_q.lora_A.weight": torch.full((4, 8), float("inf")),
               "unet.a.to_q.lora_B.weight": torch.full((8, 4), float("inf"))}, path)
    with pytest.raises(LoraError) as refused:
        read_lora(path, "inf", "t")
    assert str(refused.value) == "inf: tensor 'unet.a.to_q.lora_A.weight' holds NaN or infinite values"


def test_a_lora_weight_above_the_bound_is_refused_saying_the_bound(files, tmp_path):
    path = rewritten(files.demo, tmp_path / "huge.safetensors", {LORA_B: one_value(lora_b(files), -2e4)})
    with pytest.raises(LoraError) as refused:
        read_lora(path, "huge", "t")
    assert str(refused.value) == (f"huge: tensor {LORA_B!r} holds values up to 20000 in absolute value, more than "
                                  "10000 (no real LoRA's weights or alphas are that large)")


def test_a_lora_weight_at_the_bound_is_read(files, tmp_path):
    path = rewritten(files.demo, tmp_path / "edge.safetensors", {LORA_B: one_value(lora_b(files), 1e4)})
    assert read_lora(path, "edge", "t").state_dict[LORA_B].abs().max() == 1e4


def test_a_kohya_network_alpha_above_the_bound_is_refused(files, tmp_path):
    alpha = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.alpha"
    path = rewritten(files.demo, tmp_path / "alpha.safetensors", {alpha: torch.tensor(1e5)})
    with pytest.raises(LoraError) as refused:
        read_lora(path, "alpha", "t")
    assert str(refused.value) == (f"alpha: tensor {alpha!r} holds values up to 100000 in absolute value, more than "
                                  "10000 (no real LoRA's weights or alphas are that large)")


def test_a_kohya_network_alpha_that_is_not_finite_is_refused(files, tmp_path):
    alpha = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.alpha"
    path = rewritten(files.demo, tmp_path / "alpha.safetensors", {alpha: torch.tensor(float("nan"), dtype=torch.float16)})
    with pytest.raises(LoraError) as refused:
        read_lora(path, "alpha", "t")
    assert str(refused.value) == f"alpha: tensor {alpha!r} holds NaN or infinite values"


@pytest.mark.parametrize(("value", "shown"), [
    (1e38, "1e+38"), (-20000, "-20000"), (float("inf"), "inf"), (float("nan"), "nan"), ("8", "'8'"), (True, "True"),
], ids=repr)
def test_a_metadata_lora_alpha_that_is_not_a_finite_number_within_the_bound_is_refused(files, tmp_path, value, shown):
    import json

    metadata = {**json.loads(_metadata_of(files.alpha_meta)), "unet.lora_alpha": value}
    path = rewritten(files.alpha_meta, tmp_path / "meta.safetensors",
                     metadata={"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(LoraError) as refused:
        read_lora(path, "meta", "t")
    assert str(refused.value) == (f"meta: lora_adapter_metadata 'unet.lora_alpha' is {shown}: an alpha must be a "
                                  "finite number of at most 10000 in absolute value")


def test_a_metadata_alpha_pattern_value_above_the_bound_is_refused(files, tmp_path):
    import json

    metadata = json.loads(_metadata_of(files.alpha_meta))
    metadata["unet.alpha_pattern"] = {"down_blocks.0": 4, "up_blocks.1": 1e30}
    path = rewritten(files.alpha_meta, tmp_path / "meta.safetensors",
                     metadata={"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(LoraError) as refused:
        read_lora(path, "meta", "t")
    assert str(refused.value) == ("meta: lora_adapter_metadata 'unet.alpha_pattern' ['up_blocks.1'] is 1e+30: an alpha "
                                  "must be a finite number of at most 10000 in absolute value")


def _metadata_of(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["lora_adapter_metadata"]


def test_the_same_lora_as_bytes_reads_as_it_does_from_its_file(files):
    from_file = read_lora(files.alpha_meta, "alpha", "t")
    from_bytes = read_lora_bytes(files.alpha_meta.read_bytes(), "alpha", "t")
    assert from_bytes.state_dict.keys() == from_file.state_dict.keys()
    assert all(torch.equal(from_bytes.state_dict[k], v) for k, v in from_file.state_dict.items())
    assert (from_bytes.name, from_bytes.identity, from_bytes.metadata, from_bytes.nbytes) == (
        from_file.name, from_file.identity, from_file.metadata, from_file.nbytes)


def test_truncated_lora_bytes_are_refused_saying_the_sizes(files):
    data = files.demo.read_bytes()
    with pytest.raises(LoraError) as refused:
        read_lora_bytes(data[:-100], "cut", "t")
    assert str(refused.value) == (f"cut: damaged safetensors file (safetensors file is {len(data) - 100} bytes, its "
                                  f"header says {len(data)})")


def test_lora_bytes_that_are_not_safetensors_are_refused(files):
    with pytest.raises(LoraError, match=r"^notes: not a safetensors file \(LoRAs are read from \.safetensors only"):
        read_lora_bytes(files.text.read_bytes(), "notes", "t")


def test_lora_bytes_holding_a_nan_are_refused(files, tmp_path):
    path = rewritten(files.demo, tmp_path / "bad.safetensors", {LORA_B: one_value(lora_b(files), float("nan"))})
    with pytest.raises(LoraError) as refused:
        read_lora_bytes(path.read_bytes(), "bad", "t")
    assert str(refused.value) == f"bad: tensor {LORA_B!r} holds NaN or infinite values"


# --------------------------------------------------------------------------------------------------
# Fetched once; the cache in memory is bounded


def library(pipe, root: Path, **settings) -> LoraLibrary:
    return LoraLibrary.for_pipeline(pipe, LoraSettings(**settings), root, ConversionConfig.from_env())


def lora(path: str, scale: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(path=path, scale=scale)


def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was started")

    monkeypatch.setattr(lora_download, "run_child", refuse)


def test_a_data_uri_lora_is_read_from_the_request_and_never_stored(pipe, files, tmp_path, monkeypatch):
    uri = data_uri(files.demo)
    no_downloads(monkeypatch)
    first = library(pipe, tmp_path).resolve([lora(uri)])
    again = library(pipe, tmp_path).resolve([lora(uri, 0.5)])  # a fresh process's library: nothing in memory
    assert again.loras[0][1].identity == first.loras[0][1].identity == f"url:{url_hash(uri)}"
    assert again.loras[0][2] == 0.5
    assert list(tmp_path.iterdir()) == []


def test_a_lora_over_the_file_size_limit_is_refused_and_nothing_is_kept(pipe, files, tmp_path):
    assert files.big.stat().st_size > MB
    with pytest.raises(LoraRequestError) as refused:
        library(pipe, tmp_path / "data", max_file_mb=1).resolve([lora(data_uri(files.big))])
    [error] = refused.value.detail
    assert refused.value.status_code == 422 and error["loc"] == ["body", "loras", 0, "path"]
    assert "more than the limit of 1 MiB for a LoRA file ([lora] max_file_mb)" in error["msg"]
    assert [p for p in (tmp_path / "data").rglob("*") if p.is_file()] == []


def test_the_cache_keeps_the_most_recently_used_loras_within_its_bytes(pipe, files, tmp_path, monkeypatch):
    paths = {f"org/lora-{i}": make_tiny_lora(tmp_path / f"l{i}", pipe.unet, seed=i, rank=30) for i in range(3)}
    monkeypatch.setattr(lora_download, "fetch_request_lora",
                        lambda ref, files, **kw: LoraFile(paths[ref.repo], f"hub:{ref.repo}"))
    lib = library(pipe, tmp_path, cache_mb=1)
    size = weights_of(paths["org/lora-0"]).nbytes
    assert 0.4 * MB < size <= 0.5 * MB  # two fit in 1 MiB, three do not
    for name in ("org/lora-0", "org/lora-1", "org/lora-0", "org/lora-2"):
        lib.resolve([lora(name)])
    assert lib.cached() == ["hub:org/lora-0", "hub:org/lora-2"]  # lora-1 was the least recently used
    assert lib.cached_bytes == 2 * size


def test_a_lora_larger_than_the_whole_cache_is_used_but_not_kept(pipe, files, tmp_path):
    lib = library(pipe, tmp_path, cache_mb=0)
    resolved = lib.resolve([lora(data_uri(files.demo))])
    assert len(resolved) == 1 and lib.cached() == [] and lib.cached_bytes == 0


def test_a_lora_for_another_architecture_is_a_422_naming_its_path(pipe, files, tmp_path):
    with pytest.raises(LoraRequestError) as refused:
        library(pipe, tmp_path).resolve([lora(data_uri(files.demo)), lora(data_uri(files.sdxl))])
    [error] = refused.value.detail
    assert error["loc"] == ["body", "loras", 1, "path"] and error["type"] == "lora_mismatch"
    assert "not a LoRA for this model's architecture" in error["msg"]


@pytest.fixture
def hub(files, monkeypatch, tmp_path_factory):
    lora_bytes = files.demo.read_bytes()
    repos = [HubRepo("org/tiny-lora"), HubRepo("org/two-loras"), HubRepo("org/big-lora")]
    repos[0].push({"pytorch_lora_weights.safetensors": lora_bytes, "README.md": b"# a LoRA\n",
                   "styles/other.safetensors": files.other_seed.read_bytes()})
    repos[1].push({"a.safetensors": files.alpha_meta.read_bytes(), "b.safetensors": files.with_text.read_bytes()})
    repos[2].push({"big.safetensors": files.big.read_bytes()})
    with HubServer(repos) as server:
        use_hub(monkeypatch, server, tmp_path_factory.mktemp("hf-home"))
        yield server


def test_a_hub_repo_lora_is_its_default_file_fetched_once_into_the_hub_cache_then_found_offline(pipe, files, hub,
                                                                                              tmp_path, monkeypatch):
    first = library(pipe, tmp_path).resolve([lora("org/tiny-lora")])
    assert hub.downloaded() == {"pytorch_lora_weights.safetensors"}
    commit = hub.repos["org/tiny-lora"].branches["main"]
    assert first.loras[0][1].identity == f"hub:org/tiny-lora@{commit}/pytorch_lora_weights.safetensors"
    hub.reset_counts()
    no_downloads(monkeypatch)
    again = library(pipe, tmp_path).resolve([lora("org/tiny-lora")])
    assert hub.count() == 0 and again.loras[0][1].identity == first.loras[0][1].identity


def test_a_file_in_a_hub_repo_is_fetched_by_its_path(pipe, files, hub, tmp_path):
    resolved = library(pipe, tmp_path).resolve([lora("org/tiny-lora/styles/other.safetensors")])
    assert hub.downloaded() == {"styles/other.safetensors"}
    assert torch.equal(next(iter(resolved.loras[0][1].state_dict.values())),
                       next(iter(weights_of(files.other_seed).state_dict.values())))


@pytest.mark.parametrize(("path", "message"), [
    ("org/no-such-lora", "cannot be fetched: repo org/no-such-lora needs a Hugging Face token (it is private, gated "
                         "or does not exist)"),
    ("org/tiny-lora/nope.safetensors", "cannot be fetched: repo org/tiny-lora has no file nope.safetensors at "
                                       "revision 'main'"),
    ("org/two-loras", "repo org/two-loras has 2 .safetensors files and none is named pytorch_lora_weights.safetensors: "
                      "name the one to use, e.g. org/two-loras/a.safetensors, org/two-loras/b.safetensors"),
    ("org/tiny-lora@no-such-branch", "revision 'no-such-branch' does not exist in repo org/tiny-lora"),
])
def test_a_hub_lora_that_cannot_be_fetched_is_a_422_saying_why(pipe, hub, tmp_path, path, message):
    with pytest.raises(LoraRequestError) as refused:
        library(pipe, tmp_path).resolve([lora(path)])
    [error] = refused.value.detail
    assert error["loc"] == ["body", "loras", 0, "path"] and message in error["msg"], error["msg"]


def test_a_hub_lora_over_the_size_limit_is_refused_before_its_bytes_are_downloaded(pipe, hub, tmp_path):
    with pytest.raises(LoraRequestError, match=r"org/big-lora/big.safetensors is 1\.\d MiB, more than the limit of "
                                               r"1 MiB for a LoRA file"):
        library(pipe, tmp_path, max_file_mb=1).resolve([lora("org/big-lora")])
    assert hub.downloaded() == set()
