"""ControlNets and IP-Adapters end to end over HTTP, in-process, on the demo app configured with
them: fal.toml's ``[[model.controlnets]]`` and ``[[model.ip_adapters]]`` name their weights,
setup() converts them into the store and loads them with the demo model, and requests name them
in ``controlnets`` and ``ip_adapter`` on POST /, /stream, /image-to-image and /inpainting. Control
and prompt images are data: URIs; nothing reaches the network.

The demo profile's own ControlNet (``demo-controlnet``, trained with the demo model) draws the
caption's shape where the control image is white: where it lands is measured from pixels. A second
ControlNet with random weights takes Canny edges; the IP-Adapter and its encoder have random weights.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from condition_models import make_tiny_controlnet, make_tiny_image_encoder, make_tiny_ip_adapter
from PIL import Image as PILImage
from starlette.testclient import TestClient
from test_app import _Env, pixels
from test_app_images import MASK, SOURCE, data_uri

from conversion.sources.demo import TRAINED_CONTROLNET, TRAINED_PIPELINE
from demo_training.controlnet import centroid
from demo_training.shapes import Scene, draw_silhouette, read_picture
from serving.controlnets import preprocess
from serving.schema import ConditionChoices, request_models
from serving.settings import load_settings

HERE = __import__("pathlib").Path(__file__).resolve().parent.parent
BODY = {"prompt": "a red circle on a blue background", "num_inference_steps": 2, "output_format": "png", "seed": 3}
SIDE = 64  # the demo profile's square_hd

DEMO = "demo-controlnet"
SQUARE = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
SQUARE[8:40, 4:28] = 255  # a white block in the upper left, black elsewhere
BLACK = data_uri(PILImage.new("RGB", (SIDE, SIDE)))
WHITE_BLOCK = data_uri(PILImage.fromarray(SQUARE))
PHOTO = data_uri(PILImage.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)))
RED = data_uri(PILImage.new("RGB", (40, 40), (220, 20, 20)))


def load_app_with(tmp_path, tables: str):
    """app.py imported from a copy of the project's app files whose fal.toml ends with ``tables``
    (the demo profile's [model] gains them), as a module of its own."""
    folder = tmp_path / "app"
    folder.mkdir()
    shutil.copy(HERE / "app.py", folder / "app.py")
    shutil.copy(HERE / "requirements.txt", folder / "requirements.txt")
    (folder / "fal.toml").write_text((HERE / "fal.toml").read_text() + "\n" + tables)
    spec = importlib.util.spec_from_file_location("app_with_conditions", folder / "app.py")
    module = importlib.util.module_from_spec(spec)
    with _Env(APP_PROFILE="demo"):
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """The demo app (with its demo-controlnet) plus a canny ControlNet and an IP-Adapter, after setup()."""
    import torch
    from diffusers import UNet2DConditionModel

    src = tmp_path_factory.mktemp("conditions")
    unet = UNet2DConditionModel.from_pretrained(TRAINED_PIPELINE / "unet", torch_dtype=torch.float32)
    canny = make_tiny_controlnet(src / "canny-controlnet", unet, seed=4)
    adapter = make_tiny_ip_adapter(src / "h94" / "models" / "ip-adapter_tiny.safetensors", unet)
    make_tiny_image_encoder(src / "h94" / "models" / "image_encoder")
    module = load_app_with(src, f"""
[[profiles.demo.model.controlnets]]
source = "{canny}"
preprocess = "canny"

[[profiles.demo.model.ip_adapters]]
source = "{adapter}"
image_encoder = "{src / 'h94'}"
image_encoder_subfolder = "models/image_encoder"
""")
    root = tmp_path_factory.mktemp("app-data")
    with _Env(APP_DATA_ROOT=str(root), HF_HUB_OFFLINE="1"):
        instance = module.TextToImageApp(_allow_init=True)
        with TestClient(instance._build_app()) as client:
            yield SimpleNamespace(app=instance, client=client, root=root, canny=str(canny), adapter=str(adapter),
                                  module=module)


def post(conditioned, path: str = "/", **body):
    return conditioned.client.post(path, json={**BODY, **body})


def image_of(conditioned, path: str = "/", **body) -> np.ndarray:
    response = post(conditioned, path, **body)
    assert response.status_code == 200, response.text
    return np.asarray(pixels(response.json()["images"][0]).convert("RGB")).astype(float)


def control(path: str, image_url: str, **extra) -> dict:
    return {"path": path, "image_url": image_url, **extra}


# --------------------------------------------------------------------------------------------------
# Setup: own store entries, loaded with the model


def test_setup_converts_each_controlnet_adapter_and_encoder_into_its_own_store_entry(conditioned):
    entries = conditioned.app.extras.entries()
    assert [entry.what for entry in entries] == ["controlnet", "controlnet", "ip-adapter", "image encoder"]
    assert entries[0].source.path == str(TRAINED_CONTROLNET)  # demo-controlnet: the committed folder
    assert all(entry.path.parent == conditioned.root / "flashpack" for entry in entries)
    assert sorted(p.name for p in (entries[0].path / "controlnet").iterdir()) == ["config.json", "model.flashpack"]
    assert (entries[2].path / "module" / "model.flashpack").is_file()
    health = conditioned.client.get("/health").json()
    assert health["status"] == "ok"


def test_the_request_schema_lists_the_configured_controlnets_and_ip_adapters_by_path(conditioned):
    schema = conditioned.client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["ControlNetInput"]["properties"]["path"]["enum"] == [DEMO, conditioned.canny]
    assert schema["IPAdapterInput"]["properties"]["path"]["enum"] == [conditioned.adapter]
    for name in ("TextToImageInput", "ImageToImageInput", "InpaintInput"):
        fields = schema[name]["properties"]
        assert fields["controlnets"]["maxItems"] == 2 and fields["ip_adapter"]["maxItems"] == 1


def test_a_deployment_without_controlnets_or_ip_adapters_has_no_such_fields():
    settings = load_settings(HERE / "fal.toml", profile="")  # the default profile configures none
    assert settings.model.controlnets == [] and settings.model.ip_adapters == []
    models = request_models(settings.serving, settings.safety_checker.enabled, settings.lora,
                            ConditionChoices.of(settings.model))
    for model in (models.TextToImageInput, models.ImageToImageInput, models.InpaintInput):
        assert "controlnets" not in model.model_fields and "ip_adapter" not in model.model_fields


# --------------------------------------------------------------------------------------------------
# ControlNets


@pytest.mark.parametrize(("x", "y"), [(0.3, 0.3), (0.7, 0.65), (0.5, 0.3)])
def test_the_demo_controlnet_draws_the_shape_where_the_control_image_is_white(conditioned, x, y):
    scene = Scene("circle", "red", "blue", "center", 0.16)
    silhouette = data_uri(draw_silhouette(scene, x, y))
    body = {"prompt": "a red circle on a blue background", "num_inference_steps": 20}
    placed = pixels(post(conditioned, **body, controlnets=[control(DEMO, silhouette)]).json()["images"][0])
    cx, cy = centroid(placed)
    assert np.hypot(cx - x, cy - y) < 0.08, (cx, cy)
    assert read_picture(placed).colour == "red" and read_picture(placed).background == "blue"


def test_conditioning_scale_zero_gives_the_picture_without_controlnets(conditioned):
    plain = image_of(conditioned)
    zero = image_of(conditioned, controlnets=[control(conditioned.canny, PHOTO, conditioning_scale=0.0)])
    full = image_of(conditioned, controlnets=[control(conditioned.canny, PHOTO)])
    np.testing.assert_array_equal(zero, plain)
    assert np.abs(full - plain).mean() > 1


def test_start_and_end_percentage_bound_the_steps_a_controlnet_applies_to(conditioned):
    body = {"num_inference_steps": 4}
    plain = image_of(conditioned, **body)
    whole = image_of(conditioned, **body, controlnets=[control(conditioned.canny, PHOTO)])
    late = image_of(conditioned, **body, controlnets=[control(conditioned.canny, PHOTO, start_percentage=0.5)])
    assert np.abs(late - plain).mean() > 0 and np.abs(late - whole).mean() > 0


def test_two_controlnets_in_one_request_both_apply(conditioned):
    one = image_of(conditioned, controlnets=[control(conditioned.canny, PHOTO)])
    both = image_of(conditioned, controlnets=[control(conditioned.canny, PHOTO),
                                              control(DEMO, WHITE_BLOCK)])
    assert np.abs(both - one).mean() > 1


def test_canny_preprocessing_gives_white_edges_on_black_where_the_image_changes():
    edges = np.asarray(preprocess(PILImage.fromarray(SQUARE), "canny"))
    assert edges.shape == (SIDE, SIDE, 3) and set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges[:, :, 0])
    on_border = (np.minimum(np.abs(ys - 8), np.abs(ys - 39)) <= 1) | (np.minimum(np.abs(xs - 4), np.abs(xs - 27)) <= 1)
    assert len(ys) > 0 and on_border.all()  # every edge pixel lies on the block's outline
    assert edges[10:38, 3:5, 0].max(axis=1).all()  # and its left side is traced row by row
    assert preprocess(PILImage.fromarray(SQUARE), "none").tobytes() == SQUARE.tobytes()


