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
