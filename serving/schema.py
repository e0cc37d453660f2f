"""The public request/response models: fal's text-to-image and image-to-image conventions, bounds
from ``[serving]``. The fields every generating endpoint shares are one base model
(``GenerationInput``); POST /'s ``TextToImageInput`` is it as it is, ``ImageToImageInput`` adds
``image_url`` and ``strength`` (and takes its ``image_size`` from the input image when absent),
``InpaintInput`` adds ``mask_url``.

The request models depend on the settings (bounds, presets, defaults), so they are built by
:func:`request_models` for one :class:`~serving.settings.ServingSettings` (cached per value):
any profile's schema can be built side by side, without reloading a module. The response models
do not depend on the settings and are plain module-level classes.

Numbers and booleans are strict: "5" or true for a number and "yes" or 1 for a boolean are refused;
an integer is still a valid float (guidance_scale 7), and 5.0 a valid integer (as in JSON Schema).
"""

import threading
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from fal.toolkit import Image, ImageField, ImageSizeConstraints, ImageSizeField
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conversion.sources import LoraPathError, parse_lora_path
from serving.prompts import FLUX_T5_TOKENS, MAX_WINDOWS
from serving.schedulers import SCHEDULER_NAMES, SchedulerName
from serving.settings import PIXEL_MULTIPLE, LoraSettings, ModelSettings, PresetName, ServingSettings

# The largest integer a JSON number carries exactly in every client (JavaScript's 2**53 - 1).
MAX_SEED = 2**53 - 1


def _no_text_or_boolean(value: Any) -> Any:
    if isinstance(value, str | bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


# An integer of a request: a JSON integer, or a number without a fraction (JSON Schema's integer);
# never a string or a boolean, which pydantic's lax mode would convert.
RequestInt = Annotated[int, BeforeValidator(_no_text_or_boolean)]


@dataclass(frozen=True)
class RequestModels:
    """The request models of one ``[serving]`` (and ``[lora]``) table (the classes fal's OpenAPI
    names). ``Loras`` is the type of the ``loras`` field, bounds and documentation included: any
    endpoint's input model takes LoRAs by declaring ``loras: models.Loras``."""

    ImageSize: type[BaseModel]
    LoraWeight: type[BaseModel]
    Loras: Any
    TextToImageInput: type[BaseModel]
    ImageToImageInput: type[BaseModel]
    InpaintInput: type[BaseModel]


_built: dict[str, RequestModels] = {}
_building = threading.Lock()


@dataclass(frozen=True)
class ConditionChoices:
    """What a request may name in ``controlnets`` and ``ip_adapter``: the sources of fal.toml's
    ``[[model.controlnets]]`` and ``[[model.ip_adapters]]`` (none: the request models lack the field)."""

    controlnets: tuple[str, ...] = ()
    ip_adapters: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: ModelSettings) -> "ConditionChoices":
        return cls(tuple(net.source for net in model.controlnets), tuple(a.source for a in model.ip_adapters))


def request_models(serving: ServingSettings, safety_checker: bool = True, lora: LoraSettings | None = None,
                   conditions: ConditionChoices | None = None) -> RequestModels:
    """The request models whose bounds, defaults and presets are ``serving``'s (and whose
    ``loras`` are bounded by ``lora``, default ``[lora]``'s defaults); the same classes for equal
    settings, so an app and its tests share them. ``safety_checker``: whether the app has a
    checker (fal.toml's ``[safety_checker]`` is not ``"none"``), which the schema says.
    ``conditions``: the ControlNets and IP-Adapters a request may name (default: none)."""
    lora, conditions = lora or LoraSettings(), conditions or ConditionChoices()
    key = f"{serving.model_dump_json()} checker={safety_checker} lora={lora.model_dump_json()} {conditions!r}"
    with _building:
        if key not in _built:
            _built[key] = _build_request_models(serving, safety_checker, lora, conditions)
        return _built[key]


