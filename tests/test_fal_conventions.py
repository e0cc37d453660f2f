"""fal's request conventions where fal's clients read them: POST /inpainting (with /inpaint kept as
a deprecated alias), ``output_format: "webp"``, a ``scheduler`` per request by fal's names, and
prompts longer than the text encoder's window read whole (or refused), never cut.

End to end on the demo app (test_app.py's ``served``: an SD pipeline whose CLIP window is 24
tokens, its own scheduler DPM++ 2M with v-prediction and trailing timesteps), and on the tiny SDXL
and Flux pipelines for what only they have (two text encoders, a pooled embedding, T5, flow matching).
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import test_app_images
import torch
from fal.exceptions import FieldException
from PIL import Image as PILImage
from test_app import BATCH_TOLERANCE_LEVELS, image_bytes, levels, pixels, served
from test_app_images import MASK, SOURCE, data_uri

from serving.generate import GenerationParams, generate
from serving.prompts import FLUX_T5_TOKENS, MAX_WINDOWS, Prompts
from serving.schedulers import DISCRETE, FLOW, SCHEDULER_NAMES, Schedulers, with_scheduler

__all__ = ["served"]  # test_app.py's demo app: a module-scoped fixture, one instance for this module

SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "output_format": "png"}
# fal-ai/lora's SchedulerEnum, in its order (fal's own Stable Diffusion app, field "scheduler").
FALS_SCHEDULERS = ["DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "Euler", "Euler A",
                   "Euler (trailing timesteps)", "LCM", "LCM (trailing timesteps)", "DDIM", "TCD"]
# Prompts of the demo's words (each one token): 8 tokens a phrase, so 3 phrases fill more than one 24-token window.
PHRASE = "a red circle on a blue background,"


def post(served, path: str = "/", **body):
    """``path`` with ``body`` over small defaults (an image endpoint: at its input image's size)."""
    size = {} if path in ("/", "/stream") else {"image_size": None}
    return served.client.post(path, json={"prompt": "a red circle on a blue background", **SMALL, **size, **body})


def ok(served, path: str = "/", **body) -> dict:
    response = post(served, path, **body)
    assert response.status_code == 200, response.text
    return response.json()


def first_png(body: dict) -> bytes:
    return image_bytes(body["images"][0])


def openapi(app_module) -> dict:
    return app_module.TextToImageApp(_allow_init=True).openapi()


# --------------------------------------------------------------------------------------------------
# POST /inpainting, and /inpaint its alias


def test_the_openapi_has_fals_inpainting_path_and_its_cancel_with_the_inpaint_alias_marked_deprecated(app_module):
    paths = openapi(app_module)["paths"]
    for path in ("/inpainting", "/inpaint"):
        operation = paths[path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/InpaintInput"}
        assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ImageToImageOutput"}
    for path in ("/inpainting/cancel", "/inpaint/cancel"):
        assert paths[path]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/CancelOutput"}
    assert paths["/inpaint"]["post"]["description"].startswith("Deprecated: the earlier name of POST /inpainting")
    assert paths["/inpaint/cancel"]["post"]["description"].startswith("Deprecated")
    assert "Deprecated" not in paths["/inpainting"]["post"]["description"]


def test_inpainting_and_its_alias_answer_identically(served):
    body = {"image_url": SOURCE, "mask_url": data_uri(PILImage.fromarray(MASK)), "seed": 3, "num_images": 2,
            "num_inference_steps": 4}
    new, alias = ok(served, "/inpainting", **body), ok(served, "/inpaint", **body)
    assert [image_bytes(i) for i in new["images"]] == [image_bytes(i) for i in alias["images"]]
    assert {k: v for k, v in new.items() if k not in ("images", "timings")} == {
        k: v for k, v in alias.items() if k not in ("images", "timings")}
    kept = np.asarray(pixels(new["images"][0]))[MASK == 0]
    assert np.array_equal(kept, np.asarray(PILImage.open(io.BytesIO(_source_png())).convert("RGB"))[MASK == 0])


def _source_png() -> bytes:
    import base64

    return base64.b64decode(SOURCE.partition(",")[2])


def test_inpainting_refuses_as_the_alias_does(served):
    for path in ("/inpainting", "/inpaint"):
        response = post(served, path, image_url=SOURCE)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "mask_url"]


def test_fals_cancel_call_stops_an_inpainting_request_as_it_stops_the_alias(served, monkeypatch):
    test_app_images.test_fals_cancel_call_stops_an_image_request_which_answers_499(served, monkeypatch, "/inpainting")


def test_inpainting_cancel_of_a_request_not_in_flight_is_404_as_for_every_endpoint(served):
    for path in ("/inpainting/cancel", "/inpaint/cancel"):
        response = served.client.post(path, headers={"x-fal-request-id": "nothing-here"})
        assert response.status_code == 404


def test_a_model_without_inpainting_answers_501_naming_the_path_called(served, monkeypatch):
    from serving.img2img import ImagePipelines

    monkeypatch.setattr(served.app, "_image_pipes", ImagePipelines(served.app._image_pipes.image_to_image, None))
    for path in ("/inpainting", "/inpaint"):
        response = post(served, path, image_url=SOURCE, mask_url=data_uri(PILImage.fromarray(MASK)))
        assert response.status_code == 501
        assert response.json()["detail"] == f"{path[1:]} is not available for this model (StableDiffusionPipeline)"


# --------------------------------------------------------------------------------------------------
# output_format: webp


def test_the_schema_offers_fals_three_output_formats(app_module):
    schemas = openapi(app_module)["components"]["schemas"]
    for model in ("TextToImageInput", "ImageToImageInput", "InpaintInput"):
        assert schemas[model]["properties"]["output_format"]["enum"] == ["jpeg", "png", "webp"]
        assert schemas[model]["properties"]["output_format"]["default"] == "jpeg"


def test_webp_output_is_a_webp_image_of_the_same_picture(served):
    as_png = ok(served, seed=12)["images"][0]
    image = ok(served, seed=12, output_format="webp")["images"][0]
    assert image["content_type"] == "image/webp"
    data = image_bytes(image)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    decoded = pixels(image)
    assert decoded.format == "WEBP" and decoded.size == (64, 64) == (image["width"], image["height"])
    difference = np.abs(levels(image).astype(float) - levels(as_png))
    assert difference.mean() < 8  # lossy, quality 80: the same picture


def test_webp_output_for_image_to_image_and_inpainting_too(served):
    for path, extra in (("/image-to-image", {}), ("/inpainting", {"mask_url": data_uri(PILImage.fromarray(MASK))})):
        image = ok(served, path, image_url=SOURCE, output_format="webp", seed=1, num_inference_steps=4,
                   **extra)["images"][0]
        assert image["content_type"] == "image/webp" and pixels(image).format == "WEBP"


# --------------------------------------------------------------------------------------------------
# scheduler: fal's names, built from the model's own scheduler config


def test_the_schema_offers_fals_scheduler_names_default_the_models_own(app_module):
    schemas = openapi(app_module)["components"]["schemas"]
    assert list(SCHEDULER_NAMES) == FALS_SCHEDULERS
    for model in ("TextToImageInput", "ImageToImageInput", "InpaintInput"):
        field = schemas[model]["properties"]["scheduler"]
        assert field["anyOf"] == [{"enum": FALS_SCHEDULERS, "type": "string"}, {"type": "null"}]
        assert field.get("default") is None and "model's own scheduler" in field["description"]
        assert "scheduler" not in schemas[model].get("required", [])


def test_an_unknown_scheduler_name_is_422_naming_the_field(served):
    for name in ("dpm++ 2m", "Heun", "LMS", 3):
        response = post(served, scheduler=name)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "scheduler"]


