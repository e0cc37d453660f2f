"""Cheap previews of the latents during denoising, for POST /stream's progress events.

A preview is a fixed linear map of each latent pixel's 4 channels to RGB (plus a bias), at the
latent resolution (1/8 of the image's sides for SD and SDXL): no VAE decode, no extra model, a few
microseconds of arithmetic per step. The factors are the widely used approximations fitted to the
SD 1.x/2.x and SDXL VAEs (the ones ComfyUI's ``latent_formats`` and other UIs ship), rounded to two
decimals. They show the composition and colours emerging; they are not the decoded image.

A model whose latents are not 4-channel (SD3, Flux: 16) has no known projection: its progress
events carry no previews. torch is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fal.toolkit import Image

# Rows: latent channels 0-3; columns: R, G, B.
SD_FACTORS = ((0.35, 0.23, 0.32), (0.33, 0.50, 0.24), (-0.28, 0.18, 0.27), (-0.21, -0.26, -0.72))
SD_BIAS = (0.0, 0.0, 0.0)
SDXL_FACTORS = ((0.37, 0.42, 0.43), (-0.25, 0.00, 0.11), (0.11, 0.11, -0.04), (-0.32, -0.25, -0.22))
SDXL_BIAS = (0.11, -0.02, 0.00)
# SDXL's VAE scales its latents by this; SD 1.x/2.x's by 0.18215.
SDXL_SCALING_FACTOR = 0.13025
PREVIEW_FORMAT = "jpeg"


@dataclass(frozen=True)
class LatentProjection:
    """A linear latent -> RGB map: ``rgb = latent @ factors + bias``, in [-1, 1]."""

    family: str
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]


SD = LatentProjection("sd", SD_FACTORS, SD_BIAS)
SDXL = LatentProjection("sdxl", SDXL_FACTORS, SDXL_BIAS)


def projection_for(pipe: Any) -> LatentProjection | None:
    """The projection for ``pipe``'s model family (SD or SDXL, 4-channel latents), or None."""
    vae = getattr(pipe, "vae", None)
    config = getattr(vae, "config", None)
    if config is None or getattr(config, "latent_channels", None) != 4:
        return None
    is_xl = type(pipe).__name__.startswith("StableDiffusionXL") or (
        abs(float(getattr(config, "scaling_factor", 0.0) or 0.0) - SDXL_SCALING_FACTOR) < 1e-6)
    return SDXL if is_xl else SD


def preview_pictures(latents: Any, projection: LatentProjection) -> list[Any]:
    """One RGB PIL image per latent of the batch ``latents`` ``(n, 4, h, w)``, ``w`` x ``h`` pixels."""
    import torch
    from PIL import Image as PILImage

    x = latents.detach().to(device="cpu", dtype=torch.float32)
    factors = torch.tensor(projection.factors, dtype=torch.float32)
    bias = torch.tensor(projection.bias, dtype=torch.float32)
    rgb = torch.einsum("nchw,cr->nhwr", x, factors) + bias
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    return [PILImage.fromarray(array) for array in pixels]


def preview_images(latents: Any, projection: LatentProjection) -> list[Image]:
    """The previews of ``latents`` as fal ``Image``s with inline JPEG ``data:`` URIs (never uploaded:
    a preview is a few kilobytes and outdated one step later)."""
    return [Image.from_pil(picture, format=PREVIEW_FORMAT, repository="in_memory", fallback_repository=None)
            for picture in preview_pictures(latents, projection)]
