"""model_loader.private_api: the versions its hooks were checked against are the ones installed
by requirements.txt, and each hook still finds what it reaches for."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from conversion.demo import make_clip_tokenizer, tiny_clip_text_config
from model_loader import private_api

ROOT = Path(__file__).resolve().parent.parent


def test_the_checked_versions_are_the_pinned_ones():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), flags=re.MULTILINE))
    assert {name: pins[name] for name in private_api.CHECKED_VERSIONS} == private_api.CHECKED_VERSIONS


def test_module_tensors_tell_persistent_from_non_persistent_buffers():
    module = torch.nn.Linear(2, 3)
    module.register_buffer("kept", torch.zeros(1))
    module.register_buffer("computed", torch.ones(1), persistent=False)
    found = {(kind, attr, persistent) for kind, attr, _, persistent in private_api.module_tensors(module)}
    assert found == {("parameter", "weight", True), ("parameter", "bias", True), ("buffer", "kept", True),
                     ("buffer", "computed", False)}


def test_set_module_tensor_replaces_a_parameter_in_place():
    module = torch.nn.Linear(2, 3)
    value = torch.nn.Parameter(torch.zeros(3, 2))
    private_api.set_module_tensor(module, "parameter", "weight", value)
    assert module.weight is value


def test_a_transformers_model_is_built_without_random_init_on_the_meta_device():
    from accelerate import init_empty_weights

    config = tiny_clip_text_config(make_clip_tokenizer())
    with init_empty_weights(include_buffers=False):
        model = private_api.build_transformers_model(CLIPTextModel, config, torch.float16)
    assert all(p.is_meta and p.dtype == torch.float16 for p in model.parameters())


def test_pipeline_init_keys_list_components_and_optional_kwargs():
    components, optional = private_api.pipeline_init_keys(StableDiffusionPipeline)
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(components)
    assert "requires_safety_checker" in optional
    assert "safety_checker" in private_api.optional_components(StableDiffusionPipeline)
    assert private_api.optional_components(DiffusionPipeline) == []


def test_a_class_that_is_not_legacy_is_not_remapped():
    assert private_api.remap_legacy_model_class(UNet2DConditionModel, {"norm_type": "layer_norm"}) is UNet2DConditionModel


def test_a_transformers_class_without_a_rename_keeps_its_name():
    assert private_api.remap_transformers_class("CLIPTextModel") == "CLIPTextModel"


def test_lora_loadable_components_are_where_load_lora_weights_puts_layers():
    from tests.tiny_models import tiny_sdxl_pipeline

    assert private_api.lora_loadable_components(tiny_sdxl_pipeline()) == ["unet", "text_encoder", "text_encoder_2"]
    assert private_api.lora_loadable_components(torch.nn.Linear(2, 2)) == []
