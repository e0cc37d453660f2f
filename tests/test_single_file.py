"""Single-file checkpoints of each family (SD 1.x, SDXL, Flux.1) through the store: the pipeline
class detected from the tensor names, the configs (and the components a file lacks) from a local
diffusers directory or a Hub repo, fetched from a data: URL or as a file of a loopback Hub repo;
each conversion loads with the project's loader and equals the conversion of its diffusers
directory, tensor for tensor."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import conversion.checkpoint
from conversion.checkpoint import NotDetected, detect_pipeline_class, missing_components, tensor_shapes
from conversion.download import hub as hub_download
from conversion.download import url as url_download
from conversion.errors import SourceError
from conversion.manifest import read_manifest, verify_converted
from conversion.sources import parse_source
from conversion.store import ensure_converted
from tests.hub_server import HubRepo, HubServer, use_hub
from tests.single_files import (
    checkpoint_bytes,
    data_url,
    flux_checkpoint,
    flux_mapping_for_tiny_models,
    ldm_checkpoint,
    sdxl_checkpoint,
)
from tests.tiny_models import make_tiny_flux, make_tiny_sd, make_tiny_sdxl

FAMILIES = {  # name: (pipeline class, builder, the components a single file holds)
    "sd15": ("StableDiffusionPipeline", make_tiny_sd, ldm_checkpoint, ["unet", "vae", "text_encoder"]),
    "sdxl": ("StableDiffusionXLPipeline", lambda d: make_tiny_sdxl(d, text_encoder_2_width=48), sdxl_checkpoint,
             ["unet", "vae", "text_encoder", "text_encoder_2"]),
    "flux-dev": ("FluxPipeline", lambda d: make_tiny_flux(d, guidance_embeds=True), flux_checkpoint, ["transformer"]),
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single-file-sources")
    return {name: build(root / name) for name, (_, build, _, _) in FAMILIES.items()}


def config_dir(pipeline: Path, dst: Path, keep_weights_of: tuple[str, ...] = ()) -> Path:
    """``pipeline``'s configs, tokenizers and scheduler (and the weights of ``keep_weights_of``)."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        keep = Path(folder).name in keep_weights_of
        return [n for n in names if n.endswith(".safetensors") and not keep]

    return Path(shutil.copytree(pipeline, dst, ignore=ignore))


def loaded_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every component's tensors, as model_loader.load_pipeline builds the pipeline from the entry."""
    from model_loader import load_pipeline

    pipe = load_pipeline(path)
    return {name: module.state_dict() for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def assert_same_tensors(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]) -> None:
    assert got.keys() == want.keys()
    for component in want:
        assert got[component].keys() == want[component].keys(), component
        different = [k for k in want[component] if not torch.equal(got[component][k], want[component][k])]
        assert different == [], component


def no_download(*args, **kwargs):
    raise AssertionError("the warm path downloaded")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_single_file_of_each_family_is_detected_converted_and_loads_equal_to_its_diffusers_pipeline(
    family, pipelines, tmp_path, monkeypatch
):
    cls_name, _, to_single_file, held = FAMILIES[family]
    pipeline = pipelines[family]
    index = json.loads((pipeline / "model_index.json").read_text())
    lacking = tuple(c for c in ("vae", "text_encoder", "text_encoder_2") if c in index and c not in held)
    config = config_dir(pipeline, tmp_path / "config", keep_weights_of=lacking)  # Flux: all but the transformer
    source = parse_source(data_url(to_single_file(pipeline)), config=str(config))
    assert source.pipeline_class is None  # left to detection
    mapping = flux_mapping_for_tiny_models() if family.startswith("flux") else contextlib.nullcontext()
    with mapping:
        path = ensure_converted(source, root=tmp_path / "volume")
    verify_converted(path, full=True)
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == cls_name
    assert read_manifest(path)["source"]["kind"] == "url"
    reference = ensure_converted(str(pipeline), root=tmp_path / "volume")
    assert_same_tensors(loaded_tensors(path), loaded_tensors(reference))
    monkeypatch.setattr(url_download, "run_child", no_download)
    monkeypatch.setattr(hub_download, "run_child", no_download)
    assert ensure_converted(source, root=tmp_path / "volume") == path