def _build_request_models(serving: ServingSettings, safety_checker: bool, lora: LoraSettings,
                          conditions: ConditionChoices) -> RequestModels:
    class ImageSize(BaseModel):
        model_config = ConfigDict(extra="forbid")

        width: RequestInt = Field(
            ge=serving.min_side,
            le=serving.max_side,
            multiple_of=PIXEL_MULTIPLE,
            description=f"Width of the image in pixels: a multiple of {PIXEL_MULTIPLE}, at most "
            f"{serving.max_pixels} pixels in all.",
            examples=[serving.presets.landscape_4_3.width],
        )
        height: RequestInt = Field(
            ge=serving.min_side,
            le=serving.max_side,
            multiple_of=PIXEL_MULTIPLE,
            description=f"Height of the image in pixels: a multiple of {PIXEL_MULTIPLE}, at most "
            f"{serving.max_pixels} pixels in all.",
            examples=[serving.presets.landscape_4_3.height],
        )

        @model_validator(mode="after")
        def _within_pixel_limit(self) -> "ImageSize":
            if self.width * self.height > serving.max_pixels:
                raise ValueError(
                    f"{self.width}x{self.height} is {self.width * self.height} pixels, "
                    f"more than the limit of {serving.max_pixels}"
                )
            return self

    def image_size_kind(value: Any) -> str | None:
        if isinstance(value, str):
            return "preset"
        if isinstance(value, dict | ImageSize):
            return "custom"
        return None

    preset_text = ", ".join(f"{name} ({s.width}x{s.height})" for name, s in serving.presets)
    ImageSizeInput = Annotated[
        Annotated[PresetName, Tag("preset")] | Annotated[ImageSize, Tag("custom")],
        Discriminator(
            image_size_kind,
            custom_error_type="image_size_type",
            custom_error_message="image_size must be a preset name or an object {width, height}",
        ),
    ]

    LoraWeight, Loras = _lora_models(lora)

    def image_size_field(default: Any, absent: str) -> Any:
        return ImageSizeField(
            default=default,
            constraints=ImageSizeConstraints(
                min_width=serving.min_side, max_width=serving.max_side, min_height=serving.min_side,
                max_height=serving.max_side, max_area=serving.max_pixels, multiple_of=PIXEL_MULTIPLE,
            ),
            description=f"A preset name -- {preset_text} -- or an object {{width, height}}.{absent}",
            examples=[serving.default_image_size, {"width": serving.presets.landscape_4_3.width,
                                                   "height": serving.presets.landscape_4_3.height}],
        )

    # The fields every generating endpoint shares (POST /, /stream, /image-to-image, /inpainting), with their bounds.
    class GenerationInput(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str = Field(
            min_length=1,
            max_length=serving.max_prompt_length,
            description=f"What the image should show. {PROMPT_TOKENS}",
            examples=["a lighthouse on a cliff at sunset, oil painting"],
        )
        negative_prompt: str = Field(
            default="",
            max_length=serving.max_prompt_length,
            description=f"What the image should not show (empty: nothing). {PROMPT_TOKENS}",
            examples=["blurry, low quality"],
        )
        image_size: ImageSizeInput = image_size_field(serving.default_image_size, "")
        num_inference_steps: RequestInt = Field(
            default=serving.default_steps,
            ge=1,
            le=serving.max_steps,
            description="Denoising steps: more is slower and usually more detailed.",
            examples=[serving.default_steps],
        )
        guidance_scale: float = Field(
            default=serving.default_guidance_scale,
            strict=True,
            ge=0,
            le=serving.max_guidance_scale,
            allow_inf_nan=False,
            description="How closely the image follows the prompt (classifier-free guidance; <= 1 turns it off).",
            examples=[serving.default_guidance_scale],
        )
        # RequestInt spelled out: bounds before the validator keep them in the schema of an optional field.
        seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_no_text_or_boolean)] | None = Field(
            default=None,
            description="Seed of the noise. The same seed and inputs give the same image; absent: a fresh random "
            "seed, returned in the response. Image i of a request uses seed + i.",
            examples=[42],
        )
        num_images: RequestInt = Field(
            default=1,
            ge=1,
            le=4,
            description="How many images to generate (image i uses seed + i, so each can be reproduced alone).",
            examples=[1],
        )
        scheduler: SchedulerName | None = Field(
            default=None,
            description=SCHEDULER_TEXT,
            examples=["DPM++ 2M Karras"],
        )
        output_format: Literal["jpeg", "png", "webp"] = Field(
            default="jpeg",
            description="Encoding of the images: jpeg (quality 95), png (lossless) or webp (lossy, quality 80).",
            examples=["jpeg"],
        )
        sync_mode: bool = Field(
            default=False,
            strict=True,
            description="Return the images inline as data: URIs instead of uploading them to fal's CDN "
            "(larger response; the images are not stored).",
            examples=[False],
        )
        enable_safety_checker: bool = Field(
            default=True,
            strict=True,
            description=CHECKER_ON if safety_checker else CHECKER_NONE,
            examples=[True],
        )
        loras: Loras

        @field_validator("prompt")
        @classmethod
        def _prompt_has_text(cls, value: str) -> str:
            if not any(_is_visible(ch) for ch in value):
                raise ValueError(
                    "prompt must contain some non-whitespace text (spaces and control characters do not count)"
                )
            return value

    condition_fields = _condition_fields(conditions)
    if condition_fields:  # the shared fields, and the request's ControlNets and IP-Adapter
        GenerationInput = create_model("GenerationInput", __base__=GenerationInput, **condition_fields)  # type: ignore[call-overload]  # noqa: N806

    class TextToImageInput(GenerationInput):  # type: ignore[valid-type,misc]
        pass

    class ImageToImageInput(GenerationInput):  # type: ignore[valid-type,misc]
        # The input images first in the schema, as on fal's own endpoints (its playground follows this order).
        model_config = ConfigDict(extra="forbid", json_schema_extra=_images_first)

        # image_size is the one shared field whose default differs: the input image's own size.
        image_size: ImageSizeInput | None = image_size_field(
            None, " Absent or null: the input image's own size, rounded down to multiples of "
            f"{PIXEL_MULTIPLE} (it must then be within these bounds). The input is resized to this size.")
        image_url: ImageUrl = ImageField(
            description="The image to start from: an https:// URL or a data: URI (e.g. fal_client.encode_image). "
            f"PNG, JPEG, WebP, GIF or BMP, 8-bit, at most {serving.max_pixels} pixels; transparency is "
            "flattened onto white.",
            examples=[EXAMPLE_IMAGE_URL],
            json_schema_extra={"pattern": URL_PATTERN},
        )
        strength: float = Field(
            default=DEFAULT_STRENGTH,
            strict=True,
            gt=0,
            le=1,
            allow_inf_nan=False,
            description="How much to change the image: near 0 keeps it, 1 repaints it from noise. Of "
            "num_inference_steps, the last strength x num_inference_steps are run (at least one).",
            examples=[DEFAULT_STRENGTH],
        )

        @field_validator("strength")
        @classmethod
        def _runs_a_step(cls, value: float, info: ValidationInfo) -> float:
            steps = info.data.get("num_inference_steps")
            if steps is not None and int(steps * value) < 1:
                raise ValueError(f"strength {value} of {steps} num_inference_steps runs no denoising step: "
                                 "strength x num_inference_steps must be at least 1")
            return value

    class InpaintInput(ImageToImageInput):
        mask_url: ImageUrl = ImageField(
            description="Where to repaint: a mask of the image's size (https:// URL or data: URI), white where the "
            "image is repainted and black where it is kept (grays blend; transparency counts as black). The "
            "kept pixels come back exactly as sent.",
            examples=[EXAMPLE_MASK_URL],
            json_schema_extra={"pattern": URL_PATTERN},
        )

    return RequestModels(ImageSize=ImageSize, LoraWeight=LoraWeight, Loras=Loras, TextToImageInput=TextToImageInput,
                         ImageToImageInput=ImageToImageInput, InpaintInput=InpaintInput)


