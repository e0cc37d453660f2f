"""[[model.loras]]: LoRAs fused into the pipeline before it is packed, as a store entry of their own
that a warm start finds offline, generating what the same LoRA applied per request generates."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import conversion.download.lora as lora_download
from conversion.config import ConversionConfig
from conversion.download import DownloadPolicy
from conversion.lora import read_lora
from conversion.manifest import read_manifest
from conversion.sources import FusedSource, RandomDemoSource, parse_lora_path, with_fused_loras
from conversion.store import Store, ensure_converted
from model_loader import load_pipeline
from serving.lora_adapters import adapters
from tests.tiny_models import data_uri, make_tiny_lora

# Fused weights (W + s * B A, computed once in float32) and LoRA layers applied per request (W x +
# s * B (A x)) round differently: measured on the demo model at 64x64, 4 steps, the decoded images
# differ by at most 1.6e-6 (pixels in [0, 1]); the tests allow 1e-4.
FUSED_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def lora_uri(tmp_path_factory, converted_sd_dir) -> str:
    pipe = load_pipeline(converted_sd_dir, device="cpu", torch_dtype=torch.float32)
    return data_uri(make_tiny_lora(tmp_path_factory.mktemp("lora") / "demo", pipe.unet, pipe.text_encoder, seed=7))


def fused(uri: str, scale: float) -> FusedSource:
    return FusedSource(RandomDemoSource(), ((parse_lora_path(uri), scale),))


@pytest.fixture(scope="module")
def entries(tmp_path_factory, lora_uri):
    """The plain demo entry and the demo with the LoRA fused at 0.75, in one store."""
    root = tmp_path_factory.mktemp("store")
    plain = ensure_converted(RandomDemoSource(), root=root, dtype="float32")
    with_lora = ensure_converted(fused(lora_uri, 0.75), root=root, dtype="float32")
    return root, plain, with_lora


def image(pipe, seed: int = 5) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe("a cat on a horse", num_inference_steps=4, width=64, height=64, generator=generator,
                output_type="np").images[0]


def test_a_fused_entry_is_an_entry_of_its_own_recording_its_loras(entries, lora_uri):
    root, plain, with_lora = entries
    assert with_lora != plain and with_lora.parent == plain.parent
    assert with_lora.name.startswith("demo-random-seed0--lora-")
    source = read_manifest(with_lora)["source"]
    assert source["fused_loras"] == [{"path": parse_lora_path(lora_uri).display, "scale": 0.75}]
    assert "fused_loras" not in read_manifest(plain)["source"]
    assert (with_lora / "unet" / "model.flashpack").read_bytes() != (plain / "unet" / "model.flashpack").read_bytes()
    assert (with_lora / "vae" / "model.flashpack").read_bytes() == (plain / "vae" / "model.flashpack").read_bytes()


def test_another_scale_or_another_lora_is_another_store_key(tmp_path, lora_uri):
    store = Store(tmp_path, ConversionConfig.from_env())
    other = data_uri(Path(__file__))  # any other URL: keys are computed offline, nothing is fetched
    digests = {store.entry(source, "id", "float32").digest
               for source in (RandomDemoSource(), fused(lora_uri, 0.75), fused(lora_uri, 0.5), fused(other, 0.75))}
    assert len(digests) == 4


def test_a_warm_start_finds_the_fused_entry_offline_without_the_lora_file(entries, lora_uri, monkeypatch):
    root, _, with_lora = entries
    shutil.rmtree(root / ".fal")  # the fetched LoRA: a warm start does not need it

    def refuse(*args, **kwargs):
        raise AssertionError("a download was started")

    monkeypatch.setattr(lora_download, "run_child", refuse)
    assert Store(root, ConversionConfig.from_env()).warm(fused(lora_uri, 0.75), "float32") == with_lora
    assert ensure_converted(fused(lora_uri, 0.75), root=root, dtype="float32") == with_lora


def test_the_fused_entry_generates_what_the_same_lora_applied_per_request_generates(entries, lora_uri, tmp_path):
    root, plain, with_lora = entries
    config = ConversionConfig.from_env()
    fetched = lora_download.fetch_lora(parse_lora_path(lora_uri).location(), tmp_path,
                                       policy=DownloadPolicy.from_config(config), config=config)
    lora = read_lora(fetched.path, "lora", fetched.identity)
    base = load_pipeline(plain, device="cpu", torch_dtype=torch.float32)
    before = image(base)
    with adapters(base, [(lora, 0.75)]):
        per_request = image(base)
    fused_image = image(load_pipeline(with_lora, device="cpu", torch_dtype=torch.float32))
    assert np.abs(fused_image - per_request).max() <= FUSED_TOLERANCE
    assert np.abs(fused_image - before).max() > 0.01  # the LoRA is in the packs


def test_no_fused_loras_leave_the_source_as_it_is():
    assert with_fused_loras(RandomDemoSource(), []) == RandomDemoSource()
