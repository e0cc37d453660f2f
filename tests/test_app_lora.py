"""A request's ``loras`` through the app in-process (demo profile): applied to that request only,
422s naming ``loras[i]``, POST /stream alike, and ``[[model.loras]]`` fused into the served entry."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage
from starlette.testclient import TestClient

import conversion.download.lora as lora_download
from conversion.manifest import read_manifest
from serving.settings import FusedLoraSetting
from tests import test_app
from tests.tiny_models import data_uri, make_tiny_lora, tiny_sdxl_pipeline

SMALL = {"prompt": "a cat on a horse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2,
         "output_format": "png"}


served = test_app.served  # the demo app after setup(), one per module


@pytest.fixture(scope="module")
def loras(served, tmp_path_factory):
    """data: URIs of LoRAs for the demo model (two), of one for another architecture, of a file
    that is no safetensors."""
    pipe, root = served.app.pipe, tmp_path_factory.mktemp("loras")
    notes = root / "notes.txt"
    notes.write_text("not a LoRA\n")
    return SimpleNamespace(
        demo=data_uri(make_tiny_lora(root / "demo", pipe.unet, pipe.text_encoder, seed=11)),
        other=data_uri(make_tiny_lora(root / "other", pipe.unet, seed=12)),
        sdxl=data_uri(make_tiny_lora(root / "sdxl", tiny_sdxl_pipeline().unet, seed=1)),
        notes=data_uri(notes),
    )


def post(served, **body):
    return served.client.post("/", json={**SMALL, **body})


def png(response) -> bytes:
    assert response.status_code == 200, response.text
    [image] = response.json()["images"]
    return base64.b64decode(image["url"].partition(",")[2])


def lora_layers(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())


def test_a_lora_changes_that_requests_image_and_the_next_request_gets_the_image_of_before(served, loras):
    before = png(post(served, seed=5))
    with_lora = png(post(served, seed=5, loras=[{"path": loras.demo, "scale": 1.0}]))
    after = png(post(served, seed=5))
    assert after == before and with_lora != before
    assert lora_layers(served.app.pipe) == 0


def test_two_loras_and_their_scales_each_change_the_image(served, loras):
    one = png(post(served, seed=6, loras=[{"path": loras.demo}]))
    both = png(post(served, seed=6, loras=[{"path": loras.demo}, {"path": loras.other, "scale": 0.5}]))
    weaker = png(post(served, seed=6, loras=[{"path": loras.demo, "scale": 0.5}]))
    assert len({one, both, weaker, png(post(served, seed=6))}) == 4


def test_a_lora_asked_for_again_comes_from_memory_without_a_download(served, loras, monkeypatch):
    first = png(post(served, seed=7, loras=[{"path": loras.demo}]))

    def refuse(*args, **kwargs):
        raise AssertionError("a download was started")

    monkeypatch.setattr(lora_download, "run_child", refuse)
    monkeypatch.setattr(lora_download, "fetch_lora", refuse)
    assert png(post(served, seed=7, loras=[{"path": loras.demo}])) == first


BAD_LORAS = [
    (["loras", 0, "path"], [{"path": "http://example.com/lora.safetensors"}], "http: URLs are not accepted"),
    (["loras", 0, "path"], [{"path": "just-a-name"}], "neither an https:// URL nor a Hugging Face repo"),
    (["loras", 0, "path"], [{"path": "org/repo/weights.bin"}], "must be a .safetensors file"),
    (["loras", 0, "path"], [{"scale": 0.5}], "Field required"),
    (["loras", 0, "scale"], [{"path": "org/lora", "scale": 1.5}], "less than or equal to 1"),
    (["loras", 0, "scale"], [{"path": "org/lora", "scale": -0.1}], "greater than or equal to 0"),
    (["loras", 0, "scale"], [{"path": "org/lora", "scale": "1"}], "valid number"),
    (["loras", 0, "weight"], [{"path": "org/lora", "weight": 1}], "Extra inputs"),
    (["loras"], [{"path": "org/lora"}] * 4, "at most 3 items"),
    (["loras"], {"path": "org/lora"}, "valid list"),
]


@pytest.mark.parametrize(("loc", "value", "message"), BAD_LORAS, ids=[f"{i}" for i in range(len(BAD_LORAS))])
def test_an_invalid_lora_is_422_naming_it(served, loc, value, message):
    response = post(served, loras=value)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"][1:len(loc) + 1] == loc and message in e["msg"] for e in errors), errors


@pytest.mark.parametrize(("name", "message"), [
    ("sdxl", "not a LoRA for this model's architecture: 32 of its 64 LoRA layers name modules StableDiffusionPipeline "
             "does not have"),
    ("notes", "not a safetensors file"),
])
def test_a_lora_that_is_not_one_for_this_model_is_a_422_naming_its_index_and_nothing_runs(served, loras, name,
                                                                                         message):
    before = png(post(served, seed=8))
    response = post(served, seed=8, loras=[{"path": loras.demo}, {"path": getattr(loras, name)}])
    assert response.status_code == 422 and response.headers["x-fal-billable-units"] == "0"
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "loras", 1, "path"] and message in error["msg"], error
    assert error["msg"].startswith("data:...(")  # the URI is not echoed back
    assert png(post(served, seed=8)) == before and lora_layers(served.app.pipe) == 0


def test_a_bad_lora_on_the_stream_is_a_plain_422_before_any_event(served, loras):
    response = served.client.post("/stream", json={**SMALL, "loras": [{"path": loras.sdxl}]})
    assert response.status_code == 422 and response.headers["content-type"] == "application/json"
    assert response.json()["detail"][0]["loc"] == ["body", "loras", 0, "path"]


def test_the_stream_applies_the_lora_like_post(served, loras):
    body = {**SMALL, "seed": 9, "loras": [{"path": loras.demo, "scale": 0.5}]}
    response = served.client.post("/stream", json=body)
    assert response.status_code == 200
    result = next(json.loads(block.split("data: ", 1)[1]) for block in response.text.split("\n\n")
                  if block.startswith("event: result"))
    assert base64.b64decode(result["images"][0]["url"].partition(",")[2]) == png(served.client.post("/", json=body))


def test_a_request_whose_generation_fails_with_a_lora_leaves_no_lora_behind(served, loras, monkeypatch):
    before = png(post(served, seed=10))
    pipe = served.app.pipe
    seen = []

    class FailingPipe:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, **kwargs):
            seen.append(lora_layers(pipe))
            raise RuntimeError("out of memory, say")

    monkeypatch.setattr(served.app, "pipe", FailingPipe())
    with pytest.raises(RuntimeError, match="out of memory, say"):
        post(served, seed=10, loras=[{"path": loras.demo}])
    monkeypatch.undo()
    assert seen == [64] and lora_layers(pipe) == 0
    assert png(post(served, seed=10)) == before


def levels(data: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_lora_named_in_the_settings_is_fused_into_the_served_store_entry(served, loras):
    module = served.module

    class FusedApp(module.TextToImageApp):
        pass

    model = module.TextToImageApp.settings.model.model_copy(
        update={"loras": [FusedLoraSetting(path=loras.demo, scale=0.5)]})
    FusedApp.settings = module.TextToImageApp.settings.model_copy(update={"model": model})
    with TestClient(FusedApp(_allow_init=True)._build_app()) as client:
        store = Path(client.get("/health").json()["store"])
        fused = png(client.post("/", json={**SMALL, "seed": 12}))
    per_request = png(post(served, seed=12, loras=[{"path": loras.demo, "scale": 0.5}]))
    assert store.parent == served.root / "flashpack" and store.name.startswith("demo--lora-")
    assert read_manifest(store)["source"]["fused_loras"][0]["scale"] == 0.5
    assert np.abs(levels(fused) - levels(per_request)).max() <= 1  # README, "LoRAs": the tolerance of fusing
    assert fused != png(post(served, seed=12))


def _image_to_image(served, **body):
    picture = PILImage.new("RGB", (64, 64), (200, 40, 40))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = served.client.post("/image-to-image", json={**SMALL, "image_url": image_url, "strength": 0.5,
                                                            "seed": 5, **body})
    assert response.status_code == 200, response.text
    return response.json()["images"][0]["url"]


def test_image_to_image_applies_a_lora_to_that_request_only(served, loras):
    before = _image_to_image(served)
    with_lora = _image_to_image(served, loras=[{"path": loras.demo, "scale": 1.0}])
    after = _image_to_image(served)
    assert with_lora != before
    assert after == before
    assert lora_layers(served.app.pipe) == 0


def test_inpaint_refuses_a_lora_for_another_architecture_naming_its_index(served, loras):
    response = served.client.post("/inpaint", json={**SMALL, "image_url": "data:,", "mask_url": "data:,",
                                                    "loras": [{"path": loras.sdxl}]})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"] if "loras" in e["loc"]] == [["body", "loras", 0, "path"]]
