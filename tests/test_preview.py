"""serving.preview: the latent -> RGB projection of POST /stream's previews, per model family."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from serving.preview import SD, SDXL, preview_images, preview_pictures, projection_for


def pipe(latent_channels: int = 4, scaling_factor: float = 0.18215, cls: str = "StableDiffusionPipeline"):
    config = SimpleNamespace(latent_channels=latent_channels, scaling_factor=scaling_factor)
    return type(cls, (), {"vae": SimpleNamespace(config=config)})()


@pytest.mark.parametrize(
    ("model", "family"),
    [(pipe(), "sd"), (pipe(scaling_factor=0.13025), "sdxl"), (pipe(cls="StableDiffusionXLPipeline", scaling_factor=1.0), "sdxl")],
    ids=["sd-vae", "sdxl-vae", "sdxl-pipeline"],
)
def test_a_4_channel_model_gets_its_familys_projection(model, family):
    assert projection_for(model).family == family


def test_a_model_without_4_channel_latents_gets_no_projection():
    assert projection_for(pipe(latent_channels=16)) is None
    assert projection_for(SimpleNamespace()) is None


@pytest.mark.parametrize("projection", [SD, SDXL], ids=["sd", "sdxl"])
@pytest.mark.parametrize("channel", range(4))
def test_a_latent_pixel_maps_linearly_to_rgb(projection, channel):
    latents = torch.zeros(1, 4, 2, 3)
    latents[0, channel] = 0.5
    rgb = [0.5 * f + b for f, b in zip(projection.factors[channel], projection.bias, strict=True)]
    expected = tuple(round(min(max((value + 1) * 127.5, 0), 255)) for value in rgb)
    [picture] = preview_pictures(latents, projection)
    assert {tuple(p) for p in np.asarray(picture).reshape(-1, 3)} == {expected}


def test_there_is_one_preview_per_image_at_the_latent_resolution():
    pictures = preview_pictures(torch.randn(3, 4, 6, 10, dtype=torch.float16), SD)
    assert [(p.mode, p.size) for p in pictures] == [("RGB", (10, 6))] * 3


def test_previews_are_inline_jpeg_data_uris_that_decode():
    [image] = preview_images(torch.randn(1, 4, 8, 12), SDXL)
    header, _, data = image.url.partition(",")
    assert header == "data:image/jpeg;base64" and image.content_type == "image/jpeg"
    picture = PILImage.open(io.BytesIO(base64.b64decode(data)))
    assert (picture.format, picture.size, image.width, image.height) == ("JPEG", (12, 8), 12, 8)