@pytest.mark.parametrize("name", FALS_SCHEDULERS)
def test_every_scheduler_generates_the_same_image_for_the_same_seed(served, name):
    first, again = ok(served, seed=21, scheduler=name), ok(served, seed=21, scheduler=name)
    assert first_png(first) == first_png(again)


def test_schedulers_change_the_image_and_the_models_own_settings_carry_over(served):
    own = first_png(ok(served, seed=22))
    assert first_png(ok(served, seed=22, scheduler=None)) == own
    # The demo's own scheduler is DPM++ 2M (v-prediction, trailing timesteps): the name rebuilds exactly it.
    assert first_png(ok(served, seed=22, scheduler="DPM++ 2M")) == own
    others = {name: first_png(ok(served, seed=22, scheduler=name)) for name in ("Euler A", "DDIM", "DPM++ 2M Karras")}
    assert len({own, *others.values()}) == 4


def test_concurrent_requests_with_different_schedulers_each_equal_the_request_alone(served):
    pipe = served.app.pipe
    own, own_config = pipe.scheduler, dict(pipe.scheduler.config)
    names = ["Euler A", "DPM++ 2M SDE Karras", None, "DDIM", "Euler", "LCM", "TCD", "Euler A"]
    bodies = [{"seed": 40 + i, "num_images": 1 + i % 2, **({"scheduler": name} if name else {})}
              for i, name in enumerate(names)]
    alone = [[image_bytes(im) for im in ok(served, **body)["images"]] for body in bodies]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        together = list(pool.map(lambda body: ok(served, **body), bodies))
    assert [[image_bytes(im) for im in body["images"]] for body in together] == alone
    assert pipe.scheduler is own and dict(pipe.scheduler.config) == own_config
    assert list(pipe.config["scheduler"]) == ["diffusers", "DPMSolverMultistepScheduler"]
    for variant in (served.app._image_pipes.image_to_image, served.app._image_pipes.inpaint):
        assert variant.scheduler is own


