"""convert_pipeline: local diffusers pipeline directory -> converted (FlashPack) directory."""

from __future__ import annotations

import filecmp
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tiny_models import tiny_gpt2
from transformers import CLIPTextModel, GPT2LMHeadModel, T5EncoderModel

from conversion.convert import convert_pipeline, weight_files
from conversion.demo import make_clip_tokenizer, make_demo_pipeline, tiny_clip_text_config, tiny_vae
from conversion.errors import ConversionError
from conversion.manifest import MANIFEST_NAME, read_manifest, verify_converted
from model_loader import load_model, load_state_dict, read_layout

SD_WEIGHTS = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def _mini_pipeline(root: Path, **components: tuple[str, torch.nn.Module, dict]) -> Path:
    """A source directory holding only the given components: name=(library, model, save kwargs)."""
    index = {"_class_name": "DiffusionPipeline", "_diffusers_version": "0.42.1"}
    for name, (library, model, save_kwargs) in components.items():
        model.save_pretrained(root / name, **save_kwargs)
        index[name] = [library, type(model).__name__]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return tiny_vae()


def _pack_of(converted: Path, comp: str) -> dict[str, torch.Tensor]:
    return load_state_dict(converted / comp / "model.flashpack")


@pytest.mark.parametrize("pipeline", ["sd", "sdxl", "flux"])
def test_every_tensor_equals_the_source(request, pipeline):
    src = request.getfixturevalue(f"tiny_{pipeline}_dir")
    converted = request.getfixturevalue(f"converted_{pipeline}_dir")
    packs = sorted(p.parent.name for p in converted.glob("*/model.flashpack"))
    assert packs == sorted(p.parent.name for p in src.glob("*/*.safetensors"))
    for comp in packs:
        want = load_file(weight_files(src / comp, None)[0][0])
        got = _pack_of(converted, comp)
        assert sorted(got) == sorted(want), comp
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{comp}: {name}"


def test_converted_layout_swaps_weights_for_packs_and_adds_a_verified_manifest(tiny_sd_dir, converted_sd_dir):
    src_files = {p.relative_to(tiny_sd_dir).as_posix() for p in tiny_sd_dir.rglob("*") if p.is_file()}
    dst_files = {p.relative_to(converted_sd_dir).as_posix() for p in converted_sd_dir.rglob("*") if p.is_file()}
    packs = {f"{comp}/model.flashpack" for comp in SD_WEIGHTS}
    weights = {f"{comp}/{name}" for comp, name in SD_WEIGHTS.items()}
    assert dst_files == (src_files - weights) | packs | {MANIFEST_NAME}
    for rel in src_files - weights:
        assert filecmp.cmp(tiny_sd_dir / rel, converted_sd_dir / rel, shallow=False), rel
    verify_converted(converted_sd_dir, full=True)


def test_manifest_records_source_dtype_and_variant(tiny_sd_dir, converted_sd_dir):
    source = read_manifest(converted_sd_dir)["source"]
    assert source == {"kind": "local", "path": str(tiny_sd_dir), "dtype": None, "variant": None}


