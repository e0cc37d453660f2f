"""POST /stream: server-sent events with the progress of one generation, then its result.

fal's streaming convention (fal docs, "Streaming Endpoints"): an ``@fal.endpoint("/stream")`` that
returns a ``StreamingResponse`` of SSE events; ``fal_client.stream(app, arguments)`` POSTs to
``<app>/stream`` and yields the JSON of each event's ``data:`` line. The events, in order::

    event: progress
    data: {"step": 1, "total_steps": 8, "previews": [{"url": "data:image/jpeg;base64,...", ...}]}
    ... one per denoising step, step 1 to total_steps ...
    event: result
    data: {"images": [...], "seed": 42, "prompt": "...", "timings": {...}}    <- what POST / returns

If the generation fails (or is cancelled through ``POST /stream/cancel``) after the stream began,
the last event is ``event: error`` with ``{"detail": "..."}`` instead of the result. If the client
goes away, the generation stops at its next step (serving.cancel).

The generation runs in a worker thread; its step callback builds each progress event there
(previews included) and hands it to the event loop, so the loop never waits on the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fal.toolkit import Image
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse

from serving.cancel import CLIENT_DISCONNECTED, CancelFlag, InFlight, request_id_of, watch_disconnect
from serving.generate import GenerationCancelled, Step
from serving.preview import LatentProjection, preview_images

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
PROGRESS, RESULT, ERROR = "progress", "result", "error"
# What a request's work is given: its request id, its cancel flag and the step callback.
Work = Callable[[str, CancelFlag, Callable[[Step], None]], BaseModel]
_END = object()


class StreamProgress(BaseModel):
    """The data of a ``progress`` event: one per finished denoising step."""

    step: int = Field(ge=1, description="Denoising steps finished so far: 1, 2, ... up to total_steps.",
                      examples=[3])
    total_steps: int = Field(ge=1, description="Denoising steps this request runs in all.", examples=[8])
    previews: list[Image] = Field(
        description="One preview per image (image i of num_images), decoded cheaply from the latents after "
        "this step: a fixed linear latent-to-RGB projection at the latent resolution (1/8 of the image's "
        "sides for SD and SDXL), as an inline JPEG data: URI. Not the final image: the latents are still "
        "noisy. Empty for a model family without a known projection.",
        examples=[[{"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg...", "content_type": "image/jpeg",
                    "width": 128, "height": 128}]],
    )


class StreamError(BaseModel):
    """The data of an ``error`` event: the generation ended without a result."""

    detail: str = Field(description="What went wrong.",
                        examples=["cancelled after 3 of 8 steps (cancelled through POST /cancel)"])


def sse(event: str, data: BaseModel) -> bytes:
    """One server-sent event: its name and its data as one line of JSON."""
    return f"event: {event}\ndata: {data.model_dump_json()}\n\n".encode()


def event_stream(request: Any, in_flight: InFlight, work: Work, projection: LatentProjection | None,
                 billable_units: int) -> StreamingResponse:
    """The SSE response of POST /stream: ``work`` (the generation, returning what POST / returns)
    runs when the client starts reading; progress events while it runs, then its result. Its
    headers leave before any image exists, so it bills the ``billable_units`` asked for."""
    from .billing import BILLABLE_UNITS_HEADER

    return StreamingResponse(_events(request, in_flight, work, projection), media_type=MEDIA_TYPE,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      BILLABLE_UNITS_HEADER: str(billable_units)})


async def _events(request: Any, in_flight: InFlight, work: Work,
                  projection: LatentProjection | None) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:  # from the worker thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def on_step(step: Step) -> None:
        previews = preview_images(step.latents, projection) if projection is not None else []
        put(sse(PROGRESS, StreamProgress(step=step.done, total_steps=step.total, previews=previews)))

    with in_flight.register(request_id_of(request.headers)) as (request_id, flag):

        def run() -> None:
            try:
                put(sse(RESULT, work(request_id, flag, on_step)))
            except GenerationCancelled as exc:
                put(sse(ERROR, StreamError(detail=str(exc))))
            except Exception:  # the stream has begun (status 200 is sent): the error becomes its last event
                log.exception("stream[%s]: the generation failed", request_id)
                put(sse(ERROR, StreamError(detail="Internal Server Error")))  # what POST / answers, with a 500
            finally:
                put(_END)

        # The request's context (fal's request state, e.g. for CDN uploads) goes with the work.
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(run,), name=f"stream-{request_id}", daemon=True).start()
        watcher = asyncio.ensure_future(watch_disconnect(request, flag))
        ended = False
        try:
            while (item := await queue.get()) is not _END:
                yield item
            ended = True
        finally:
            # Closed or cancelled before the end: the client has gone; stop at the next step.
            if not ended:
                flag.cancel(CLIENT_DISCONNECTED)
            watcher.cancel()


def document_stream(app: Any, path: str, result_model: type[BaseModel]) -> None:
    """Describe POST ``path``'s events in ``app``'s OpenAPI schema (FastAPI cannot see them in a
    ``StreamingResponse``): the three event kinds, their data models (``result_model`` for the
    result) with descriptions and examples, and an example stream."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        spec = build()
        operation = spec.get("paths", {}).get(path, {}).get("post")
        if operation is not None:
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (StreamProgress, StreamError, result_model):
                _register(schemas, model)
            operation.setdefault("responses", {})["200"] = _stream_response(result_model.__name__)
        return spec

    app.openapi = openapi


def _register(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schema.setdefault("x-fal-order-properties", list(schema.get("properties", {})))
    schemas.setdefault(model.__name__, schema)


def _stream_response(result_name: str) -> dict[str, Any]:
    ref = "#/components/schemas/{}".format
    example_progress = [{"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg...", "content_type": "image/jpeg",
                         "width": 128, "height": 128}]
    example = (
        f'event: progress\ndata: {{"step": 1, "total_steps": 2, "previews": {json.dumps(example_progress)}}}\n\n'
        f'event: progress\ndata: {{"step": 2, "total_steps": 2, "previews": {json.dumps(example_progress)}}}\n\n'
        'event: result\ndata: {"images": [{"url": "https://v3.fal.media/files/elephant/lighthouse.jpeg", '
        '"content_type": "image/jpeg", "width": 1024, "height": 1024}], "seed": 42, '
        '"prompt": "a lighthouse on a cliff at sunset", "timings": {"queue": 0.0, "inference": 2.41, '
        '"encode": 0.12}}\n\n'
    )
    return {
        "description": "Server-sent events (text/event-stream): one `progress` event per denoising step "
        f"(data: {StreamProgress.__name__}), then one `result` event whose data is exactly what POST / "
        f"returns ({result_name}); or, when the generation fails or is cancelled after the stream began, a "
        f"last `error` event ({StreamError.__name__}). fal_client.stream() yields each event's data as a dict.",
        "content": {
            MEDIA_TYPE: {
                "schema": {"type": "string", "description": "A stream of server-sent events."},
                "itemSchema": {  # OpenAPI 3.2's description of one event, as FastAPI writes it
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": [PROGRESS, RESULT, ERROR]},
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {"oneOf": [{"$ref": ref(StreamProgress.__name__)},
                                                        {"$ref": ref(result_name)},
                                                        {"$ref": ref(StreamError.__name__)}]},
                        },
                    },
                },
                "example": example,
            },
        },
    }