@pytest.mark.parametrize("name", ["Euler A", "DPM++ 2M SDE"])
def test_a_batch_with_a_stochastic_scheduler_is_image_i_of_seed_plus_i(served, name):
    singles = [ok(served, seed=60 + i, scheduler=name)["images"][0] for i in range(3)]
    batch = ok(served, seed=60, num_images=3, scheduler=name)["images"]
    for image, single in zip(batch, singles, strict=True):
        assert np.abs(levels(image) - levels(single)).max() <= BATCH_TOLERANCE_LEVELS


def test_the_scheduler_applies_to_image_to_image_inpainting_and_the_stream(served):
    mask = data_uri(PILImage.fromarray(MASK))
    for path, extra in (("/image-to-image", {"image_url": SOURCE}),
                        ("/inpainting", {"image_url": SOURCE, "mask_url": mask})):
        own = first_png(ok(served, path, seed=5, num_inference_steps=4, **extra))
        euler_a = [first_png(ok(served, path, seed=5, num_inference_steps=4, scheduler="Euler A", **extra))
                   for _ in range(2)]
        assert euler_a[0] == euler_a[1] != own
    streamed = served.client.post("/stream", json={"prompt": "a red circle on a blue background", **SMALL, "seed": 7,
                                                   "scheduler": "DDIM"})
    result = streamed.text.rpartition("event: result\ndata: ")[2]
    import json

    assert first_png(json.loads(result)) == first_png(ok(served, seed=7, scheduler="DDIM"))


def test_the_log_line_of_a_generation_names_its_scheduler(served, caplog):
    with caplog.at_level("INFO", logger="serving.generate"):
        ok(served, seed=1, scheduler="Euler A")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("generate[") and ": started, 2 step(s) x 1 image(s) at 64x64, scheduler Euler A (waited"
               in m for m in messages)


# The schedulers of the model families served: the demo's, SDXL's and SD 1.5's configs as published.
DEMO_CONFIG = {"_class_name": "DPMSolverMultistepScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
               "steps_offset": 1, "timestep_spacing": "trailing"}
SDXL_CONFIG = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
               "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
               "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
SD15_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
               "steps_offset": 1, "trained_betas": None, "clip_sample": False}


def scheduler_of(config: dict):
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


@pytest.mark.parametrize("config", [DEMO_CONFIG, SDXL_CONFIG, SD15_CONFIG], ids=["demo", "sdxl", "sd15"])
def test_every_name_either_runs_every_step_count_or_is_refused_up_front(config):
    schedulers = Schedulers(scheduler_of(config))
    assert list(schedulers.choices) == FALS_SCHEDULERS
    for name in FALS_SCHEDULERS:
        built = schedulers.build(name)
        assert type(built).__name__ == DISCRETE[name].cls
        assert built.config.prediction_type == config.get("prediction_type", "epsilon")  # the model's, kept
        for steps in range(1, 101):
            try:
                schedulers.check(name, steps)
            except FieldException as refused:
                assert name.startswith(("LCM", "TCD")) and steps > 50
                assert refused.field == "num_inference_steps"
                assert refused.message == f'num_inference_steps: the "{name}" scheduler runs at most 50 steps ' \
                                          "(its original_inference_steps)"
                continue
            built.set_timesteps(steps, device="cpu")


