"""Converted pipelines load with load_pipeline and give the same images as diffusers on the source."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from model_loader import load_model, load_pipeline, read_pack
from model_loader.errors import PipelineLoadError, StateDictMismatchError

SD_CALL = dict(num_inference_steps=2, height=64, width=64, output_type="pt")
SDXL_CALL = dict(num_inference_steps=2, height=32, width=32, output_type="pt")
FLUX_CALL = dict(num_inference_steps=2, height=16, width=16, output_type="pt", max_sequence_length=16)


def _reference(src, **kwargs):
    """diffusers' own loading of the source, with every tensor moved to freshly allocated memory.

    diffusers leaves weights in mmap'd safetensors at arbitrary (8-byte) alignments, and oneDNN
    GEMMs round differently for unaligned operands (~1e-7); the copy makes the comparison
    about values, not addresses.
    """
    pipe = DiffusionPipeline.from_pretrained(src, local_files_only=True, **kwargs)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for t in [*component.parameters(), *component.buffers()]:
                t.data = t.data.clone()
    return pipe


def _image(pipe, call, seed=0):
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(seed), **call).images


def test_converted_sd_gives_the_same_image_as_diffusers_on_the_source(tiny_sd_dir, converted_sd_dir):
    ours = _image(load_pipeline(converted_sd_dir), SD_CALL)
    assert ours.shape == (1, 3, 64, 64)
    assert torch.equal(ours, _image(_reference(tiny_sd_dir), SD_CALL))


def test_converted_sdxl_gives_the_same_image_as_diffusers_on_the_source(tiny_sdxl_dir, converted_sdxl_dir):
    pipe = load_pipeline(converted_sdxl_dir)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert torch.equal(_image(pipe, SDXL_CALL), _image(_reference(tiny_sdxl_dir), SDXL_CALL))


def test_converted_flux_gives_the_same_image_as_diffusers_on_the_source(tiny_flux_dir, converted_flux_dir):
    assert torch.equal(
        _image(load_pipeline(converted_flux_dir), FLUX_CALL), _image(_reference(tiny_flux_dir), FLUX_CALL)
    )


def test_sd_with_safety_checker_and_feature_extractor_matches_diffusers(tmp_path):
    from tiny_models import make_tiny_sd_with_safety_checker

    from conversion.convert import convert_pipeline

    src = make_tiny_sd_with_safety_checker(tmp_path / "src")
    pipe = load_pipeline(convert_pipeline(src, tmp_path / "converted"))
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert pipe.safety_checker.concept_embeds.requires_grad is False  # as its class declares
    ours = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **SD_CALL)
    theirs = _reference(src)("a photo of a cat", generator=torch.Generator().manual_seed(0), **SD_CALL)
    assert ours.nsfw_content_detected == theirs.nsfw_content_detected
    assert torch.equal(ours.images, theirs.images)


def test_pipeline_config_kwargs_from_model_index_reach_the_pipeline(converted_sdxl_dir):
    # the tiny SDXL is saved with force_zeros_for_empty_prompt=False (the default is True)
    assert load_pipeline(converted_sdxl_dir).config.force_zeros_for_empty_prompt is False


def test_the_pipeline_and_each_model_record_where_they_were_loaded_from(converted_sd_dir):
    pipe = load_pipeline(converted_sd_dir)
    assert pipe.name_or_path == str(converted_sd_dir)
    assert pipe.unet.config._name_or_path == str(converted_sd_dir / "unet")  # diffusers model
    assert pipe.text_encoder.config.name_or_path == str(converted_sd_dir / "text_encoder")  # transformers model


def test_null_components_are_passed_as_none(converted_sd_dir):
    pipe = load_pipeline(converted_sd_dir)
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_t5_shared_and_encoder_embeddings_stay_one_parameter(converted_flux_dir):
    t5 = load_pipeline(converted_flux_dir).text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight


def test_each_component_is_views_of_its_pack_blocks(converted_sd_dir):
    pipe = load_pipeline(converted_sd_dir)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        assert len(storages) == 1, name  # one float32 block per component


def test_torch_dtype_casts_every_floating_parameter(converted_sd_dir):
    pipe = load_pipeline(converted_sd_dir, torch_dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}
    assert pipe.text_encoder.embeddings.position_ids.dtype == torch.int64
    image = _image(pipe, dict(SD_CALL, output_type="np"))
    assert image.shape == (1, 64, 64, 3)


def test_load_model_resolves_classes_without_a_model_index(converted_sd_dir, tmp_path):
    for name in ("unet", "text_encoder"):
        shutil.copytree(converted_sd_dir / name, tmp_path / name)
    unet = load_model(tmp_path / "unet")
    text_encoder = load_model(tmp_path / "text_encoder")
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert type(text_encoder).__name__ == "CLIPTextModel"
    assert not unet.training and not text_encoder.training


def test_diffusers_reads_our_packs_for_its_own_models(converted_sd_dir):
    theirs = UNet2DConditionModel.from_pretrained(converted_sd_dir, subfolder="unet", use_flashpack=True)
    ours = load_model(converted_sd_dir / "unet")
    want = ours.state_dict()
    got = theirs.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_diffusers_pipeline_loads_from_flashpack_given_the_text_encoder(converted_sd_dir):
    # diffusers reads model.flashpack only for its own models; transformers components are passed in
    pipe = DiffusionPipeline.from_pretrained(
        converted_sd_dir, use_flashpack=True, text_encoder=load_model(converted_sd_dir / "text_encoder")
    )
    assert torch.equal(_image(pipe, SD_CALL), _image(load_pipeline(converted_sd_dir), SD_CALL))


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.fixture
def broken(converted_sd_dir, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(converted_sd_dir, dst)
    return dst


def test_missing_model_index_is_an_error_naming_it(broken):
    (broken / "model_index.json").unlink()
    with pytest.raises(PipelineLoadError, match=f"{broken / 'model_index.json'}: missing"):
        load_pipeline(broken)


def test_missing_pack_is_an_error_naming_it(broken):
    (broken / "unet" / "model.flashpack").unlink()
    with pytest.raises(PipelineLoadError, match=f"{broken / 'unet' / 'model.flashpack'}: missing"):
        load_pipeline(broken)


def test_missing_component_directory_is_an_error_naming_it(broken):
    shutil.rmtree(broken / "vae")
    with pytest.raises(PipelineLoadError, match=f"{broken / 'vae'}: component directory"):
        load_pipeline(broken)


def test_unknown_component_class_is_an_error_naming_it(broken):
    index = json.loads((broken / "model_index.json").read_text())
    index["unet"] = ["diffusers", "NoSuchModel"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineLoadError, match="'diffusers' has no class 'NoSuchModel'"):
        load_pipeline(broken)


def test_unknown_pipeline_class_is_an_error_naming_it(broken):
    index = json.loads((broken / "model_index.json").read_text())
    index["_class_name"] = "NoSuchPipeline"
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineLoadError, match="unknown pipeline class 'NoSuchPipeline'"):
        load_pipeline(broken)


def test_pack_of_another_component_is_a_mismatch_naming_the_file(broken):
    shutil.copyfile(broken / "vae" / "model.flashpack", broken / "unet" / "model.flashpack")
    with pytest.raises(StateDictMismatchError, match=f"{broken / 'unet' / 'model.flashpack'}: tensors do not match"):
        load_pipeline(broken)


def test_read_pack_of_converted_component_holds_one_name_per_tied_tensor(converted_flux_dir):
    names = read_pack(converted_flux_dir / "text_encoder_2" / "model.flashpack").layout.names()
    assert ("shared.weight" in names) != ("encoder.embed_tokens.weight" in names)


def test_a_deeply_nested_model_index_is_a_load_error_naming_the_file(tmp_path):
    from model_loader.pipeline import read_model_index

    (tmp_path / "model_index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PipelineLoadError, match=r"model_index\.json: not a readable model_index\.json \(nested more than"):
        read_model_index(tmp_path)
