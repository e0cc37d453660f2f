"""A request's LoRA and image URLs against a hostile https server (tests/https_server.py), through the
demo app in-process: nobody can fill the volume or stall the runner through a request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import uvicorn
from fastapi import HTTPException

from conversion.config import ConversionConfig
from conversion.download.lora_files import LORA_FILE
from conversion.sources.url import url_hash
from serving.lora import LoraLibrary, LoraRequestError
from serving.settings import LoraSettings
from tests import test_app
from tests.tiny_models import make_tiny_lora, tiny_sdxl_pipeline

SMALL = {"prompt": "a cat on a horse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2,
         "output_format": "png"}
MB = 1024 * 1024

served = test_app.served  # the demo app after setup(), one per module


@pytest.fixture(scope="module")
def lora_files(served, tmp_path_factory):
    """LoRA files: two for the demo model, one for SDXL, and 700 KB of random bytes."""
    pipe, root = served.app.pipe, tmp_path_factory.mktemp("lora-files")
    junk = root / "junk.safetensors"
    junk.write_bytes(os.urandom(700 * 1024))
    return SimpleNamespace(
        demo=make_tiny_lora(root / "demo", pipe.unet, pipe.text_encoder, seed=21).read_bytes(),
        demo2=make_tiny_lora(root / "demo2", pipe.unet, seed=22).read_bytes(),
        sdxl=make_tiny_lora(root / "sdxl", tiny_sdxl_pipeline().unet, seed=3).read_bytes(),
        junk=junk.read_bytes(),
    )


@pytest.fixture
def library(served, monkeypatch):
    """Install a LoRA library with these settings in the served app (and return it)."""
    def install(root: Path | None = None, **settings) -> LoraLibrary:
        lib = LoraLibrary.for_pipeline(served.app.pipe, LoraSettings(**settings), root or served.root,
                                       config=ConversionConfig.from_env())
        monkeypatch.setattr(served.app, "_loras", lib)
        return lib
    return install


def post(served, path: str = "/", headers: dict | None = None, **body):
    return served.client.post(path, json={**SMALL, **body}, headers=headers or {})


def image(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["images"][0]["url"]


def entries(root: Path) -> list[str]:
    """What is in the volume's LoRA directory (entries and temporary directories)."""
    directory = root / ".cache" / "loras"
    return sorted(os.listdir(directory)) if directory.exists() else []


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def in_thread(call) -> dict:
    """Run ``call`` in a thread; the returned dict gets its ``result`` (or ``error``) and ``seconds``."""
    out: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        out["seconds"] = time.monotonic() - started

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


