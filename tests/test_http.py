"""serving.http alone: the request body limit as an ASGI middleware, and the 422 errors shortened.
(Through fal's own app, with its 422 handler, they are tested in test_app_schema.py.)"""

from __future__ import annotations

import asyncio
import json

from serving.http import ECHO_CHARS, MAX_ERRORS_SHOWN, RequestBodyLimit, short_validation_errors


def run_limit(max_bytes: int, scope: dict, messages: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Call RequestBodyLimit around a recording app; (scopes the app saw, what it received, what was sent)."""
    reached, received, sent = [], [], []

    async def app(scope, receive, send):
        reached.append(scope)
        received.append(await receive())

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(RequestBodyLimit(app, max_bytes=max_bytes)(scope, receive, send))
    return reached, received, sent


def http_scope(*headers: tuple[bytes, bytes]) -> dict:
    return {"type": "http", "method": "POST", "path": "/", "headers": list(headers)}


def test_streamed_body_is_counted_across_chunks_and_never_reaches_the_app():
    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True} for _ in range(3)]
    reached, _, sent = run_limit(1000, http_scope(), chunks)
    assert reached == [] and sent[0]["status"] == 413


def test_declared_content_length_over_the_limit_is_refused_before_the_body_is_read():
    messages = [{"type": "http.request", "body": b"x" * 10, "more_body": False}]
    reached, _, sent = run_limit(1000, http_scope((b"content-length", b"5000")), messages)
    assert reached == [] and len(messages) == 1  # nothing read
    assert sent[0]["status"] == 413 and (b"x-fal-billable-units", b"0") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"detail": "the request body is 5000 bytes, more than the limit of 1000 "
                                                     "bytes ([serving] max_request_bytes in fal.toml)"}


def test_a_body_within_the_limit_reaches_the_app_whole_in_one_message():
    chunks = [{"type": "http.request", "body": b"ab", "more_body": True},
              {"type": "http.request", "body": b"cd", "more_body": False}]
    reached, received, sent = run_limit(1000, http_scope(), chunks)
    assert len(reached) == 1 and sent == []
    assert received == [{"type": "http.request", "body": b"abcd", "more_body": False}]


def test_other_scopes_pass_through_untouched():
    reached, received, _ = run_limit(1, {"type": "lifespan"}, [{"type": "lifespan.startup"}])
    assert reached == [{"type": "lifespan"}] and received == [{"type": "lifespan.startup"}]


def test_short_validation_errors_echo_short_prefixes_of_inputs_and_key_names():
    errors = [{"type": "string_too_long", "loc": ("body", "prompt"), "msg": "too long", "input": "y" * 900},
              {"type": "extra_forbidden", "loc": ("body", "k" * 500), "msg": "extra", "input": 1},
              {"type": "missing", "loc": ("body", "prompt"), "msg": "missing", "input": {"x": "z" * 500}},
              {"type": "missing", "loc": ("body", 0), "msg": "small", "input": {"x": 1}}]
    shown = short_validation_errors(errors)
    assert shown[0]["input"] == "y" * ECHO_CHARS + "..." and shown[0]["loc"] == ["body", "prompt"]
    assert shown[1]["loc"] == ["body", "k" * ECHO_CHARS + "..."] and shown[1]["input"] == 1
    assert shown[2]["input"] == json.dumps({"x": "z" * 500})[:ECHO_CHARS] + "..."
    assert shown[3] == {"type": "missing", "loc": ["body", 0], "msg": "small", "input": {"x": 1}}  # short: as is
    assert errors[0]["input"] == "y" * 900  # the caller's errors are not changed


def test_short_validation_errors_show_at_most_20_and_count_the_rest():
    errors = [{"type": "extra_forbidden", "loc": ("body", f"extra{i}"), "msg": "extra", "input": i} for i in range(50)]
    shown = short_validation_errors(errors)
    assert len(shown) == MAX_ERRORS_SHOWN + 1 == 21
    assert shown[-1] == {"type": "too_many_errors", "loc": ["body"], "input": None, "msg": "30 more errors not shown"}
