"""flashpack-t2i: a fal text-to-image app that starts cold in seconds.

Read top to bottom:
  1. settings   fal.toml, validated strictly, one profile chosen by APP_PROFILE (``demo`` = offline)
  2. schema     the public request/response models (fal's conventions, bounds from fal.toml)
  3. the app    setup(): lookup (+ start reading) -> store (acquire + convert once) -> load -> warm up;
                POST / generates images, GET|POST /health reports readiness and setup timings.

Run it: ``make serve`` (demo, offline), ``fal run flashpack-t2i`` (a fal runner),
``fal deploy flashpack-t2i``. Heavy libraries (torch, diffusers, most of conversion, model_loader)
are imported inside setup(): importing this file stays cheap, and the pack reads start before them.
Only conversion.sources (stdlib) is imported here, to check [model] when the settings load.
"""

import glob
import json
import logging
import os
import re
import threading
import time
import tomllib
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from secrets import randbelow, token_hex
from typing import Annotated, Any, Literal

import fal
from fal.toolkit import Image, ImageSizeConstraints, ImageSizeField
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conversion.errors import SourceError
from conversion.sources import parse_source

log = logging.getLogger("app")

APP_NAME = "flashpack-t2i"
HERE = Path(__file__).resolve().parent
SETTINGS_FILE = HERE / "fal.toml"
REQUIREMENTS_FILE = HERE / "requirements.txt"
# Local packages that travel with the deployment (uploaded as app files, importable on the runner).
LOCAL_PACKAGES = ["model_loader", "conversion"]
DEMO_SOURCE = "demo"
# The largest integer a JSON number carries exactly in every client (JavaScript's 2**53 - 1).
MAX_SEED = 2**53 - 1
PIXEL_MULTIPLE = 8
# Sanity bounds of [serving]: far beyond any real use, low enough that no setting is absurd.
MAX_STEPS_LIMIT = 1000
MAX_GUIDANCE_LIMIT = 100.0
MAX_SIDE_LIMIT = 8192
MAX_PROMPT_LIMIT = 100_000
# A 422 answer echoes at most this many characters of any input, and at most this many errors.
ECHO_CHARS = 100
MAX_ERRORS_SHOWN = 20


# --------------------------------------------------------------------------------------------------
# 1. Settings (fal.toml)


class SettingsError(ValueError):
    """fal.toml (or requirements.txt) is missing, malformed, or names an impossible value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


PresetName = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]


class SizeSetting(_Strict):
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class PresetSettings(_Strict):
    """What each of fal's preset names means in pixels (a profile may shrink them)."""

    square_hd: SizeSetting
    square: SizeSetting
    portrait_4_3: SizeSetting
    portrait_16_9: SizeSetting
    landscape_4_3: SizeSetting
    landscape_16_9: SizeSetting


class DeploySettings(_Strict):
    """fal.App settings: machine, scaling, timeouts, auth."""

    machine_type: str | list[str]
    keep_alive: int = Field(ge=0)
    min_concurrency: int = Field(default=0, ge=0)
    max_concurrency: int = Field(ge=1)
    max_multiplexing: int = Field(default=1, ge=1)
    request_timeout: int = Field(ge=1)
    startup_timeout: int = Field(ge=1)
    auth: Literal["private", "public", "shared"] = "private"

    @field_validator("machine_type")
    @classmethod
    def _machine_type_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError("must name a machine type (or a non-empty list of them)")
        return value

    @model_validator(mode="after")
    def _concurrency_order(self) -> "DeploySettings":
        if self.min_concurrency > self.max_concurrency:
            raise ValueError(f"min_concurrency ({self.min_concurrency}) exceeds max_concurrency ({self.max_concurrency})")
        return self


