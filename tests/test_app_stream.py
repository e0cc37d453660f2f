"""POST /stream and stopping a generation, over HTTP against `fal run --local` on the demo profile
(test_app_server.py's server), as a client meets them: the server-sent events read with httpx, a
client that goes away mid-generation, and fal's cancellation call (POST <endpoint>/cancel)."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
from PIL import Image as PILImage
from test_app_server import SMALL, image_bytes, post, server

# test_app_server.py's `fal run --local` demo server: a fixture, and one of its own for this module.
__all__ = ["server"]

# The demo's largest request: about 8 s of generating on one core, so a stop is plainly early.
LONG = {"image_size": {"width": 512, "height": 256}, "num_inference_steps": 25, "num_images": 2, "output_format": "png"}
# The demo VAE decodes latents 4x: a 64x64 image has 16x16 latents, the size of its previews.
LATENT_SIDE = 16
LOG_WAIT_S = 60


def read_events(response: httpx.Response) -> Iterator[tuple[str | None, dict]]:
    """The server-sent events of ``response``: (event name, parsed data), as they arrive."""
    name, data = None, []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = None, []
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())


def stream(server, headers: dict | None = None, **body) -> list[tuple[str | None, dict]]:
    with httpx.stream("POST", f"{server['url']}/stream", json={"prompt": "a cat on a horse", **SMALL, **body},
                      headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(read_events(response))


def log_line(server, pattern: str) -> re.Match:
    """The first line of the server's log matching ``pattern``, waited for (at most LOG_WAIT_S)."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        match = re.search(pattern, server["log"].read_text(errors="replace"))
        if match or time.monotonic() > deadline:
            assert match, f"no log line matches {pattern!r}:\n{server['log'].read_text()[-3000:]}"
            return match
        time.sleep(0.1)


def without_file_name(image: dict) -> dict:
    """An image of a response without its file name, which fal draws at random for every encoding."""
    return {k: v for k, v in image.items() if k != "file_name"}


def cancelled_steps(server, request_id: str, reason: str) -> int:
    """How many of its 25 steps the request ``request_id`` ran before it stopped for ``reason``."""
    match = log_line(server, rf"generate\[{re.escape(request_id)}\]: cancelled after (\d+) of 25 steps "
                             rf"\({re.escape(reason)}\)")
    return int(match[1])


# --------------------------------------------------------------------------------------------------
# The stream


def test_stream_bills_the_started_megapixels_of_the_images_it_was_asked_for(server):
    body = {"prompt": "a cat on a horse", **SMALL, "num_images": 3, "num_inference_steps": 1}
    with httpx.stream("POST", f"{server['url']}/stream", json=body, timeout=120) as response:
        assert response.headers["x-fal-billable-units"] == "3"  # 64x64 is under one megapixel: 1 unit each
        list(read_events(response))


def test_stream_sends_one_progress_event_per_step_in_order_then_the_result(server):
    events = stream(server, seed=42, num_inference_steps=4)
    assert [name for name, _ in events] == ["progress"] * 4 + ["result"]
    assert [(data["step"], data["total_steps"]) for _, data in events[:-1]] == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_every_preview_decodes_as_a_jpeg_at_the_latent_resolution(server):
    events = stream(server, seed=5, num_images=2, num_inference_steps=2)
    for _, progress in events[:-1]:
        assert len(progress["previews"]) == 2
        for preview in progress["previews"]:
            header, _, data = preview["url"].partition(",")
            assert header == "data:image/jpeg;base64"
            picture = PILImage.open(io.BytesIO(base64.b64decode(data)))
            assert (picture.format, picture.size) == ("JPEG", (LATENT_SIDE, LATENT_SIDE))
            assert (preview["width"], preview["height"]) == (LATENT_SIDE, LATENT_SIDE)


