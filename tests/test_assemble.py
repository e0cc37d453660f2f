"""Assembling modules from packs: views not copies, strict keys, ties, 0-dim, buffers, dtypes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_t5_tokenizer, tiny_gpt2, tiny_t5_encoder
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, T5EncoderModel

from conversion.demo import make_clip_tokenizer, tiny_clip_text_config
from conversion.writer import pack_state_dict
from model_loader import read_pack
from model_loader.assemble import (
    assemble_model,
    build_empty_model,
    check_tensors,
    load_tensors,
)
from model_loader.errors import StateDictMismatchError


def _pack(tmp_path, state_dict, name="model.flashpack", target_dtype=None):
    path = tmp_path / name
    pack_state_dict(state_dict, path, target_dtype=target_dtype)
    return read_pack(path)


def _storage_span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


@pytest.fixture(scope="module")
def clip_text():
    torch.manual_seed(1)
    return CLIPTextModel(tiny_clip_text_config(make_clip_tokenizer())).eval()


def test_empty_model_has_meta_parameters_and_real_buffers(clip_text):
    model = build_empty_model(CLIPTextModel, clip_text.config)
    assert all(p.is_meta for p in model.parameters())
    position_ids = model.embeddings.position_ids
    assert not position_ids.is_meta
    assert torch.equal(position_ids, torch.arange(77).unsqueeze(0))


def test_parameters_are_views_into_one_flat_block_per_dtype(tmp_path, clip_text):
    sd = clip_text.state_dict()
    sd = {k: (v.bfloat16() if "layer_norm" in k else v) for k, v in sd.items()}  # two dtypes
    pack = _pack(tmp_path, sd)
    model = assemble_model(CLIPTextModel, clip_text.config, pack, "cpu")
    assert len(pack.blocks) == 2
    for block in pack.blocks:
        lo, hi = _storage_span(block)
        members = [p for p in model.parameters() if p.dtype == block.dtype]
        assert members
        for p in members:
            assert p.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
            start, end = _storage_span(p)
            assert lo <= start and end <= hi


def test_loaded_model_matches_original_outputs_and_is_in_eval_mode(tmp_path, clip_text):
    model = assemble_model(CLIPTextModel, clip_text.config, _pack(tmp_path, clip_text.state_dict()))
    ids = torch.tensor([[0, 5, 9, 1]])
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).pooler_output, clip_text(ids).pooler_output)


def test_non_persistent_buffer_is_real_and_not_in_the_pack(tmp_path, clip_text):
    pack = _pack(tmp_path, clip_text.state_dict())
    assert "embeddings.position_ids" not in pack.layout.names()
    model = assemble_model(CLIPTextModel, clip_text.config, pack)
    buf = model.embeddings.position_ids
    assert buf.device == torch.device("cpu") and not buf.is_meta
    assert torch.equal(buf, clip_text.embeddings.position_ids)


def test_in_place_write_to_a_loaded_cpu_parameter_changes_the_block(tmp_path, clip_text):
    pack = _pack(tmp_path, clip_text.state_dict())
    model = assemble_model(CLIPTextModel, clip_text.config, pack)
    weight = model.final_layer_norm.weight
    before = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(weight, before + 1.0)
    assert torch.equal(pack.tensors()["final_layer_norm.weight"], before + 1.0)


def test_parameters_require_grad_like_from_pretrained(tmp_path, clip_text):
    model = assemble_model(CLIPTextModel, clip_text.config, _pack(tmp_path, clip_text.state_dict()))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("names_in_file", ["both", "input_only", "output_only"])
def test_tied_embeddings_stay_one_parameter(tmp_path, names_in_file):
    original = tiny_gpt2()
    sd = dict(original.state_dict())
    if names_in_file == "input_only":
        del sd["lm_head.weight"]
    elif names_in_file == "output_only":
        del sd["transformer.wte.weight"]
    model = assemble_model(type(original), original.config, _pack(tmp_path, sd))
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.tensor([[1, 7, 3, 60]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_every_alias_of_a_tied_tensor_is_loaded_from_its_first_name():
    model = build_empty_model(T5EncoderModel, tiny_t5_encoder(make_t5_tokenizer()).config)
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    chosen = check_tensors(model, shapes, "<t5>")
    assert chosen["shared.weight"] == chosen["encoder.embed_tokens.weight"] == "shared.weight"


def test_zero_dim_parameter_stays_zero_dim(tmp_path):
    tok = make_clip_tokenizer()
    config = CLIPConfig(
        text_config=tiny_clip_text_config(tok).to_dict(),
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                       "num_hidden_layers": 1, "image_size": 8, "patch_size": 4, "projection_dim": 32},
        projection_dim=32,
    )
    torch.manual_seed(0)
    original = CLIPModel(config)
    with torch.no_grad():
        original.logit_scale.fill_(2.5)
    model = assemble_model(CLIPModel, config, _pack(tmp_path, original.state_dict()))
    assert model.logit_scale.shape == torch.Size([])
    assert model.logit_scale.item() == 2.5


def test_mismatch_error_names_missing_unexpected_and_misshaped_keys(tmp_path, clip_text):
    sd = dict(clip_text.state_dict())
    del sd["final_layer_norm.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["final_layer_norm.weight"] = torch.zeros(31)
    pack = _pack(tmp_path, sd, name="bad.flashpack")
    with pytest.raises(StateDictMismatchError) as err:
        assemble_model(CLIPTextModel, clip_text.config, pack, where=str(tmp_path / "bad.flashpack"))
    message = str(err.value)
    assert str(tmp_path / "bad.flashpack") in message
    assert "missing (1): final_layer_norm.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "final_layer_norm.weight: stored [31] float32, module wants [32] float32" in message


def test_integer_buffer_stored_as_float_is_a_mismatch():
    module = torch.nn.Module()
    module.register_buffer("ids", torch.arange(4))
    with pytest.raises(StateDictMismatchError, match=r"ids: stored \[4\] float32, module wants \[4\] int64"):
        load_tensors(module, {"ids": torch.zeros(4)}, "cpu", "here")


def test_mismatch_leaves_the_module_untouched():
    module = torch.nn.Linear(2, 2)
    weight = module.weight
    with pytest.raises(StateDictMismatchError):
        load_tensors(module, {"weight": torch.zeros(2, 2)}, "cpu", "here")  # bias missing
    assert module.weight is weight


def test_torch_dtype_casts_floats_and_keeps_one_block_per_dtype(tmp_path, clip_text):
    pack = _pack(tmp_path, clip_text.state_dict())
    model = assemble_model(CLIPTextModel, clip_text.config, pack, torch_dtype=torch.bfloat16)
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    assert model.embeddings.position_ids.dtype == torch.int64
    ref = clip_text.final_layer_norm.weight.bfloat16()
    assert torch.equal(model.final_layer_norm.weight, ref)


def test_fp16_keeps_the_modules_transformers_keeps_in_float32(tmp_path):
    original = tiny_t5_encoder(make_t5_tokenizer())
    original.save_pretrained(tmp_path / "t5")
    want = T5EncoderModel.from_pretrained(tmp_path / "t5", dtype=torch.float16)
    model = assemble_model(T5EncoderModel, original.config, _pack(tmp_path, original.state_dict()),
                           torch_dtype=torch.float16)
    got = {n: p.dtype for n, p in model.named_parameters()}
    assert got == {n: p.dtype for n, p in want.named_parameters()}
    assert got["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32
    assert got["shared.weight"] == torch.float16


def test_transformers_models_are_built_without_random_initialisation(clip_text, monkeypatch):
    calls = []
    original = CLIPTextModel._init_weights
    monkeypatch.setattr(CLIPTextModel, "_init_weights", lambda self, module: calls.append(module) or original(self, module))
    CLIPTextModel._from_config(clip_text.config)  # what from_config does: initialises every module
    assert calls
    calls.clear()
    build_empty_model(CLIPTextModel, clip_text.config)
    assert calls == []
