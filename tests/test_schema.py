"""serving.schema: the public request/response models, built directly from any profile's [serving]
table (no app, no module reload), and the sizes and seeds a request stands for."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.schema import (
    CHECKER_NONE,
    CHECKER_ON,
    MAX_SEED,
    HealthOutput,
    TextToImageOutput,
    image_seeds,
    request_models,
    requested_size,
)
from serving.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
DEMO = load_settings(REPO / "fal.toml", profile="demo").serving
DEFAULT = load_settings(REPO / "fal.toml", profile="").serving


def model_schema(serving, name: str) -> dict:
    if name in ("TextToImageOutput", "HealthOutput"):
        return {"TextToImageOutput": TextToImageOutput, "HealthOutput": HealthOutput}[name].model_json_schema()
    return getattr(request_models(serving), name).model_json_schema()


@pytest.mark.parametrize("serving", [DEMO, DEFAULT], ids=["demo", "default"])
@pytest.mark.parametrize("model", ["TextToImageInput", "TextToImageOutput", "ImageSize", "HealthOutput",
                                   "LoraWeight", "ImageToImageInput", "InpaintInput"])
def test_every_public_field_has_a_description_and_an_example(serving, model):
    properties = model_schema(serving, model)["properties"]
    undocumented = [name for name, prop in properties.items() if not prop.get("description")]
    without_example = [name for name, prop in properties.items() if not prop.get("examples")]
    assert undocumented == [] and without_example == []


@pytest.mark.parametrize(
    ("serving", "steps", "prompt", "x_fal"),
    [
        (DEMO, 25, 500, {"min_width": 32, "max_width": 512, "min_height": 32, "max_height": 512, "max_area": 131072,
                         "multiple_of": 8}),
        (DEFAULT, 60, 2000, {"min_width": 256, "max_width": 2048, "min_height": 256, "max_height": 2048,
                             "max_area": 2359296, "multiple_of": 8}),
    ],
    ids=["demo", "default"],
)
def test_each_profiles_schema_carries_its_own_bounds_side_by_side(serving, steps, prompt, x_fal):
    schema = request_models(serving).TextToImageInput.model_json_schema()
    props = schema["properties"]
    assert props["num_inference_steps"]["maximum"] == steps
    assert props["prompt"]["maxLength"] == prompt
    assert props["image_size"]["x-fal"] == x_fal
    assert schema["required"] == ["prompt"]
    assert schema["additionalProperties"] is False


def test_equal_settings_share_one_set_of_models_and_other_settings_get_their_own():
    same = load_settings(REPO / "fal.toml", profile="demo").serving
    assert request_models(same) is request_models(DEMO)
    assert request_models(DEFAULT).TextToImageInput is not request_models(DEMO).TextToImageInput


def test_enable_safety_checker_defaults_to_true_and_its_description_says_whether_there_is_a_checker():
    with_checker, without = request_models(DEMO).TextToImageInput, request_models(DEMO, safety_checker=False).TextToImageInput
    assert with_checker is not without and request_models(DEMO, safety_checker=True).TextToImageInput is with_checker
    assert with_checker.model_fields["enable_safety_checker"].description == CHECKER_ON
    assert without.model_fields["enable_safety_checker"].description == CHECKER_NONE
    assert "has_nsfw_concepts is always false" in CHECKER_NONE
    assert with_checker(prompt="a cat").enable_safety_checker is True


@pytest.mark.parametrize("value", ["true", 1, 0, None])
def test_enable_safety_checker_takes_a_json_boolean_only(value):
    with pytest.raises(ValidationError, match="valid boolean"):
        request_models(DEMO).TextToImageInput(prompt="a cat", enable_safety_checker=value)


def test_a_schema_built_for_changed_settings_enforces_them():
    serving = DEMO.model_copy(update={"max_steps": 3, "default_steps": 2, "max_prompt_length": 10})
    Input = request_models(serving).TextToImageInput
    assert Input(prompt="a cat").num_inference_steps == 2
    with pytest.raises(ValidationError, match="less than or equal to 3"):
        Input(prompt="a cat", num_inference_steps=4)
    with pytest.raises(ValidationError, match="at most 10 characters"):
        Input(prompt="a cat on a horse")
    assert request_models(DEMO).TextToImageInput(prompt="a cat", num_inference_steps=4).num_inference_steps == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "\u200b\t\u0007\u2028"}, "prompt must contain some non-whitespace text"),
        ({"image_size": {"width": 512, "height": 512}}, "512x512 is 262144 pixels, more than the limit of 131072"),
        ({"image_size": 5}, "image_size must be a preset name or an object {width, height}"),
        ({"image_size": "huge"}, "square_hd"),
        ({"seed": "5"}, "Input should be a valid integer"),
        ({"seed": True}, "Input should be a valid integer"),
        ({"num_images": 5}, "less than or equal to 4"),
        ({"guidance_scale": "7"}, "Input should be a valid number"),
        ({"sync_mode": 1}, "Input should be a valid boolean"),
        ({"steps": 4}, "Extra inputs are not permitted"),
    ],
    ids=["invisible-prompt", "pixel-limit", "size-type", "unknown-preset", "text-seed", "boolean-seed",
         "too-many-images", "text-guidance", "integer-boolean", "unknown-key"],
)
def test_a_request_outside_the_schema_is_refused_with_its_message(change, message):
    with pytest.raises(ValidationError) as err:
        request_models(DEMO).TextToImageInput.model_validate({"prompt": "a cat", **change})
    assert message in str(err.value)


def test_whole_numbers_are_integers_and_integers_are_numbers():
    request = request_models(DEMO).TextToImageInput.model_validate({"prompt": "a cat", "seed": 5.0,
                                                                    "guidance_scale": 7})
    assert request.seed == 5 and request.guidance_scale == 7.0
    assert request.image_size == "square_hd" and request.num_inference_steps == 20  # the demo's defaults


def test_requested_size_is_the_profiles_preset_or_the_given_size():
    models = request_models(DEMO)
    assert requested_size("portrait_16_9", DEMO) == (40, 64)
    assert requested_size("portrait_16_9", DEFAULT) == (576, 1024)
    assert requested_size(models.ImageSize(width=40, height=72), DEMO) == (40, 72)
    parsed = models.TextToImageInput.model_validate({"prompt": "a cat", "image_size": {"width": 64, "height": 32}})
    assert requested_size(parsed.image_size, DEMO) == (64, 32)


def test_image_seeds_wrap_inside_the_valid_range():
    assert image_seeds(7, 3) == [7, 8, 9]
    assert image_seeds(MAX_SEED, 2) == [MAX_SEED, 0]


def test_loras_follow_the_lora_settings_bounds():
    from serving.settings import LoraSettings

    Input = request_models(DEMO, lora=LoraSettings(max_loras=1, max_scale=2.0)).TextToImageInput
    loras = Input.model_json_schema()["properties"]["loras"]
    assert loras["maxItems"] == 1 and loras["items"] == {"$ref": "#/$defs/LoraWeight"}
    assert Input(prompt="a cat", loras=[{"path": "org/lora", "scale": 2.0}]).loras[0].scale == 2.0
    with pytest.raises(ValidationError, match="less than or equal to 2"):
        Input(prompt="a cat", loras=[{"path": "org/lora", "scale": 2.5}])
    with pytest.raises(ValidationError, match="at most 1 item"):
        Input(prompt="a cat", loras=[{"path": "org/a"}, {"path": "org/b"}])
    none = request_models(DEMO, lora=LoraSettings(max_loras=0)).TextToImageInput
    assert "takes no LoRAs" in none.model_json_schema()["properties"]["loras"]["description"]
    with pytest.raises(ValidationError, match="at most 0 items"):
        none(prompt="a cat", loras=[{"path": "org/a"}])


def test_another_endpoints_input_takes_loras_by_declaring_the_shared_type():
    from pydantic import BaseModel

    models = request_models(DEMO)

    class ImageToImageInput(BaseModel):
        prompt: str
        loras: models.Loras

    assert ImageToImageInput(prompt="a cat").loras == []
    parsed = ImageToImageInput(prompt="a cat", loras=[{"path": "org/lora/style.safetensors"}])
    assert isinstance(parsed.loras[0], models.LoraWeight) and parsed.loras[0].scale == 1.0
    with pytest.raises(ValidationError, match="http: URLs are not accepted"):
        ImageToImageInput(prompt="a cat", loras=[{"path": "http://example.com/a.safetensors"}])