@pytest.mark.parametrize("path", ["/image-to-image", "/inpainting"])
def test_image_endpoints_take_controlnets_with_their_input_images(conditioned, path):
    body = {"image_url": SOURCE, "strength": 1.0, "num_inference_steps": 2}
    if path == "/inpainting":
        body["mask_url"] = data_uri(PILImage.fromarray(MASK))
    dark = image_of(conditioned, path, **body, controlnets=[control(DEMO, BLACK)])
    block = image_of(conditioned, path, **body, controlnets=[control(DEMO, WHITE_BLOCK)])
    assert dark.shape == (48, 64, 3)  # the input image's size; the control image is resized to it
    assert np.abs(block - dark).mean() > 0


def test_stream_runs_controlnets_and_answers_with_the_images_of_post(conditioned):
    body = {**BODY, "controlnets": [control(DEMO, WHITE_BLOCK)]}
    with conditioned.client.stream("POST", "/stream", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    streamed = np.asarray(pixels(events[-1]["images"][0]).convert("RGB")).astype(float)
    np.testing.assert_array_equal(streamed, image_of(conditioned, controlnets=body["controlnets"]))


def test_a_controlnet_request_is_billed_as_any_request_and_reports_its_read_time(conditioned):
    response = post(conditioned, controlnets=[control(DEMO, WHITE_BLOCK)], num_images=2)
    assert response.status_code == 200 and response.headers["x-fal-billable-units"] == "2"
    assert {"read", "queue", "inference"} <= set(response.json()["timings"])


def test_fals_cancel_call_stops_a_controlnet_request_which_answers_499(conditioned, monkeypatch):
    net = conditioned.app._conditions.controlnets.nets[DEMO].model
    forward = net.forward

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(net, "forward", slow)
    answers = []
    headers = {"x-fal-request-id": "cancel-controlnet"}
    thread = threading.Thread(target=lambda: answers.append(conditioned.client.post(
        "/", json={**BODY, "num_inference_steps": 20, "controlnets": [control(DEMO, BLACK)]},
        headers=headers)))
    thread.start()
    deadline = time.monotonic() + 30
    while (cancel := conditioned.client.post("/cancel", headers=headers)).status_code == 404:
        assert time.monotonic() < deadline, "the request never became cancellable"
        time.sleep(0.05)
    thread.join(timeout=60)
    [answer] = answers
    assert cancel.json() == {"request_id": "cancel-controlnet", "cancelled": True}
    assert answer.status_code == 499 and answer.json()["detail"].endswith("of 20 steps (cancelled through POST /cancel)")
    assert not conditioned.app._lock.locked()


# --------------------------------------------------------------------------------------------------
# IP-Adapters


def test_an_image_prompt_steers_the_picture_and_scale_zero_leaves_it_as_without(conditioned):
    plain = image_of(conditioned)
    red = image_of(conditioned, ip_adapter=[{"path": conditioned.adapter, "ip_adapter_image_url": RED}])
    photo = image_of(conditioned, ip_adapter=[{"path": conditioned.adapter, "ip_adapter_image_url": PHOTO}])
    zero = image_of(conditioned, ip_adapter=[{"path": conditioned.adapter, "ip_adapter_image_url": RED, "scale": 0.0}])
    assert np.abs(red - plain).mean() > 1 and np.abs(red - photo).mean() > 1
    np.testing.assert_array_equal(zero, plain)
    np.testing.assert_array_equal(image_of(conditioned), plain)  # the UNet is itself again after each


def test_an_image_prompt_and_a_controlnet_apply_together_on_every_endpoint(conditioned):
    prompt = [{"path": conditioned.adapter, "ip_adapter_image_url": RED}]
    controls = [control(DEMO, WHITE_BLOCK)]
    with_both = image_of(conditioned, controlnets=controls, ip_adapter=prompt)
    assert np.abs(with_both - image_of(conditioned, controlnets=controls)).mean() > 1
    edited = image_of(conditioned, "/image-to-image", image_url=SOURCE, strength=1.0, controlnets=controls,
                      ip_adapter=prompt)
    assert edited.shape == (48, 64, 3)


# --------------------------------------------------------------------------------------------------
# Bad input: a 422 naming the field


@pytest.mark.parametrize(("body", "field", "text"), [
    ({"controlnets": [{"path": "org/unknown", "image_url": BLACK}]}, ["body", "controlnets", 0, "path"], "Input should be"),
    ({"controlnets": [{"image_url": BLACK}]}, ["body", "controlnets", 0, "path"], "Field required"),
    ({"controlnets": [{"path": "LOCAL", "image_url": "http://example.com/a.png"}]},
     ["body", "controlnets", 0, "image_url"], "https"),
    ({"controlnets": [{"path": "LOCAL", "image_url": BLACK, "conditioning_scale": 2.5}]},
     ["body", "controlnets", 0, "conditioning_scale"], "less than or equal to 2"),
    ({"controlnets": [{"path": "LOCAL", "image_url": BLACK, "start_percentage": 0.6, "end_percentage": 0.4}]},
     ["body", "controlnets", 0], "start_percentage (0.6) must be less than end_percentage (0.4)"),
    ({"controlnets": [{"path": "LOCAL", "image_url": BLACK, "mask_url": BLACK}]},
     ["body", "controlnets", 0, "mask_url"], "Extra inputs are not permitted"),
    ({"controlnets": [{"path": "LOCAL", "image_url": BLACK}] * 3}, ["body", "controlnets"], "at most 2 items"),
    ({"ip_adapter": [{"path": "ADAPTER", "ip_adapter_image_url": RED}] * 2}, ["body", "ip_adapter"], "at most 1 item"),
    ({"ip_adapter": [{"path": "ADAPTER", "image_url": RED}]}, ["body", "ip_adapter", 0, "ip_adapter_image_url"],
     "Field required"),
    ({"ip_adapter": [{"path": "ADAPTER", "ip_adapter_image_url": RED, "scale": -1}]},
     ["body", "ip_adapter", 0, "scale"], "greater than or equal to 0"),
])
def test_a_malformed_controlnet_or_ip_adapter_entry_is_refused_naming_it(conditioned, body, field, text):
    body = json.loads(json.dumps(body).replace("LOCAL", DEMO).replace("ADAPTER", conditioned.adapter))
    response = post(conditioned, **body)
    assert response.status_code == 422
    [error] = [e for e in response.json()["detail"] if e["loc"] == field]
    assert text in error["msg"]


@pytest.mark.parametrize("path", ["/", "/stream", "/image-to-image"])
def test_a_control_image_that_is_no_image_is_refused_naming_it_before_anything_runs(conditioned, path):
    body = {"controlnets": [control(DEMO, "data:image/png;base64,bm90IGFuIGltYWdl")]}
    if path == "/image-to-image":
        body.update(image_url=SOURCE, strength=1.0)
    response = post(conditioned, path, **body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "controlnets[0].image_url"] and "not an image" in error["msg"]


def test_an_image_prompt_that_is_no_image_is_refused_naming_it(conditioned):
    response = post(conditioned, ip_adapter=[{"path": conditioned.adapter,
                                              "ip_adapter_image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}])
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "ip_adapter[0].ip_adapter_image_url"]