def test_the_result_event_is_what_post_returns_for_the_same_request(server):
    [*_, (name, result)] = stream(server, seed=42, num_images=2)
    direct = post(server, seed=42, num_images=2).json()
    assert name == "result" and set(result) == set(direct) == {"images", "seed", "prompt", "has_nsfw_concepts", "timings"}
    assert (result["seed"], result["prompt"]) == (direct["seed"], direct["prompt"])
    assert [without_file_name(image) for image in result["images"]] == [without_file_name(i) for i in direct["images"]]
    assert set(result["timings"]) == set(direct["timings"]) == {"queue", "inference", "safety", "encode"}


def test_stream_with_invalid_input_is_422_naming_the_field_and_sends_no_events(server):
    response = httpx.post(f"{server['url']}/stream", json={"prompt": "a cat", **SMALL, "num_images": 5}, timeout=60)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert [error["loc"] for error in response.json()["detail"]] == [["body", "num_images"]]


# --------------------------------------------------------------------------------------------------
# Stopping: the client goes away, or fal cancels; the lock is released and the next request works


def test_closing_the_stream_after_the_first_progress_event_stops_the_generation(server):
    with httpx.stream("POST", f"{server['url']}/stream", json={"prompt": "a cat", **LONG, "seed": 1},
                      headers={"x-fal-request-id": "stream-closed-early"}, timeout=120) as response:
        name, first = next(read_events(response))
    assert (name, first["step"], first["total_steps"]) == ("progress", 1, 25)
    assert cancelled_steps(server, "stream-closed-early", "client disconnected") < 25
    assert image_bytes(post(server, seed=7))


def test_a_client_that_disconnects_from_post_stops_the_generation(server):
    body = json.dumps({"prompt": "a cat", **LONG, "seed": 2}).encode()
    url = urlsplit(server["url"])
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"x-fal-request-id: post-disconnected\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        log_line(server, r"generate\[post-disconnected\]: started")
    assert cancelled_steps(server, "post-disconnected", "client disconnected") < 25
    assert image_bytes(post(server, seed=7))


def test_fals_cancel_call_stops_a_post_request_which_answers_499(server):
    answers: list[httpx.Response] = []
    request = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{server['url']}/", json={"prompt": "a cat", **LONG, "seed": 3}, headers={"x-fal-request-id": "post-cancelled"},
        timeout=120)))
    request.start()
    log_line(server, r"generate\[post-cancelled\]: started")
    cancel = httpx.post(f"{server['url']}/cancel", headers={"x-fal-request-id": "post-cancelled"}, timeout=30)
    request.join(timeout=100)
    assert cancel.status_code == 200 and cancel.json() == {"request_id": "post-cancelled", "cancelled": True}
    steps = cancelled_steps(server, "post-cancelled", "cancelled through POST /cancel")
    assert steps < 25
    assert answers[0].status_code == 499
    assert answers[0].json() == {"detail": f"cancelled after {steps} of 25 steps (cancelled through POST /cancel)"}
    assert image_bytes(post(server, seed=7))


def test_fals_cancel_call_ends_a_stream_with_an_error_event(server):
    with httpx.stream("POST", f"{server['url']}/stream", json={"prompt": "a cat", **LONG, "seed": 4},
                      headers={"x-fal-request-id": "stream-cancelled"}, timeout=120) as response:
        events = read_events(response)
        assert next(events)[0] == "progress"
        cancel = httpx.post(f"{server['url']}/stream/cancel", headers={"x-fal-request-id": "stream-cancelled"},
                            timeout=30)
        *progress, (name, error) = list(events)
    assert cancel.status_code == 200
    assert name == "error" and {event for event, _ in progress} <= {"progress"}
    steps = cancelled_steps(server, "stream-cancelled", "cancelled through POST /stream/cancel")
    assert error == {"detail": f"cancelled after {steps} of 25 steps (cancelled through POST /stream/cancel)"}
    assert steps < 25
    assert image_bytes(post(server, seed=7))