class ModelSettings(_Strict):
    """The model to serve: a source the store acquires and converts once (checked with
    conversion.sources' rules by :func:`load_settings`, see :func:`model_problem`)."""

    source: str = Field(min_length=1)
    revision: str | None = Field(default=None, min_length=1)
    variant: str | None = Field(default=None, min_length=1)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ServingSettings(_Strict):
    """Bounds of one request; they become the public schema."""

    max_prompt_length: int = Field(ge=1, le=MAX_PROMPT_LIMIT)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    default_steps: int = Field(ge=1, le=MAX_STEPS_LIMIT)
    max_steps: int = Field(ge=1, le=MAX_STEPS_LIMIT)
    default_guidance_scale: float = Field(ge=0, le=MAX_GUIDANCE_LIMIT, allow_inf_nan=False)
    max_guidance_scale: float = Field(ge=0, le=MAX_GUIDANCE_LIMIT, allow_inf_nan=False)
    min_side: int = Field(ge=PIXEL_MULTIPLE, le=MAX_SIDE_LIMIT, multiple_of=PIXEL_MULTIPLE)
    max_side: int = Field(ge=PIXEL_MULTIPLE, le=MAX_SIDE_LIMIT, multiple_of=PIXEL_MULTIPLE)
    max_pixels: int = Field(ge=PIXEL_MULTIPLE * PIXEL_MULTIPLE, le=MAX_SIDE_LIMIT * MAX_SIDE_LIMIT)
    default_image_size: PresetName
    output: Literal["cdn", "data_uri"] = "cdn"
    warmup_sizes: list[PresetName] = []
    warmup_steps: int = Field(default=1, ge=1)
    presets: PresetSettings

    @model_validator(mode="after")
    def _consistent(self) -> "ServingSettings":
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) exceeds max_steps ({self.max_steps})")
        if self.default_guidance_scale > self.max_guidance_scale:
            raise ValueError(
                f"default_guidance_scale ({self.default_guidance_scale}) exceeds "
                f"max_guidance_scale ({self.max_guidance_scale})"
            )
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) exceeds max_side ({self.max_side})")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        for name in PresetSettings.model_fields:
            size = getattr(self.presets, name)
            problem = size_problem(size.width, size.height, self)
            if problem:
                raise ValueError(f"presets.{name}: {problem}")
        return self


class AppSettings(_Strict):
    profile: str
    deploy: DeploySettings
    model: ModelSettings
    serving: ServingSettings


def size_problem(width: int, height: int, serving: ServingSettings) -> str | None:
    """Why ``width`` x ``height`` cannot be served under ``serving``'s bounds (None if it can)."""
    for side, value in (("width", width), ("height", height)):
        if value % PIXEL_MULTIPLE:
            return f"{side} {value} is not a multiple of {PIXEL_MULTIPLE}"
        if not serving.min_side <= value <= serving.max_side:
            return f"{side} {value} is outside [{serving.min_side}, {serving.max_side}]"
    if width * height > serving.max_pixels:
        return f"{width}x{height} is {width * height} pixels, more than the limit of {serving.max_pixels}"
    return None


_SECTIONS = ("deploy", "model", "serving")
_UNION_TAG = re.compile(r"^(str|int|list\[.*\]|function-.*)$")


