"""What a generating endpoint answers: its images screened by the safety checker, then encoded as
fal ``Image``s (uploaded to fal's CDN, or inline ``data:`` URIs), with the request's seed, prompt
and timings."""

from __future__ import annotations

import threading
import time
from typing import Any

from fal.toolkit import Image

from .safety import SafetyChecker, screen


def encode_image(picture: Any, output_format: str, inline: bool) -> Image:
    """A fal ``Image`` of ``picture`` encoded as ``output_format`` by fal's toolkit (``jpeg``: quality 95,
    ``png``: lossless, ``webp``: PIL's lossy default, quality 80), its content_type ``image/<format>``:
    a data: URI when ``inline`` (offline, no credentials), else uploaded to fal's CDN."""
    if inline:
        return Image.from_pil(picture, format=output_format, repository="in_memory", fallback_repository=None)
    return Image.from_pil(picture, format=output_format)


def screened_and_encoded(input: Any, seed: int, pictures: list[Any], timings: dict[str, float],
                         checker: SafetyChecker | None, lock: threading.Lock, output: str) -> dict[str, Any]:
    """The fields of a generating endpoint's answer: ``pictures`` through the safety checker (under
    the pipeline lock: it runs on the pipeline's device, one model call at a time), then encoded
    (inline when the request asks ``sync_mode`` or ``[serving] output`` is ``data_uri``)."""
    checking = time.perf_counter()
    with lock:
        pictures, has_nsfw_concepts = screen(pictures, checker, input.enable_safety_checker)
    timings["safety"] = time.perf_counter() - checking
    encoding = time.perf_counter()
    inline = input.sync_mode or output == "data_uri"
    images = [encode_image(picture, input.output_format, inline) for picture in pictures]
    timings["encode"] = time.perf_counter() - encoding
    return {"images": images, "seed": seed, "prompt": input.prompt, "has_nsfw_concepts": has_nsfw_concepts,
            "timings": {k: round(v, 4) for k, v in timings.items()}}
