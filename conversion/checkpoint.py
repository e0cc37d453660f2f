"""Single-file checkpoints: which format a file is, and whether it is visibly damaged (truncated,
or a safetensors header that safetensors would refuse).

Torch-free: the header is parsed within limits (``model_loader.bounded_json``), never executed,
and each tensor's fields are checked before anything indexes them.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from model_loader.bounded_json import loads_bounded

from .errors import shown

_MAX_HEADER_BYTES = 100 << 20  # safetensors caps its header at 100 MB


class HeaderError(ValueError):
    """A file starts like safetensors but its header cannot be read, or a field of it is not valid."""


def safetensors_header(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any]] | None:
    """(header length, parsed header) of a safetensors file; None when the file is not safetensors.
    :class:`HeaderError` when the header is not JSON or a field of it is not what safetensors
    requires, so callers may index ``dtype``, ``shape`` and ``data_offsets`` as they are."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = _header_length(f.read(9), size)
        if n is None:
            return None
        return n, _parse_header(b"{" + f.read(n - 1), n)


def safetensors_header_of_bytes(data: bytes) -> tuple[int, dict[str, Any]] | None:
    """:func:`safetensors_header` of a safetensors file held in memory."""
    n = _header_length(data[:9], len(data))
    if n is None:
        return None
    return n, _parse_header(data[8:8 + n], n)


def _header_length(head: bytes, size: int) -> int | None:
    """The header length the first 9 bytes of a file of ``size`` bytes declare; None when they are
    not safetensors' (8-byte length, then ``{``) or the length cannot be right."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    n = int.from_bytes(head[:8], "little")
    return n if 0 < n < min(size, _MAX_HEADER_BYTES) else None


def _parse_header(raw: bytes, n: int) -> dict[str, Any]:
    try:
        header = loads_bounded(raw, max_bytes=n)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HeaderError(str(exc)) from None
    if not isinstance(header, dict):
        raise HeaderError("not a JSON object")
    _check_header(header)
    return header


def _check_header(header: dict[str, Any]) -> None:
    """Raise :class:`HeaderError` naming the first tensor and field of a parsed safetensors header
    that safetensors would refuse: a tensor's ``dtype`` must be a string, its ``shape`` a list of
    sizes, its ``data_offsets`` two integers ``0 <= begin <= end``; ``__metadata__`` maps strings
    to strings."""
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise HeaderError("__metadata__ must be a JSON object of strings")
            continue
        if not isinstance(info, dict):
            raise HeaderError(f"tensor {shown(name)} must be a JSON object (dtype, shape, data_offsets)")
        if not isinstance(info.get("dtype"), str):
            raise HeaderError(f"tensor {shown(name)}: dtype must be a string")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise HeaderError(f"tensor {shown(name)}: shape must be a list of integers >= 0")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise HeaderError(f"tensor {shown(name)}: data_offsets must be two integers 0 <= begin <= end")


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts like a safetensors file (8-byte header length, then ``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def checkpoint_problem(path: Path) -> str | None:
    """Why a single-file checkpoint is visibly damaged (truncated, or its header not valid), or None.

    safetensors: the header must parse and the file must end where its last tensor ends.
    ``.ckpt`` (a zip): the central directory at the end must be there. Other formats pass.
    """
    try:
        parsed = safetensors_header(path)
    except HeaderError as exc:
        return f"unreadable safetensors header: {exc}"
    if parsed is not None:
        return safetensors_size_problem(*parsed, os.path.getsize(path))
    with open(path, "rb") as f:
        if f.read(2) == b"PK" and not zipfile.is_zipfile(path):
            return "zip (.ckpt) file without its central directory"
    return None


def safetensors_size_problem(n: int, header: dict[str, Any], size: int) -> str | None:
    """Why a safetensors file of ``size`` bytes is truncated (or has bytes past its last tensor)
    by its checked header of ``n`` bytes, or None."""
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"safetensors file is {size} bytes, its header says {expected}"
    return None


# ---------------------------------------------------------------------------------------------
# Which pipeline a single-file checkpoint is for, from its tensor names (and two shapes) alone

STABLE_DIFFUSION = "StableDiffusionPipeline"
STABLE_DIFFUSION_XL = "StableDiffusionXLPipeline"
FLUX = "FluxPipeline"
DETECTED_CLASSES = (STABLE_DIFFUSION, STABLE_DIFFUSION_XL, FLUX)

# Where each component's weights lie in the original single-file layouts, by key prefix (the
# prefixes diffusers' converters strip: single_file_utils.LDM_UNET_KEY, LDM_VAE_KEYS,
# LDM_CLIP_PREFIX_TO_REMOVE, convert_open_clip_checkpoint's prefixes, is_t5_in_single_file, and
# convert_flux_transformer_checkpoint_to_diffusers). The denoiser comes first.
COMPONENT_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    STABLE_DIFFUSION: {
        "unet": ("model.diffusion_model.",),
        "vae": ("first_stage_model.",),
        "text_encoder": ("cond_stage_model.transformer.",),
    },
    STABLE_DIFFUSION_XL: {
        "unet": ("model.diffusion_model.",),
        "vae": ("first_stage_model.",),
        "text_encoder": ("conditioner.embedders.0.transformer.",),
        "text_encoder_2": ("conditioner.embedders.1.model.",),
    },
    FLUX: {  # Black Forest Labs' files hold the transformer alone (ComfyUI's add model.diffusion_model.)
        "transformer": ("double_blocks.", "model.diffusion_model.double_blocks."),
        "vae": ("vae.",),
        "text_encoder": ("text_encoders.clip_l.",),
        "text_encoder_2": ("text_encoders.t5xxl.",),
    },
}


class NotDetected(ValueError):
    """The checkpoint's tensor names do not say which supported pipeline it is for."""


