"""The app in-process, end to end on the embedded demo model: setup() (demo source -> store ->
loader -> warm-up) behind Starlette's TestClient, then requests through fal's FastAPI app.

One app instance serves the whole module; requests use small images and few steps.
"""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage
from starlette.testclient import TestClient

from conversion.demo import make_demo_safety_checker
from conversion.manifest import read_manifest
from serving.output import encode_image
from serving.schema import MAX_SEED
from serving.settings import ModelSettings, SafetyCheckerSettings

SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "output_format": "png"}
MANIFEST = "flashpack_manifest.json"


class _Env:
    """Set environment variables for a module-scoped fixture and put them back afterwards."""

    def __init__(self, **values: str):
        self.values, self.saved = values, {k: os.environ.get(k) for k in values}

    def __enter__(self):
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def served(tmp_path_factory, app_module):
    """The demo app after setup(), on a fresh data root (APP_DATA_ROOT)."""
    import torch

    root = tmp_path_factory.mktemp("app-data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread per op is the fastest and steadiest here
    with _Env(APP_DATA_ROOT=str(root), HF_HUB_OFFLINE="1"):
        module = app_module
        instance = module.TextToImageApp(_allow_init=True)
        try:
            with TestClient(instance._build_app()) as client:
                yield SimpleNamespace(module=module, app=instance, client=client, root=root)
        finally:
            torch.set_num_threads(threads)


def generate(served, **body) -> dict:
    response = served.client.post("/", json={"prompt": "a cat on a horse", **SMALL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def image_bytes(image: dict) -> bytes:
    header, _, data = image["url"].partition(",")
    assert header == f"data:{image['content_type']};base64"
    return base64.b64decode(data)


def pixels(image: dict) -> PILImage.Image:
    return PILImage.open(io.BytesIO(image_bytes(image)))


# --------------------------------------------------------------------------------------------------
# Setup and health


def test_health_reports_ready_with_setup_phase_timings(served):
    for response in (served.client.get("/health"), served.client.post("/health")):
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok" and body["profile"] == "demo" and body["model"] == "demo"
        assert body["device"] == "cpu"
        assert set(body["setup_seconds"]) == {"lookup", "store", "load", "warmup", "total"}
        assert Path(body["store"], MANIFEST).is_file()
        assert Path(body["store"]).is_relative_to(served.root)


def test_demo_app_serves_the_demo_source_from_the_store_and_keeps_no_generated_copy(served):
    store = Path(served.client.get("/health").json()["store"])
    assert read_manifest(store)["source"]["kind"] == "demo"
    assert sorted(p.name for p in served.root.iterdir()) == ["flashpack"]


def test_demo_app_loads_the_demo_safety_checker_from_its_own_store_entry(served):
    checker = Path(served.client.get("/health").json()["safety_checker"])
    assert checker.parent == served.root / "flashpack"
    assert read_manifest(checker)["source"]["kind"] == "demo-safety-checker"
    assert (checker / "safety_checker" / "model.flashpack").is_file()
    assert type(served.app.safety_checker.model).__name__ == "StableDiffusionSafetyChecker"

def test_second_start_finds_the_store_and_converts_nothing(served, caplog):
    store = Path(served.client.get("/health").json()["store"])
    manifest_mtime = (store / MANIFEST).stat().st_mtime_ns
    entries = sorted(p.name for p in store.parent.iterdir())
    second = served.module.TextToImageApp(_allow_init=True)
    checker = served.client.get("/health").json()["safety_checker"]
    with (
        _Env(APP_DATA_ROOT=str(served.root)),
        caplog.at_level("INFO"),
        TestClient(second._build_app()) as client,
    ):
        health = client.get("/health").json()
        response = client.post("/", json={"prompt": "a cat on a horse", **SMALL, "seed": 3})
    assert health["store"] == str(store) and health["safety_checker"] == checker
    assert (store / MANIFEST).stat().st_mtime_ns == manifest_mtime
    assert sorted(p.name for p in store.parent.iterdir()) == entries
    assert [r.name for r in caplog.records if r.name in ("conversion.convert", "conversion.download")] == []
    assert any(r.name == "conversion.store" and "no network" in r.getMessage() for r in caplog.records)
    assert any(r.name == "conversion.entry" and r.getMessage().startswith(f"lookup: pipeline {store}; ")
               and r.getMessage().endswith(" pack(s) reading in the background") for r in caplog.records)
    assert any(r.name == "conversion.entry" and r.getMessage() == f"lookup: safety checker {checker}; 1 pack(s) "
               "reading in the background" for r in caplog.records)
    assert image_bytes(response.json()["images"][0]) == image_bytes(generate(served, seed=3)["images"][0])


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _start_and_check(served, caplog) -> tuple[dict, bytes]:
    with caplog.at_level("INFO"), TestClient(served.module.TextToImageApp(_allow_init=True)._build_app()) as client:
        response = client.post("/", json={"prompt": "a cat on a horse", **SMALL, "seed": 3})
        assert response.status_code == 200 and response.json()["has_nsfw_concepts"] == [False]
        return client.get("/health").json(), image_bytes(response.json()["images"][0])


def test_a_corrupt_checker_pack_is_caught_while_loading_and_rebuilt_on_the_same_start(served, tmp_path, caplog):
    with _Env(APP_DATA_ROOT=str(tmp_path / "data")):
        health, clean = _start_and_check(served, caplog)
        checker = Path(health["safety_checker"])
        _flip_byte(checker / "safety_checker" / "model.flashpack", 0)  # payload: the size and footer stay valid
        caplog.clear()
        rebuilt, image = _start_and_check(served, caplog)
    assert rebuilt["safety_checker"] == str(checker) and rebuilt["store"] == health["store"] and image == clean
    damaged = [r.getMessage() for r in caplog.records if r.name == "conversion.entry" and "is damaged" in r.getMessage()]
    assert len(damaged) == 1 and f"{checker}/safety_checker/model.flashpack: bytes 0-" in damaged[0]
    assert "checksum" in damaged[0]
    converted = [r.getMessage() for r in caplog.records if r.name == "conversion.convert"]
    assert converted and all("unet" not in m for m in converted)  # the checker was rebuilt, not the pipeline


def _start_and_generate(served, caplog) -> tuple[Path, bytes]:
    with caplog.at_level("INFO"), TestClient(served.module.TextToImageApp(_allow_init=True)._build_app()) as client:
        response = client.post("/", json={"prompt": "a cat on a horse", **SMALL, "seed": 3})
        assert response.status_code == 200
        return Path(client.get("/health").json()["store"]), image_bytes(response.json()["images"][0])


def test_a_corrupt_pack_is_caught_while_loading_and_rebuilt_on_the_same_start(served, tmp_path, caplog):
    with _Env(APP_DATA_ROOT=str(tmp_path / "data")):
        store, clean = _start_and_generate(served, caplog)
        _flip_byte(store / "unet" / "model.flashpack", 0)  # payload: the size and footer stay valid
        caplog.clear()
        rebuilt_store, image = _start_and_generate(served, caplog)
    assert rebuilt_store == store and image == clean
    damaged = [r.getMessage() for r in caplog.records if r.name == "conversion.entry" and "is damaged" in r.getMessage()]
    assert len(damaged) == 1 and "unet/model.flashpack: bytes 0-" in damaged[0] and "checksum" in damaged[0]
    assert any(r.name == "conversion.convert" for r in caplog.records)  # rebuilt from the source


def test_full_store_verification_from_the_environment_applies_to_the_warm_lookup(served, tmp_path, caplog):
    with _Env(APP_DATA_ROOT=str(tmp_path / "data")):
        store, clean = _start_and_generate(served, caplog)
        _flip_byte(store / "unet" / "model.flashpack", 0)
        caplog.clear()
        with _Env(APP_STORE_VERIFY="full"):
            _, image = _start_and_generate(served, caplog)
    assert image == clean
    assert any("unet/model.flashpack: sha256 mismatch" in r.getMessage() for r in caplog.records)
    assert not any("is damaged" in r.getMessage() for r in caplog.records)  # caught before loading


def test_a_corrupt_tokenizer_file_is_caught_by_the_warm_check_and_rebuilt(served, tmp_path, caplog):
    with _Env(APP_DATA_ROOT=str(tmp_path / "data")):
        store, clean = _start_and_generate(served, caplog)
        _flip_byte(store / "tokenizer" / "tokenizer.json", 3)
        caplog.clear()
        _, image = _start_and_generate(served, caplog)
    assert image == clean
    assert any("tokenizer/tokenizer.json: sha256 mismatch" in r.getMessage() for r in caplog.records)
    assert any(r.name == "conversion.convert" for r in caplog.records)


def test_setup_fails_naming_a_missing_model_source(served, tmp_path, caplog):
    from conversion.errors import SourceError

    module = served.module
    missing = tmp_path / "no-such-model"
    settings = module.TextToImageApp.settings.model_copy(
        update={"model": ModelSettings(source=str(missing), dtype="float32", device="cpu")}
    )

    class MissingModelApp(module.TextToImageApp):
        pass

    MissingModelApp.settings = settings
    with (
        _Env(APP_DATA_ROOT=str(tmp_path / "data")),
        pytest.raises(SourceError, match=f"{missing}: no such directory"),
        TestClient(MissingModelApp(_allow_init=True)._build_app()),
    ):
        pass
    assert any(r.name == "app" and r.getMessage().startswith("lookup: failed after") for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# Seeds and reproducibility


def test_response_follows_fal_conventions(served):
    body = generate(served, seed=11)
    assert set(body) == {"images", "seed", "prompt", "has_nsfw_concepts", "timings"}
    assert body["seed"] == 11 and body["prompt"] == "a cat on a horse" and body["has_nsfw_concepts"] == [False]
    image = body["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (64, 64, "image/png")
    assert image["url"].startswith("data:image/png;base64,")  # the demo profile never uploads
    assert pixels(image).size == (64, 64)
    assert set(body["timings"]) == {"queue", "inference", "safety", "encode"}


def test_same_seed_gives_identical_image_bytes(served):
    first, second = generate(served, seed=1234), generate(served, seed=1234)
    assert image_bytes(first["images"][0]) == image_bytes(second["images"][0])


def test_different_seeds_give_different_images(served):
    first, second = generate(served, seed=1234), generate(served, seed=1235)
    assert image_bytes(first["images"][0]) != image_bytes(second["images"][0])


def test_seed_zero_is_honoured(served):
    zero, again, one = generate(served, seed=0), generate(served, seed=0), generate(served, seed=1)
    assert zero["seed"] == 0
    assert image_bytes(zero["images"][0]) == image_bytes(again["images"][0])
    assert image_bytes(zero["images"][0]) != image_bytes(one["images"][0])


def test_absent_seed_draws_a_fresh_seed_that_reproduces_the_image(served):
    first, second = generate(served), generate(served)
    assert first["seed"] != second["seed"]
    assert all(0 <= body["seed"] <= MAX_SEED for body in (first, second))
    again = generate(served, seed=first["seed"])
    assert image_bytes(again["images"][0]) == image_bytes(first["images"][0])


# Batched kernels may round differently from single-image ones (another blocking or accumulation
# order for another batch size): ~1e-5 in the decoded [0, 1] floats, measured, so at most one level
# of 255 where a value sits on a rounding boundary. README, "Calling the deployed endpoint".
BATCH_TOLERANCE_LEVELS = 1


def levels(image: dict) -> np.ndarray:
    return np.asarray(pixels(image).convert("RGB"), dtype=np.int16)


def test_each_image_of_a_batch_is_the_single_image_of_its_seed_within_one_level_of_255(served):
    batch = generate(served, seed=500, num_images=3)
    assert batch["seed"] == 500 and len(batch["images"]) == 3
    singles = [generate(served, seed=500 + i)["images"][0] for i in range(3)]
    for image, single in zip(batch["images"], singles, strict=True):
        assert np.abs(levels(image) - levels(single)).max() <= BATCH_TOLERANCE_LEVELS
    assert len({image_bytes(im) for im in batch["images"]}) == 3


class RecordingPipe:
    """The served pipeline, recording the arguments of each call."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_num_images_is_one_pipeline_call_with_a_cpu_generator_per_image_seeded_seed_plus_i(served, monkeypatch):
    recording = RecordingPipe(served.app.pipe)
    monkeypatch.setattr(served.app, "pipe", recording)
    generate(served, seed=500, num_images=3)
    [call] = recording.calls
    assert call["num_images_per_prompt"] == 3
    assert [(g.device.type, g.initial_seed()) for g in call["generator"]] == [("cpu", 500), ("cpu", 501), ("cpu", 502)]


def test_the_seeds_of_a_batch_wrap_within_the_seed_range(served, monkeypatch):
    recording = RecordingPipe(served.app.pipe)
    monkeypatch.setattr(served.app, "pipe", recording)
    generate(served, seed=MAX_SEED, num_images=2)
    assert [g.initial_seed() for g in recording.calls[0]["generator"]] == [MAX_SEED, 0]


def test_negative_prompt_changes_the_image(served):
    plain, negative = generate(served, seed=9), generate(served, seed=9, negative_prompt="blurry")
    assert image_bytes(plain["images"][0]) != image_bytes(negative["images"][0])


# --------------------------------------------------------------------------------------------------
# The safety checker


@pytest.fixture(scope="module")
def flagging(served, tmp_path_factory):
    """The demo app with a test-only checker that flags every image (the demo checker built with
    flag level 0, as a local checker directory), on the demo app's data root."""
    module = served.module
    checker_dir = make_demo_safety_checker(tmp_path_factory.mktemp("checker") / "flags-everything", flag_level=0)

    class FlaggingApp(module.TextToImageApp):
        pass

    FlaggingApp.settings = module.TextToImageApp.settings.model_copy(
        update={"safety_checker": SafetyCheckerSettings(source=str(checker_dir))})
    with TestClient(FlaggingApp(_allow_init=True)._build_app()) as client:
        yield SimpleNamespace(client=client, checker_dir=checker_dir)


def test_the_demo_checker_flags_none_of_the_demo_images(served):
    assert generate(served, seed=21, num_images=3)["has_nsfw_concepts"] == [False, False, False]


def test_flagged_images_are_replaced_by_black_images_of_their_size(flagging):
    response = flagging.client.post("/", json={"prompt": "a cat on a horse", **SMALL, "seed": 21, "num_images": 2,
                                               "image_size": {"width": 64, "height": 48}})
    body = response.json()
    assert response.status_code == 200 and body["has_nsfw_concepts"] == [True, True]
    for image in body["images"]:
        assert (image["width"], image["height"]) == (64, 48)
        assert np.array_equal(np.asarray(pixels(image)), np.zeros((48, 64, 3), dtype=np.uint8))


def test_enable_safety_checker_false_returns_the_images_unchecked(served, flagging):
    body = {"prompt": "a cat on a horse", **SMALL, "seed": 21, "num_images": 2, "enable_safety_checker": False}
    unchecked = flagging.client.post("/", json=body).json()
    assert unchecked["has_nsfw_concepts"] == [False, False]
    demo = generate(served, seed=21, num_images=2)
    assert [image_bytes(im) for im in unchecked["images"]] == [image_bytes(im) for im in demo["images"]]


def test_the_checker_of_the_settings_comes_from_the_store_as_a_local_checker_entry(served, flagging):
    entry = Path(flagging.client.get("/health").json()["safety_checker"])
    assert entry.parent == served.root / "flashpack"
    source = read_manifest(entry)["source"]
    assert (source["kind"], source["ref"]) == ("local-safety-checker", str(flagging.checker_dir))


def test_a_deployment_without_a_checker_says_so_and_flags_nothing(served, caplog):
    module = served.module

    class UncheckedApp(module.TextToImageApp):
        pass

    UncheckedApp.settings = module.TextToImageApp.settings.model_copy(
        update={"safety_checker": SafetyCheckerSettings(source="none")})
    with caplog.at_level("INFO"), TestClient(UncheckedApp(_allow_init=True)._build_app()) as client:
        health = client.get("/health").json()
        body = client.post("/", json={"prompt": "a cat", **SMALL, "seed": 4, "num_images": 2}).json()
    assert health["safety_checker"] is None and body["has_nsfw_concepts"] == [False, False]
    assert any(r.name == "serving.safety" and r.levelname == "WARNING" and "safety checker: none" in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# Sizes and formats


@pytest.mark.parametrize(
    ("preset", "size"),
    [("square_hd", (64, 64)), ("square", (64, 64)), ("portrait_16_9", (40, 64)), ("landscape_4_3", (64, 48))],
)
def test_preset_names_map_to_the_demo_sizes(served, preset, size):
    image = generate(served, seed=1, image_size=preset, num_inference_steps=1)["images"][0]
    assert (image["width"], image["height"]) == size
    assert pixels(image).size == size


@pytest.mark.parametrize("size", [(32, 32), (512, 32), (32, 512), (512, 256), (40, 72)])
def test_boundary_sizes_are_generated(served, size):
    image = generate(served, seed=2, image_size={"width": size[0], "height": size[1]}, num_inference_steps=1)
    assert pixels(image["images"][0]).size == size


def test_jpeg_output_is_a_jpeg(served):
    image = generate(served, seed=5, output_format="jpeg")["images"][0]
    assert image["content_type"] == "image/jpeg"
    assert image_bytes(image)[:3] == b"\xff\xd8\xff"
    assert pixels(image).format == "JPEG"


def test_encode_image_inline_is_a_data_uri(served):
    picture = PILImage.new("RGB", (16, 8), (255, 0, 0))
    image = encode_image(picture, "png", inline=True)
    assert image.url.startswith("data:image/png;base64,")
    assert (image.width, image.height) == (16, 8)


# --------------------------------------------------------------------------------------------------
# Invalid input: 422 naming the field, and the server keeps serving

TOO_LONG = "x" * 501
BAD_INPUTS = [
    ("prompt", {"prompt": ""}, "at least 1 character"),
    ("prompt", {"prompt": "   "}, "non-whitespace"),
    ("prompt", {"prompt": "\u0000"}, "non-whitespace"),
    ("prompt", {"prompt": "\u200b\t\u0007\u2028"}, "non-whitespace"),
    ("prompt", {"prompt": TOO_LONG}, "at most 500 characters"),
    ("prompt", {"prompt": 123}, "valid string"),
    ("prompt", {"prompt": None}, "valid string"),
    ("negative_prompt", {"negative_prompt": TOO_LONG}, "at most 500 characters"),
    ("seed", {"seed": -1}, "greater than or equal to 0"),
    ("seed", {"seed": 2**53}, "less than or equal to 9007199254740991"),
    ("seed", {"seed": 1.5}, "valid integer"),
    ("seed", {"seed": "abc"}, "valid integer"),
    ("seed", {"seed": "5"}, "valid integer"),
    ("seed", {"seed": True}, "valid integer"),
    ("num_images", {"num_images": True}, "valid integer"),
    ("num_images", {"num_images": 0}, "greater than or equal to 1"),
    ("num_images", {"num_images": 5}, "less than or equal to 4"),
    ("image_size", {"image_size": "huge"}, "square_hd"),
    ("image_size", {"image_size": 5}, "preset name or an object"),
    ("image_size", {"image_size": {"width": 100, "height": 64}}, "multiple of 8"),
    ("image_size", {"image_size": {"width": 1024, "height": 64}}, "less than or equal to 512"),
    ("image_size", {"image_size": {"width": 16, "height": 64}}, "greater than or equal to 32"),
    ("image_size", {"image_size": {"width": 512, "height": 512}}, "more than the limit of 131072"),
    ("image_size", {"image_size": {"width": 64}}, "Field required"),
    ("image_size", {"image_size": {"width": "64", "height": 64}}, "valid integer"),
    ("image_size", {"image_size": {"width": 64, "height": 64, "depth": 3}}, "Extra inputs"),
    ("num_inference_steps", {"num_inference_steps": 0}, "greater than or equal to 1"),
    ("num_inference_steps", {"num_inference_steps": 26}, "less than or equal to 25"),
    ("num_inference_steps", {"num_inference_steps": "many"}, "valid integer"),
    ("num_inference_steps", {"num_inference_steps": "2"}, "valid integer"),
    ("guidance_scale", {"guidance_scale": -0.5}, "greater than or equal to 0"),
    ("guidance_scale", {"guidance_scale": 21}, "less than or equal to 20"),
    ("guidance_scale", {"guidance_scale": "high"}, "valid number"),
    ("guidance_scale", {"guidance_scale": "7"}, "valid number"),
    ("guidance_scale", {"guidance_scale": True}, "valid number"),
    ("output_format", {"output_format": "gif"}, "'jpeg', 'png' or 'webp'"),
    ("sync_mode", {"sync_mode": "maybe"}, "valid boolean"),
    ("sync_mode", {"sync_mode": "yes"}, "valid boolean"),
    ("sync_mode", {"sync_mode": 1}, "valid boolean"),
    ("enable_safety_checker", {"enable_safety_checker": "false"}, "valid boolean"),
    ("enable_safety_checker", {"enable_safety_checker": 0}, "valid boolean"),
    ("enable_safety_checker", {"enable_safety_checker": None}, "valid boolean"),
    ("steps", {"steps": 4}, "Extra inputs"),
]


@pytest.mark.parametrize(("field", "change", "message"), BAD_INPUTS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_INPUTS)])
def test_invalid_input_is_422_naming_the_field(served, field, change, message):
    response = served.client.post("/", json={"prompt": "a cat", **SMALL, **change})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(error["loc"][:2] == ["body", field] for error in errors), errors
    assert any(message in error["msg"] for error in errors), errors


def test_integer_guidance_scale_and_whole_float_seed_are_accepted(served):
    body = generate(served, guidance_scale=7, seed=5.0)
    assert body["seed"] == 5
    assert image_bytes(body["images"][0]) == image_bytes(generate(served, guidance_scale=7.0, seed=5)["images"][0])


def test_missing_prompt_is_422_naming_prompt(served):
    response = served.client.post("/", json={"seed": 1})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_server_keeps_serving_after_invalid_requests(served):
    for _, change, _ in BAD_INPUTS:
        assert served.client.post("/", json={"prompt": "a cat", **SMALL, **change}).status_code == 422
    assert served.client.post("/", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert generate(served, seed=77)["seed"] == 77


# --------------------------------------------------------------------------------------------------
# Concurrency: requests never share pipeline state


def test_eight_concurrent_requests_each_equal_their_sequential_result(served):
    bodies = [{"seed": 900 + i, "prompt": f"a horse number {i}", "num_images": 1 + i % 2} for i in range(8)]
    sequential = [[image_bytes(im) for im in generate(served, **body)["images"]] for body in bodies]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda body: generate(served, **body), bodies))
    assert [[image_bytes(im) for im in body["images"]] for body in concurrent] == sequential


# --------------------------------------------------------------------------------------------------
# Stopping a generation, and the pipeline lock


def test_a_cancelled_generation_stops_at_the_end_of_the_next_step(served):
    from serving.cancel import CancelFlag
    from serving.generate import GenerationCancelled, GenerationParams
    from serving.generate import generate as generate_images

    flag, seen = CancelFlag(), []

    def on_step(step):
        seen.append((step.done, step.total))
        if step.done == 2:
            flag.cancel("test")

    params = GenerationParams("a cat", "", 64, 64, 25, 5.0, seeds=(1,))
    with pytest.raises(GenerationCancelled) as raised:
        generate_images(served.app.pipe, params, flag=flag, on_step=on_step)
    assert seen == [(1, 25), (2, 25)]
    assert (raised.value.steps_done, raised.value.total_steps, raised.value.reason) == (3, 25, "test")


def test_a_request_cancelled_while_waiting_for_the_pipeline_leaves_without_running_it(served):
    import threading

    from serving.cancel import CancelFlag
    from serving.generate import GenerationCancelled, GenerationParams, run_generation

    lock, flag, recording = threading.Lock(), CancelFlag(), RecordingPipe(served.app.pipe)
    lock.acquire()  # another request is generating
    flag.cancel("test")  # the client went away while this one waited
    with pytest.raises(GenerationCancelled) as raised:
        run_generation(recording, lock, GenerationParams("a cat", "", 64, 64, 2, 5.0, seeds=(1,)), request="t", flag=flag)
    assert raised.value.steps_done == 0 and recording.calls == []
    assert lock.locked()  # still the other request's
    lock.release()


def test_a_failing_generation_releases_the_pipeline_lock_and_the_next_request_succeeds(served, monkeypatch):
    class FailingPipe(RecordingPipe):
        def __call__(self, **kwargs):
            raise RuntimeError("out of memory, say")

    monkeypatch.setattr(served.app, "pipe", FailingPipe(served.app.pipe))
    with pytest.raises(RuntimeError, match="out of memory, say"):
        served.client.post("/", json={"prompt": "a cat", **SMALL, "seed": 1})
    monkeypatch.undo()
    assert not served.app._lock.locked()
    assert generate(served, seed=1)["seed"] == 1


def test_a_failure_after_the_stream_began_ends_it_with_an_error_event_and_releases_the_lock(served, monkeypatch):
    class FailingPipe(RecordingPipe):
        def __call__(self, **kwargs):
            raise RuntimeError("out of memory, say")

    monkeypatch.setattr(served.app, "pipe", FailingPipe(served.app.pipe))
    response = served.client.post("/stream", json={"prompt": "a cat", **SMALL, "seed": 1})
    monkeypatch.undo()
    assert response.status_code == 200
    assert response.text == 'event: error\ndata: {"detail":"Internal Server Error"}\n\n'
    assert not served.app._lock.locked()
    assert generate(served, seed=1)["seed"] == 1


def test_cancel_without_a_request_id_is_400_naming_the_header(served):
    for path in ("/cancel", "/stream/cancel"):
        response = served.client.post(path)
        assert response.status_code == 400
        assert response.json() == {"detail": "the x-fal-request-id header is required: it names the request to cancel"}


def test_cancel_of_a_request_not_in_flight_is_404(served):
    response = served.client.post("/cancel", headers={"x-fal-request-id": "no-such-request"})
    assert response.status_code == 404
    assert response.json() == {"detail": "no request 'no-such-request' is in flight (finished, or never started)"}
