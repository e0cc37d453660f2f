"""POST /image-to-image and POST /inpaint in-process, end to end on the demo app (test_app.py's
``served``), and on a twin whose VAE roughly reconstructs its input (the demo's random VAE does
not, so only the twin can show that image-to-image keeps the input's layout). Input images are
data: URIs; nothing reaches the network."""

from __future__ import annotations

import base64
import io
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage
from starlette.testclient import TestClient
from test_app import BATCH_TOLERANCE_LEVELS, RecordingPipe, image_bytes, levels, pixels, served
from tiny_models import make_tiny_sd_passthrough

from conversion.download.caller_url import FetchLimits
from serving.img2img import ImagePipelines
from serving.settings import ModelSettings

__all__ = ["served"]  # test_app.py's demo app: a module-scoped fixture, one instance for this module

STEPS = {"num_inference_steps": 4, "output_format": "png"}


def data_uri(picture: PILImage.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def gradient(width: int = 64, height: int = 64) -> np.ndarray:
    """A smooth, structured RGB image: horizontal and vertical ramps and a coarse checkerboard."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), ((xx // 16 + yy // 16) % 2) * 255],
                    -1).astype(np.uint8)


def unrelated(width: int = 64, height: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([255 - yy * 255 // (height - 1), ((xx // 8) % 2) * 255, 255 - xx * 255 // (width - 1)],
                    -1).astype(np.uint8)


def noise(width: int = 64, height: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


SOURCE = data_uri(PILImage.fromarray(noise(64, 48)))
MASK = np.zeros((48, 64), dtype=np.uint8)
MASK[8:40, 16:48] = 255  # white: repaint a 32x32 square, keep the rest


def post(client, path: str, **body):
    return client.post(path, json={"prompt": "a cat on a horse", "image_url": SOURCE, **STEPS, **body})


def edit(client, path: str = "/image-to-image", **body) -> dict:
    response = post(client, path, **body)
    assert response.status_code == 200, response.text
    return response.json()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


# --------------------------------------------------------------------------------------------------
# The pipelines: built once with from_pipe, sharing the loaded modules


def test_image_pipelines_are_the_sd_variants_built_from_the_loaded_pipeline(served):
    pipes = served.app._image_pipes
    assert type(served.app.pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipes.image_to_image).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(pipes.inpaint).__name__ == "StableDiffusionInpaintPipeline"


def test_from_pipe_shares_every_module_and_every_weight_nothing_is_copied(served):
    pipe = served.app.pipe
    for variant in (served.app._image_pipes.image_to_image, served.app._image_pipes.inpaint):
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert getattr(variant, name) is getattr(pipe, name), name
        for name in ("unet", "vae", "text_encoder"):
            mine = [(n, p, p.data_ptr()) for n, p in getattr(pipe, name).named_parameters()]
            theirs = [(n, p, p.data_ptr()) for n, p in getattr(variant, name).named_parameters()]
            assert len(mine) == len(theirs) > 0
            assert all(a[0] == b[0] and a[1] is b[1] and a[2] == b[2] for a, b in zip(mine, theirs, strict=True))


def test_from_pipe_builds_the_sdxl_variants_sharing_the_modules_too():
    from tiny_models import tiny_sdxl_pipeline

    from serving.img2img import build_image_pipelines

    pipe = tiny_sdxl_pipeline()
    pipes = build_image_pipelines(pipe)
    assert type(pipes.image_to_image).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert type(pipes.inpaint).__name__ == "StableDiffusionXLInpaintPipeline"
    for variant in (pipes.image_to_image, pipes.inpaint):
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert getattr(variant, name) is getattr(pipe, name)
            assert ([p.data_ptr() for p in getattr(variant, name).parameters()]
                    == [p.data_ptr() for p in getattr(pipe, name).parameters()])


def test_a_model_without_an_image_to_image_pipeline_answers_501(served, monkeypatch):
    monkeypatch.setattr(served.app, "_image_pipes", ImagePipelines(image_to_image=None, inpaint=None))
    for path, extra in (("/image-to-image", {}), ("/inpaint", {"mask_url": data_uri(PILImage.fromarray(MASK))})):
        response = post(served.client, path, **extra)
        assert response.status_code == 501
        assert response.json() == {"detail": f"{path[1:]} is not available for this model (StableDiffusionPipeline)"}


# --------------------------------------------------------------------------------------------------
# Image-to-image


@pytest.fixture(scope="module")
def passthrough(served, tmp_path_factory):
    """The demo app serving the demo pipeline with a VAE that roughly reconstructs its input
    (tests/tiny_models.passthrough_vae), from a local directory, on the demo app's data root."""
    model_dir = make_tiny_sd_passthrough(tmp_path_factory.mktemp("passthrough") / "demo-passthrough")

    class PassthroughApp(served.module.TextToImageApp):
        pass

    PassthroughApp.settings = served.module.TextToImageApp.settings.model_copy(
        update={"model": ModelSettings(source=str(model_dir), dtype="float32", device="cpu")})
    with TestClient(PassthroughApp(_allow_init=True)._build_app()) as client:
        yield SimpleNamespace(client=client)


def test_low_strength_keeps_the_inputs_layout_and_full_strength_does_not(passthrough):
    # With the pass-through VAE alone (no denoising) the output correlates ~0.72 with this input.
    source, other = gradient(), unrelated()
    results = {}
    for strength in (0.25, 1.0):
        body = edit(passthrough.client, image_url=data_uri(PILImage.fromarray(source)), strength=strength, seed=1)
        results[strength] = levels(body["images"][0])
    low, full = results[0.25], results[1.0]
    assert correlation(low, source) > 0.6  # measured 0.72 (4 steps: one denoising step at 0.25)
    assert abs(correlation(low, other)) < 0.1  # measured 0.00
    assert correlation(full, source) < 0.35  # measured 0.21: the input is mostly noised away


def test_a_text_to_image_of_the_same_seed_ignores_the_layout(passthrough):
    # The baseline the feature must beat: POST / does not see the input at all.
    body = passthrough.client.post("/", json={"prompt": "a cat on a horse", "image_size": {"width": 64, "height": 64},
                                              **STEPS, "seed": 1}).json()
    assert abs(correlation(levels(body["images"][0]), gradient())) < 0.1


def test_image_to_image_follows_fal_conventions_and_takes_the_inputs_size(served):
    body = edit(served.client, seed=11, strength=0.5)
    assert set(body) == {"images", "seed", "prompt", "has_nsfw_concepts", "timings"}
    assert body["seed"] == 11 and body["has_nsfw_concepts"] == [False]
    [image] = body["images"]
    assert (image["width"], image["height"], image["content_type"]) == (64, 48, "image/png")
    assert pixels(image).size == (64, 48)
    assert set(body["timings"]) == {"read", "queue", "inference", "safety", "encode"}


def test_an_absent_image_size_rounds_the_inputs_sides_down_to_multiples_of_8(served):
    body = edit(served.client, image_url=data_uri(PILImage.fromarray(noise(61, 47))), seed=1)
    assert pixels(body["images"][0]).size == (56, 40)


def test_a_given_image_size_resizes_the_input(served):
    body = edit(served.client, image_size={"width": 96, "height": 32}, seed=1)
    assert pixels(body["images"][0]).size == (96, 32)
    assert pixels(edit(served.client, image_size="square", seed=1)["images"][0]).size == (64, 64)


def test_same_seed_same_image_other_seed_other_image(served):
    first, again, other = (edit(served.client, seed=seed, strength=0.75) for seed in (42, 42, 43))
    assert image_bytes(first["images"][0]) == image_bytes(again["images"][0])
    assert image_bytes(first["images"][0]) != image_bytes(other["images"][0])


def test_strength_changes_the_image(served):
    weak, strong = edit(served.client, seed=5, strength=0.5), edit(served.client, seed=5, strength=1.0)
    assert image_bytes(weak["images"][0]) != image_bytes(strong["images"][0])


def test_num_images_is_one_call_with_a_generator_per_image_each_the_single_image_of_its_seed(served, monkeypatch):
    singles = [edit(served.client, seed=300 + i, strength=0.75)["images"][0] for i in range(3)]
    recording = RecordingPipe(served.app._image_pipes.image_to_image)
    monkeypatch.setattr(served.app, "_image_pipes", ImagePipelines(recording, served.app._image_pipes.inpaint))
    batch = edit(served.client, seed=300, strength=0.75, num_images=3)
    [call] = recording.calls
    assert call["num_images_per_prompt"] == 3 and call["strength"] == 0.75
    assert [g.initial_seed() for g in call["generator"]] == [300, 301, 302]
    assert [image.size for image in call["image"]] == [(64, 48)] * 3
    assert batch["seed"] == 300 and len(batch["images"]) == 3
    for image, single in zip(batch["images"], singles, strict=True):
        assert np.abs(levels(image) - levels(single)).max() <= BATCH_TOLERANCE_LEVELS


def test_text_to_image_is_unchanged_by_image_to_image_calls_on_the_shared_scheduler(served):
    def text_to_image() -> bytes:
        body = {"prompt": "a cat", "image_size": {"width": 64, "height": 64}, **STEPS, "seed": 8}
        return image_bytes(served.client.post("/", json=body).json()["images"][0])

    before = text_to_image()
    edit(served.client, seed=1, strength=0.5)
    edit(served.client, "/inpaint", seed=1, mask_url=data_uri(PILImage.fromarray(MASK)))
    assert text_to_image() == before


def test_a_transparent_input_is_flattened_onto_white(served, monkeypatch):
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)  # fully transparent black
    recording = RecordingPipe(served.app._image_pipes.image_to_image)
    monkeypatch.setattr(served.app, "_image_pipes", ImagePipelines(recording, served.app._image_pipes.inpaint))
    edit(served.client, image_url=data_uri(PILImage.fromarray(rgba, "RGBA")), seed=1)
    [given] = recording.calls[0]["image"]
    assert given.mode == "RGB" and np.all(np.asarray(given) == 255)


