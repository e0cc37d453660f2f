"""module_app.py: a plain torch module (the demo VAE's decoder, neither a diffusers nor a
transformers model) goes source -> store -> our loader -> HTTP, and a damaged pack is rebuilt on the
same start, as the pipeline's is."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from starlette.testclient import TestClient

from conversion.manifest import read_manifest
from conversion.sources.demo import TRAINED_PIPELINE

LATENTS = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(3))


@pytest.fixture()
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("APP_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "data"


@pytest.fixture(scope="module")
def module_app():
    import module_app

    return module_app


def start(module_app):
    return TestClient(module_app.LatentDecoderApp(_allow_init=True)._build_app())


def decoded(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    header, _, data = response.json()["image"]["url"].partition(",")
    assert header == "data:image/png;base64"
    return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(data))))


def diffusers_decoding(latents: torch.Tensor) -> np.ndarray:
    """What the demo pipeline's own AutoencoderKL makes of the same latents (the reference)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(TRAINED_PIPELINE / "vae", local_files_only=True).eval()
    with torch.inference_mode():
        pixels = vae.decode(latents[None] / vae.config.scaling_factor).sample[0]
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_the_module_app_decodes_latents_as_the_demo_vae_does(module_app, data_root):
    with start(module_app) as client:
        image = decoded(client.post("/", json={"latents": LATENTS.tolist()}))
        health = client.get("/health").json()
    assert image.shape == (24, 20, 3)
    assert np.abs(image.astype(int) - diffusers_decoding(LATENTS).astype(int)).max() <= 1
    assert read_manifest(health["store"])["source"]["kind"] == "module"
    assert sorted(os.listdir(health["store"])) == ["flashpack_manifest.json", "module"]


def test_the_module_is_a_plain_torch_module_whose_weights_are_views_of_one_pack_block(module_app, data_root):
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    app = module_app.LatentDecoderApp(_allow_init=True)
    with TestClient(app._build_app()):
        model = app.module
    assert isinstance(model, torch.nn.Module) and not isinstance(model, ModelMixin | PreTrainedModel)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1  # float32 weights: one flat block, every parameter a view of it


def test_a_second_start_finds_the_entry_and_converts_nothing(module_app, data_root, caplog):
    with start(module_app) as client:
        store = client.get("/health").json()["store"]
    caplog.clear()
    with caplog.at_level("INFO"), start(module_app) as client:
        assert client.get("/health").json()["store"] == store
    assert not [r for r in caplog.records if r.name == "conversion.convert"]
    assert any(r.name == "conversion.entry" and r.getMessage() == f"lookup: module {store}; 1 pack(s) reading in "
               "the background" for r in caplog.records)


def test_a_corrupt_module_pack_is_caught_while_loading_and_rebuilt_on_the_same_start(module_app, data_root, caplog):
    with start(module_app) as client:
        store = client.get("/health").json()["store"]
        clean = decoded(client.post("/", json={"latents": LATENTS.tolist()}))
    pack = os.path.join(store, "module", "model.flashpack")
    with open(pack, "r+b") as f:  # a payload byte: the size and footer stay valid
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    caplog.clear()
    with caplog.at_level("INFO"), start(module_app) as client:
        assert client.get("/health").json()["store"] == store
        image = decoded(client.post("/", json={"latents": LATENTS.tolist()}))
    damaged = [r.getMessage() for r in caplog.records if r.name == "conversion.entry" and "is damaged" in r.getMessage()]
    assert len(damaged) == 1 and "module/model.flashpack: bytes 0-" in damaged[0] and "checksum" in damaged[0]
    assert any(r.name == "conversion.convert" for r in caplog.records)  # rebuilt from the source
    assert np.array_equal(image, clean)


def test_latents_with_the_wrong_channel_count_are_a_422_naming_the_field(module_app, data_root):
    with start(module_app) as client:
        response = client.post("/", json={"latents": LATENTS[:3].tolist()})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "latents"]
    assert response.json()["detail"][0]["msg"] == "latents must have 4 channels, got 3"


def test_ragged_latents_are_a_422(module_app, data_root):
    with start(module_app) as client:
        response = client.post("/", json={"latents": [[[0.0, 1.0], [0.0]]] * 4})
    assert response.status_code == 422
    assert "every row as long" in response.text


def test_non_finite_latents_are_a_422(module_app, data_root):
    with start(module_app) as client:
        response = client.post("/", content=b'{"latents": [[[NaN]], [[0]], [[0]], [[0]]]}',
                               headers={"content-type": "application/json"})
    assert response.status_code == 422
