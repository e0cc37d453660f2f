"""POST /image-to-image and POST /inpaint over HTTP against `fal run --local` on the demo profile
(test_app_server.py's server), as a client meets them: data: URIs in, fal-client's encode_image
and run(), a 422 naming the field for an unreachable URL or a mask of the wrong size."""

from __future__ import annotations

import base64
import io

import fal_client
import httpx
import numpy as np
from PIL import Image as PILImage
from test_app_server import image_bytes, levels, local_fal_client, server

__all__ = ["server", "local_fal_client"]  # test_app_server.py's fixtures: one server for this module

STEPS = {"num_inference_steps": 4, "output_format": "png"}
SOURCE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
MASK = np.zeros((48, 64), dtype=np.uint8)
MASK[8:40, 16:48] = 255


def data_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server['url']}{path}", json={"prompt": "a cat on a horse", "image_url": data_uri(SOURCE),
                                                      **STEPS, **body}, timeout=120)


def test_image_to_image_over_http_same_seed_same_bytes_the_inputs_size_and_billed(server):
    first, again, other = (post(server, "/image-to-image", seed=seed, strength=0.75) for seed in (42, 42, 43))
    assert image_bytes(first) == image_bytes(again) != image_bytes(other)
    [image] = first.json()["images"]
    assert (image["width"], image["height"]) == (64, 48)
    assert first.headers["x-fal-billable-units"] == "1"


def test_inpaint_over_http_keeps_the_unmasked_pixels(server):
    response = post(server, "/inpaint", mask_url=data_uri(MASK), seed=3, num_images=2)
    assert response.headers["x-fal-billable-units"] == "2"
    for png in image_bytes(response):
        difference = np.abs(levels(png) - SOURCE.astype(np.int16)).max(axis=-1)
        assert difference[MASK == 0].max() == 0 and difference[MASK == 255].mean() > 40


def test_an_unreachable_image_url_is_422_naming_it_and_the_server_keeps_serving(server):
    response = post(server, "/image-to-image", image_url="https://localhost:1/cat.png")
    assert response.status_code == 422 and response.headers["x-fal-billable-units"] == "0"
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "image_url"] and error["msg"].startswith("image_url could not be fetched")
    assert image_bytes(post(server, "/image-to-image", seed=1))


def test_a_mask_of_another_size_is_422_naming_mask_url_over_http(server):
    response = post(server, "/inpaint", mask_url=data_uri(MASK[:32, :32]))
    assert response.status_code == 422
    assert response.json()["detail"] == [{"loc": ["body", "mask_url"], "type": "mask_size",
                                          "msg": "mask_url is 32x32 but the image is 64x48: they must be the same size"}]


def test_fal_clients_encode_image_and_run_reach_both_endpoints(server, local_fal_client):
    image, mask = fal_client.encode_image(PILImage.fromarray(SOURCE)), fal_client.encode_image(PILImage.fromarray(MASK))
    arguments = {"prompt": "a cat on a horse", "image_url": image, **STEPS, "seed": 42, "strength": 0.75}
    result = local_fal_client.run("", arguments=arguments, path="image-to-image")
    assert result["seed"] == 42 and (result["images"][0]["width"], result["images"][0]["height"]) == (64, 48)
    inpainted = local_fal_client.run("", arguments={**arguments, "mask_url": mask}, path="inpaint")
    assert len(inpainted["images"]) == 1 and inpainted["has_nsfw_concepts"] == [False]


def test_the_cancel_paths_of_both_endpoints_are_served(server):
    for path in ("/image-to-image/cancel", "/inpaint/cancel"):
        response = httpx.post(f"{server['url']}{path}", headers={"x-fal-request-id": "not-in-flight"}, timeout=30)
        assert response.status_code == 404  # routed: fal's cancellation call finds no such request