def load_settings(path: str | os.PathLike[str] = SETTINGS_FILE, profile: str | None = None) -> AppSettings:
    """Read and validate ``path``; ``profile`` (default: $APP_PROFILE) overlays ``[profiles.<name>]``.

    Tables merge key by key, except ``[model]``, which a profile replaces whole. Any problem raises
    :class:`SettingsError` naming the file, the profile and the key.
    """
    path = Path(path)
    profile = (os.environ.get("APP_PROFILE", "") if profile is None else profile).strip() or "default"
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"{path}: settings file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None

    profiles = raw.pop("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(p, dict) for p in profiles.values()):
        raise SettingsError(f"{path}: [profiles] must hold one table per profile, e.g. [profiles.demo]")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise SettingsError(f"{path}: unknown table(s) {', '.join(unknown)} (tables: {', '.join(_SECTIONS)}, profiles)")
    merged = dict(raw)
    if profile != "default":
        if profile not in profiles:
            known = ", ".join(["default", *sorted(profiles)])
            raise SettingsError(f"{path}: APP_PROFILE={profile!r} is not a profile here (known: {known})")
        for section, overlay in profiles[profile].items():
            where = f"profiles.{profile}.{section}"
            if section not in _SECTIONS:
                raise SettingsError(f"{path}: unknown table [{where}] (tables: {', '.join(_SECTIONS)})")
            if not isinstance(overlay, dict):
                raise SettingsError(f"{path}: {where} must be a table")
            base = merged.get(section, {})
            merged[section] = overlay if section == "model" else _deep_merge(base, overlay)

    try:
        settings = AppSettings(profile=profile, **merged)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise SettingsError(f"{path} (profile {profile!r}): {problems}") from None
    problem = model_problem(settings.model)
    if problem is not None:
        key, message = problem
        raise SettingsError(f"{path} (profile {profile!r}): model.{key}: {message}")
    return settings


def model_problem(model: ModelSettings) -> tuple[str, str] | None:
    """The ``[model]`` key that cannot be served and why, by conversion.sources' rules; None if fine.

    ``source`` is checked alone, then with ``variant``, then with ``revision`` too, so the key
    named is the one that breaks it. A local directory must exist where the settings are loaded.
    """
    if model.source == DEMO_SOURCE:
        for key in ("revision", "variant"):
            if getattr(model, key) is not None:
                return key, f"the {DEMO_SOURCE!r} source has no {key}s; remove {key}"
        return None
    checks = [("source", {}), ("variant", {"variant": model.variant}),
              ("revision", {"variant": model.variant, "revision": model.revision})]
    for key, extra in checks:
        try:
            parse_source(model.source, **extra)
        except SourceError as exc:
            return key, str(exc)
    return None


def _deep_merge(base: Any, overlay: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(base, dict):
        return overlay
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def _describe(error: Any) -> str:
    """``serving.max_steps: <message>`` for one pydantic error (union branch tags left out)."""
    key = ".".join(str(part) for part in error["loc"] if not _UNION_TAG.match(str(part)))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif error["type"] == "finite_number":
        message = f"must be a finite number, got {error['input']}"
    return f"{key or '<top level>'}: {message}"


def read_requirements(path: str | os.PathLike[str] = REQUIREMENTS_FILE) -> list[str]:
    """The pip specifiers of ``path`` (comments and blank lines dropped), for ``fal.App.requirements``."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise SettingsError(f"{path}: requirements file not found (the fal runner installs from it)") from None
    requirements = []
    for number, line in enumerate(lines, 1):
        spec = line.split("#", 1)[0].strip()
        if spec.startswith("-"):
            raise SettingsError(f"{path}:{number}: pip options ({spec!r}) cannot be passed to fal; list packages only")
        if spec:
            requirements.append(spec)
    return requirements


SETTINGS = load_settings()
SERVING = SETTINGS.serving


# --------------------------------------------------------------------------------------------------
# 2. The public schema (fal's text-to-image conventions; bounds come from [serving]). Numbers and
#    booleans are strict: "5" or true for a number and "yes" or 1 for a boolean are refused; an
#    integer is still a valid float (guidance_scale 7), and 5.0 a valid integer (as in JSON Schema).


def _no_text_or_boolean(value: Any) -> Any:
    if isinstance(value, str | bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


# An integer of a request: a JSON integer, or a number without a fraction (JSON Schema's integer);
# never a string or a boolean, which pydantic's lax mode would convert.
RequestInt = Annotated[int, BeforeValidator(_no_text_or_boolean)]


class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: RequestInt = Field(
        ge=SERVING.min_side,
        le=SERVING.max_side,
        multiple_of=PIXEL_MULTIPLE,
        description=f"Width of the image in pixels: a multiple of {PIXEL_MULTIPLE}, at most "
        f"{SERVING.max_pixels} pixels in all.",
        examples=[SERVING.presets.landscape_4_3.width],
    )
    height: RequestInt = Field(
        ge=SERVING.min_side,
        le=SERVING.max_side,
        multiple_of=PIXEL_MULTIPLE,
        description=f"Height of the image in pixels: a multiple of {PIXEL_MULTIPLE}, at most "
        f"{SERVING.max_pixels} pixels in all.",
        examples=[SERVING.presets.landscape_4_3.height],
    )

    @model_validator(mode="after")
    def _within_pixel_limit(self) -> "ImageSize":
        if self.width * self.height > SERVING.max_pixels:
            raise ValueError(
                f"{self.width}x{self.height} is {self.width * self.height} pixels, "
                f"more than the limit of {SERVING.max_pixels}"
            )
        return self


def _image_size_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "preset"
    if isinstance(value, dict | ImageSize):
        return "custom"
    return None


_PRESET_TEXT = ", ".join(f"{name} ({s.width}x{s.height})" for name, s in SERVING.presets)
ImageSizeInput = Annotated[
    Annotated[PresetName, Tag("preset")] | Annotated[ImageSize, Tag("custom")],
    Discriminator(
        _image_size_kind,
        custom_error_type="image_size_type",
        custom_error_message="image_size must be a preset name or an object {width, height}",
    ),
]


class TextToImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        min_length=1,
        max_length=SERVING.max_prompt_length,
        description="What the image should show.",
        examples=["a lighthouse on a cliff at sunset, oil painting"],
    )
    negative_prompt: str = Field(
        default="",
        max_length=SERVING.max_prompt_length,
        description="What the image should not show (empty: nothing).",
        examples=["blurry, low quality"],
    )
    image_size: ImageSizeInput = ImageSizeField(
        default=SERVING.default_image_size,
        constraints=ImageSizeConstraints(
            min_width=SERVING.min_side, max_width=SERVING.max_side, min_height=SERVING.min_side,
            max_height=SERVING.max_side, max_area=SERVING.max_pixels, multiple_of=PIXEL_MULTIPLE,
        ),
        description=f"A preset name -- {_PRESET_TEXT} -- or an object {{width, height}}.",
        examples=[SERVING.default_image_size, {"width": SERVING.presets.landscape_4_3.width,
                                               "height": SERVING.presets.landscape_4_3.height}],
    )
    num_inference_steps: RequestInt = Field(
        default=SERVING.default_steps,
        ge=1,
        le=SERVING.max_steps,
        description="Denoising steps: more is slower and usually more detailed.",
        examples=[SERVING.default_steps],
    )
    guidance_scale: float = Field(
        default=SERVING.default_guidance_scale,
        strict=True,
        ge=0,
        le=SERVING.max_guidance_scale,
        allow_inf_nan=False,
        description="How closely the image follows the prompt (classifier-free guidance; <= 1 turns it off).",
        examples=[SERVING.default_guidance_scale],
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
    output_format: Literal["jpeg", "png"] = Field(
        default="jpeg",
        description="Encoding of the images.",
        examples=["jpeg"],
    )
    sync_mode: bool = Field(
        default=False,
        strict=True,
        description="Return the images inline as data: URIs instead of uploading them to fal's CDN "
        "(larger response; the images are not stored).",
        examples=[False],
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not any(_is_visible(ch) for ch in value):
            raise ValueError("prompt must contain some non-whitespace text (spaces and control characters do not count)")
        return value


def _is_visible(ch: str) -> bool:
    """Neither whitespace nor a control, format, surrogate, private-use or unassigned character."""
    return not ch.isspace() and unicodedata.category(ch)[0] != "C"


class TextToImageOutput(BaseModel):
    images: list[Image] = Field(
        description="The generated images.",
        examples=[[{"url": "https://v3.fal.media/files/elephant/lighthouse.jpeg", "width": 1024,
                    "height": 1024, "content_type": "image/jpeg"}]],
    )
    seed: int = Field(description="The seed of the first image (image i used seed + i).", examples=[42])
    prompt: str = Field(description="The prompt the images were generated from.",
                        examples=["a lighthouse on a cliff at sunset, oil painting"])
    timings: dict[str, float] = Field(
        description="Seconds spent: waiting for the GPU (queue), generating (inference), encoding and "
        "uploading (encode).",
        examples=[{"queue": 0.0, "inference": 2.41, "encode": 0.12}],
    )


class HealthOutput(BaseModel):
    status: Literal["ok"] = Field(description="'ok' once setup() has finished.", examples=["ok"])
    profile: str = Field(description="The fal.toml profile being served.", examples=["default"])
    model: str = Field(description="The model's source.", examples=["stabilityai/stable-diffusion-xl-base-1.0"])
    device: str = Field(description="Where the model runs.", examples=["cuda"])
    store: str = Field(description="The converted model directory loaded.",
                       examples=["/data/flashpack/stable-diffusion-xl-base-1.0"])
    setup_seconds: dict[str, float] = Field(
        description="Duration of each setup phase: lookup, store, load, warmup, total.",
        examples=[{"lookup": 0.01, "store": 0.0, "load": 1.9, "warmup": 1.2, "total": 3.4}],
    )


# Request limits: the body size ([serving].max_request_bytes, 413) and short 422 answers.


class RequestBodyLimit:
    """ASGI middleware: answer 413 to an HTTP request whose body exceeds ``max_bytes``.

    A declared Content-Length is checked before anything is read; a body without one (chunked) is
    counted as it arrives. The body is read here in full (FastAPI reads it whole anyway) and then
    handed on unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(declared, scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: nobody left to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(None, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, declared: int | None, scope: Scope, receive: Receive, send: Send) -> None:
        size = f"is {declared} bytes, more than" if declared is not None else "exceeds"
        detail = f"the request body {size} the limit of {self.max_bytes} bytes ([serving] max_request_bytes in fal.toml)"
        response = JSONResponse({"detail": detail}, 413, headers={"x-fal-billable-units": "0"})
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The request's Content-Length when it has exactly one well-formed one, else None."""
    values = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
    return int(values[0]) if len(values) == 1 and values[0].strip().isdigit() else None


def short_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """``errors`` for a 422 answer that echoes no more than ECHO_CHARS of any input (values and
    key names) and at most MAX_ERRORS_SHOWN errors: a 10 MB prompt is not sent back."""
    shown = []
    for error in errors[:MAX_ERRORS_SHOWN]:
        error = dict(error)
        error["loc"] = [_shorten(part) if isinstance(part, str) else part for part in error.get("loc", ())]
        if "input" in error:
            error["input"] = _short_input(error["input"])
        shown.append(error)
    if len(errors) > MAX_ERRORS_SHOWN:
        shown.append({"type": "too_many_errors", "loc": ["body"], "input": None,
                      "msg": f"{len(errors) - MAX_ERRORS_SHOWN} more errors not shown"})
    return shown


def _short_input(value: Any) -> Any:
    """``value`` when it is short; else its first ECHO_CHARS characters (objects as JSON) and "..."."""
    if isinstance(value, str):
        return _shorten(value)
    if isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False, default=repr)
        return value if len(text) <= ECHO_CHARS else _shorten(text)
    return value


def _shorten(text: str) -> str:
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def preset_size(name: str) -> tuple[int, int]:
    size = getattr(SERVING.presets, name)
    return size.width, size.height


def requested_size(image_size: str | ImageSize) -> tuple[int, int]:
    if isinstance(image_size, ImageSize):
        return image_size.width, image_size.height
    return preset_size(image_size)


def image_seeds(seed: int, count: int) -> list[int]:
    """Seed of each image: seed + i, wrapping within [0, MAX_SEED] so every one is a valid request seed."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


# --------------------------------------------------------------------------------------------------
# 3. The app


class TextToImageApp(fal.App, name=APP_NAME):
    """Text-to-image on a FlashPack-converted diffusers pipeline."""

    machine_type = SETTINGS.deploy.machine_type
    keep_alive = SETTINGS.deploy.keep_alive
    min_concurrency = SETTINGS.deploy.min_concurrency
    max_concurrency = SETTINGS.deploy.max_concurrency
    max_multiplexing = SETTINGS.deploy.max_multiplexing
    request_timeout = SETTINGS.deploy.request_timeout
    startup_timeout = SETTINGS.deploy.startup_timeout
    app_auth = SETTINGS.deploy.auth
    requirements = read_requirements()
    app_files = LOCAL_PACKAGES
    settings = SETTINGS

    def _add_extra_middlewares(self, app: FastAPI) -> None:
        super()._add_extra_middlewares(app)
        app.add_middleware(RequestBodyLimit, max_bytes=self.settings.serving.max_request_bytes)  # outermost

    def _add_extra_routes(self, app: FastAPI) -> None:
        super()._add_extra_routes(app)
        # The last hook of fal's _build_app, after it registered its 422 handler: wrap that handler
        # so it keeps fal's format and headers but echoes only short inputs.
        fal_handler = app.exception_handlers[RequestValidationError]

        async def short_422(request: Any, exc: RequestValidationError) -> Any:
            return await fal_handler(request, RequestValidationError(short_validation_errors(exc.errors())))

        app.add_exception_handler(RequestValidationError, short_422)

    def setup(self) -> None:
        _configure_logging()
        started = time.perf_counter()
        self.phase_seconds: dict[str, float] = {}
        model = self.settings.model
        from conversion.store import Store, resolve_root, verify_mode  # torch-free, like all of "lookup"

        root = resolve_root()
        store = Store(root)

        # 1. lookup: a warm store entry, checked offline (sizes, small files' sha256), and the
        #    reads of its packs started at once: they are the load's first leg and run while
        #    torch, diffusers and transformers import. No network, no torch.
        reads = None
        with self._phase("lookup") as phase:
            source = warm_source(model, root)
            self.store_path = store.warm(source, model.dtype, verify_mode()) if source is not None else None
            device = early_device(model.device) if self.store_path is not None else None
            if device is not None:
                reads = start_reads(self.store_path, device)
            phase.detail = (f"{self.store_path}; {len(reads.names)} pack(s) reading in the background" if reads
                            else str(self.store_path) if self.store_path else "no store entry yet")

        # 2-3. store: acquire + convert once; a warm start has nothing to do here.
        with self._phase("store") as phase:
            if self.store_path is None:
                source = self._source(root)
                from conversion.store import ensure_converted

                self.store_path = Path(ensure_converted(source, root=root, dtype=model.dtype))
                phase.detail = str(self.store_path)
            else:
                phase.detail = "warm: found in lookup"

        # 4. load: finish the reads (each pack's checksum checked as its bytes pass) while the
        #    modules are built on the meta device; parameters become views of the packs' blocks.
        with self._phase("load") as phase:
            import torch

            from model_loader import ChecksumMismatchError

            imported_torch = time.perf_counter() - phase.started

            self.device = resolve_device(model.device)
            if reads is None:
                reads = start_reads(self.store_path, self.device)
            from model_loader import load_pipeline

            torch_dtype = getattr(torch, model.dtype)
            try:
                self.pipe = load_pipeline(self.store_path, device=self.device, torch_dtype=torch_dtype, reads=reads)
            except Exception as exc:  # a damaged entry is rebuilt on this start; anything else is raised
                reads.cancel()
                problem = str(exc) if isinstance(exc, ChecksumMismatchError) else store_problem(self.store_path)
                if problem is None:
                    raise
                self.store_path = self._rebuild(store, root, problem)
                self.pipe = load_pipeline(self.store_path, device=self.device, torch_dtype=torch_dtype,
                                          reads=start_reads(self.store_path, self.device))
            finally:
                reads = None  # the pipeline holds the blocks it uses; nothing else keeps them
            self.pipe.set_progress_bar_config(disable=True)
            size = sum(p.stat().st_size for p in self.store_path.glob("*/*.flashpack"))
            phase.rate(size, f"to {self.device}, checksums verified (import torch {imported_torch:.2f} s)")

        # 5. warm up: run every served shape once, so no request pays first-call costs.
        self._lock = threading.Lock()
        serving = self.settings.serving
        with self._phase("warmup") as phase:
            shapes = list(dict.fromkeys(serving.warmup_sizes))
            for name in shapes:
                width, height = preset_size(name)
                self._generate("warm-up", "", width, height, serving.warmup_steps, serving.default_guidance_scale,
                               seed=0)
            phase.detail = f"{len(shapes)} shape(s) x {serving.warmup_steps} step(s): {', '.join(shapes) or 'none'}"

        self.phase_seconds["total"] = round(time.perf_counter() - started, 3)
        log.info("setup: ready in %.2f s (profile %s, model %s, device %s)", self.phase_seconds["total"],
                 self.settings.profile, model.source, self.device)

    def _source(self, root: Path) -> Any:
        """The model's source, the demo source generated first when it is the demo."""
        from conversion.sources import parse_source

        model = self.settings.model
        text = str(ensure_demo_source(root)) if model.source == DEMO_SOURCE else model.source
        return parse_source(text, revision=model.revision, variant=model.variant)

    def _rebuild(self, store: Any, root: Path, problem: str) -> Path:
        """Move the damaged entry aside and build it again from the source, on this start."""
        from conversion.errors import ConversionError, StoreError
        from conversion.store import ensure_converted

        damaged = self.store_path
        log.error("load: the store entry %s is damaged (%s); moving it aside and rebuilding it from the source",
                  damaged, problem)
        store.quarantine(damaged, problem)
        try:
            return Path(ensure_converted(self._source(root), root=root, dtype=self.settings.model.dtype))
        except ConversionError as exc:
            raise StoreError(
                f"the store entry {damaged} was damaged ({problem}) and has been moved aside, but rebuilding it "
                f"failed: {exc}. Make the source ({self.settings.model.source}) reachable; the next start "
                "rebuilds it"
            ) from exc

    @fal.endpoint("/")
    def text_to_image(self, input: TextToImageInput) -> TextToImageOutput:
        """Generate ``num_images`` images for ``prompt``."""
        seed = input.seed if input.seed is not None else randbelow(MAX_SEED + 1)
        width, height = requested_size(input.image_size)

        queued = time.perf_counter()
        with self._lock:  # one pipeline call at a time: diffusers pipelines keep per-call state
            started = time.perf_counter()
            pictures = [
                self._generate(input.prompt, input.negative_prompt, width, height, input.num_inference_steps,
                               input.guidance_scale, seed=image_seed)
                for image_seed in image_seeds(seed, input.num_images)
            ]
        generated = time.perf_counter()

        inline = input.sync_mode or self.settings.serving.output == "data_uri"
        images = [encode_image(picture, input.output_format, inline) for picture in pictures]
        done = time.perf_counter()
        timings = {"queue": started - queued, "inference": generated - started, "encode": done - generated}
        return TextToImageOutput(images=images, seed=seed, prompt=input.prompt,
                                 timings={k: round(v, 4) for k, v in timings.items()})

    @fal.endpoint(
        "/health",
        health_check=fal.HealthCheck(start_period_seconds=SETTINGS.deploy.startup_timeout, timeout_seconds=5,
                                     failure_threshold=3, call_regularly=True),
    )
    def health(self) -> HealthOutput:
        """Readiness and setup timings (fal also serves this method on GET /health)."""
        if getattr(self, "pipe", None) is None:
            raise RuntimeError("setup() has not finished: no pipeline is loaded")
        return HealthOutput(status="ok", profile=self.settings.profile, model=self.settings.model.source,
                            device=str(self.device), store=str(self.store_path), setup_seconds=self.phase_seconds)

    def _generate(self, prompt: str, negative_prompt: str, width: int, height: int, steps: int,
                  guidance_scale: float, seed: int):
        """One image from one seed. A fresh CPU generator per image: the same seed gives the same noise
        on every device, and no request touches another's random state."""
        import torch

        generator = torch.Generator(device="cpu").manual_seed(seed)
        result = self.pipe(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            num_images_per_prompt=1,
            output_type="pil",
        )
        return result.images[0]

    def _phase(self, name: str) -> "_Phase":
        return _Phase(name, self.phase_seconds)


class _Phase:
    """Times a setup phase into ``seconds[name]`` and logs one line for it (with ``detail``)."""

    def __init__(self, name: str, seconds: dict[str, float]):
        self.name, self.seconds, self.detail = name, seconds, ""
        self.nbytes: int | None = None

    def rate(self, nbytes: int, where: str) -> None:
        self.nbytes, self.detail = nbytes, where

    def __enter__(self) -> "_Phase":
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        elapsed = time.perf_counter() - self.started
        self.seconds[self.name] = round(elapsed, 3)
        if exc_info[0] is not None:
            log.error("%s: failed after %.2f s: %s", self.name, elapsed, exc_info[1])
            return
        if self.nbytes is not None:
            rate = self.nbytes / 1e9 / elapsed if elapsed > 0 else 0.0
            log.info("%s: %.2f GB in %.2f s (%.2f GB/s) %s", self.name, self.nbytes / 1e9, elapsed, rate, self.detail)
        else:
            log.info("%s: %.2f s%s", self.name, elapsed, f" ({self.detail})" if self.detail else "")


# --------------------------------------------------------------------------------------------------
# Helpers of setup() and the endpoint


def resolve_device(device: str) -> str:
    """fal.toml's ``model.device`` as a concrete device (``cuda`` gets the current device's index,
    so background reader threads target the same GPU as this thread)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"fal.toml: model.device is {device!r} but no CUDA device is visible (use 'auto' or 'cpu')")
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return device


def ensure_demo_source(root: Path, seed: int = 0) -> Path:
    """The embedded demo model as a local diffusers source under ``root``, generated once.

    Built in a private directory and renamed into place, so a crash never leaves half a source.
    """
    target = demo_source_dir(root, seed)
    if (target / "model_index.json").is_file():
        return target
    import shutil

    from conversion.demo import make_demo_pipeline

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.tmp-{os.getpid()}-{token_hex(4)}"
    try:
        make_demo_pipeline(scratch, seed=seed)
        os.rename(scratch, target)
        log.info("demo: generated the demo source at %s", target)
    except OSError:
        if not (target / "model_index.json").is_file():
            raise
        # another process published it first; theirs is identical
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def demo_source_dir(root: Path, seed: int = 0) -> Path:
    return root / "demo-source" / f"seed-{seed}"


def warm_source(model: ModelSettings, root: Path) -> Any:
    """The model's source when a warm lookup can use it (torch-free); None when the demo source
    has not been generated yet (so there is no entry for it either)."""
    from conversion.sources import parse_source

    if model.source == DEMO_SOURCE:
        demo = demo_source_dir(root)
        return parse_source(str(demo)) if (demo / "model_index.json").is_file() else None
    return parse_source(model.source, revision=model.revision, variant=model.variant)


def early_device(device: str) -> str | None:
    """The device known before torch is imported: ``cpu`` when fal.toml says so, or says ``auto``
    on a machine without NVIDIA device nodes; None when only torch can tell."""
    if device == "cpu" or (device == "auto" and not glob.glob("/dev/nvidia[0-9]*")):
        return "cpu"
    return None


def start_reads(store_path: Path, device: str) -> Any:
    """Start reading the packs of a converted directory for ``device``, with their checksums."""
    from conversion.manifest import packs_to_read
    from model_loader import start_pack_reads

    return start_pack_reads(packs_to_read(store_path), str(device))


def store_problem(store_path: Path) -> str | None:
    """What is wrong with a store entry that failed to load (its full sha256 check), or None
    when it matches its manifest (then the load error is not the store's)."""
    from conversion.manifest import VerificationError, verify_converted

    try:
        verify_converted(store_path, full=True)
    except VerificationError as exc:
        return str(exc)
    return None


def encode_image(picture: Any, output_format: str, inline: bool) -> Image:
    """A fal ``Image``: a data: URI when ``inline`` (offline, no credentials), else uploaded to fal's CDN."""
    if inline:
        return Image.from_pil(picture, format=output_format, repository="in_memory", fallback_repository=None)
    return Image.from_pil(picture, format=output_format)


def _configure_logging() -> None:
    """Show the INFO phase lines of app / conversion / model_loader when nothing else configured logging."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("app", "conversion", "model_loader"):
        logging.getLogger(name).setLevel(logging.INFO)