def test_the_names_fix_what_they_say_and_nothing_else():
    karras_model = Schedulers(scheduler_of({**DEMO_CONFIG, "use_karras_sigmas": True}))
    assert karras_model.build("DPM++ 2M").config.use_karras_sigmas is False
    assert karras_model.build("DPM++ 2M Karras").config.use_karras_sigmas is True
    sde = karras_model.build("DPM++ 2M SDE Karras").config
    assert (sde.algorithm_type, sde.solver_order, sde.use_karras_sigmas) == ("sde-dpmsolver++", 2, True)
    sdxl = Schedulers(scheduler_of(SDXL_CONFIG))
    assert sdxl.build("Euler").config.timestep_spacing == "leading"
    assert sdxl.build("Euler (trailing timesteps)").config.timestep_spacing == "trailing"
    assert sdxl.build("LCM (trailing timesteps)").config.timestep_spacing == "trailing"
    assert type(sdxl.build("Euler A")).__name__ == "EulerAncestralDiscreteScheduler"


def test_a_flow_matching_model_takes_euler_only_and_others_are_422_naming_the_field():
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedulers = Schedulers(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert list(schedulers.choices) == list(FLOW) == ["Euler"]
    schedulers.check("Euler", 28)
    euler = schedulers.build("Euler")
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.config.shift == 3.0
    with pytest.raises(FieldException) as refused:
        schedulers.check("DDIM", 28)
    assert refused.value.field == "scheduler"
    assert refused.value.message == ('scheduler "DDIM" does not apply to this model (its own scheduler is '
                                     'FlowMatchEulerDiscreteScheduler); those that do: "Euler", or null for the '
                                     "model's own")


def test_a_model_without_a_scheduler_takes_none():
    with pytest.raises(FieldException) as refused:
        Schedulers(None).check("Euler", 2)
    assert refused.value.message.endswith("(its own scheduler is none); those that do: none, or null for the model's own")
    Schedulers(None).check(None, 2)


def test_a_borrowed_scheduler_is_never_held_twice_at_once_and_is_reused_after():
    schedulers = Schedulers(scheduler_of(SDXL_CONFIG))
    held, release = [], threading.Barrier(4)

    def borrow():
        with schedulers.borrowed("Euler A") as scheduler:
            held.append(scheduler)
            release.wait(timeout=10)

    threads = [threading.Thread(target=borrow) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(s) for s in held}) == 4
    with schedulers.borrowed("Euler A") as again:
        assert any(again is s for s in held)  # an idle one, not a fifth


def test_the_view_runs_its_scheduler_and_leaves_the_pipeline_as_it_was(served):
    pipe = served.app.pipe
    own, config = pipe.scheduler, dict(pipe.config)
    ddim = Schedulers.for_pipeline(pipe).build("DDIM")
    view = with_scheduler(pipe, ddim)
    assert view.scheduler is ddim and list(view.config["scheduler"]) == ["diffusers", "DDIMScheduler"]
    assert pipe.scheduler is own and dict(pipe.config) == config
    assert view.unet is pipe.unet and view.text_encoder is pipe.text_encoder and view.vae is pipe.vae
    params = GenerationParams("a red circle on a blue background", "", 64, 64, 2, 5.0, seeds=(3,))
    [through_view] = generate(pipe, params, scheduler=ddim)
    assert pipe.scheduler is own and dict(pipe.config) == config
    [again] = generate(pipe, params, scheduler=Schedulers.for_pipeline(pipe).build("DDIM"))
    assert np.array_equal(np.asarray(through_view), np.asarray(again))


