"""The safety checker at serving time: its source, its load from the store, and the screening of a
request's images, which replaces flagged images the way fal's endpoints do.

fal's own text-to-image app (github.com/fal-ai/text-to-image, ``text_to_image/runtime.py``,
``run_safety_checker`` and ``filter_by``) runs diffusers' ``StableDiffusionSafetyChecker`` on the
generated images and returns each flagged one as a black RGB image of the same size, with
``has_nsfw_concepts[i]`` saying which; with ``enable_safety_checker`` false it checks nothing and
returns all false. :func:`screen` does the same, in one batch per request. (diffusers' own
pipelines black out flagged images too, which is where fal's behaviour comes from.)

The checker is one more store entry: :func:`checker_source` names it from ``[safety_checker]``,
the store converts it once (conversion.sources.safety_checker presents it as a two-component
pipeline directory), and :func:`load_safety_checker` loads it with the project's loader. torch,
transformers and model_loader are imported inside the functions, so importing this stays cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_loader.diffusers_layout import FEATURE_EXTRACTOR, SAFETY_CHECKER

from .settings import SafetyCheckerSettings

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from conversion.sources import Source
    from model_loader import PackReads

log = logging.getLogger("serving.safety")

def checker_source(settings: SafetyCheckerSettings) -> Source | None:
    """The source of the checker ``[safety_checker]`` names; None for ``source = "none"``."""
    from conversion.sources import parse_checker_source

    if not settings.enabled:
        log.warning('safety checker: none ([safety_checker] source = "none"); images are served unchecked')
        return None
    return parse_checker_source(settings.source, revision=settings.revision, subfolder=settings.subfolder)


@dataclass
class SafetyChecker:
    """A loaded checker and its feature extractor, on one device and dtype."""

    model: Any  # diffusers' StableDiffusionSafetyChecker
    feature_extractor: Any  # transformers' CLIPImageProcessor
    device: str
    dtype: torch.dtype

    def flags(self, images: list[Image]) -> list[bool]:
        """Which of ``images`` the checker flags, all in one forward pass."""
        import numpy as np
        import torch

        pixels = self.feature_extractor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        # The checker blanks the arrays it is given for flagged images; screen() replaces the images
        # themselves, so it gets empty stand-ins instead of copies of every image.
        stand_ins = [np.zeros(0) for _ in images]
        with torch.inference_mode():
            _, flagged = self.model(clip_input=pixels, images=stand_ins)
        return [bool(flag) for flag in flagged]


def load_safety_checker(
    path: str | Path, device: str, torch_dtype: torch.dtype | None = None, reads: PackReads | None = None
) -> SafetyChecker:
    """The checker of the converted directory ``path``: ``safety_checker/`` with the project's
    loader (``reads``: its pack reads, started early, checked by their checksums), and
    ``feature_extractor/`` with its own ``from_pretrained`` from those local files."""
    from transformers import CLIPImageProcessor

    from model_loader import load_model

    root = Path(path)
    model = load_model(root / SAFETY_CHECKER, device, torch_dtype=torch_dtype, reads=reads)
    extractor = CLIPImageProcessor.from_pretrained(str(root / FEATURE_EXTRACTOR), local_files_only=True)
    return SafetyChecker(model, extractor, device, next(model.parameters()).dtype)


def black_like(image: Image) -> Image:
    """A black RGB image of ``image``'s size: what a flagged image is replaced by (as fal does)."""
    from PIL import Image as PILImage

    return PILImage.new("RGB", image.size, (0, 0, 0))


def screen(images: list[Image], checker: SafetyChecker | None, enabled: bool) -> tuple[list[Image], list[bool]]:
    """``images`` with every one the checker flags replaced by :func:`black_like`, and the flags
    (``has_nsfw_concepts``); unchecked and all false when ``enabled`` is false or there is no checker."""
    if not enabled or checker is None or not images:
        return list(images), [False] * len(images)
    flags = checker.flags(images)
    return [black_like(image) if flag else image for image, flag in zip(images, flags, strict=True)], flags
