"""Stopping a request's generation when its caller goes away or fal cancels it.

A request gets a :class:`CancelFlag` that the pipeline's step callback reads (serving.generate
raises at the next denoising step once it is set). Two things set it:

- the client disconnecting: the ASGI ``http.disconnect`` message, which :func:`cancel_on_disconnect`
  waits for while the generation runs in a worker thread (the same watch as fal's
  ``fal.toolkit.utils.endpoint.cancel_on_disconnect``, but setting a flag a thread can read instead
  of cancelling an async scope, which cannot stop a thread);
- fal's cancellation call: fal sends ``POST <endpoint path>/cancel`` with the request's
  ``x-fal-request-id`` header (fal's "Handle request cancellations" docs); :class:`InFlight` finds
  the request's flag by that id.

Torch-free and without fal imports (FastAPI and pydantic only, for the cancel endpoints; conversion.errors
for how messages echo caller input).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, Field

from conversion.errors import shown

# fal's request id header: on the request itself and on its cancellation (POST <path>/cancel).
REQUEST_ID_HEADER = "x-fal-request-id"
# Why a request stopped, as logged.
CLIENT_DISCONNECTED = "client disconnected"
REQUEST_ENDED = "the request ended"  # its task was cancelled (e.g. the server is stopping)
# How often a request waiting for the pipeline lock looks at its flag.
LOCK_POLL_S = 0.05


class CancelOutput(BaseModel):
    """The answer of ``POST /cancel`` and ``POST /stream/cancel``."""

    request_id: str = Field(description="The request asked to stop (its x-fal-request-id).",
                            examples=["f2b1c6a0-6a0e-4a4e-9c55-1f0e2c3d4b5a"])
    cancelled: bool = Field(description="True: the request was in flight and stops at its next denoising step.",
                            examples=[True])


class CancelFlag:
    """Set once, from any thread, with the reason; read by the pipeline's step callback."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._guard = threading.Lock()
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        """Ask the generation to stop at its next step; the first reason given is kept."""
        with self._guard:
            if self.reason is None:
                self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        """Whether the generation has been asked to stop."""
        return self._event.is_set()


class InFlight:
    """The requests being served, by request id, so a cancellation call can find its request.

    Every flag registered under an id is kept: two requests in flight under one id (a caller
    reusing ``x-fal-request-id``) are both cancelled by it, and each leaves on its own.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._flags: dict[str, list[CancelFlag]] = {}
        self._local_ids = itertools.count(1)

    @contextlib.contextmanager
    def register(self, request_id: str | None) -> Iterator[tuple[str, CancelFlag]]:
        """A fresh flag for one request, findable by ``request_id`` (a local id when fal gave none)
        until the block ends."""
        flag = CancelFlag()
        with self._guard:
            key = request_id or f"local-{next(self._local_ids)}"
            self._flags.setdefault(key, []).append(flag)
        try:
            yield key, flag
        finally:
            with self._guard:
                flags = self._flags[key]
                flags.remove(flag)
                if not flags:
                    del self._flags[key]

    def cancel(self, request_id: str, reason: str) -> bool:
        """Set the flag of every request in flight under ``request_id``; False when there is none."""
        with self._guard:
            flags = list(self._flags.get(request_id, ()))
        for flag in flags:
            flag.cancel(reason)
        return bool(flags)


def cancel_request(in_flight: InFlight, request: Any) -> CancelOutput:
    """Answer fal's ``POST <endpoint>/cancel``: stop the request named by its ``x-fal-request-id``
    header (400 without one, 404 when no such request is in flight)."""
    request_id = request_id_of(request.headers)
    if request_id is None:
        raise HTTPException(400, f"the {REQUEST_ID_HEADER} header is required: it names the request to cancel")
    if not in_flight.cancel(request_id, f"cancelled through POST {request.url.path}"):
        raise HTTPException(404, f"no request {shown(request_id)} is in flight (finished, or never started)")
    return CancelOutput(request_id=request_id, cancelled=True)


def request_id_of(headers: Any) -> str | None:
    """The fal request id of a request's headers, or None (a local run, a direct call)."""
    value = headers.get(REQUEST_ID_HEADER)
    return (value.strip() or None) if isinstance(value, str) else None


async def watch_disconnect(request: Any, flag: CancelFlag) -> None:
    """Wait for the client to go away (``http.disconnect``) and then set ``flag``.

    Call it only once the request body has been read (FastAPI reads it before the endpoint runs):
    from then on the only message an ASGI server delivers is the disconnect.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            flag.cancel(CLIENT_DISCONNECTED)
            return


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Any, flag: CancelFlag) -> AsyncIterator[None]:
    """Within the block, a client disconnect sets ``flag`` (the generation runs in a thread meanwhile)."""
    watcher = asyncio.ensure_future(watch_disconnect(request, flag))
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def acquire_unless_cancelled(lock: threading.Lock, flag: CancelFlag | None) -> bool:
    """Take ``lock``; give up (False) as soon as ``flag`` is set, so a request cancelled while it
    waits for the pipeline leaves at once instead of after the running one."""
    while not lock.acquire(timeout=LOCK_POLL_S):
        if flag is not None and flag.is_set():
            return False
    if flag is not None and flag.is_set():
        lock.release()
        return False
    return True