def test_an_answer_is_billed_its_images(served):
    response = post(served.client, "/image-to-image", seed=1, num_images=2)
    assert response.status_code == 200 and response.headers["x-fal-billable-units"] == "2"


def test_flagged_images_are_blacked_out_as_for_text_to_image(served, monkeypatch):
    from serving import safety

    monkeypatch.setattr(safety.SafetyChecker, "flags", lambda self, images: [True] * len(images))
    body = edit(served.client, seed=1)
    assert body["has_nsfw_concepts"] == [True]
    assert not np.asarray(pixels(body["images"][0])).any()


# --------------------------------------------------------------------------------------------------
# Inpainting


def test_inpaint_keeps_every_unmasked_pixel_exactly_and_repaints_the_masked_ones(served):
    # Exact, not "close": the input is laid back over the result where the mask is black (the demo
    # VAE alone would change every pixel: its random decoder does not reconstruct). PNG: lossless.
    body = edit(served.client, "/inpaint", mask_url=data_uri(PILImage.fromarray(MASK)), seed=3)
    out, source = levels(body["images"][0]), noise(64, 48).astype(np.int16)
    difference = np.abs(out - source).max(axis=-1)
    assert difference[MASK == 0].max() == 0
    assert difference[MASK == 255].mean() > 40  # measured ~136 of 255


