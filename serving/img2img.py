"""Image-to-image and inpainting on the loaded pipeline: the two extra pipelines, built once from
its components (nothing loaded or copied again), and what a request's input images become.

**The pipelines.** diffusers' ``AutoPipelineForImage2Image.from_pipe(pipe)`` and
``AutoPipelineForInpainting.from_pipe(pipe)`` pick the family's variant (StableDiffusionPipeline ->
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline, StableDiffusionXLPipeline -> the
SDXL ones, FluxPipeline -> Flux's) and construct it from the *same* module objects: the unet, VAE,
text encoders, tokenizers and scheduler are shared, so the weights (views into the loader's flat
blocks) exist once. :func:`build_image_pipelines` checks that every module is the very object of the
text-to-image pipeline and refuses anything else, so a diffusers change that copied weights would
fail setup instead of doubling GPU memory. One pipeline lock serves all three: they share the
modules and the scheduler, whose per-call state every call resets (``set_timesteps``).

A model family without a variant (or whose variant cannot be built) gets ``None``, logged; its
endpoint then answers 501.

**Sizes.** The output is ``image_size`` when the request gives one (the image and mask are resized
to it), else the input's own size rounded down to multiples of 8, which must then be within the
``[serving]`` bounds. An inpainting mask is used at the image's size; the result keeps the input's
pixels where the mask is black (:func:`overlay`), as diffusers' docs advise with ``apply_overlay``.

torch and diffusers are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fal.exceptions import FieldException

from .images import Fetch, check_same_size, decode_image, decode_mask, fetch_https, fetch_limits, read_url
from .schema import requested_size
from .settings import PIXEL_MULTIPLE, ServingSettings, size_problem

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

IMAGE_TO_IMAGE, INPAINT = "image-to-image", "inpaint"


@dataclass(frozen=True)
class ImagePipelines:
    """The image-to-image and inpainting pipelines of the served model (None: the family has none)."""

    image_to_image: Any
    inpaint: Any

    def get(self, kind: str) -> Any:
        return self.image_to_image if kind == IMAGE_TO_IMAGE else self.inpaint


def build_image_pipelines(pipe: Any) -> ImagePipelines:
    """The image-to-image and inpainting variants of ``pipe``, sharing all of its modules."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    built = {}
    for kind, auto in ((IMAGE_TO_IMAGE, AutoPipelineForImage2Image), (INPAINT, AutoPipelineForInpainting)):
        try:
            variant = auto.from_pipe(pipe)
        except Exception as exc:  # no variant for this family (diffusers raises ValueError), or it cannot be built
            log.warning("%s: not served: %s has no %s pipeline (%s: %s)", kind, type(pipe).__name__, kind,
                        type(exc).__name__, exc)
            built[kind] = None
            continue
        shares_modules(pipe, variant, kind)
        variant.set_progress_bar_config(disable=True)
        log.info("%s: %s, sharing the modules of %s", kind, type(variant).__name__, type(pipe).__name__)
        built[kind] = variant
    return ImagePipelines(image_to_image=built[IMAGE_TO_IMAGE], inpaint=built[INPAINT])


def shares_modules(pipe: Any, variant: Any, what: str) -> None:
    """Raise unless every torch module of ``pipe`` is the very object in ``variant`` (built by
    ``from_pipe``): a copy would hold a second copy of its weights."""
    unshared = [name for name, module in _modules(pipe).items() if _modules(variant).get(name, module) is not module]
    if unshared:
        raise RuntimeError(f"{what}: {type(variant).__name__}.from_pipe did not share {', '.join(unshared)} "
                           "with the loaded pipeline (it would hold a second copy of their weights)")


def _modules(pipe: Any) -> dict[str, Any]:
    """The torch modules of a pipeline, by component name."""
    import torch

    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


@dataclass(frozen=True)
class SourceImages:
    """A request's input images at the output size: ``image`` RGB, ``mask`` grayscale or None."""

    image: Image
    mask: Image | None
    width: int
    height: int


def read_sources(input: Any, serving: ServingSettings, fetch: Fetch = fetch_https,
                 cancelled: Callable[[], bool] = lambda: False) -> SourceImages:
    """The input images of an image-to-image (``image_url``) or inpainting (``+ mask_url``) request,
    read, decoded and checked (:mod:`serving.images`), at the output size. Raises a 422
    ``FieldException`` naming the field; each https fetch ends by ``[serving] image_fetch_timeout_s``
    or when ``cancelled()``."""
    from PIL import Image as PILImage

    limits = fetch_limits(serving.image_fetch_timeout_s)
    image = decode_image(read_url(input.image_url, "image_url", fetch, limits, cancelled), "image_url",
                         serving.max_pixels)
    mask_url = getattr(input, "mask_url", None)
    mask = None
    if mask_url is not None:
        mask = decode_mask(read_url(mask_url, "mask_url", fetch, limits, cancelled), "mask_url", serving.max_pixels)
        check_same_size(image, mask, "mask_url")
    width, height = output_size(input.image_size, image, serving)
    if image.size != (width, height):
        image = image.resize((width, height), PILImage.Resampling.LANCZOS)
        mask = mask.resize((width, height), PILImage.Resampling.BILINEAR) if mask is not None else None
    return SourceImages(image=image, mask=mask, width=width, height=height)


def output_size(image_size: Any, image: Image, serving: ServingSettings) -> tuple[int, int]:
    """The request's ``image_size`` in pixels; when absent (None), ``image``'s own size rounded down
    to multiples of 8, which must be within ``serving``'s bounds (else 422 naming ``image_url``)."""
    if image_size is not None:
        return requested_size(image_size, serving)
    width, height = (max(PIXEL_MULTIPLE, side - side % PIXEL_MULTIPLE) for side in image.size)
    problem = size_problem(width, height, serving)
    if problem:
        raise FieldException(field="image_url", type="image_size",
                             message=f"image_url is {image.width}x{image.height}, served as {width}x{height}: "
                             f"{problem}; give image_size to resize it")
    return width, height


def overlay(result: Image, source: SourceImages) -> Image:
    """``result`` where the mask is white, the input image where it is black, blended in between:
    the pixels the mask keeps come back exactly as they were sent (diffusers' ``apply_overlay``)."""
    from PIL import Image as PILImage

    return PILImage.composite(result.convert("RGB"), source.image, source.mask)