def _images_first(schema: dict[str, Any]) -> None:
    """Order a request schema's properties with image_url and mask_url first (display only)."""
    properties = schema.get("properties", {})
    first = [name for name in ("image_url", "mask_url") if name in properties]
    schema["properties"] = {name: properties[name] for name in [*first, *(n for n in properties if n not in first)]}


def _checked_url(value: str, info: ValidationInfo) -> str:
    from serving.images import url_problem

    problem = url_problem(value, info.field_name or "image URL")
    if problem:
        raise ValueError(problem)
    return value


# An input image's URL in a request (image_url, mask_url, a ControlNet's image_url, ip_adapter_image_url):
# https:// or data:, checked by serving.images.url_problem, which names the field.
ImageUrl = Annotated[str, AfterValidator(_checked_url)]


# What an image URL of a request starts with (the schema's pattern; serving.images.url_problem checks it).
URL_PATTERN = "^(https://|data:)"
# fal's defaults and examples for its image-to-image and inpainting endpoints (fal-ai/fast-sdxl/image-to-image,
# /inpainting: strength 0.95; the example images of their docs, which are diffusers' inpainting examples).
DEFAULT_STRENGTH = 0.95
EXAMPLE_IMAGE_URL = ("https://raw.githubusercontent.com/CompVis/latent-diffusion/main/data/inpainting_examples/"
                     "overture-creations-5sI6fQgYIuo.png")