@pytest.fixture
def tiny_volume(tmp_path):
    """A 4 MiB tmpfs as the volume (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a tiny tmpfs volume needs root to mount")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# -------------------------------------------------------------------------------------------------
# The volume


def test_an_https_lora_is_fetched_onto_the_volume_once_and_applied(served, hostile_https, lora_files, library):
    lib = library(served.root / "once")
    url = hostile_https.file_url("once.safetensors", lora_files.demo)
    before = image(post(served, seed=3))
    first, again = (image(post(served, seed=3, loras=[{"path": url}])) for _ in range(2))
    assert first == again != before
    [entry] = entries(served.root / "once")
    assert (served.root / "once" / ".cache" / "loras" / entry / LORA_FILE).read_bytes() == lora_files.demo
    assert hostile_https.hits["/files/once.safetensors"] == 1
    assert lib.fetches_in_flight == 0


@pytest.mark.parametrize(("name", "message"), [("junk", "not a safetensors file"),
                                               ("sdxl", "not a LoRA for this model's architecture")])
def test_a_refused_lora_file_is_deleted_from_the_volume(served, hostile_https, lora_files, library, name, message):
    library(served.root / f"refused-{name}")
    url = hostile_https.file_url(f"refused-{name}.safetensors", getattr(lora_files, name))
    response = post(served, loras=[{"path": url}])
    assert response.status_code == 422 and message in response.json()["detail"][0]["msg"]
    assert entries(served.root / f"refused-{name}") == []


def test_junk_lora_urls_never_fill_a_tiny_volume(served, hostile_https, lora_files, library, tiny_volume):
    library(tiny_volume, max_file_mb=1, volume_mb=1)
    statuses = []
    for i in range(12):  # 12 x 700 KB: twice the 4 MiB volume
        url = hostile_https.file_url(f"junk-{i}.safetensors", lora_files.junk)
        statuses.append(post(served, loras=[{"path": url}]).status_code)
    assert statuses == [422] * 12
    assert entries(tiny_volume) == []


def test_a_full_volume_while_fetching_a_lora_is_507_naming_it(served, hostile_https, library, tiny_volume):
    library(tiny_volume, max_file_mb=8, volume_mb=8)
    url = hostile_https.file_url("big.safetensors", os.urandom(6 * MB))  # more than the 4 MiB volume holds
    response = post(served, loras=[{"path": url}])
    assert response.status_code == 507
    detail = response.json()["detail"]
    assert detail.startswith("loras[0]: https://") and "could not be stored: no space left" in detail
    assert entries(tiny_volume) == []


def test_lora_files_over_the_volume_budget_evict_the_least_recently_used(served, hostile_https, lora_files,
                                                                        library):
    root = served.root / "budget"
    lib = library(root, max_file_mb=1, volume_mb=1, cache_mb=0)  # 1 MiB on the volume; nothing in memory
    big = {i: make_tiny_lora(root.parent / f"big{i}", served.app.pipe.unet, seed=30 + i, rank=12).read_bytes()
           for i in range(3)}
    assert all(0.4 * MB < len(b) < 0.5 * MB for b in big.values())  # two fit in 1 MiB, three do not
    urls = {i: hostile_https.file_url(f"big-{i}.safetensors", b) for i, b in big.items()}
    for i in (0, 1, 2):
        assert post(served, loras=[{"path": urls[i]}]).status_code == 200
        time.sleep(0.01)
    kept = {lib.files.entry(f"url:{url_hash(urls[i])}").name: i for i in urls}
    assert sorted(kept[name] for name in entries(root)) == [1, 2]
    assert lib.files.usage()[0] <= 1 * MB


# -------------------------------------------------------------------------------------------------
# Slow servers, deadlines, cancellation


def test_a_slow_lora_url_is_cut_off_at_its_deadline_with_a_422(served, hostile_https, library):
    library(served.root / "deadline", fetch_timeout_s=2)
    started = time.monotonic()
    response = post(served, loras=[{"path": f"{hostile_https.url}/drip/100000/0.2/deadline"}])
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"].endswith("cannot be fetched: not fetched within 2 s")
    assert time.monotonic() - started < 5
    assert entries(served.root / "deadline") == []


def test_slow_lora_urls_hold_up_no_request_without_loras_and_a_fetch_beyond_the_slots_is_503(
        served, hostile_https, library):
    lib = library(served.root / "slots", max_fetches=2, fetch_timeout_s=8)
    slow = [in_thread(lambda i=i: post(served, loras=[{"path": f"{hostile_https.url}/drip/100000/0.5/slot{i}"}]))
            for i in range(2)]
    wait_for(lambda: lib.fetches_in_flight == 2)
    health = served.client.get("/health").json()["load"]
    assert (health["lora_fetches"], health["lora_fetch_limit"], health["saturated"]) == (2, 2, True)
    started = time.monotonic()
    assert post(served, seed=1).status_code == 200
    assert time.monotonic() - started < 5  # while both fetches drip on
    busy = post(served, loras=[{"path": f"{hostile_https.url}/drip/100000/0.5/slot3"}])
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    assert "already fetching 2 LoRA(s) ([lora] max_fetches)" in busy.json()["detail"]
    for request in slow:
        request["thread"].join(15)
        assert request["result"].status_code == 422  # cut off at the 8 s deadline
    assert lib.fetches_in_flight == 0 and served.client.get("/health").json()["load"]["saturated"] is False


def test_cancel_stops_a_lora_fetch_at_once_and_removes_its_partial_file(served, hostile_https, library):
    lib = library(served.root / "cancel", fetch_timeout_s=30)
    slow = in_thread(lambda: post(served, headers={"x-fal-request-id": "slow-lora"},
                                  loras=[{"path": f"{hostile_https.url}/drip/100000/0.5/cancel"}]))
    wait_for(lambda: lib.fetches_in_flight == 1)
    cancelled = served.client.post("/cancel", headers={"x-fal-request-id": "slow-lora"})
    assert cancelled.status_code == 200
    slow["thread"].join(5)
    assert slow["result"].status_code == 499 and slow["seconds"] < 5
    assert lib.fetches_in_flight == 0 and entries(served.root / "cancel") == []


def test_a_client_that_goes_away_stops_its_lora_fetch(served, hostile_https, library):
    lib = library(served.root / "disconnect", fetch_timeout_s=30)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(served.app._build_app(), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))  # no second setup()
    threading.Thread(target=server.run, daemon=True).start()
    wait_for(lambda: server.started)
    try:
        body = json.dumps({"prompt": "a cat", "num_inference_steps": 2,
                           "loras": [{"path": f"{hostile_https.url}/drip/100000/0.5/gone"}]}).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: lib.fetches_in_flight == 1)
        client.close()
        started = time.monotonic()
        wait_for(lambda: lib.fetches_in_flight == 0, timeout_s=5)
        assert time.monotonic() - started < 3 and entries(served.root / "disconnect") == []
    finally:
        server.should_exit = True


# -------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(("path", "message"), [
    ("/to-http/plain.safetensors", "cannot be fetched: a URL or a redirect that is not https:// is refused"),
    ("/status/500", "cannot be fetched: the server answered HTTP 500"),
    ("/loop", "cannot be fetched: too many redirects (more than 5)"),
    ("/truncated/5000", "cannot be fetched: the server closed the connection before sending the whole body"),
    ("/huge", "is larger than that, more than the limit of 16 MiB for a LoRA file ([lora] max_file_mb)"),
])
def test_a_lora_url_that_fails_is_422_at_once_naming_why_and_is_not_retried(served, hostile_https, path, message):
    hostile_https.hits.clear()
    started = time.monotonic()
    response = post(served, loras=[{"path": hostile_https.url + path}])
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "loras", 0, "path"] and error["msg"].endswith(message), error
    assert time.monotonic() - started < 3
    assert hostile_https.hits[path] == (6 if path == "/loop" else 1)


def test_a_lora_url_of_a_private_address_is_refused_without_a_child(served, monkeypatch):
    from conversion.download import caller_url

    monkeypatch.setattr(caller_url.subprocess, "Popen", lambda *a, **k: pytest.fail("a child was started"))
    response = post(served, loras=[{"path": "https://169.254.169.254/latest/lora.safetensors"}])
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"].endswith(
        "cannot be fetched: its host is a private, loopback or link-local address")


def test_an_image_url_that_drips_is_cut_off_at_its_deadline(served, hostile_https, monkeypatch):
    settings = served.app.settings
    monkeypatch.setattr(served.app, "settings", settings.model_copy(
        update={"serving": settings.serving.model_copy(update={"image_fetch_timeout_s": 2})}))
    started = time.monotonic()
    response = post(served, "/image-to-image", image_url=f"{hostile_https.url}/drip/100000/0.2/image")
    assert response.status_code == 422
    assert response.json()["detail"] == [{"loc": ["body", "image_url"], "type": "image_unreachable",
                                          "msg": "image_url could not be fetched: not fetched within 2 s"}]
    assert time.monotonic() - started < 5


def test_a_data_uri_lora_never_touches_the_volume(served, lora_files, library):
    import base64

    library(served.root / "data-uri")
    uri = "data:application/octet-stream;base64," + base64.b64encode(lora_files.demo2).decode()
    assert post(served, loras=[{"path": uri}]).status_code == 200
    assert not (served.root / "data-uri").exists()


def test_a_fetch_beyond_the_runners_slots_is_a_503_not_a_422(served, library):
    lib = library(served.root / "busy", max_fetches=1)
    assert lib._fetch_slots.acquire(blocking=False)
    try:
        with pytest.raises(HTTPException) as raised:
            lib.resolve([SimpleNamespace(path="org/some-lora", scale=1.0)])
        assert raised.value.status_code == 503 and not isinstance(raised.value, LoraRequestError)
    finally:
        lib._fetch_slots.release()