def test_the_flux_pipeline_runs_euler_as_its_own_scheduler(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    params = GenerationParams("a cat", "", 32, 32, 2, 1.0, seeds=(4,))
    [own] = generate(pipe, params)
    with Schedulers.for_pipeline(pipe).borrowed("Euler") as euler:
        [euler_image] = generate(pipe, params, scheduler=euler)
    assert euler is not pipe.scheduler
    assert np.array_equal(np.asarray(own), np.asarray(euler_image))


# --------------------------------------------------------------------------------------------------
# Long prompts: read whole in windows, or refused with a 422 naming the field, never cut


def demo_prompts(served) -> Prompts:
    return served.app._prompts


def test_the_demo_reads_windows_of_its_tokenizers_length_up_to_the_limit(served):
    prompts = demo_prompts(served)
    assert (prompts.kind, prompts.window, prompts.limit) == ("sd", 24, MAX_WINDOWS * 22)
    assert prompts.count("a red circle on a blue background") == 7
    assert prompts._tokenizers["tokenizer"] is not served.app.pipe.tokenizer  # a private copy


def test_a_prompt_that_fits_one_window_goes_to_diffusers_as_text_and_gives_the_same_image(served):
    prompts = demo_prompts(served)
    short = f"{PHRASE} {PHRASE}"
    assert prompts.inputs(served.app.pipe, short, "blurry") == {"prompt": short, "negative_prompt": "blurry"}
    params = GenerationParams(short, "", 64, 64, 2, 5.0, seeds=(8,))
    [plain] = generate(served.app.pipe, params)  # diffusers' own encoding
    assert np.array_equal(np.asarray(pixels(ok(served, prompt=short, seed=8)["images"][0]).convert("RGB")),
                          np.asarray(plain))


def test_the_words_after_the_first_window_change_the_image(served):
    head = " ".join([PHRASE] * 3)  # 24 tokens: past the 22 a window holds
    assert demo_prompts(served).count(head) > 22
    blue, green = f"{head} a red circle on a blue background", f"{head} a red circle on a green background"
    assert first_png(ok(served, prompt=blue, seed=9)) != first_png(ok(served, prompt=green, seed=9))
    assert first_png(ok(served, prompt=blue, seed=9)) == first_png(ok(served, prompt=blue, seed=9))
    # So does a long negative prompt's tail.
    assert (first_png(ok(served, seed=9, negative_prompt=blue)) != first_png(ok(served, seed=9, negative_prompt=green)))


def test_a_long_prompt_is_encoded_window_by_window_each_as_the_pipeline_encodes_a_window(served):
    pipe, prompts = served.app.pipe, demo_prompts(served)
    words = [PHRASE] * 5  # 40 tokens: 2 windows
    inputs = prompts.inputs(pipe, " ".join(words), "")
    assert set(inputs) == {"prompt_embeds", "negative_prompt_embeds"}
    assert inputs["prompt_embeds"].shape == inputs["negative_prompt_embeds"].shape == (1, 2 * 24, 64)
    ids = prompts._ids(" ".join(words))["tokenizer"]
    first = f"{PHRASE} {PHRASE} a red circle on a blue"  # the first window's 22 tokens
    assert prompts._ids(first)["tokenizer"] == ids[:22]
    [window], _ = pipe.encode_prompt(first, "cpu", 1, False)
    assert torch.allclose(inputs["prompt_embeds"][0, :24], window, atol=1e-6)
    empty, _ = pipe.encode_prompt("", "cpu", 1, False)
    assert torch.allclose(inputs["negative_prompt_embeds"][0, 24:], empty[0], atol=1e-6)


def test_a_long_prompt_in_a_batch_is_image_i_of_seed_plus_i(served):
    prompt = " ".join([PHRASE] * 4)
    singles = [ok(served, prompt=prompt, seed=70 + i)["images"][0] for i in range(2)]
    batch = ok(served, prompt=prompt, seed=70, num_images=2)["images"]
    for image, single in zip(batch, singles, strict=True):
        assert np.abs(levels(image) - levels(single)).max() <= BATCH_TOLERANCE_LEVELS


def test_long_prompts_for_image_to_image_and_inpainting(served):
    prompt = " ".join([PHRASE] * 4)
    for path, extra in (("/image-to-image", {}), ("/inpainting", {"mask_url": data_uri(PILImage.fromarray(MASK))})):
        ok(served, path, prompt=prompt, negative_prompt=prompt, image_url=SOURCE, seed=2, num_inference_steps=4,
           **extra)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("path", ["/", "/stream", "/image-to-image", "/inpainting"])
def test_a_prompt_longer_than_the_model_reads_is_422_naming_the_field_and_its_tokens(served, field, path):
    too_long = "x" * 200  # one letter a token (the demo has no merge for "xx"): 200 tokens
    tokens, limit = demo_prompts(served).count(too_long), demo_prompts(served).limit
    assert tokens == 200 > limit == 176
    extra = {"/image-to-image": {"image_url": SOURCE},
             "/inpainting": {"image_url": SOURCE, "mask_url": data_uri(PILImage.fromarray(MASK))}}.get(path, {})
    response = post(served, path, **{field: too_long, **extra})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"] == [{"loc": ["body", field], "msg": f"{field}: 200 tokens, the model reads at most "
                                          "176", "type": "prompt_too_long"}]
    assert response.headers["x-fal-billable-units"] == "0"