EXAMPLE_MASK_URL = ("https://raw.githubusercontent.com/CompVis/latent-diffusion/main/data/inpainting_examples/"
                    "overture-creations-5sI6fQgYIuo_mask.png")


# An example LoRA path for the schema: a LoRA file in a Hub repo (fal's examples are URLs; either works).
LORA_EXAMPLE_PATH = "https://huggingface.co/ByteDance/Hyper-SD/resolve/main/Hyper-SDXL-8steps-lora.safetensors"


def _lora_models(lora: LoraSettings) -> tuple[type[BaseModel], Any]:
    """fal's ``LoraWeight`` (``path``, ``scale``) within ``lora``'s bounds, and the type of a
    request's ``loras`` list."""

    class LoraWeight(BaseModel):
        model_config = ConfigDict(extra="forbid")

        path: str = Field(
            min_length=1,
            description="URL or the path to the LoRA weights: an https:// URL of a .safetensors file (or a data: URI), "
            "a Hugging Face repo id org/name (its pytorch_lora_weights.safetensors, else its only .safetensors file), "
            "or a file in a repo, org/name/dir/file.safetensors; org/name@revision/... pins a revision. Fetched once "
            f"(at most {lora.max_file_mb} MiB) and kept on the server; it must be a LoRA for this model's "
            "architecture.",
            examples=[LORA_EXAMPLE_PATH, "ByteDance/Hyper-SD/Hyper-SDXL-8steps-lora.safetensors"],
        )
        scale: float = Field(
            default=1.0,
            strict=True,
            ge=0,
            le=lora.max_scale,
            allow_inf_nan=False,
            description="The scale of the LoRA weight: how strongly it changes the model (0: not at all, 1: as "
            "trained). It applies to this request only.",
            examples=[1.0],
        )

        @field_validator("path")
        @classmethod
        def _fetchable(cls, value: str) -> str:
            try:
                parse_lora_path(value)
            except LoraPathError as exc:
                raise ValueError(str(exc)) from None
            return value

    loras_text = (f"at most {lora.max_loras}" if lora.max_loras else "none: this deployment takes no LoRAs")
    Loras = Annotated[
        list[LoraWeight],
        Field(
            default_factory=list,
            max_length=lora.max_loras,
            description=f"The LoRAs to apply for this request, {loras_text}, each with its scale: loaded before the "
            "generation and removed after it, so they change this request's images only.",
            examples=[[], [{"path": LORA_EXAMPLE_PATH, "scale": 1.0}]],
        ),
    ]
    return LoraWeight, Loras


# Bounds of a request's ControlNet and IP-Adapter entries. fal's schemas give defaults (1.0, 0.0, 1.0,
# 1.0) but no upper bounds; beyond 2 both only break the image.
MAX_CONDITIONING_SCALE = 2.0
MAX_IP_ADAPTER_SCALE = 2.0
# An example control image for the schema: diffusers' ControlNet documentation's input.
EXAMPLE_CONTROL_URL = "https://hf.co/datasets/huggingface/documentation-images/resolve/main/diffusers/input_image_vermeer.png"


