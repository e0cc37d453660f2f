"""serving.billing: the x-fal-billable-units header fal charges by, on a small Starlette app.
(Through the app itself: test_app_schema.py and, over HTTP, test_app_server.py.)"""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.billing import BILLABLE_UNITS_HEADER, BillableUnits, billable_units, image_units


@pytest.mark.parametrize(
    ("width", "height", "units"),
    [(64, 64, 1), (256, 256, 1), (1024, 1024, 1), (1024, 1032, 2), (1024, 1536, 2), (1536, 1536, 3),
     (2048, 2048, 4)],
)
def test_an_image_is_billed_its_megapixels_rounded_up(width, height, units):
    assert image_units(width, height) == units


def test_an_answer_is_billed_the_sum_of_its_images_and_an_unsized_image_counts_one():
    images = [{"width": 1024, "height": 1024}, {"width": 1536, "height": 1536}, {"width": None, "height": None}]
    assert billable_units(images) == 1 + 3 + 1
    assert billable_units([]) == 0


def answer(body: object, status: int = 200, headers: dict[str, str] | None = None):
    async def endpoint(request):
        return JSONResponse(body, status, headers=headers)

    return endpoint


def client_for(endpoint) -> TestClient:
    app = Starlette(routes=[Route("/", endpoint, methods=["GET", "POST"])])
    app.add_middleware(BillableUnits)
    return TestClient(app)


def test_a_successful_answer_carries_the_units_of_the_images_it_delivers_and_its_body_unchanged():
    body = {"images": [{"url": "data:", "width": 1024, "height": 1536}, {"url": "data:", "width": 512, "height": 512}],
            "seed": 7}
    response = client_for(answer(body)).post("/")
    assert response.headers[BILLABLE_UNITS_HEADER] == "3"
    assert response.json() == body
    assert int(response.headers["content-length"]) == len(json.dumps(body, separators=(",", ":")))


def test_an_answer_with_no_images_is_billed_zero():
    assert client_for(answer({"images": []})).post("/").headers[BILLABLE_UNITS_HEADER] == "0"


@pytest.mark.parametrize("status", [400, 404, 413, 422, 499])
def test_a_refused_request_is_billed_zero(status):
    response = client_for(answer({"detail": "no"}, status)).post("/")
    assert response.status_code == status
    assert response.headers[BILLABLE_UNITS_HEADER] == "0"


def test_units_the_endpoint_set_itself_are_kept():
    body = {"images": [{"width": 1024, "height": 1024}]}
    response = client_for(answer(body, headers={BILLABLE_UNITS_HEADER: "5"})).post("/")
    assert response.headers.get_list(BILLABLE_UNITS_HEADER) == ["5"]


@pytest.mark.parametrize(
    "endpoint",
    [answer({"status": "ok"}), answer([1, 2]), answer({"images": "none"}), answer({"detail": "boom"}, 500)],
    ids=["json-without-images", "json-list", "images-not-a-list", "server-error"],
)
def test_answers_that_deliver_no_images_get_no_header(endpoint):
    assert BILLABLE_UNITS_HEADER not in client_for(endpoint).post("/").headers


def test_plain_text_and_streamed_answers_pass_through_untouched():
    async def text(request):
        return PlainTextResponse("hello")

    async def stream(request):
        async def events():
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    assert BILLABLE_UNITS_HEADER not in client_for(text).get("/").headers
    response = client_for(stream).get("/")
    assert response.text == "data: 1\n\ndata: 2\n\n"
    assert BILLABLE_UNITS_HEADER not in response.headers