def test_a_prompt_at_the_limit_is_read(served):
    at_limit = "x" * 176
    assert demo_prompts(served).count(at_limit) == 176
    assert len(ok(served, prompt=at_limit, seed=1)["images"]) == 1


def test_sd_and_sdxl_window_layout_is_the_tokenizers_own_for_a_text_that_fits(served):
    from tiny_models import tiny_sdxl_pipeline

    sdxl = tiny_sdxl_pipeline()
    for pipe, names in ((served.app.pipe, ["tokenizer"]), (sdxl, ["tokenizer", "tokenizer_2"])):
        prompts = Prompts.for_pipeline(pipe)
        for text in ("", "a red circle", "a photo of an astronaut on a horse"):
            for name in names:
                tokenizer = getattr(pipe, name)
                rows, masks = prompts.windows(name, prompts._ids(text)[name], 1)
                expected = tokenizer(text, padding="max_length", max_length=prompts.window, truncation=True)
                assert rows == [expected.input_ids] and masks == [expected.attention_mask]


@pytest.mark.parametrize("force_zeros", [False, True])
def test_sdxl_one_window_encodes_as_diffusers_does_and_a_long_prompt_runs(force_zeros):
    from tiny_models import tiny_sdxl_pipeline

    from serving.img2img import build_image_pipelines

    pipe = tiny_sdxl_pipeline(force_zeros_for_empty_prompt=force_zeros)
    pipe.set_progress_bar_config(disable=True)
    prompts = Prompts.for_pipeline(pipe)
    assert (prompts.kind, prompts.window, prompts.limit) == ("sdxl", 77, 600)
    text = "a photo of an astronaut on a horse"
    embeds, pooled = prompts._sdxl(pipe, prompts._ids(text), 1)
    negative, negative_pooled = prompts._sdxl(pipe, prompts._ids("a cat"), 1)
    theirs = pipe.encode_prompt(text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                negative_prompt="a cat")
    for ours, expected in zip((embeds, negative, pooled, negative_pooled), theirs, strict=True):
        assert torch.equal(ours, expected)
    long = " ".join(["a photo of an astronaut on a horse,"] * 12)  # 96 tokens: 2 windows
    assert prompts.count(long) > 75
    inputs = prompts.inputs(pipe, long, "")
    assert inputs["prompt_embeds"].shape == (1, 2 * 77, 64) and inputs["pooled_prompt_embeds"].shape == (1, 32)
    zeros = not inputs["negative_prompt_embeds"].any() and not inputs["negative_pooled_prompt_embeds"].any()
    assert zeros is force_zeros  # an empty negative prompt: zeros where the model says so, as diffusers does
    params = GenerationParams(long, "", 64, 64, 2, 5.0, seeds=(1, 2))
    assert len(generate(pipe, params, prompts=prompts)) == 2
    image_to_image = build_image_pipelines(pipe).image_to_image
    picture = PILImage.new("RGB", (64, 64), (120, 30, 200))
    edited = GenerationParams(long, long, 64, 64, 4, 5.0, seeds=(3,), image=picture, strength=0.5,
                              scheduler="Euler A")
    with Schedulers.for_pipeline(pipe).borrowed("Euler A") as euler_a:
        assert len(generate(image_to_image, edited, prompts=prompts, scheduler=euler_a)) == 1


def test_flux_reads_its_t5_limit_and_refuses_beyond_it(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    prompts = Prompts.for_pipeline(pipe)
    assert (prompts.kind, prompts.limit) == ("flux", FLUX_T5_TOKENS - 1)
    assert prompts.inputs(pipe, "a cat", "") == {"prompt": "a cat", "negative_prompt": None}  # Flux encodes its own
    word = "cat "
    per_word = prompts.count(word * 10) / 10
    fits, beyond = word * int(511 // per_word), word * int(600 // per_word)
    assert prompts.count(fits) <= 511 < prompts.count(beyond)
    prompts.check("prompt", fits)
    with pytest.raises(FieldException) as refused:
        prompts.check("prompt", beyond)
    assert (refused.value.field, refused.value.message) == (
        "prompt", f"prompt: {prompts.count(beyond)} tokens, the model reads at most 511")


def test_a_pipeline_without_tokenizers_checks_nothing():
    class Stand:
        pass

    prompts = Prompts.for_pipeline(Stand())
    assert prompts.kind == "none"
    prompts.check("prompt", "x" * 100_000)
