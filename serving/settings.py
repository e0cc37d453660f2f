"""fal.toml's settings: strict pydantic models of its tables and :func:`load_settings`.

The top-level tables are the default profile; ``[profiles.<name>]`` overlays one of them, chosen by
the ``profile`` argument or, when that is None, by $APP_PROFILE (read here and nowhere else, when
:func:`load_settings` is called). Nothing is read at import. ``[model]`` and ``[safety_checker]``
are checked with conversion.sources' rules (stdlib only), so a source the store could not acquire
fails here.
"""

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from conversion.errors import SourceError
from conversion.sources import (
    DEMO_SOURCE,
    RANDOM_DEMO_SOURCE,
    Source,
    parse_checker_source,
    parse_lora_path,
    parse_model_folder_source,
    parse_source,
)

# The component each converted ControlNet and image encoder entry holds its model in.
CONTROLNET_COMPONENT = "controlnet"
IMAGE_ENCODER_COMPONENT = "image_encoder"
# The environment variable that picks the profile when load_settings() is given none.
PROFILE_ENV = "APP_PROFILE"
# Image sides are multiples of this (the VAE's downsampling factor).
PIXEL_MULTIPLE = 8
# Sanity bounds of [serving]: far beyond any real use, low enough that no setting is absurd.
MAX_STEPS_LIMIT = 1000
MAX_GUIDANCE_LIMIT = 100.0
MAX_SIDE_LIMIT = 8192
MAX_PROMPT_LIMIT = 100_000
# [safety_checker] source that serves without a checker (said explicitly, never by omission).
NO_CHECKER = "none"
# Sanity bounds of [lora] and [[model.loras]].
MAX_LORAS_LIMIT = 16
MAX_LORA_SCALE_LIMIT = 10.0
MAX_LORA_FILE_MB_LIMIT = 64 * 1024
# The most ControlNets and IP-Adapters [model] may configure (each is a store entry loaded at every start).
MAX_ADAPTERS_LIMIT = 8


class SettingsError(ValueError):
    """fal.toml (or requirements.txt) is missing, malformed, or names an impossible value."""