def tensor_shapes(path: str | os.PathLike[str]) -> dict[str, list[int]] | None:
    """Every tensor's name and shape from a safetensors header (nothing else is read); None when
    the file is not safetensors (a pickled ``.ckpt`` cannot be listed without unpickling it)."""
    parsed = safetensors_header(path)
    if parsed is None:
        return None
    return {name: list(info["shape"]) for name, info in parsed[1].items() if name != "__metadata__"}


def detect_pipeline_class(shapes: dict[str, list[int]]) -> tuple[str, str]:
    """(pipeline class, what the checkpoint is) for a checkpoint's tensor names and shapes.

    The rules of diffusers' ``single_file_utils.infer_diffusers_model_type`` (and its
    ``CHECKPOINT_KEY_NAMES``), in its order, for the families served here: SD 1.x (``v1``), SDXL
    base (``xl_base``) and Flux.1 (``flux-dev``, ``flux-schnell``); the families it tells apart
    from them (inpainting, SD 2.x, Playground v2.5, the SDXL refiner, Flux Fill/Depth, Chroma,
    Flux.2) are named and refused. They are written on key prefixes rather than called because
    diffusers' keys name fixed depths (``resblocks.9``, ``output_blocks.11``) that only full-size
    checkpoints have, and because it calls anything it does not know ``v1``. Raises
    :class:`NotDetected` saying what the checkpoint looks like.
    """
    names = set(shapes)

    def has(*prefixes: str) -> bool:
        return any(name.startswith(prefixes) for name in names)

    def shape(*keys: str) -> list[int]:
        return next((shapes[k] for k in keys if k in shapes), [])

    unet_in = shape("model.diffusion_model.input_blocks.0.0.weight")
    if len(unet_in) > 1 and unet_in[1] in (8, 9):
        raise NotDetected("an inpainting or InstructPix2Pix checkpoint (its UNet takes "
                          f"{unet_in[1]} input channels), not a text-to-image one")
    if has("cond_stage_model.model."):
        raise NotDetected("a Stable Diffusion 2.x checkpoint (an OpenCLIP text encoder under cond_stage_model.model.)")
    if "edm_mean" in names:
        raise NotDetected("a Playground v2.5 checkpoint (it needs an EDM scheduler)")
    if has("model.diffusion_model.") and has("conditioner.embedders.1.model."):
        return STABLE_DIFFUSION_XL, "SDXL base"
    if has("conditioner.embedders.0.model."):
        raise NotDetected("an SDXL refiner checkpoint (an image-to-image model)")
    if has("single_stream_modulation.", "model.diffusion_model.single_stream_modulation."):
        raise NotDetected("a Flux.2 checkpoint")
    if has("distilled_guidance_layer.", "model.diffusion_model.distilled_guidance_layer."):
        raise NotDetected("a Chroma checkpoint")
    if {"double_blocks.0.img_attn.norm.key_norm.scale",
            "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"} & names:
        img_in = shape("img_in.weight", "model.diffusion_model.img_in.weight")
        if len(img_in) > 1 and img_in[1] in (128, 384):
            raise NotDetected(f"a Flux.1 {'Fill' if img_in[1] == 384 else 'Depth'} checkpoint, not a text-to-image one")
        guided = has("guidance_in.", "model.diffusion_model.guidance_in.")
        return FLUX, "Flux.1 dev" if guided else "Flux.1 schnell"
    if has("model.diffusion_model.input_blocks.") and has("cond_stage_model.transformer."):
        return STABLE_DIFFUSION, "SD 1.x"
    sample = ", ".join(repr(n) for n in sorted(names)[:3])
    raise NotDetected(f"no supported family's tensor names ({len(names)} tensors, e.g. {sample or 'none'})")


def missing_components(pipeline_class: str, names: set[str] | dict[str, Any]) -> list[str] | None:
    """The components of ``pipeline_class`` whose weights the checkpoint does not hold, by the
    key prefixes of :data:`COMPONENT_PREFIXES`; None for a class not listed there."""
    table = COMPONENT_PREFIXES.get(pipeline_class)
    if table is None:
        return None
    return [c for c, prefixes in table.items() if not any(n.startswith(prefixes) for n in names)]
