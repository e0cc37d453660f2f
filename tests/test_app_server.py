"""The real thing: `fal run --local flashpack-t2i` (what `make serve` runs) as a subprocess on free
ports, offline and without fal credentials, called over HTTP."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fal_client
import httpx
import numpy as np
import pytest
from PIL import Image as PILImage

REPO = Path(__file__).resolve().parents[1]
FAL = Path(sys.executable).with_name("fal")
SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "output_format": "png"}
START_TIMEOUT_S = 100  # below pytest-timeout (120 s) so a slow start fails with the server log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A `fal run --local` server on the demo profile; yields its base URL, stops it afterwards."""
    if not FAL.exists():
        pytest.skip(f"the fal CLI is not installed next to {sys.executable}")
    root = tmp_path_factory.mktemp("server-data")
    log_path = root / "server.log"
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "APP_PROFILE": "demo",
        "APP_DATA_ROOT": str(root),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # 2 shared cores: one thread per op is the fastest and steadiest here
    }
    env.pop("FAL_KEY", None)  # no fal credentials are needed
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(FAL), "run", "--local", "--exposed-port", str(port), "--exposed-metrics-port", str(metrics_port),
             "flashpack-t2i"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"fal run --local exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no healthy server after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "log": log_path, "root": root}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(server, **body) -> httpx.Response:
    return httpx.post(f"{server['url']}/", json={"prompt": "a cat on a horse", **SMALL, **body}, timeout=120)


def image_bytes(response: httpx.Response) -> list[bytes]:
    assert response.status_code == 200, response.text
    return [base64.b64decode(image["url"].partition(",")[2]) for image in response.json()["images"]]


def test_health_reports_the_demo_model_and_setup_phases(server):
    body = httpx.get(f"{server['url']}/health", timeout=10).json()
    assert body["status"] == "ok" and body["profile"] == "demo" and body["model"] == "demo"
    assert set(body["setup_seconds"]) == {"lookup", "store", "load", "warmup", "total"}
    assert Path(body["store"]).is_relative_to(server["root"])


def test_setup_logs_one_line_per_phase(server):
    log = server["log"].read_text()
    for phase in ("lookup", "store", "load", "warmup"):
        assert f"app INFO {phase}: " in log, log[-3000:]
    assert "setup: ready in" in log


def test_same_seed_same_bytes_and_other_seed_other_bytes_over_http(server):
    first, second, other = post(server, seed=42), post(server, seed=42), post(server, seed=43)
    assert image_bytes(first) == image_bytes(second)
    assert image_bytes(first) != image_bytes(other)
    assert first.json()["seed"] == 42


def test_image_i_is_image_0_of_seed_plus_i_within_one_level_over_http(server):
    batch = image_bytes(post(server, seed=0, num_images=2))  # one batched pipeline call: README's tolerance
    singles = [image_bytes(post(server, seed=0))[0], image_bytes(post(server, seed=1))[0]]
    for image, single in zip(batch, singles, strict=True):
        assert np.abs(levels(image) - levels(single)).max() <= 1


def levels(png: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize(
    ("field", "change"),
    [("prompt", {"prompt": ""}), ("seed", {"seed": -1}), ("num_images", {"num_images": 5}),
     ("image_size", {"image_size": "giant"}), ("num_inference_steps", {"num_inference_steps": 0}),
     ("output_format", {"output_format": "bmp"})],
)
def test_invalid_input_is_422_and_the_server_keeps_serving(server, field, change):
    response = post(server, **change)
    assert response.status_code == 422
    assert any(error["loc"][:2] == ["body", field] for error in response.json()["detail"])
    assert post(server, seed=7).status_code == 200


def test_safety_checker_verdicts_over_http_one_per_image_and_the_switch_is_a_strict_boolean(server):
    checked, unchecked = post(server, seed=5, num_images=2), post(server, seed=5, num_images=2,
                                                                enable_safety_checker=False)
    assert checked.json()["has_nsfw_concepts"] == unchecked.json()["has_nsfw_concepts"] == [False, False]
    assert image_bytes(checked) == image_bytes(unchecked)  # the demo checker passes the demo's images
    refused = post(server, enable_safety_checker="no")
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "enable_safety_checker"]
    health = httpx.get(f"{server['url']}/health", timeout=10).json()
    assert Path(health["safety_checker"]).parent == server["root"] / "flashpack"


