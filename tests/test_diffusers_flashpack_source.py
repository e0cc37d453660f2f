"""A pipeline directory written by diffusers' ``save_pretrained(use_flashpack=True)`` as a source:
its packed components (``unet/model.flashpack``, ``vae/model.flashpack``) are adopted, the rest
(``text_encoder/model.safetensors``) converted, and a Hub listing selects the packs."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_sd

import conversion.manifest
from conversion.config import ConversionConfig
from conversion.convert import weight_files
from conversion.errors import ConversionError
from conversion.manifest import hash_file, read_manifest
from conversion.sources import parse_source
from conversion.store import Store
from conversion.writer import pack_state_dict
from model_loader import load_state_dict
from model_loader.diffusers_layout import select_files
from model_loader.errors import DiffusersLayoutError
from model_loader.format import MAGIC, TRAILER

COMPONENTS = ["text_encoder", "unet", "vae"]
SD_INDEX = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One tiny SD pipeline saved twice by diffusers: ``normal`` (safetensors) and ``packed``
    (``use_flashpack=True``)."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("saved")
    pipe = StableDiffusionPipeline.from_pretrained(make_tiny_sd(root / "base"), local_files_only=True)
    pipe.save_pretrained(root / "normal")
    pipe.save_pretrained(root / "packed", use_flashpack=True)
    return {"normal": root / "normal", "packed": root / "packed"}


@pytest.fixture
def packed(saved, tmp_path) -> Path:
    """A copy of the diffusers-packed pipeline this test may damage."""
    return Path(shutil.copytree(saved["packed"], tmp_path / "packed"))


def _ensure(root: Path, src: Path, dtype: str = "float32") -> Path:
    return Store(root, ConversionConfig()).ensure(parse_source(str(src)), dtype)


def _packs(entry: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_state_dict(p) for p in sorted(entry.glob("*/model.flashpack"))}


def _assert_same_tensors(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]) -> None:
    assert sorted(got) == sorted(want)
    for comp, tensors in want.items():
        assert sorted(got[comp]) == sorted(tensors), comp
        for name, tensor in tensors.items():
            assert got[comp][name].dtype == tensor.dtype, f"{comp}: {name}"
            assert torch.equal(got[comp][name], tensor), f"{comp}: {name}"


def _rewrite_footer(pack: Path, edit) -> None:
    """Replace a pack's footer JSON by ``edit(footer)`` (payload kept)."""
    data = pack.read_bytes()
    footer_len, _ = TRAILER.unpack(data[-TRAILER.size:])
    payload = data[: len(data) - TRAILER.size - footer_len]
    footer = json.loads(data[len(payload): len(data) - TRAILER.size])
    body = json.dumps(edit(footer), separators=(",", ":")).encode()
    pack.write_bytes(payload + body + TRAILER.pack(len(body), MAGIC))


def _refusal(tmp_path: Path, src: Path) -> str:
    with pytest.raises(ConversionError) as info:
        _ensure(tmp_path / "store", src)
    assert Store(tmp_path / "store", ConversionConfig()).warm(parse_source(str(src)), "float32") is None
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# what diffusers writes


def test_diffusers_packs_its_own_components_and_leaves_transformers_ones_in_safetensors(saved):
    files = sorted(p.relative_to(saved["packed"]).as_posix() for p in saved["packed"].rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith(("tokenizer/", "scheduler/"))] == [
        "model_index.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "unet/config.json", "unet/model.flashpack",
        "vae/config.json", "vae/model.flashpack",
    ]


# ---------------------------------------------------------------------------------------------
# converting it


def test_packed_source_gives_the_tensors_of_the_same_pipeline_saved_normally(saved, tmp_path):
    from_packs = _ensure(tmp_path / "store", saved["packed"])
    normal = _ensure(tmp_path / "store", saved["normal"])
    assert from_packs != normal
    got = _packs(from_packs)
    assert sorted(got) == COMPONENTS
    _assert_same_tensors(got, _packs(normal))


def test_log_says_which_components_were_adopted_and_which_converted(saved, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="conversion.convert")
    _ensure(tmp_path / "store", saved["packed"])
    lines = [r.getMessage() for r in caplog.records if r.name == "conversion.convert"]
    assert [m.groups() for line in lines if (m := re.match(r"convert: (\w+) \((\w+), ([^)]+)\) ", line))] == [
        ("text_encoder", "CLIPTextModel", "streamed"),
        ("unet", "UNet2DConditionModel", "pack copied"),
        ("vae", "AutoencoderKL", "pack copied"),
    ]
    assert "convert: adopted from packs: unet, vae; converted: text_encoder" in lines


