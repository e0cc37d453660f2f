"""ControlNets at serving time: the configured ones loaded from the store, the pipelines that run
them, and what a request's ``controlnets`` become.

**Pipelines.** For each endpoint kind (text-to-image, image-to-image, inpainting) diffusers'
``AutoPipelineFor*.from_pipe(pipe, controlnet=...)`` builds the family's ControlNet variant once in
setup (StableDiffusionControlNetPipeline, StableDiffusionXLControlNetInpaintPipeline, ...) from the
*same* modules as the loaded pipeline: nothing is loaded or copied again (checked, as
serving.img2img checks its pipelines). A request runs a shallow view of that pipeline whose
``controlnet`` is the one it names, or diffusers' ``MultiControlNetModel`` of the ones it names (a
list of the same modules), so any subset of the configured ControlNets runs without rebuilding a
pipeline or touching the shared one.

**Control images** are read and checked as image-to-image's input images are (serving.images: a
422 naming ``controlnets[i].image_url``), resized to the output size, then preprocessed as the
ControlNet's ``preprocess`` setting says: ``"none"`` as sent, ``"canny"`` OpenCV's Canny edges
(thresholds 100 and 200, as diffusers' ControlNet guides use).

torch, diffusers and OpenCV are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .images import Fetch, decode_image, read_url
from .img2img import IMAGE_TO_IMAGE, INPAINT, shares_modules

if TYPE_CHECKING:
    from PIL.Image import Image

    from conversion.download.caller_url import FetchLimits

log = logging.getLogger(__name__)

TEXT_TO_IMAGE = "text-to-image"
# Canny's hysteresis thresholds (diffusers' ControlNet examples, controlnet_aux's CannyDetector defaults).
CANNY_LOW, CANNY_HIGH = 100, 200


@dataclass(frozen=True)
class ControlNet:
    """A configured ControlNet, loaded: ``path`` is its source as fal.toml names it (what a
    request's ``controlnets[i].path`` says)."""

    path: str
    model: Any  # diffusers' ControlNetModel, its weights views of the loader's blocks
    preprocess: str


@dataclass(frozen=True)
class ControlInput:
    """One entry of a request's ``controlnets``, read: the ControlNet, its control image at the
    output size (preprocessed), and how strongly and when it applies."""

    net: ControlNet
    image: Image
    scale: float
    start: float
    end: float


class ControlNets:
    """The configured ControlNets and, per endpoint kind, the ControlNet pipeline that runs them
    (None where the model's family has none)."""

    def __init__(self, nets: list[ControlNet], pipelines: dict[str, Any]) -> None:
        self.nets = {net.path: net for net in nets}
        self.pipelines = pipelines

    @classmethod
    def build(cls, pipe: Any, nets: list[ControlNet]) -> ControlNets:
        """The ControlNet pipelines of ``pipe``'s family, built once from its modules (with the first
        ControlNet; a request's view names its own)."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        if getattr(pipe, "unet", None) is None:  # Flux's ControlNet pipelines take other models and arguments
            raise RuntimeError(f"[[model.controlnets]]: {type(pipe).__name__} is not served with ControlNets here (SD 1.x/2.x "
                               "and SDXL are); remove the controlnets or serve another model")
        for net in nets:
            mismatch = _mismatch(net.model.config, pipe.unet.config)
            if mismatch:
                raise RuntimeError(f"[[model.controlnets]] {net.path}: a ControlNet for another model ({mismatch}); "
                                   "configure one made for this model's family")
        if any(net.preprocess == "canny" for net in nets):
            import cv2  # noqa: F401  # missing OpenCV stops setup, not the first request

        autos = {TEXT_TO_IMAGE: AutoPipelineForText2Image, IMAGE_TO_IMAGE: AutoPipelineForImage2Image,
                 INPAINT: AutoPipelineForInpainting}
        pipelines: dict[str, Any] = {}
        for kind, auto in autos.items():
            try:
                variant = auto.from_pipe(pipe, controlnet=nets[0].model)
            except Exception as exc:  # no ControlNet variant for this family (diffusers raises ValueError)
                log.warning("controlnets: %s has no %s ControlNet pipeline (%s: %s); requests naming controlnets "
                            "there are refused", type(pipe).__name__, kind, type(exc).__name__, exc)
                pipelines[kind] = None
                continue
            if getattr(variant, "controlnet", None) is not nets[0].model:
                raise RuntimeError(f"controlnets: {type(variant).__name__} is not a ControlNet pipeline")
            shares_modules(pipe, variant, f"{kind} ControlNet")
            variant.set_progress_bar_config(disable=True)
            log.info("controlnets: %s for %s, sharing the modules of %s", type(variant).__name__, kind,
                     type(pipe).__name__)
            pipelines[kind] = variant
        if pipelines[TEXT_TO_IMAGE] is None:
            raise RuntimeError(f"[[model.controlnets]]: {type(pipe).__name__} has no ControlNet pipeline in diffusers "
                               "(SD 1.x/2.x and SDXL have); remove the controlnets or serve another model")
        return cls(nets, pipelines)

    def supports(self, kind: str) -> bool:
        """Whether requests of endpoint ``kind`` may name controlnets."""
        return self.pipelines.get(kind) is not None

    def read(self, entries: list[Any], width: int, height: int, fetch: Fetch, limits: FetchLimits,
             max_pixels: int, cancelled: Callable[[], bool]) -> list[ControlInput]:
        """A request's ``controlnets`` read: each control image fetched, decoded and checked (422
        naming ``controlnets[i].image_url``), at ``width`` x ``height``, preprocessed."""
        from PIL import Image as PILImage

        read = []
        for i, entry in enumerate(entries):
            field = f"controlnets[{i}].image_url"
            net = self.nets[entry.path]  # the request model allows configured paths only
            image = decode_image(read_url(entry.image_url, field, fetch, limits, cancelled), field, max_pixels)
            if image.size != (width, height):
                image = image.resize((width, height), PILImage.Resampling.LANCZOS)
            read.append(ControlInput(net, preprocess(image, net.preprocess), entry.conditioning_scale,
                                     entry.start_percentage, entry.end_percentage))
        return read

    def call(self, kind: str, controls: list[ControlInput]) -> tuple[Any, dict[str, Any]]:
        """The pipeline to call for ``controls`` on endpoint ``kind`` (a view of its ControlNet
        pipeline running exactly those ControlNets) and the call's ControlNet arguments."""
        view = copy.copy(self.pipelines[kind])  # diffusers' setter updates the view's config only
        images = [control.image for control in controls]
        scales = [control.scale for control in controls]
        starts, ends = [control.start for control in controls], [control.end for control in controls]
        if len(controls) == 1:
            view.controlnet = controls[0].net.model
            images, scales, starts, ends = images[0], scales[0], starts[0], ends[0]
        else:
            from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

            view.controlnet = MultiControlNetModel([control.net.model for control in controls])
        # Text-to-image takes the control image as `image`; image-to-image and inpainting as `control_image`.
        image_arg = "image" if kind == TEXT_TO_IMAGE else "control_image"
        return view, {image_arg: images, "controlnet_conditioning_scale": scales, "control_guidance_start": starts,
                      "control_guidance_end": ends}


def _mismatch(controlnet: Any, unet: Any) -> str | None:
    """How a ControlNet's config differs from the UNet's where its residuals must fit (the text
    context width and the channels of each level: SD 1.x, SD 2.x and SDXL differ in them), or None."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, list | tuple) else value

    for key in ("cross_attention_dim", "block_out_channels", "addition_embed_type"):
        ours, theirs = plain(controlnet.get(key)), plain(unet.get(key))
        if ours != theirs:
            return f"its {key} is {ours} where the UNet's is {theirs}"
    return None


def preprocess(image: Image, how: str) -> Image:
    """``image`` as the ControlNet reads it: as sent (``"none"``) or its Canny edges, white on black (``"canny"``)."""
    if how == "none":
        return image
    import cv2
    import numpy as np
    from PIL import Image as PILImage

    edges = cv2.Canny(np.asarray(image.convert("RGB")), CANNY_LOW, CANNY_HIGH)
    return PILImage.fromarray(np.stack([edges] * 3, axis=-1))