def test_inpaint_same_seed_same_image_and_batching(served):
    mask = data_uri(PILImage.fromarray(MASK))
    first, again = (edit(served.client, "/inpaint", mask_url=mask, seed=9) for _ in range(2))
    assert image_bytes(first["images"][0]) == image_bytes(again["images"][0])
    batch = edit(served.client, "/inpaint", mask_url=mask, seed=9, num_images=2)
    second = edit(served.client, "/inpaint", mask_url=mask, seed=10)
    assert len(batch["images"]) == 2
    for image, single in zip(batch["images"], [first["images"][0], second["images"][0]], strict=True):
        assert np.abs(levels(image) - levels(single)).max() <= BATCH_TOLERANCE_LEVELS


def test_inpaint_passes_the_mask_at_the_images_size_white_repaint(served, monkeypatch):
    recording = RecordingPipe(served.app._image_pipes.inpaint)
    monkeypatch.setattr(served.app, "_image_pipes", ImagePipelines(served.app._image_pipes.image_to_image, recording))
    edit(served.client, "/inpaint", mask_url=data_uri(PILImage.fromarray(MASK)), image_size={"width": 128, "height": 96},
         seed=1)
    [call] = recording.calls
    [image], [mask] = call["image"], call["mask_image"]
    assert image.size == mask.size == (128, 96) and mask.mode == "L"
    assert (call["width"], call["height"], call["strength"]) == (128, 96, 0.95)  # fal's default strength
    mask = np.asarray(mask)
    assert mask[48, 64] == 255 and mask[2, 2] == 0