def test_a_pack_in_the_dtype_asked_for_is_copied_byte_for_byte_and_hashed_as_copied(saved, tmp_path, monkeypatch):
    hashed: list[str] = []
    real_hash_file = conversion.manifest.hash_file
    monkeypatch.setattr(conversion.manifest, "hash_file", lambda path, *a, **k: hashed.append(Path(path).name)
                        or real_hash_file(path, *a, **k))
    entry = _ensure(tmp_path / "store", saved["packed"])
    assert not [name for name in hashed if name.endswith(".flashpack")]
    files = read_manifest(entry)["files"]
    for comp in ("unet", "vae"):
        src, dst = saved["packed"] / comp / "model.flashpack", entry / comp / "model.flashpack"
        assert dst.read_bytes() == src.read_bytes(), comp
        sha256, checksum = hash_file(src, segments=True)
        assert files[f"{comp}/model.flashpack"]["sha256"] == sha256
        assert files[f"{comp}/model.flashpack"]["checksum"] == checksum.to_json()


def test_float16_store_casts_the_adopted_packs(saved, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="conversion.convert")
    got = _packs(_ensure(tmp_path / "store", saved["packed"], "float16"))
    assert {t.dtype for comp in ("unet", "vae") for t in got[comp].values()} == {torch.float16}
    _assert_same_tensors(got, _packs(_ensure(tmp_path / "store", saved["normal"], "float16")))
    adopted = [r.getMessage() for r in caplog.records if "pack cast to float16" in r.getMessage()]
    assert [line.split(" ")[1] for line in adopted] == ["unet", "vae"]


def test_the_pack_wins_over_safetensors_beside_it_and_the_log_says_so(saved, packed, tmp_path, caplog):
    other = saved["normal"] / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: torch.zeros_like(v) for k, v in load_file(other).items()},
              packed / "unet" / "diffusion_pytorch_model.safetensors")
    caplog.set_level(logging.INFO, logger="conversion.convert")
    entry = _ensure(tmp_path / "store", packed)
    _assert_same_tensors({"unet": _packs(entry)["unet"]}, {"unet": load_state_dict(saved["packed"] / "unet" / "model.flashpack")})
    assert (f"convert: {packed / 'unet'} holds both model.flashpack and diffusion_pytorch_model.safetensors; "
            "the pack wins (adopted, not converted)") in caplog.messages


# ---------------------------------------------------------------------------------------------
# packs refused


def test_a_truncated_pack_is_refused_naming_the_file(packed, tmp_path):
    pack = packed / "unet" / "model.flashpack"
    data = pack.read_bytes()
    pack.write_bytes(data[: len(data) // 2])
    assert _refusal(tmp_path, packed) == (
        f"{pack}: not a FlashPack file (no FLASHPK magic at the end; truncated or another format). The pack is "
        "damaged (truncated or overwritten): save the component again (diffusers' save_pretrained(use_flashpack=True)"
        f"), or convert its original weights instead (remove model.flashpack and put its safetensors in {pack.parent})"
    )


def test_a_pack_with_a_corrupt_footer_is_refused_naming_the_file(packed, tmp_path):
    pack = packed / "vae" / "model.flashpack"
    data = bytearray(pack.read_bytes())
    footer_len, _ = TRAILER.unpack(data[-TRAILER.size:])
    data[len(data) - TRAILER.size - footer_len] = ord("x")  # the footer's opening brace
    pack.write_bytes(bytes(data))
    assert _refusal(tmp_path, packed).startswith(f"{pack}: invalid FlashPack footer: not UTF-8 JSON (")


def test_a_pack_of_an_unknown_format_version_is_refused_saying_what_to_do(packed, tmp_path):
    pack = packed / "unet" / "model.flashpack"
    _rewrite_footer(pack, lambda footer: {**footer, "format": "flashpack_v5"})
    assert _refusal(tmp_path, packed) == (
        f"{pack}: a pack with format 'flashpack_v5', written by a flashpack newer than the one this app reads: it "
        "reads the uncompressed flashpack_v3 and flashpack_v4 packs that flashpack 0.4.5 writes. Save the component "
        "again with flashpack 0.4.5 (diffusers' save_pretrained(use_flashpack=True)), or convert its original weights "
        f"instead (remove model.flashpack and put its safetensors in {pack.parent})"
    )


def test_a_compressed_pack_is_refused_saying_what_to_do(packed, tmp_path):
    pack = packed / "vae" / "model.flashpack"
    pack_state_dict({"a": torch.ones(4, dtype=torch.bfloat16), "b": torch.ones(2)}, pack)  # two dtypes: v4

    def compress(footer: dict) -> dict:
        footer["macroblocks"][0]["fpz"] = {"codec": "zstd"}
        return footer

    _rewrite_footer(pack, compress)
    assert _refusal(tmp_path, packed).startswith(
        f"{pack}: a pack with zstd-compressed blocks ('fpz'), written by a flashpack newer than the one this app reads"
    )


def test_a_pack_that_does_not_fit_its_model_class_is_refused_naming_the_tensors(packed, tmp_path):
    pack = packed / "unet" / "model.flashpack"
    tensors = dict(load_state_dict(pack))
    tensors["conv_in.kernel"] = tensors.pop("conv_in.weight")
    tensors["conv_out.bias"] = torch.zeros(5)
    pack_state_dict(tensors, pack)
    message = _refusal(tmp_path, packed)
    assert message.startswith(f"{pack}: tensors do not match UNet2DConditionModel; missing (1): conv_in.weight; "
                              "unexpected (1): conv_in.kernel; shape/dtype mismatch (1): conv_out.bias: stored [5] ")
    assert message.endswith(". The pack was not saved from this model class with this config.json: convert the "
                            "component's original weights instead (remove model.flashpack and put its safetensors "
                            f"in {pack.parent})")


# ---------------------------------------------------------------------------------------------
# choosing the files


def test_select_files_takes_the_pack_instead_of_the_safetensors_beside_it():
    listing = ["model_index.json", "unet/config.json", "unet/model.flashpack", "unet/diffusion_pytorch_model.safetensors"]
    assert select_files(listing, {"unet": ["diffusers", "UNet2DConditionModel"]}) == [
        "model_index.json", "unet/config.json", "unet/model.flashpack",
    ]


def test_select_files_of_a_diffusers_packed_repo(saved):
    listing = sorted(p.relative_to(saved["packed"]).as_posix() for p in saved["packed"].rglob("*") if p.is_file())
    weights = [f for f in select_files(listing, SD_INDEX) if f.endswith((".flashpack", ".safetensors"))]
    assert weights == ["text_encoder/model.safetensors", "unet/model.flashpack", "vae/model.flashpack"]


def test_a_requested_variant_wins_over_a_default_pack_and_a_component_without_it_takes_its_pack():
    listing = ["model_index.json", "unet/config.json", "unet/model.flashpack",
               "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json", "vae/model.flashpack",
               "vae/diffusion_pytorch_model.safetensors"]
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    assert select_files(listing, index, variant="fp16") == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/model.flashpack",
    ]


def test_a_variant_pack_is_taken_for_its_variant_only():
    listing = ["model_index.json", "unet/config.json", "unet/model.fp16.flashpack"]
    index = {"unet": ["diffusers", "UNet2DConditionModel"]}
    assert select_files(listing, index, variant="fp16") == listing
    with pytest.raises(DiffusersLayoutError, match=re.escape("has no default (non-variant) weights; it has variants "
                                                             "['fp16']")):
        select_files(listing, index)


def test_only_model_flashpack_is_a_pack():
    listing = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.flashpack",
               "unet/diffusion_pytorch_model.safetensors"]
    assert select_files(listing, {"unet": ["diffusers", "UNet2DConditionModel"]}) == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    ]


