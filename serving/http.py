"""The HTTP guards of the app: a request body limit (413) and 422 answers that stay short.

Both sit in front of fal's FastAPI app, so what a client sends is bounded before pydantic or the
endpoint sees it, and a refused 10 MB prompt is not sent back.
"""

import json
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A 422 answer echoes at most this many characters of any input, and at most this many errors.
ECHO_CHARS = 100
MAX_ERRORS_SHOWN = 20


class RequestBodyLimit:
    """ASGI middleware: answer 413 to an HTTP request whose body exceeds ``max_bytes``.

    A declared Content-Length is checked before anything is read; a body without one (chunked) is
    counted as it arrives. The body is read here in full (FastAPI reads it whole anyway) and then
    handed on unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(declared, scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: nobody left to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(None, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, declared: int | None, scope: Scope, receive: Receive, send: Send) -> None:
        size = f"is {declared} bytes, more than" if declared is not None else "exceeds"
        detail = f"the request body {size} the limit of {self.max_bytes} bytes ([serving] max_request_bytes in fal.toml)"
        response = JSONResponse({"detail": detail}, 413, headers={"x-fal-billable-units": "0"})
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The request's Content-Length when it has exactly one well-formed one, else None."""
    values = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
    return int(values[0]) if len(values) == 1 and values[0].strip().isdigit() else None


def short_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """``errors`` for a 422 answer that echoes no more than ECHO_CHARS of any input (values and
    key names) and at most MAX_ERRORS_SHOWN errors: a 10 MB prompt is not sent back."""
    shown = []
    for error in errors[:MAX_ERRORS_SHOWN]:
        error = dict(error)
        error["loc"] = [_shorten(part) if isinstance(part, str) else part for part in error.get("loc", ())]
        if "input" in error:
            error["input"] = _short_input(error["input"])
        shown.append(error)
    if len(errors) > MAX_ERRORS_SHOWN:
        shown.append({"type": "too_many_errors", "loc": ["body"], "input": None,
                      "msg": f"{len(errors) - MAX_ERRORS_SHOWN} more errors not shown"})
    return shown


def _short_input(value: Any) -> Any:
    """``value`` when it is short; else its first ECHO_CHARS characters (objects as JSON) and "..."."""
    if isinstance(value, str):
        return _shorten(value)
    if isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False, default=repr)
        return value if len(text) <= ECHO_CHARS else _shorten(text)
    return value


def _shorten(text: str) -> str:
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def shorten_validation_answers(app: FastAPI) -> None:
    """Wrap ``app``'s registered 422 handler (fal's) so it keeps its format and headers but
    answers with :func:`short_validation_errors`. Call it after that handler is registered."""
    handler = app.exception_handlers[RequestValidationError]

    async def short_422(request: Any, exc: RequestValidationError) -> Any:
        return await handler(request, RequestValidationError(short_validation_errors(exc.errors())))

    app.add_exception_handler(RequestValidationError, short_422)