# --------------------------------------------------------------------------------------------------
# Bad input: a 422 naming the field, nothing generated, nothing billed


def png_bytes(picture: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


TRUNCATED = b64(png_bytes(PILImage.fromarray(noise(64, 48)))[:300])
DEEP = PILImage.fromarray(np.full((48, 64), 40000, dtype=np.uint16))
BAD_INPUTS = [
    ("image_url", "/image-to-image", {"image_url": b64(b"hello, not an image", "text/plain")}, "is not an image"),
    ("image_url", "/image-to-image", {"image_url": TRUNCATED}, "could not be decoded"),
    ("image_url", "/image-to-image", {"image_url": "data:image/png;base64,%%%"}, "base64 data is invalid"),
    ("image_url", "/image-to-image", {"image_url": "data:image/png;base64"}, "not a valid data: URI"),
    ("image_url", "/image-to-image", {"image_url": data_uri(PILImage.new("RGB", (400, 400)))},
     "is 400x400 (160000 pixels), more than the limit of 131072"),
    ("image_url", "/image-to-image", {"image_url": b64(png_bytes(DEEP))}, "has mode I;16 (16-bit or float)"),
    ("image_url", "/image-to-image", {"image_url": data_uri(PILImage.new("RGB", (16, 16)))},
     "is 16x16, served as 16x16: width 16 is outside [32, 512]; give image_size to resize it"),
    ("image_url", "/image-to-image", {"image_url": "https://localhost/cat.png"},
     "could not be fetched: its host is a private, loopback or link-local address"),
    ("image_url", "/image-to-image", {"image_url": "http://example.com/cat.png"}, "must be an https:// URL or a data: URI"),
    ("image_url", "/image-to-image", {"image_url": "ftp://example.com/cat.png"}, "must be an https:// URL or a data: URI"),
    ("image_url", "/image-to-image", {"image_url": "https://example.com/" + "x" * 2048}, "at most 2048 characters"),
    ("image_url", "/image-to-image", {"image_url": None}, "valid string"),
    ("strength", "/image-to-image", {"strength": 0}, "greater than 0"),
    ("strength", "/image-to-image", {"strength": -0.5}, "greater than 0"),
    ("strength", "/image-to-image", {"strength": 1.5}, "less than or equal to 1"),
    ("strength", "/image-to-image", {"strength": "0.5"}, "valid number"),
    ("strength", "/image-to-image", {"strength": 0.2}, "strength 0.2 of 4 num_inference_steps runs no denoising step"),
    ("strength", "/inpaint", {"strength": 2, "mask_url": data_uri(PILImage.fromarray(MASK))}, "less than or equal to 1"),
    ("image_size", "/image-to-image", {"image_size": {"width": 1024, "height": 64}}, "less than or equal to 512"),
    ("mask_url", "/inpaint", {"mask_url": data_uri(PILImage.new("L", (32, 32)))},
     "mask_url is 32x32 but the image is 64x48: they must be the same size"),
    ("mask_url", "/inpaint", {"mask_url": b64(b"GIF89a nope")}, "mask_url is not an image"),
    ("mask_url", "/inpaint", {"mask_url": "https://127.0.0.1/mask.png"}, "mask_url could not be fetched"),
    ("mask_url", "/inpaint", {}, "Field required"),
    ("image_url", "/inpaint", {"image_url": b64(b"nope"), "mask_url": data_uri(PILImage.fromarray(MASK))},
     "image_url is not an image"),
    ("mask_url", "/image-to-image", {"mask_url": data_uri(PILImage.fromarray(MASK))}, "Extra inputs"),
]


@pytest.mark.parametrize(("field", "path", "change", "message"), BAD_INPUTS,
                         ids=[f"{p[1:]}-{f}-{i}" for i, (f, p, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_422_naming_the_field_and_billed_nothing(served, monkeypatch, field, path, change, message):
    recording = RecordingPipe(served.app._image_pipes.image_to_image)
    monkeypatch.setattr(served.app, "_image_pipes", ImagePipelines(recording, recording))
    response = post(served.client, path, **change)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(error["loc"][:2] == ["body", field] and message in error["msg"] for error in errors), errors
    assert response.headers["x-fal-billable-units"] == "0"
    assert recording.calls == []
    assert len(response.content) < 1000  # short: a data URI is never echoed whole


def test_the_server_keeps_serving_after_bad_images(served):
    for _, path, change, _ in BAD_INPUTS:
        assert post(served.client, path, **change).status_code == 422
    assert edit(served.client, seed=1)["seed"] == 1


def test_a_fetched_image_is_decoded_like_a_data_uri(served, monkeypatch):
    png = png_bytes(PILImage.fromarray(noise(64, 48)))
    asked = []
    monkeypatch.setattr(served.app, "_fetch", lambda url, limits, cancelled: asked.append((url, limits)) or png)
    fetched = edit(served.client, image_url="https://images.example.com/cat.png", seed=4)
    inline = edit(served.client, seed=4)
    assert asked == [("https://images.example.com/cat.png", FetchLimits(50 * 1024 * 1024, deadline_s=30.0,
                                                                        read_timeout_s=10.0))]
    assert image_bytes(fetched["images"][0]) == image_bytes(inline["images"][0])


def test_an_unreachable_url_is_422_naming_it_with_the_reason(served, monkeypatch):
    def timeout(url, limits, cancelled):
        raise TimeoutError("timed out")

    monkeypatch.setattr(served.app, "_fetch", timeout)
    response = post(served.client, "/image-to-image", image_url="https://images.example.com/cat.png")
    assert response.status_code == 422
    assert response.json()["detail"] == [{"loc": ["body", "image_url"], "msg": "image_url could not be fetched: timed out",
                                          "type": "image_unreachable"}]


# --------------------------------------------------------------------------------------------------
# Cancellation: fal's POST <endpoint>/cancel


class SlowPipe(RecordingPipe):
    """The pipeline, a little slower per step, so a cancellation lands mid-generation."""

    def __call__(self, **kwargs):
        step_end = kwargs["callback_on_step_end"]

        def slow(pipeline, index, timestep, tensors):
            time.sleep(0.3)
            return step_end(pipeline, index, timestep, tensors)

        return super().__call__(**{**kwargs, "callback_on_step_end": slow})


@pytest.mark.parametrize("path", ["/image-to-image", "/inpaint"])
def test_fals_cancel_call_stops_an_image_request_which_answers_499(served, monkeypatch, path):
    pipes = served.app._image_pipes
    monkeypatch.setattr(served.app, "_image_pipes", ImagePipelines(SlowPipe(pipes.image_to_image), SlowPipe(pipes.inpaint)))
    request_id = f"cancel-{path[1:]}"
    answers = []
    body = {"num_inference_steps": 20, "strength": 1.0, "seed": 1, "mask_url": data_uri(PILImage.fromarray(MASK))}
    if path == "/image-to-image":
        del body["mask_url"]
    thread = threading.Thread(target=lambda: answers.append(served.client.post(
        path, json={"prompt": "a cat", "image_url": SOURCE, **body}, headers={"x-fal-request-id": request_id})))
    thread.start()
    deadline = time.monotonic() + 30
    while (cancel := served.client.post(f"{path}/cancel", headers={"x-fal-request-id": request_id})).status_code == 404:
        assert time.monotonic() < deadline, "the request never became cancellable"
        time.sleep(0.05)
    thread.join(timeout=60)
    assert cancel.status_code == 200 and cancel.json() == {"request_id": request_id, "cancelled": True}
    [answer] = answers
    assert answer.status_code == 499
    assert answer.json()["detail"].endswith(f"of 20 steps (cancelled through POST {path}/cancel)")
    assert not served.app._lock.locked()
