"""Billable units: one per started megapixel of every image a response delivers.

fal charges a request the number of units its ``x-fal-billable-units`` response header says (the
price of a unit is set by fal per endpoint; without the header the platform falls back to its
default). fal's SDK itself answers ``0`` on a 404, a 422 and a refused upload policy (``fal/app.py``,
``fal/api/api.py``); its docs give two patterns for image apps, one unit per image or one per
megapixel rounded up (docs.fal.ai, "Publishing to the Marketplace": ``ceil(width * height / (1024 *
1024)) * num_images``). This app bills per megapixel: its sizes range from 256x256 to 2.25 MP, and
the compute of an image grows with its pixels, so a flat price per image would overcharge small
images or undercharge large ones. A 1024x1024 image is 1 unit, 1024x1536 is 2, 1536x1536 is 3.

:class:`BillableUnits` counts what was delivered, not what was asked for: it reads the ``images``
(their ``width`` and ``height``) of a successful JSON answer, so it needs no line in an endpoint.
A 4xx answer (413, 422, 499, ...) is billed ``0`` unless it carries its own header; a 5xx is never
charged by fal. Answers that stream (``text/event-stream``) are passed on untouched: such an
endpoint sets the header itself from what it was asked for (:func:`image_units` x ``num_images``:
its headers leave before any image exists).
Units matter to callers of a ``shared`` app; the owner of a private app pays for runner time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BILLABLE_UNITS_HEADER = "x-fal-billable-units"
MEGAPIXEL = 1024 * 1024


def image_units(width: int, height: int) -> int:
    """The units of one ``width`` x ``height`` image: its megapixels rounded up, at least 1."""
    return max(1, math.ceil(width * height / MEGAPIXEL))


def billable_units(images: Iterable[Mapping[str, Any]]) -> int:
    """The units of the images of an answer (each a mapping with ``width`` and ``height``; one
    whose size is missing counts 1)."""
    total = 0
    for image in images:
        width, height = image.get("width"), image.get("height")
        sized = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))
        total += image_units(width, height) if sized else 1
    return total


def answer_units(body: bytes) -> int | None:
    """The units of a JSON answer body that holds ``images``; None for any other body (no header)."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    images = answer.get("images") if isinstance(answer, dict) else None
    if not isinstance(images, list) or not all(isinstance(image, Mapping) for image in images):
        return None
    return billable_units(images)


class BillableUnits:
    """ASGI middleware: add ``x-fal-billable-units`` to each HTTP answer that lacks it (see the
    module's docstring for what is counted). A 200 JSON answer is held until its body is complete
    (its length does not change); every other answer passes straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def send_with_units(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                status = message["status"]
                if BILLABLE_UNITS_HEADER.encode() in names:
                    pass
                elif 400 <= status < 500:
                    message = {**message, "headers": [*headers, (BILLABLE_UNITS_HEADER.encode(), b"0")]}
                elif status == 200 and _is_json(headers):
                    held = message
                    return
                await send(message)
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(chunks)
                units = answer_units(body)
                start, held = held, None
                if units is not None:
                    start = {**start, "headers": [*start.get("headers", []),
                                                  (BILLABLE_UNITS_HEADER.encode(), str(units).encode())]}
                await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                await send(message)

        await self.app(scope, receive, send_with_units)


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the answer's content-type is JSON."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False