def test_a_local_component_with_a_pack_converts_from_the_pack(saved):
    assert weight_files(saved["packed"] / "unet", None) == ([saved["packed"] / "unet" / "model.flashpack"], None)
    assert weight_files(saved["packed"] / "text_encoder", None) == (
        [saved["packed"] / "text_encoder" / "model.safetensors"], None)


def test_a_pipeline_saved_with_a_variant_converts_from_its_variant_packs(saved, tmp_path):
    from diffusers import StableDiffusionPipeline

    from conversion.convert import convert_pipeline

    src = tmp_path / "fp16"
    StableDiffusionPipeline.from_pretrained(saved["normal"], local_files_only=True).save_pretrained(
        src, use_flashpack=True, variant="fp16")  # unet/model.fp16.flashpack, text_encoder/model.fp16.safetensors
    entry = convert_pipeline(src, tmp_path / "converted", variant="fp16", show_progress=False)
    assert (entry / "unet" / "model.flashpack").read_bytes() == (src / "unet" / "model.fp16.flashpack").read_bytes()
    _assert_same_tensors(_packs(entry), _packs(_ensure(tmp_path / "store", saved["normal"])))


def test_a_hub_repo_with_packs_and_safetensors_is_fetched_and_served_from_its_packs(saved, tmp_path, monkeypatch):
    from tests.hub_server import HubRepo, HubServer, use_hub

    normal = saved["normal"]
    extra = {f"{comp}/diffusion_pytorch_model.safetensors": (normal / comp / "diffusion_pytorch_model.safetensors")
             .read_bytes() for comp in ("unet", "vae")}
    with HubServer([HubRepo.from_dir("org/packed", saved["packed"], extra=extra)]) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        entry = Store(tmp_path / "store", ConversionConfig()).ensure(parse_source("org/packed"), "float32")
        snapshot = next((tmp_path / "store").rglob("snapshots/*"))
    fetched = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                     if p.name.endswith((".safetensors", ".flashpack")))
    assert fetched == ["text_encoder/model.safetensors", "unet/model.flashpack", "vae/model.flashpack"]
    for comp in ("unet", "vae"):
        assert (entry / comp / "model.flashpack").read_bytes() == (saved["packed"] / comp / "model.flashpack").read_bytes()
    _assert_same_tensors(_packs(entry), _packs(_ensure(tmp_path / "local", normal)))