def test_refuses_a_non_empty_destination(tiny_sd_dir, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match=f"{dst}: not empty"):
        convert_pipeline(tiny_sd_dir, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_converts_into_an_existing_empty_directory(tmp_path):
    src = _mini_pipeline(tmp_path / "src", vae=("diffusers", _vae(), {}))
    dst = tmp_path / "dst"
    dst.mkdir()
    assert convert_pipeline(src, dst) == dst
    verify_converted(dst)


def test_missing_component_directory_fails_before_writing(tmp_path):
    src = _mini_pipeline(tmp_path / "src", vae=("diffusers", _vae(), {}))
    index = json.loads((src / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (src / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=f"{src / 'unet'}: component directory"):
        convert_pipeline(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_missing_model_index_is_a_conversion_error(tmp_path):
    with pytest.raises(ConversionError, match="model_index.json: missing"):
        convert_pipeline(tmp_path, tmp_path / "dst")


def test_model_index_nested_100000_deep_is_a_conversion_error_naming_the_file(tmp_path):
    (tmp_path / "src").mkdir()
    index = tmp_path / "src" / "model_index.json"
    index.write_text('{"_class_name": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConversionError, match=re.escape(f"{index}: not a readable model_index.json (nested more")):
        convert_pipeline(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_shard_index_nested_100000_deep_is_a_conversion_error_naming_the_file(tmp_path):
    comp = tmp_path / "vae"
    comp.mkdir()
    index = comp / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (comp / "diffusion_pytorch_model-00001-of-00001.safetensors").write_bytes(b"")
    with pytest.raises(ConversionError, match=re.escape(f"{index}: not a valid safetensors index (nested more")):
        weight_files(comp, None)


def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    comp = tmp_path / "vae"
    comp.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (comp / "diffusion_pytorch_model-00001-of-00001.safetensors").write_bytes(b"")
    index = comp / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "../outside.safetensors"}}')
    with pytest.raises(ConversionError, match=re.escape(f"{index}: names shard(s) that are not in {comp}: "
                                                        "../outside.safetensors")):
        weight_files(comp, None)


def test_float16_casts_floats_but_not_integer_buffers(tmp_path):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    vae.bn.num_batches_tracked.fill_(5001)  # not representable in float16
    src = _mini_pipeline(tmp_path / "src", vae=("diffusers", vae, {}))
    dst = convert_pipeline(src, tmp_path / "dst", dtype=torch.float16)
    pack = _pack_of(dst, "vae")
    assert pack["bn.num_batches_tracked"].dtype == torch.int64
    assert pack["bn.num_batches_tracked"].item() == 5001
    assert {t.dtype for n, t in pack.items() if n != "bn.num_batches_tracked"} == {torch.float16}
    assert torch.equal(pack["bn.running_var"], vae.bn.running_var.half())
    assert load_model(dst / "vae").bn.num_batches_tracked.item() == 5001
    assert read_manifest(dst)["source"]["dtype"] == "float16"


def test_float16_keeps_the_t5_modules_transformers_keeps_in_float32(tiny_flux_dir, tmp_path):
    dst = convert_pipeline(tiny_flux_dir, tmp_path / "dst", dtype=torch.float16)
    pack = _pack_of(dst, "text_encoder_2")
    assert pack["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
    assert pack["encoder.block.0.layer.1.DenseReluDense.wi.weight"].dtype == torch.float16
    want = T5EncoderModel.from_pretrained(tiny_flux_dir / "text_encoder_2", dtype=torch.float16)
    got = load_model(dst / "text_encoder_2")
    assert {n: p.dtype for n, p in got.named_parameters()} == {n: p.dtype for n, p in want.named_parameters()}


def test_requested_variant_files_are_converted(tmp_path):
    vae = _vae()
    src = _mini_pipeline(tmp_path / "src", vae=("diffusers", vae, {}))
    vae.to(torch.float16).save_pretrained(src / "vae", variant="fp16")
    fp16 = convert_pipeline(src, tmp_path / "fp16", variant="fp16")
    default = convert_pipeline(src, tmp_path / "default")
    want = load_file(src / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    got = _pack_of(fp16, "vae")
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], want[k]) for k in want)
    assert {t.dtype for t in _pack_of(default, "vae").values()} == {torch.float32}
    assert read_manifest(fp16)["source"]["variant"] == "fp16"


def test_component_with_only_variant_weights_asks_for_the_variant(tmp_path):
    src = _mini_pipeline(tmp_path / "src", vae=("diffusers", _vae(), {"variant": "fp16"}))
    with pytest.raises(ConversionError, match=r"no default \(non-variant\) weights; it has variants \['fp16'\]: set variant"):
        convert_pipeline(src, tmp_path / "dst")


def _legacy_attention_names(path: Path) -> None:
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = load_file(path)
    legacy = {}
    for name, tensor in state.items():
        for new, old in renames.items():
            name = name.replace(new, old)
        legacy[name] = tensor
    assert legacy.keys() != state.keys()
    save_file(legacy, path)


def test_legacy_attention_key_names_are_renamed_while_streaming(tmp_path, caplog):
    vae = _vae()
    src = _mini_pipeline(tmp_path / "src", vae=("diffusers", vae, {}))
    _legacy_attention_names(src / "vae" / "diffusion_pytorch_model.safetensors")
    with caplog.at_level(logging.INFO, logger="conversion.convert"):
        dst = convert_pipeline(src, tmp_path / "dst")
    assert "convert: vae (AutoencoderKL, streamed)" in caplog.text
    want = vae.state_dict()
    got = _pack_of(dst, "vae")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_sd1_text_encoder_layout_is_renamed_while_streaming(tmp_path, caplog):
    # SD 1.x repos store CLIPTextModel weights under "text_model." (transformers 5 strips it) and
    # include position_ids, a persistent buffer back then (now non-persistent: ignored on load)
    torch.manual_seed(0)
    model = CLIPTextModel(tiny_clip_text_config(make_clip_tokenizer()))
    src = _mini_pipeline(tmp_path / "src", text_encoder=("transformers", model, {}))
    path = src / "text_encoder" / "model.safetensors"
    legacy = {f"text_model.{k}": v for k, v in load_file(path).items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(legacy, path)
    with caplog.at_level(logging.INFO, logger="conversion.convert"):
        dst = convert_pipeline(src, tmp_path / "dst")
    assert "convert: text_encoder (CLIPTextModel, streamed)" in caplog.text
    want = model.state_dict()
    got = _pack_of(dst, "text_encoder")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_bin_weights_are_converted_by_loading_the_model(tmp_path, caplog):
    vae = _vae()
    src = _mini_pipeline(tmp_path / "src", vae=("diffusers", vae, {"safe_serialization": False}))
    assert (src / "vae" / "diffusion_pytorch_model.bin").is_file()
    with caplog.at_level(logging.INFO, logger="conversion.convert"):
        dst = convert_pipeline(src, tmp_path / "dst")
    assert "convert: vae (AutoencoderKL, loaded)" in caplog.text
    assert not (dst / "vae" / "diffusion_pytorch_model.bin").exists()
    want = vae.state_dict()
    got = _pack_of(dst, "vae")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_logs_one_line_per_component_and_a_total(tiny_sd_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="conversion.convert"):
        convert_pipeline(tiny_sd_dir, tmp_path / "dst")
    lines = [r.getMessage() for r in caplog.records if r.name == "conversion.convert"]
    assert [line.split(" ")[1] for line in lines[:3]] == ["text_encoder", "unet", "vae"]
    assert len(lines) == 4
    assert lines[3].startswith("convert: ") and " GB in " in lines[3] and "GB/s" in lines[3]


def test_tied_lm_head_converted_and_loaded_stays_tied(tmp_path):
    original = tiny_gpt2()
    src = _mini_pipeline(tmp_path / "src", lm=("transformers", original, {}))
    dst = convert_pipeline(src, tmp_path / "dst")
    assert "lm_head.weight" not in read_layout(dst / "lm" / "model.flashpack").names()
    model = load_model(dst / "lm")
    assert isinstance(model, GPT2LMHeadModel)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.tensor([[1, 7, 3, 60]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_demo_pipeline_is_deterministic_per_seed(tmp_path):
    a = make_demo_pipeline(tmp_path / "a", seed=0)
    b = make_demo_pipeline(tmp_path / "b", seed=0)
    c = make_demo_pipeline(tmp_path / "c", seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    unet = Path("unet") / "diffusion_pytorch_model.safetensors"
    assert not filecmp.cmp(a / unet, c / unet, shallow=False)
