"""Shared fixtures: no telemetry, few torch threads, the demo app, tiny pipelines built once per session."""

from __future__ import annotations

import os

# Before any Hugging Face library is imported: no telemetry. HF_HUB_OFFLINE is
# not set here because the download tests talk to a loopback Hub in child processes that inherit
# this environment; the loaders tested here pass local_files_only=True instead.
for _name, _value in {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)
# app.py builds its fal.App from the profile chosen at its (one) import; the tests serve the offline
# demo profile, so it is fixed before anything can import app.py. Settings and schema of any other
# profile are built directly with serving.settings.load_settings and serving.schema.request_models.
os.environ["APP_PROFILE"] = "demo"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: tiny models gain nothing from more, and spinning OpenMP threads on a
# shared 2-core machine slow everything else down.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def app_module():
    """app.py, imported (once per session) with the demo profile."""
    import app

    assert app.SETTINGS.profile == "demo", f"app.py was imported with the profile {app.SETTINGS.profile!r}"
    return app


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion source directory (the demo pipeline, seed 0)."""
    from tiny_models import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("src") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("src") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("src") / "tiny-flux")


def _converted(tmp_path_factory, src: Path) -> Path:
    from conversion.convert import convert_pipeline

    dst = tmp_path_factory.mktemp("converted") / src.name
    return convert_pipeline(src, dst, source={"kind": "local", "path": str(src)})


@pytest.fixture(scope="session")
def converted_sd_dir(tmp_path_factory, tiny_sd_dir) -> Path:
    return _converted(tmp_path_factory, tiny_sd_dir)


@pytest.fixture(scope="session")
def converted_sdxl_dir(tmp_path_factory, tiny_sdxl_dir) -> Path:
    return _converted(tmp_path_factory, tiny_sdxl_dir)


@pytest.fixture(scope="session")
def converted_flux_dir(tmp_path_factory, tiny_flux_dir) -> Path:
    return _converted(tmp_path_factory, tiny_flux_dir)


@pytest.fixture(scope="module")
def juicefs_volume():
    """A real JuiceFS volume (bench/volume.py) with two mounts, ``a`` and ``b``: two hosts' views of
    one ``/data``. Skips, with the reason in pytest's summary, where the machine cannot mount one."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from volume import Shaping, Volume, VolumeUnavailable, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no JuiceFS volume: {reason}")
    # A fast store: these tests are about correctness across hosts, not speed.
    try:
        vol = Volume(Shaping(latency_ms=0, conn_mb_s=0, total_mb_s=0), mounts=("a", "b"))
    except VolumeUnavailable as exc:
        pytest.skip(f"no JuiceFS volume: {exc}")
    with vol:
        yield vol


@pytest.fixture(scope="session")
def hostile_https(tmp_path_factory):
    """tests/https_server.py's hostile https server on a public address of the loopback interface,
    its certificate trusted through SSL_CERT_FILE (children inherit it). Skips, with the reason in
    pytest's summary, where the machine cannot add the address (not root, no ``ip``)."""
    import os

    from https_server import Unavailable, start

    if os.geteuid() != 0:
        pytest.skip("no hostile https server: adding its address to the loopback interface needs root")
    try:
        server, ca_file, stop = start(tmp_path_factory.mktemp("hostile-https"))
    except Unavailable as exc:
        pytest.skip(f"no hostile https server: {exc}")
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = ca_file
    try:
        yield server
    finally:
        stop()
        if saved is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = saved