def test_a_flux_file_of_a_hub_repo_comes_with_only_the_weights_it_lacks_and_is_found_offline_after(
    tmp_path, monkeypatch
):
    pipeline = make_tiny_flux(tmp_path / "flux")  # schnell: no guidance embedder
    single = checkpoint_bytes(flux_checkpoint(pipeline))
    repo = HubRepo.from_dir("org/tiny-flux", pipeline, extra={"flux1-tiny.safetensors": single})
    with HubServer([repo]) as server, flux_mapping_for_tiny_models():
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        source = parse_source("org/tiny-flux/flux1-tiny.safetensors", config="org/tiny-flux")
        path = ensure_converted(source, root=tmp_path / "volume")
        fetched = server.downloaded()
        server.reset_counts()
        assert ensure_converted(source, root=tmp_path / "volume") == path
        assert server.count() == 0  # the branch's commit is in the store's ref file
    assert "flux1-tiny.safetensors" in fetched
    assert sorted(f for f in fetched if f.endswith(".safetensors")) == [
        "flux1-tiny.safetensors", "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]  # not transformer/: the file is the transformer
    manifest = read_manifest(path)["source"]
    assert (manifest["kind"], manifest["ref"], manifest["identity"]) == (
        "hub-file", "org/tiny-flux/flux1-tiny.safetensors", repo.branches["main"])
    reference = ensure_converted(str(pipeline), root=tmp_path / "volume")
    assert_same_tensors(loaded_tensors(path), loaded_tensors(reference))


# ---------------------------------------------------------------------------------------------
# Detection: from the safetensors header alone


def header_only(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """A safetensors file cut after its header: no tensor bytes at all."""
    data = checkpoint_bytes(tensors)
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8 + n])
    return path


def test_detection_reads_the_header_only_and_names_each_family(pipelines, tmp_path):
    flux_schnell = make_tiny_flux(tmp_path / "schnell")
    cases = {
        "sd15": (ldm_checkpoint(pipelines["sd15"]), ("StableDiffusionPipeline", "SD 1.x")),
        "sdxl": (sdxl_checkpoint(pipelines["sdxl"]), ("StableDiffusionXLPipeline", "SDXL base")),
        "flux-dev": (flux_checkpoint(pipelines["flux-dev"]), ("FluxPipeline", "Flux.1 dev")),
        "flux-schnell": (flux_checkpoint(flux_schnell), ("FluxPipeline", "Flux.1 schnell")),
        "flux-comfy": (flux_checkpoint(flux_schnell, prefix="model.diffusion_model."), ("FluxPipeline", "Flux.1 schnell")),
    }
    got = {name: detect_pipeline_class(tensor_shapes(header_only(tensors, tmp_path / f"{name}.safetensors")))
           for name, (tensors, _) in cases.items()}
    assert got == {name: expected for name, (_, expected) in cases.items()}


def shapes_of(*names: str, **shapes: list[int]) -> dict[str, list[int]]:
    return {**{n: [1] for n in names}, **{k.replace("__", "."): v for k, v in shapes.items()}}