class _Strict(BaseModel):
    """Unknown keys refused, no type coercion ("300" is not 300), immutable once loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


PresetName = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]


class SizeSetting(_Strict):
    """One image size in pixels."""

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


# The regions fal can start runners in: fal's own list (fal.cli._utils.VALID_REGIONS, what fal checks
# a pyproject.toml `regions` against; a test keeps the two equal).
FalRegion = Literal["us-west", "us-central", "us-east", "eu-north", "eu-west"]


class DeploySettings(_Strict):
    """fal.App settings: machine, scaling, timeouts, auth. Each field is the fal.App class attribute
    of the same name (``auth``: ``app_auth``); app.py sets every one of them, so what fal deploys is
    this table (fal takes an App's own attributes over pyproject.toml's app table)."""

    machine_type: str | list[str]
    keep_alive: int = Field(ge=0)
    min_concurrency: int = Field(default=0, ge=0)
    max_concurrency: int = Field(ge=1)
    concurrency_buffer: int = Field(default=0, ge=0)
    concurrency_buffer_perc: int = Field(default=0, ge=0)
    scaling_delay: int = Field(default=0, ge=0)
    max_multiplexing: int = Field(default=1, ge=1)
    request_timeout: int = Field(ge=1)
    startup_timeout: int = Field(ge=1)
    regions: list[FalRegion] | None = Field(default=None, min_length=1)  # None: any region
    auth: Literal["private", "public", "shared"] = "private"

    @field_validator("machine_type")
    @classmethod
    def _machine_type_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError("must name a machine type (or a non-empty list of them)")
        return value

    @field_validator("regions")
    @classmethod
    def _regions_once(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("names a region twice")
        return value

    @model_validator(mode="after")
    def _concurrency_order(self) -> "DeploySettings":
        if self.min_concurrency > self.max_concurrency:
            raise ValueError(f"min_concurrency ({self.min_concurrency}) exceeds max_concurrency ({self.max_concurrency})")
        if self.concurrency_buffer > self.max_concurrency:
            raise ValueError(f"concurrency_buffer ({self.concurrency_buffer}) exceeds max_concurrency "
                             f"({self.max_concurrency}): fal never runs more runners than max_concurrency")
        return self


class FusedLoraSetting(_Strict):
    """One LoRA fused into the model before it is packed (``[[model.loras]]``): where it comes
    from (a request's ``loras[i].path`` rules) and its scale."""

    path: str = Field(min_length=1)
    scale: float = Field(default=1.0, ge=0, le=MAX_LORA_SCALE_LIMIT, allow_inf_nan=False)


class ControlNetSetting(_Strict):
    """One ControlNet a request may name (``controlnets[i].path`` is its ``source``, as written
    here): a model folder (config.json + weights) on the Hub or on disk, acquired and converted
    once into the store like the model. ``preprocess``: what a request's control image becomes
    ("none": used as sent, e.g. a depth map or an edge map; "canny": its Canny edges)."""

    source: str = Field(min_length=1)
    revision: str | None = Field(default=None, min_length=1)
    variant: str | None = Field(default=None, min_length=1)
    subfolder: str | None = Field(default=None, min_length=1)
    preprocess: Literal["none", "canny"] = "none"


class IPAdapterSetting(_Strict):
    """One IP-Adapter a request may name (``ip_adapter[i].path`` is its ``source``): its weights (a
    .safetensors file on the Hub, at an https:// URL or on disk) and the CLIP image encoder it was
    trained with (a model folder: Hub repo, with ``image_encoder_subfolder``, or local directory),
    each acquired and converted once into the store."""

    source: str = Field(min_length=1)
    revision: str | None = Field(default=None, min_length=1)
    image_encoder: str = Field(min_length=1)
    image_encoder_revision: str | None = Field(default=None, min_length=1)
    image_encoder_subfolder: str | None = Field(default=None, min_length=1)


class ModelSettings(_Strict):
    """The model to serve: a source the store acquires and converts once (checked with
    conversion.sources' rules by :func:`load_settings`, see :func:`model_problem`), and the LoRAs
    fused into it before packing (``loras``: part of its store key)."""

    source: str = Field(min_length=1)
    revision: str | None = Field(default=None, min_length=1)
    variant: str | None = Field(default=None, min_length=1)
    subfolder: str | None = Field(default=None, min_length=1)  # where in a Hub repo (or directory) the pipeline is
    # Single-file checkpoints (a URL or a Hub file) only: the pipeline (None: detected from the
    # checkpoint's tensor names) and where its configs are (a local diffusers directory or a Hub repo).
    pipeline_class: Literal["StableDiffusionPipeline", "StableDiffusionXLPipeline", "FluxPipeline"] | None = None
    config: str | None = Field(default=None, min_length=1)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    loras: list[FusedLoraSetting] = Field(default=[], max_length=MAX_LORAS_LIMIT)
    controlnets: list[ControlNetSetting] = Field(default=[], max_length=MAX_ADAPTERS_LIMIT)
    ip_adapters: list[IPAdapterSetting] = Field(default=[], max_length=MAX_ADAPTERS_LIMIT)


class SafetyCheckerSettings(_Strict):
    """The safety checker: a source the store acquires and converts once, like ``[model]``
    (checked by :func:`load_settings`, see :func:`checker_problem`), on the model's device and
    dtype; ``source = "none"`` serves without one."""

    source: str = Field(min_length=1)
    revision: str | None = Field(default=None, min_length=1)
    subfolder: str | None = Field(default=None, min_length=1)

    @property
    def enabled(self) -> bool:
        """Whether the app has a checker (``source`` is not ``"none"``)."""
        return self.source != NO_CHECKER


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
    image_fetch_timeout_s: float = Field(default=30.0, ge=1, le=600, allow_inf_nan=False)
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


class LoraSettings(_Strict):
    """A request's ``loras``: how many, how strong, how large a file, how many bytes of read LoRAs
    stay in memory (a least-recently-used cache; 0 keeps none), how many bytes of fetched files
    stay on the volume (shared by every runner, least recently used evicted first), how long one
    fetch may take and how many run at once on a runner."""

    max_loras: int = Field(default=3, ge=0, le=MAX_LORAS_LIMIT)
    max_scale: float = Field(default=1.0, gt=0, le=MAX_LORA_SCALE_LIMIT, allow_inf_nan=False)
    max_file_mb: int = Field(default=1024, ge=1, le=MAX_LORA_FILE_MB_LIMIT)
    cache_mb: int = Field(default=4096, ge=0, le=1024 * 1024)
    volume_mb: int = Field(default=20480, ge=1, le=1024 * 1024)
    fetch_timeout_s: float = Field(default=120.0, ge=1, le=3600, allow_inf_nan=False)
    max_fetches: int = Field(default=4, ge=1, le=64)

    @model_validator(mode="after")
    def _consistent(self) -> "LoraSettings":
        if self.volume_mb < self.max_file_mb:
            raise ValueError(f"volume_mb ({self.volume_mb}) is less than max_file_mb ({self.max_file_mb}): "
                             "one LoRA file must fit in the volume's budget")
        return self


class CompileSettings(_Strict):
    """torch.compile of the denoiser (opt-in): inductor's mode and whether shapes stay static."""

    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    dynamic: bool = False


class AppSettings(_Strict):
    """One profile of fal.toml, validated: everything the app is built from."""

    profile: str
    deploy: DeploySettings
    model: ModelSettings
    safety_checker: SafetyCheckerSettings
    serving: ServingSettings
    compile: CompileSettings = CompileSettings()
    lora: LoraSettings = LoraSettings()


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


_SECTIONS = ("deploy", "model", "safety_checker", "serving", "compile", "lora")
# Tables a profile replaces whole: a revision belongs to its source.
_REPLACED_WHOLE = ("model", "safety_checker")
_UNION_TAG = re.compile(r"^(str|int|list\[.*\]|function-.*)$")


def load_settings(path: str | os.PathLike[str], profile: str | None = None) -> AppSettings:
    """Read and validate ``path``; ``profile`` (None: $APP_PROFILE) overlays ``[profiles.<name>]``.

    Tables merge key by key, except ``[model]`` and ``[safety_checker]``, which a profile replaces
    whole. ``[safety_checker]`` is required: the app serves without a checker only when it says
    ``source = "none"``. Any problem raises :class:`SettingsError` naming the file, the profile and
    the key.
    """
    path = Path(path)
    profile = (os.environ.get(PROFILE_ENV, "") if profile is None else profile).strip() or "default"
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
            raise SettingsError(f"{path}: {PROFILE_ENV}={profile!r} is not a profile here (known: {known})")
        for section, overlay in profiles[profile].items():
            where = f"profiles.{profile}.{section}"
            if section not in _SECTIONS:
                raise SettingsError(f"{path}: unknown table [{where}] (tables: {', '.join(_SECTIONS)})")
            if not isinstance(overlay, dict):
                raise SettingsError(f"{path}: {where} must be a table")
            base = merged.get(section, {})
            merged[section] = overlay if section in _REPLACED_WHOLE else _deep_merge(base, overlay)
    if "safety_checker" not in merged:
        raise SettingsError(
            f"{path} (profile {profile!r}): safety_checker: required table is missing; name the checker's source "
            f"(e.g. source = \"CompVis/stable-diffusion-safety-checker\"), or source = \"{NO_CHECKER}\" to serve "
            "without one"
        )

    try:
        settings = AppSettings(profile=profile, **merged)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise SettingsError(f"{path} (profile {profile!r}): {problems}") from None
    problem = model_problem(settings.model) or compile_problem(settings)
    if problem is not None:
        key, message = problem
        raise SettingsError(f"{path} (profile {profile!r}): {key}: {message}")
    problem = checker_problem(settings.safety_checker)
    if problem is not None:
        key, message = problem
        raise SettingsError(f"{path} (profile {profile!r}): safety_checker.{key}: {message}")
    return settings


def model_problem(model: ModelSettings) -> tuple[str, str] | None:
    """The ``[model]`` key (``model.source``, ...) that cannot be served and why, by conversion.sources'
    rules; None if fine.

    ``source`` is checked alone, then with ``variant``, ``revision``, ``subfolder``,
    ``pipeline_class`` and ``config`` added one at a time, so the key named is the one that breaks
    it. A local directory (source or config) must exist where the settings are loaded.
    """
    for i, lora in enumerate(model.loras):
        try:
            parse_lora_path(lora.path)
        except SourceError as exc:
            return f"model.loras[{i}].path", str(exc)
    problem = adapters_problem(model)
    if problem is not None:
        return problem
    if model.source in (DEMO_SOURCE, RANDOM_DEMO_SOURCE):
        for key in _SOURCE_KEYS:
            if getattr(model, key) is not None:
                plural = key + ("es" if key.endswith("s") else "s")
                return f"model.{key}", f"the {model.source!r} source has no {plural}; remove {key}"
        return None
    given: dict[str, str | None] = {}
    for key in ("source", *_SOURCE_KEYS):
        if key != "source":
            given[key] = getattr(model, key)
            if given[key] is None:
                continue
        try:
            parse_source(model.source, **given)
        except SourceError as exc:
            return f"model.{key}", str(exc)
    return None


def adapters_problem(model: ModelSettings) -> tuple[str, str] | None:
    """The ``[[model.controlnets]]`` or ``[[model.ip_adapters]]`` key that cannot be served and
    why (a source the store could not acquire, or one named twice: a request names each by its
    source); None if fine."""
    checks: list[tuple[str, list[Any], dict[str, Any]]] = [
        ("controlnets", model.controlnets, {"source": controlnet_source}),
        ("ip_adapters", model.ip_adapters, {"source": ip_adapter_weights, "image_encoder": ip_adapter_encoder}),
    ]
    for table, settings, parsers in checks:
        seen: set[str] = set()
        for i, setting in enumerate(settings):
            if setting.source in seen:
                return f"model.{table}[{i}].source", (f"{setting.source!r} is configured twice: a request names each "
                                                      "by its source, so each may appear once")
            seen.add(setting.source)
            for key, parse in parsers.items():
                try:
                    parse(setting)
                except SourceError as exc:
                    return f"model.{table}[{i}].{key}", str(exc)
    return None


def controlnet_source(setting: ControlNetSetting) -> Source:
    """The store source of a configured ControlNet (its entry's model is ``controlnet/``)."""
    return parse_model_folder_source(setting.source, CONTROLNET_COMPONENT, "a ControlNet", revision=setting.revision,
                                     variant=setting.variant, subfolder=setting.subfolder)


# What an IP-Adapter's source may be, for errors.
IP_ADAPTER_FILE = ("an IP-Adapter is one .safetensors file: a Hub file (org/name/path/file.safetensors), an https:// "
                   "URL or a local file")


def ip_adapter_weights(setting: IPAdapterSetting) -> Source:
    """The store source of a configured IP-Adapter's weights: one .safetensors file, converted into
    one module pack of its tensors."""
    from conversion.sources.module import HubWeightsSource, LocalWeightsSource, parse_module_source

    try:
        source = parse_module_source(setting.source, revision=setting.revision)
    except SourceError as exc:
        raise SourceError(f"{exc}; {IP_ADAPTER_FILE}") from None
    weights = source.weights
    if isinstance(weights, HubWeightsSource) or (isinstance(weights, LocalWeightsSource)
                                                 and Path(weights.path).is_dir()):
        raise SourceError(f"{setting.source}: names a folder; {IP_ADAPTER_FILE}")
    return source


def ip_adapter_encoder(setting: IPAdapterSetting) -> Source:
    """The store source of a configured IP-Adapter's image encoder (its entry's model is ``image_encoder/``)."""
    return parse_model_folder_source(setting.image_encoder, IMAGE_ENCODER_COMPONENT, "an image encoder",
                                     revision=setting.image_encoder_revision, subfolder=setting.image_encoder_subfolder)


# The [model] keys that parse_source takes besides the source, in the order they are checked.
_SOURCE_KEYS = ("variant", "revision", "subfolder", "pipeline_class", "config")


def model_source(model: ModelSettings) -> Source:
    """The source ``[model]`` names, with every key of it that the store's source takes."""
    return parse_source(model.source, **{key: getattr(model, key) for key in _SOURCE_KEYS})


def compile_problem(settings: AppSettings) -> tuple[str, str] | None:
    """Why ``[compile]`` cannot work with the rest of the profile (None if it can): the warm-up is
    where the served shapes compile, so compiling needs at least one warm-up size."""
    if settings.compile.enabled and not settings.serving.warmup_sizes:
        return ("compile.enabled", "compiling needs at least one serving.warmup_sizes entry: the warm-up is "
                "where the served shapes compile (otherwise the first request would wait for the compiler)")
    return None


def checker_problem(checker: SafetyCheckerSettings) -> tuple[str, str] | None:
    """The ``[safety_checker]`` key that cannot be served and why, by conversion.sources' rules;
    None if fine. Checked as :func:`model_problem` checks ``[model]``: ``source`` alone, then with
    ``subfolder``, then with ``revision`` too."""
    if not checker.enabled:
        for key in ("revision", "subfolder"):
            if getattr(checker, key) is not None:
                return key, f"source {NO_CHECKER!r} (no safety checker) has no {key}; remove {key}"
        return None
    checks = [("source", {}), ("subfolder", {"subfolder": checker.subfolder}),
              ("revision", {"subfolder": checker.subfolder, "revision": checker.revision})]
    for key, extra in checks:
        try:
            parse_checker_source(checker.source, **extra)
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


def read_requirements(path: str | os.PathLike[str]) -> list[str]:
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