def test_body_over_max_request_bytes_is_413_over_http_and_the_server_keeps_serving(server):
    response = httpx.post(f"{server['url']}/", content=b"x" * (1024 * 1024 + 1),
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert "more than the limit of 1048576 bytes" in response.json()["detail"]
    assert post(server, seed=7).status_code == 200


def test_eight_concurrent_requests_all_succeed_and_match_sequential(server):
    seeds = list(range(100, 108))
    sequential = [image_bytes(post(server, seed=seed)) for seed in seeds]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda seed: post(server, seed=seed), seeds))
    assert [r.status_code for r in responses] == [200] * 8
    assert [image_bytes(r) for r in responses] == sequential


def test_each_answer_is_billed_its_images_and_a_refused_request_nothing_over_http(server):
    assert post(server, seed=5, num_images=2).headers["x-fal-billable-units"] == "2"  # 64x64: one unit each
    assert post(server, num_images=5).headers["x-fal-billable-units"] == "0"  # 422
    too_large = httpx.post(f"{server['url']}/", content=b"x" * (1024 * 1024 + 1),
                           headers={"content-type": "application/json"}, timeout=60)
    assert too_large.status_code == 413 and too_large.headers["x-fal-billable-units"] == "0"


@pytest.fixture
def local_fal_client(server, monkeypatch) -> fal_client.SyncClient:
    """fal-client's synchronous client, aimed at the local server. fal-client 1.0.3 builds run()'s
    URL as ``RUN_URL_FORMAT + application`` (+ ``"/" + path``), with ``RUN_URL_FORMAT =
    "https://{FAL_RUN_HOST}/"`` fixed when it is imported; the local server speaks plain HTTP and
    serves the app at "/", so the prefix itself is the server's URL (no trailing slash, so that
    ``path="/stream"`` stays one slash) and the application is "". No key is checked locally."""
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", server["url"])
    return fal_client.SyncClient(key="local-server-checks-no-key")


def test_fal_clients_synchronous_run_gets_the_same_image_as_plain_http(server, local_fal_client):
    result = local_fal_client.run("", arguments={"prompt": "a cat on a horse", **SMALL, "seed": 42})
    assert result["seed"] == 42 and result["prompt"] == "a cat on a horse"
    [image] = result["images"]
    assert (image["width"], image["height"], image["content_type"]) == (64, 64, "image/png")
    assert [base64.b64decode(image["url"].partition(",")[2])] == image_bytes(post(server, seed=42))


def test_fal_clients_run_reaches_other_paths_of_the_app(local_fal_client):
    assert local_fal_client.run("", arguments={}, method="GET", path="health")["status"] == "ok"


def test_fal_clients_run_raises_the_servers_422_naming_the_field(local_fal_client):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        local_fal_client.run("", arguments={"prompt": "a cat", **SMALL, "num_images": 5})
    assert info.value.status_code == 422
    assert '"num_images"' in info.value.response.text


def test_a_lora_changes_its_own_request_only_and_a_foreign_one_is_422_over_http(server, tmp_path):
    from diffusers import UNet2DConditionModel

    from conversion.sources import TRAINED_DIR, url_hash
    from tests.tiny_models import data_uri, make_tiny_lora, tiny_sdxl_pipeline

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TRAINED_DIR / "pipeline" / "unet"))
    lora = data_uri(make_tiny_lora(tmp_path / "demo", unet, seed=21))
    before = image_bytes(post(server, seed=31))
    with_lora = image_bytes(post(server, seed=31, loras=[{"path": lora, "scale": 1.0}]))
    assert image_bytes(post(server, seed=31)) == before and with_lora != before
    # a data: URI is read from the request: nothing reaches the volume
    assert not (server["root"] / ".cache" / "loras").exists()
    assert not (server["root"] / ".fal" / "model_weights" / url_hash(lora)).exists()
    foreign = data_uri(make_tiny_lora(tmp_path / "sdxl", tiny_sdxl_pipeline().unet, seed=1))
    for bad, message in ((foreign, "not a LoRA for this model's architecture"), ("http://example.com/a.safetensors",
                                                                                 "http: URLs are not accepted")):
        refused = post(server, seed=31, loras=[{"path": bad}])
        assert refused.status_code == 422 and refused.headers["x-fal-billable-units"] == "0"
        [error] = refused.json()["detail"]
        assert error["loc"] == ["body", "loras", 0, "path"] and message in error["msg"], error
    assert image_bytes(post(server, seed=31)) == before