@pytest.mark.parametrize(("shapes", "message"), [
    (shapes_of("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "cond_stage_model.transformer.x",
               model__diffusion_model__input_blocks__0__0__weight=[320, 9, 3, 3]),
     "an inpainting or InstructPix2Pix checkpoint (its UNet takes 9 input channels), not a text-to-image one"),
    (shapes_of("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "cond_stage_model.model.ln_final.weight"),
     "a Stable Diffusion 2.x checkpoint (an OpenCLIP text encoder under cond_stage_model.model.)"),
    (shapes_of("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "conditioner.embedders.0.model.ln_final.weight"),
     "an SDXL refiner checkpoint (an image-to-image model)"),
    (shapes_of("double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.bias", img_in__weight=[3072, 384]),
     "a Flux.1 Fill checkpoint, not a text-to-image one"),
    (shapes_of("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"),
     "no supported family's tensor names (3 tensors, e.g. 'decoder.conv_out.weight', 'encoder.conv_in.weight', "
     "'quant_conv.weight')"),
])
def test_detection_names_what_a_checkpoint_of_another_family_is(shapes, message):
    with pytest.raises(NotDetected) as err:
        detect_pipeline_class(shapes)
    assert str(err.value) == message


def test_missing_components_are_those_of_the_class_with_no_tensor_under_their_prefix(pipelines):
    flux = flux_checkpoint(pipelines["flux-dev"])
    assert missing_components("FluxPipeline", flux) == ["vae", "text_encoder", "text_encoder_2"]
    assert missing_components("StableDiffusionXLPipeline", sdxl_checkpoint(pipelines["sdxl"])) == []
    assert missing_components("StableDiffusionPipeline", flux) == ["unet", "vae", "text_encoder"]
    assert missing_components("StableDiffusion3Pipeline", flux) is None  # not a class listed here


# ---------------------------------------------------------------------------------------------
# Clear errors, before or instead of a conversion


def test_a_checkpoint_of_no_known_family_is_refused_naming_the_source_and_model_pipeline_class(tmp_path):
    url = data_url({"encoder.conv_in.weight": torch.zeros(2, 3), "decoder.conv_out.weight": torch.zeros(3, 2)})
    source = parse_source(url)
    with pytest.raises(SourceError) as err:
        ensure_converted(source, root=tmp_path)
    assert str(err.value) == (
        f"{source.display}: cannot tell which pipeline this checkpoint is for: it is no supported family's tensor "
        "names (2 tensors, e.g. 'decoder.conv_out.weight', 'encoder.conv_in.weight'); set model.pipeline_class "
        "(StableDiffusionPipeline, StableDiffusionXLPipeline or FluxPipeline) and model.config"
    )


def test_a_pickled_checkpoint_without_a_pipeline_class_is_refused_saying_to_set_one(tmp_path):
    buffer = io.BytesIO()
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, buffer)
    source = parse_source(data_url(buffer.getvalue()))
    with pytest.raises(SourceError, match=re.escape(
        f"{source.display}: not a safetensors file (a pickled .ckpt?): its tensor names cannot be read without "
        "unpickling it, so its pipeline is not detected; set model.pipeline_class (")):
        ensure_converted(source, root=tmp_path)


def test_a_pipeline_class_the_checkpoint_does_not_hold_is_refused_naming_the_missing_denoiser(pipelines, tmp_path):
    source = parse_source(data_url(ldm_checkpoint(pipelines["sd15"])), pipeline_class="FluxPipeline")
    with pytest.raises(SourceError) as err:
        ensure_converted(source, root=tmp_path)
    assert str(err.value) == (
        f"{source.display}: holds no transformer weights for FluxPipeline (no tensor name starts with double_blocks. "
        "or model.diffusion_model.double_blocks.); is model.pipeline_class right? (StableDiffusionPipeline, "
        "StableDiffusionXLPipeline or FluxPipeline)"
    )


def test_a_flux_file_without_config_is_refused_naming_the_components_it_lacks(pipelines, tmp_path):
    source = parse_source(data_url(flux_checkpoint(pipelines["flux-dev"])))
    with pytest.raises(SourceError) as err:
        ensure_converted(source, root=tmp_path)
    assert str(err.value) == (
        f"{source.display}: the checkpoint holds no weights for vae, text_encoder, text_encoder_2; set model.config "
        "to a diffusers pipeline (a Hub repo id or a directory) that holds them, e.g. the base model's repo"
    )


def test_a_flux_file_whose_config_has_no_weights_for_what_it_lacks_is_refused_naming_the_component(
    pipelines, tmp_path
):
    config = config_dir(pipelines["flux-dev"], tmp_path / "config")  # configs only
    source = parse_source(data_url(flux_checkpoint(pipelines["flux-dev"])), config=str(config))
    with pytest.raises(SourceError, match=re.escape(
            f"{source.display}: the checkpoint holds no vae weights, and model.config ({config}) cannot provide them")):
        ensure_converted(source, root=tmp_path / "volume")


def test_a_given_pipeline_class_is_used_without_detection(pipelines, tmp_path, monkeypatch):
    def no_detection(shapes):
        raise AssertionError("detected despite a given pipeline_class")

    monkeypatch.setattr(conversion.checkpoint, "detect_pipeline_class", no_detection)
    config = config_dir(pipelines["sd15"], tmp_path / "config")
    source = parse_source(data_url(ldm_checkpoint(pipelines["sd15"])), pipeline_class="StableDiffusionPipeline",
                          config=str(config))
    path = ensure_converted(source, root=tmp_path / "volume")
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert read_manifest(path)["source"]["pipeline_class"] == "StableDiffusionPipeline"


def test_a_hub_file_the_repo_does_not_hold_is_refused_naming_it(pipelines, tmp_path, monkeypatch):
    with HubServer([HubRepo.from_dir("org/tiny-sd", pipelines["sd15"])]) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        with pytest.raises(SourceError) as err:
            ensure_converted(parse_source("org/tiny-sd/v1-5.safetensors"), root=tmp_path / "volume")
    assert str(err.value) == "repo org/tiny-sd has no file v1-5.safetensors at revision 'main'"