def _condition_fields(choices: ConditionChoices) -> dict[str, Any]:
    """The ``controlnets`` and ``ip_adapter`` fields of fal's text-to-image apps, for the
    configured ones (an empty dict when none are): each entry's ``path`` is one of them."""
    fields: dict[str, Any] = {}
    if choices.controlnets:

        class ControlNetInput(BaseModel):
            model_config = ConfigDict(extra="forbid")

            path: Literal[choices.controlnets] = Field(  # type: ignore[valid-type]
                description="Which ControlNet: one this deployment serves (fal.toml's [[model.controlnets]] source).",
                examples=[choices.controlnets[0]], json_schema_extra={"enum": list(choices.controlnets)})
            image_url: ImageUrl = ImageField(
                description="The control image (an https:// URL or a data: URI), resized to the output size: an edge, "
                "depth or pose map as the ControlNet expects it, or a photo where the ControlNet's preprocess is "
                "canny (its edges are taken). Checked as image_url of image-to-image is.",
                examples=[EXAMPLE_CONTROL_URL], json_schema_extra={"pattern": URL_PATTERN})
            conditioning_scale: float = Field(
                default=1.0, strict=True, ge=0, le=MAX_CONDITIONING_SCALE, allow_inf_nan=False,
                description="How strongly the control image steers the image (0: not at all).", examples=[1.0])
            start_percentage: float = Field(
                default=0.0, strict=True, ge=0, le=1, allow_inf_nan=False,
                description="When the ControlNet starts applying, as a fraction of the denoising steps.",
                examples=[0.0])
            end_percentage: float = Field(
                default=1.0, strict=True, ge=0, le=1, allow_inf_nan=False,
                description="When the ControlNet stops applying, as a fraction of the denoising steps (after "
                "start_percentage).", examples=[1.0])

            @model_validator(mode="after")
            def _starts_before_it_ends(self) -> "ControlNetInput":
                if self.start_percentage >= self.end_percentage:
                    raise ValueError(f"start_percentage ({self.start_percentage}) must be less than end_percentage "
                                     f"({self.end_percentage})")
                return self

        fields["controlnets"] = (list[ControlNetInput], Field(
            default_factory=list, max_length=len(choices.controlnets),
            description=f"The ControlNets to apply (at most {len(choices.controlnets)}), each with its control image: "
            "they steer where things go. This deployment serves: " + ", ".join(choices.controlnets) + ".",
            examples=[[], [{"path": choices.controlnets[0], "image_url": EXAMPLE_CONTROL_URL}]]))
    if choices.ip_adapters:

        class IPAdapterInput(BaseModel):
            model_config = ConfigDict(extra="forbid")

            path: Literal[choices.ip_adapters] = Field(  # type: ignore[valid-type]
                description="Which IP-Adapter: one this deployment serves (fal.toml's [[model.ip_adapters]] source).",
                examples=[choices.ip_adapters[0]], json_schema_extra={"enum": list(choices.ip_adapters)})
            ip_adapter_image_url: ImageUrl = ImageField(
                description="The image prompt (an https:// URL or a data: URI): its content and style steer the "
                "image. Checked as image_url of image-to-image is.",
                examples=[EXAMPLE_IMAGE_URL], json_schema_extra={"pattern": URL_PATTERN})
            scale: float = Field(
                default=1.0, strict=True, ge=0, le=MAX_IP_ADAPTER_SCALE, allow_inf_nan=False,
                description="How strongly the image prompt steers the image (0: not at all; around 0.5 balances it "
                "with the text prompt).", examples=[1.0])

        fields["ip_adapter"] = (list[IPAdapterInput], Field(
            default_factory=list, max_length=1,
            description="An image prompt: at most one IP-Adapter with its image. This deployment serves: "
            + ", ".join(choices.ip_adapters) + ".",
            examples=[[], [{"path": choices.ip_adapters[0], "ip_adapter_image_url": EXAMPLE_IMAGE_URL, "scale": 0.7}]]))
    return fields


def _is_visible(ch: str) -> bool:
    """Neither whitespace nor a control, format, surrogate, private-use or unassigned character."""
    return not ch.isspace() and unicodedata.category(ch)[0] != "C"


# What the prompts' descriptions say about tokens (serving.prompts).
PROMPT_TOKENS = (f"Read whole, never cut: SD and SDXL read a prompt longer than their text encoders' window (77 "
                 f"tokens) window by window, up to {MAX_WINDOWS} windows (600 tokens); Flux's T5 encoder reads up to "
                 f"{FLUX_T5_TOKENS - 1} tokens. A longer one is refused (422).")
# What the scheduler field says (serving.schedulers).
SCHEDULER_TEXT = ("The scheduler (sampler) of the denoising loop, by fal's names: "
                  + ", ".join(SCHEDULER_NAMES) + ". Absent or null: the model's own scheduler. A model trained on "
                  "flow matching (Flux) takes only \"Euler\"; LCM and TCD run at most 50 steps (their original_inference_steps).")


# What enable_safety_checker means, with a checker and without one (fal.toml: [safety_checker] source = "none").
CHECKER_ON = ("Run the safety checker on the images: an image it flags is replaced by a black image of the same "
              "size, and has_nsfw_concepts says which. false: the images are returned unchecked.")
CHECKER_NONE = ("This deployment has no safety checker ([safety_checker] source = \"none\"): images are never "
                "checked, whatever this says, and has_nsfw_concepts is always false.")


