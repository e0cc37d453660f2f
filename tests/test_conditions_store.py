"""ControlNets and IP-Adapters through the store and the project's loader (serving.conditions):
each is acquired and converted once into its own entry, found offline after, healed when damaged,
and loads into exactly what diffusers' own loading gives, tensor for tensor and image for image.
SD 1.x (the demo pipeline) and SDXL (the tiny test pipeline); local folders and the loopback Hub."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from condition_models import make_tiny_controlnet, make_tiny_image_encoder, make_tiny_ip_adapter, tiny_image_encoder
from PIL import Image as PILImage
from safetensors.torch import save
from tiny_models import tiny_sdxl_pipeline

from conversion.config import ConversionConfig
from conversion.sources import HubModelFolderSource, LocalModelFolderSource
from conversion.sources.demo import TRAINED_PIPELINE
from conversion.store import Store
from serving.conditions import ConditionEntries
from serving.ip_adapters import ImagePrompt
from serving.settings import ControlNetSetting, IPAdapterSetting, ModelSettings
from tests.hub_server import HubRepo, HubServer, use_hub


def sd_pipeline():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(TRAINED_PIPELINE, torch_dtype=torch.float32)


def sdxl_pipeline():
    return tiny_sdxl_pipeline(seed=3)


def model(**tables) -> ModelSettings:
    return ModelSettings(source="demo", dtype="float32", device="cpu", **tables)


def entries(tmp_path, settings: ModelSettings) -> ConditionEntries:
    store = Store(tmp_path / "volume", ConversionConfig())
    return ConditionEntries.lookup(store, settings, "cpu")


def same_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def h94_layout(root, unet, encoder_seed: int = 0):
    """An IP-Adapter repo laid out as h94/IP-Adapter: models/<adapter>.safetensors and models/image_encoder/."""
    adapter = make_tiny_ip_adapter(root / "models" / "ip-adapter_tiny.safetensors", unet)
    make_tiny_image_encoder(root / "models" / "image_encoder", seed=encoder_seed)
    return adapter


def test_a_model_folder_is_its_config_and_one_set_of_weights_at_its_top_level():
    from model_loader.diffusers_layout import select_model_folder_files

    listing = ["README.md", "canny/config.json", "canny/diffusion_pytorch_model.safetensors",
               "canny/diffusion_pytorch_model.fp16.safetensors", "canny/diffusion_pytorch_model.bin",
               "canny/images/example.png", "depth/config.json", "depth/diffusion_pytorch_model.safetensors"]
    assert select_model_folder_files(listing, "fp16", "canny") == [
        "canny/config.json", "canny/diffusion_pytorch_model.fp16.safetensors"]
    assert select_model_folder_files(listing, "fp16", "depth") == [  # no fp16 weights: the default ones
        "depth/config.json", "depth/diffusion_pytorch_model.safetensors"]
    assert select_model_folder_files(listing, None, "canny", weights=False) == ["canny/config.json"]


def test_a_folder_without_a_config_or_weights_is_no_model_folder():
    from model_loader.diffusers_layout import model_folder_index, select_model_folder_files
    from model_loader.errors import DiffusersLayoutError

    with pytest.raises(DiffusersLayoutError, match="the repo root holds no model: no config.json"):
        select_model_folder_files(["diffusion_pytorch_model.safetensors"])
    with pytest.raises(DiffusersLayoutError, match="canny: the model has no weight files beside its config.json"):
        select_model_folder_files(["canny/config.json", "canny/README.md"], subfolder="canny")
    assert model_folder_index("image_encoder", {"architectures": ["CLIPVisionModelWithProjection"]}, "x") == {
        "_class_name": "CLIPVisionModelWithProjection", "image_encoder": ["transformers", "CLIPVisionModelWithProjection"]}
    with pytest.raises(DiffusersLayoutError, match="x: names no model class"):
        model_folder_index("controlnet", {"in_channels": 4}, "x")


def test_nothing_configured_means_no_store_entry_and_nothing_built(tmp_path):
    found = entries(tmp_path, model())
    assert found.entries() == []
    conditions = found.load(object(), "cpu", torch.float32)  # no pipeline is even looked at
    assert conditions.controlnets is None and conditions.ip_adapters is None
    assert conditions.sample(64, 64) is None
    assert not (tmp_path / "volume").exists()


# --------------------------------------------------------------------------------------------------
# ControlNets


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_local_controlnet_loads_from_its_store_entry_equal_to_diffusers_from_pretrained(tmp_path, family):
    from diffusers import ControlNetModel

    pipe = sd_pipeline() if family == "sd" else sdxl_pipeline()
    folder = make_tiny_controlnet(tmp_path / "controlnet", pipe.unet, seed=1)
    found = entries(tmp_path, model(controlnets=[ControlNetSetting(source=str(folder))]))
    [entry] = found.entries()
    assert entry.path is None and isinstance(entry.source, LocalModelFolderSource)
    conditions = found.load(pipe, "cpu", torch.float32)
    assert entry.origin == "converted on this start"
    assert sorted(p.name for p in (entry.path / "controlnet").iterdir()) == ["config.json", "model.flashpack"]
    ours = conditions.controlnets.nets[str(folder)].model
    same_tensors(ours.state_dict(), ControlNetModel.from_pretrained(folder).state_dict())
    again = entries(tmp_path, model(controlnets=[ControlNetSetting(source=str(folder))]))
    assert again.entries()[0].path == entry.path  # found offline by the next start


def test_a_hub_controlnet_fetches_only_its_config_and_variant_weights_and_is_found_offline_after(tmp_path, monkeypatch):
    from diffusers import ControlNetModel

    pipe = sdxl_pipeline()
    folder = make_tiny_controlnet(tmp_path / "src", pipe.unet, seed=2, variant="fp16")
    make_tiny_controlnet(tmp_path / "other", pipe.unet, seed=5)
    files = {f"canny/{p.name}": p.read_bytes() for p in folder.iterdir()}
    files.update({f"canny-full/{p.name}": p.read_bytes() for p in (tmp_path / "other").iterdir()})
    repo = HubRepo("org/controlnets")
    commit = repo.push({**files, "README.md": b"two controlnets"})
    setting = ControlNetSetting(source="org/controlnets", revision=commit, subfolder="canny", variant="fp16")
    with HubServer([repo]) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        found = entries(tmp_path, model(controlnets=[setting]))
        conditions = found.load(pipe, "cpu", torch.float32)
        assert server.downloaded() == {"canny/config.json", "canny/diffusion_pytorch_model.fp16.safetensors"}
    [entry] = found.entries()
    assert entry.source == HubModelFolderSource("org/controlnets", revision=commit, variant="fp16", subfolder="canny",
                                                component="controlnet")
    reference = ControlNetModel.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    same_tensors(conditions.controlnets.nets["org/controlnets"].model.state_dict(), reference.state_dict())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert entries(tmp_path, model(controlnets=[setting])).entries()[0].path == entry.path


def test_a_controlnet_pack_failing_its_checksum_is_rebuilt_and_loaded_on_the_same_start(tmp_path, caplog):
    pipe = sd_pipeline()
    folder = make_tiny_controlnet(tmp_path / "controlnet", pipe.unet, seed=1)
    settings = model(controlnets=[ControlNetSetting(source=str(folder))])
    [first] = entries(tmp_path, settings).entries()
    damaged = first.ensure()
    pack = damaged / "controlnet" / "model.flashpack"
    data = bytearray(pack.read_bytes())
    data[100] ^= 0xFF
    pack.write_bytes(bytes(data))
    found = entries(tmp_path, settings)
    with caplog.at_level(logging.ERROR, logger="conversion.entry"):
        conditions = found.load(pipe, "cpu", torch.float32)
    assert "is damaged" in caplog.text and str(damaged) in caplog.text
    from diffusers import ControlNetModel

    same_tensors(conditions.controlnets.nets[str(folder)].model.state_dict(),
                 ControlNetModel.from_pretrained(folder).state_dict())


def test_controlnet_pipelines_are_built_once_from_the_loaded_modules_for_every_endpoint(tmp_path):
    pipe = sd_pipeline()
    folder = make_tiny_controlnet(tmp_path / "controlnet", pipe.unet)
    conditions = entries(tmp_path, model(controlnets=[ControlNetSetting(source=str(folder))])).load(
        pipe, "cpu", torch.float32)
    pipelines = conditions.controlnets.pipelines
    assert {kind: type(p).__name__ for kind, p in pipelines.items()} == {
        "text-to-image": "StableDiffusionControlNetPipeline",
        "image-to-image": "StableDiffusionControlNetImg2ImgPipeline",
        "inpaint": "StableDiffusionControlNetInpaintPipeline"}
    for built in pipelines.values():
        assert built.unet is pipe.unet and built.vae is pipe.vae and built.text_encoder is pipe.text_encoder


# --------------------------------------------------------------------------------------------------
# IP-Adapters


def _ip_processors(processors: dict) -> dict:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    return {name: p.state_dict() for name, p in processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)}


def _generate(pipe, **extra) -> np.ndarray:
    result = pipe(prompt="a red circle on a blue background", num_inference_steps=2, width=64, height=64,
                  generator=torch.Generator().manual_seed(7), output_type="np", **extra)
    return result.images[0]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_an_ip_adapter_built_from_the_store_equals_diffusers_load_ip_adapter(tmp_path, family):
    make = sd_pipeline if family == "sd" else sdxl_pipeline
    ours_pipe, theirs = make(), make()
    adapter = h94_layout(tmp_path / "h94", ours_pipe.unet)
    setting = IPAdapterSetting(source=str(adapter), image_encoder=str(tmp_path / "h94"),
                               image_encoder_subfolder="models/image_encoder")
    found = entries(tmp_path, model(ip_adapters=[setting]))
    conditions = found.load(ours_pipe, "cpu", torch.float32)
    assert [e.what for e in found.entries()] == ["ip-adapter", "image encoder"]
    built = conditions.ip_adapters.adapters[str(adapter)]
    theirs.load_ip_adapter(str(tmp_path / "h94"), subfolder="models", weight_name=adapter.name)

    ours_ip, theirs_ip = _ip_processors(built.processors), _ip_processors(theirs.unet.attn_processors)
    assert ours_ip.keys() == theirs_ip.keys() and ours_ip
    for name in ours_ip:
        same_tensors(ours_ip[name], theirs_ip[name])
    same_tensors(built.projection.state_dict(), theirs.unet.encoder_hid_proj.state_dict())
    same_tensors(built.image_encoder.state_dict(), theirs.image_encoder.state_dict())

    image = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    theirs.set_ip_adapter_scale(0.8)
    with conditions.ip_adapters.applied(ours_pipe, ImagePrompt(built, image, 0.8)) as (view, extra):
        assert list(extra) == ["ip_adapter_image"]
        ours_image = _generate(view, **extra)
    # The same weights and inputs: equal up to float32 rounding (the loader's tensors are views of one
    # aligned block, diffusers' its own allocations, so vectorized kernels may sum in another order).
    np.testing.assert_allclose(ours_image, _generate(theirs, ip_adapter_image=image), rtol=0, atol=1e-4)


def test_the_unet_runs_untouched_outside_a_request_with_an_image_prompt(tmp_path):
    pipe = sd_pipeline()
    before = _generate(pipe)
    own = dict(pipe.unet.attn_processors)
    weights_before = {name: p.data_ptr() for name, p in pipe.unet.named_parameters()}
    adapter = h94_layout(tmp_path / "h94", pipe.unet)
    conditions = entries(tmp_path, model(ip_adapters=[IPAdapterSetting(
        source=str(adapter), image_encoder=str(tmp_path / "h94" / "models" / "image_encoder"))])).load(
        pipe, "cpu", torch.float32)
    assert dict(pipe.unet.attn_processors) == own and pipe.unet.encoder_hid_proj is None
    image = PILImage.new("RGB", (32, 32), (200, 30, 30))
    with conditions.ip_adapters.applied(pipe, ImagePrompt(conditions.ip_adapters.adapters[str(adapter)], image, 0.0)) \
            as (view, extra):
        np.testing.assert_array_equal(_generate(view, **extra), before)  # scale 0: the adapter adds nothing
    assert dict(pipe.unet.attn_processors) == own and pipe.unet.encoder_hid_proj is None
    assert pipe.unet.config.encoder_hid_dim_type is None
    np.testing.assert_array_equal(_generate(pipe), before)
    assert {name: p.data_ptr() for name, p in pipe.unet.named_parameters()} == weights_before


def test_adapters_sharing_an_image_encoder_share_its_entry_and_its_loaded_model(tmp_path):
    pipe = sd_pipeline()
    first = h94_layout(tmp_path / "h94", pipe.unet)
    second = make_tiny_ip_adapter(tmp_path / "h94" / "models" / "ip-adapter_other.safetensors", pipe.unet, seed=4)
    encoder = {"image_encoder": str(tmp_path / "h94"), "image_encoder_subfolder": "models/image_encoder"}
    found = entries(tmp_path, model(ip_adapters=[IPAdapterSetting(source=str(first), **encoder),
                                                 IPAdapterSetting(source=str(second), **encoder)]))
    assert [e.what for e in found.entries()] == ["ip-adapter", "ip-adapter", "image encoder"]
    adapters = found.load(pipe, "cpu", torch.float32).ip_adapters.adapters
    assert adapters[str(first)].image_encoder is adapters[str(second)].image_encoder


def test_hub_ip_adapter_file_and_encoder_folder_fetch_only_what_they_name(tmp_path, monkeypatch):
    pipe = sdxl_pipeline()
    adapter = h94_layout(tmp_path / "h94", pipe.unet)
    encoder_dir = tmp_path / "h94" / "models" / "image_encoder"
    repo = HubRepo("h94/IP-Adapter")
    commit = repo.push({"models/ip-adapter_tiny.safetensors": adapter.read_bytes(),
                        **{f"models/image_encoder/{p.name}": p.read_bytes() for p in encoder_dir.iterdir()},
                        "models/ip-adapter_other.safetensors": save({"x": torch.zeros(1)}),
                        "sdxl_models/image_encoder/config.json": b"{}"})
    setting = IPAdapterSetting(source="h94/IP-Adapter/models/ip-adapter_tiny.safetensors", revision=commit,
                               image_encoder="h94/IP-Adapter", image_encoder_revision=commit,
                               image_encoder_subfolder="models/image_encoder")
    with HubServer([repo]) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        conditions = entries(tmp_path, model(ip_adapters=[setting])).load(pipe, "cpu", torch.float32)
        assert server.downloaded() == {"models/ip-adapter_tiny.safetensors", "models/image_encoder/config.json",
                                       "models/image_encoder/model.safetensors"}
    built = conditions.ip_adapters.adapters[setting.source]
    same_tensors(built.image_encoder.state_dict(), tiny_image_encoder().state_dict())


def test_weights_that_are_no_ip_adapter_stop_setup_naming_the_adapter(tmp_path):
    from safetensors.torch import save_file

    pipe = sd_pipeline()
    make_tiny_image_encoder(tmp_path / "encoder")
    wrong = tmp_path / "not-an-adapter.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(4, 4), "lora.down.weight": torch.zeros(2, 2)}, str(wrong))
    found = entries(tmp_path, model(ip_adapters=[IPAdapterSetting(source=str(wrong),
                                                                  image_encoder=str(tmp_path / "encoder"))]))
    with pytest.raises(RuntimeError, match="not-an-adapter.safetensors: 'lora.down.weight' is not an IP-Adapter tensor"):
        found.load(pipe, "cpu", torch.float32)


def test_an_ip_adapter_for_another_unet_stops_setup_naming_it_and_leaves_the_unet_as_it_was(tmp_path):
    pipe = sd_pipeline()
    adapter = make_tiny_ip_adapter(tmp_path / "sdxl-adapter.safetensors", sdxl_pipeline().unet)
    make_tiny_image_encoder(tmp_path / "encoder")
    own = dict(pipe.unet.attn_processors)
    found = entries(tmp_path, model(ip_adapters=[IPAdapterSetting(source=str(adapter),
                                                                  image_encoder=str(tmp_path / "encoder"))]))
    with pytest.raises(RuntimeError, match="sdxl-adapter.safetensors: cannot be used with this model's UNet"):
        found.load(pipe, "cpu", torch.float32)
    assert dict(pipe.unet.attn_processors) == own and pipe.unet.encoder_hid_proj is None


@pytest.mark.parametrize("kind", ["text-to-image", "image-to-image", "inpaint"])
def test_sdxl_controlnet_views_run_on_every_endpoint_and_scale_zero_adds_nothing(tmp_path, kind):
    from serving.conditions import RequestConditions
    from serving.controlnets import ControlInput
    from serving.generate import GenerationParams, generate
    from serving.img2img import build_image_pipelines

    pipe = sdxl_pipeline()
    folder = make_tiny_controlnet(tmp_path / "controlnet", pipe.unet, seed=1)
    conditions = entries(tmp_path, model(controlnets=[ControlNetSetting(source=str(folder))])).load(
        pipe, "cpu", torch.float32)
    assert type(conditions.controlnets.pipelines[kind]).__name__.startswith("StableDiffusionXLControlNet")
    net = conditions.controlnets.nets[str(folder)]
    rng = np.random.default_rng(0)
    photo = PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = PILImage.fromarray(np.where(np.arange(64)[None, :] < 32, 255, 0).astype(np.uint8).repeat(64, 0))
    inputs = {} if kind == "text-to-image" else {"image": photo, "strength": 1.0}
    if kind == "inpaint":
        inputs["mask_image"] = mask
    params = GenerationParams("a cat", "", 64, 64, 2, 5.0, seeds=(1,), **inputs)
    plain_pipe = pipe if kind == "text-to-image" else build_image_pipelines(pipe).get(kind)

    def run(scale: float) -> np.ndarray:
        request = RequestConditions(kind, [ControlInput(net, photo, scale, 0.0, 1.0)], None, conditions)
        with request.applied(pipe) as (call, extra):
            return np.asarray(generate(call, params, extra=extra)[0], dtype=float)

    plain = np.asarray(generate(plain_pipe, params)[0], dtype=float)
    assert np.abs(run(1.0) - plain).mean() > 0.5
    np.testing.assert_allclose(run(0.0), plain, atol=1)  # within one level of 255


def test_a_flux_model_with_controlnets_stops_setup_saying_so(tmp_path):
    from types import SimpleNamespace

    from serving.controlnets import ControlNet, ControlNets

    class FluxPipeline:  # what matters: a transformer, no unet
        transformer = object()

    with pytest.raises(RuntimeError, match=r"FluxPipeline is not served with ControlNets here \(SD 1.x/2.x and SDXL are\)"):
        ControlNets.build(FluxPipeline(), [ControlNet("org/flux-canny", SimpleNamespace(), "none")])


def test_a_controlnet_made_for_another_family_stops_setup_naming_it_and_what_differs(tmp_path):
    folder = make_tiny_controlnet(tmp_path / "sd-controlnet", sd_pipeline().unet)
    found = entries(tmp_path, model(controlnets=[ControlNetSetting(source=str(folder))]))
    with pytest.raises(RuntimeError, match=r"sd-controlnet: a ControlNet for another model \(its block_out_channels "
                                           r"is \[32, 64, 96\] where the UNet's is \[16, 32\]\)"):
        found.load(sdxl_pipeline(), "cpu", torch.float32)


def test_an_image_encoder_that_does_not_fit_the_adapter_stops_setup_naming_both_widths(tmp_path):
    pipe = sd_pipeline()
    adapter = make_tiny_ip_adapter(tmp_path / "adapter.safetensors", pipe.unet)  # 32-wide image embeddings
    tiny_image_encoder(projection_dim=16).save_pretrained(tmp_path / "encoder-16", safe_serialization=True)
    found = entries(tmp_path, model(ip_adapters=[IPAdapterSetting(source=str(adapter),
                                                                  image_encoder=str(tmp_path / "encoder-16"))]))
    with pytest.raises(RuntimeError, match=r"adapter.safetensors: its image projection takes 32-wide image embeddings, "
                                           r"its image encoder gives 16; configure the image encoder it was trained with"):
        found.load(pipe, "cpu", torch.float32)