class TextToImageOutput(BaseModel):
    images: list[Image] = Field(
        description="The generated images.",
        examples=[[{"url": "https://v3.fal.media/files/elephant/lighthouse.jpeg", "width": 1024,
                    "height": 1024, "content_type": "image/jpeg"}]],
    )
    has_nsfw_concepts: list[bool] = Field(
        description="One per image, in order: whether the safety checker flagged it (and it was replaced by a "
        "black image). All false when enable_safety_checker was false or the deployment has no checker.",
        examples=[[False]],
    )
    seed: int = Field(description="The seed of the first image (image i used seed + i).", examples=[42])
    prompt: str = Field(description="The prompt the images were generated from.",
                        examples=["a lighthouse on a cliff at sunset, oil painting"])
    timings: dict[str, float] = Field(
        description="Seconds spent: reading the input images (read; image-to-image and inpainting, and any request "
        "with control or prompt images), waiting for "
        "the GPU (queue), generating (inference), running the safety checker (safety), encoding and uploading "
        "(encode).",
        examples=[{"queue": 0.0, "inference": 2.41, "safety": 0.05, "encode": 0.12}],
    )


class ImageToImageOutput(TextToImageOutput):
    """What POST /image-to-image and /inpainting (and its alias /inpaint) return: POST /'s answer (fal's image-to-image endpoints
    answer the same fields)."""


class RunnerLoad(BaseModel):
    """What this runner is busy with, as /health reports it."""

    lora_fetches: int = Field(description="LoRA fetches in flight on this runner.", examples=[1])
    lora_fetch_limit: int = Field(description="At most this many at once ([lora] max_fetches); more get 503.",
                                  examples=[4])
    worker_threads_busy: int = Field(description="Worker threads in use (requests running or waiting for the model).",
                                     examples=[2])
    worker_threads: int = Field(description="Worker threads in all.", examples=[40])
    saturated: bool = Field(description="True while every LoRA fetch slot or every worker thread is taken.",
                            examples=[False])


def runner_load(lora_fetches: int, lora_fetch_limit: int, threads_busy: int, threads: int) -> RunnerLoad:
    """The load /health reports; saturated when either pool is full."""
    return RunnerLoad(lora_fetches=lora_fetches, lora_fetch_limit=lora_fetch_limit, worker_threads_busy=threads_busy,
                      worker_threads=threads,
                      saturated=lora_fetches >= lora_fetch_limit or threads_busy >= threads)


class HealthOutput(BaseModel):
    status: Literal["ok"] = Field(description="'ok' once setup() has finished.", examples=["ok"])
    profile: str = Field(description="The fal.toml profile being served.", examples=["default"])
    model: str = Field(description="The model's source.", examples=["stabilityai/stable-diffusion-xl-base-1.0"])
    device: str = Field(description="Where the model runs.", examples=["cuda"])
    store: str = Field(description="The converted model directory loaded.",
                       examples=["/data/flashpack/stable-diffusion-xl-base-1.0"])
    safety_checker: str | None = Field(
        default=None,
        description="The converted safety checker directory loaded; null when the deployment has none.",
        examples=["/data/flashpack/safety-checker--CompVis--stable-diffusion-safety-checker-4f0c1e2d9a8b7c6d"],
    )
    setup_seconds: dict[str, float] = Field(
        description="Duration of each setup phase: lookup, store, load, warmup, total.",
        examples=[{"lookup": 0.01, "store": 0.0, "load": 1.9, "warmup": 1.2, "total": 3.4}],
    )
    load: RunnerLoad | None = Field(
        default=None, description="What the runner is busy with now.",
        examples=[{"lora_fetches": 0, "lora_fetch_limit": 4, "worker_threads_busy": 1, "worker_threads": 40,
                   "saturated": False}])


# What a request's image_size means in pixels


class _Size(Protocol):
    width: int
    height: int


def preset_size(name: PresetName, serving: ServingSettings) -> tuple[int, int]:
    """``(width, height)`` of the preset ``name`` under ``serving`` (a profile may remap presets)."""
    size = getattr(serving.presets, name)
    return size.width, size.height


def requested_size(image_size: PresetName | _Size, serving: ServingSettings) -> tuple[int, int]:
    """``(width, height)`` of a request's ``image_size``: a preset name or an ``ImageSize``."""
    if isinstance(image_size, str):
        return preset_size(image_size, serving)
    return image_size.width, image_size.height


def image_seeds(seed: int, count: int) -> list[int]:
    """Seed of each image: seed + i, wrapping within [0, MAX_SEED] so every one is a valid request seed."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]
