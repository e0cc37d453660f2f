"""The two ports of fal's local server: `make serve PORT=N` moves both, and a start whose port is
taken fails before setup() with a message naming the port (fal binds them only after setup)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fal.api.api import BaseServable

from serving.ports import PortInUseError, check_ports_free, serve_ports

REPO = Path(__file__).resolve().parents[1]
FAL = Path(sys.executable).with_name("fal")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process would hold: bound and listening, as a running server's is."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def make_serve(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = subprocess.run(["make", "-n", "serve", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [command] = [line.strip() for line in result.stdout.splitlines() if "fal run --local" in line]
    return command


def test_make_serve_moves_the_metrics_port_with_the_app_port():
    assert make_serve("PORT=8123").endswith("fal run --local --exposed-port 8123 --exposed-metrics-port 9133 flashpack-t2i")
    assert make_serve().endswith("--exposed-port 8080 --exposed-metrics-port 9090 flashpack-t2i")  # fal's defaults


def test_make_serve_takes_an_explicit_metrics_port():
    assert make_serve("PORT=8123", "METRICS_PORT=9999").endswith("--exposed-port 8123 --exposed-metrics-port 9999 "
                                                                  "flashpack-t2i")


def test_the_ports_of_fals_serve_default_to_fals_own():
    serve = BaseServable().serve
    assert serve_ports(serve, {}) == {"port": 8080, "metrics_port": 9090}
    assert serve_ports(serve, {"limit_max_requests": None, "port": 18080, "metrics_port": 19090}) == {
        "port": 18080, "metrics_port": 19090}


def test_free_ports_pass_the_check():
    check_ports_free({"port": free_port(), "metrics_port": free_port()})


@pytest.mark.parametrize(
    ("name", "role"),
    [("port", "the app server's port (fal run --local --exposed-port; make serve PORT=N)"),
     ("metrics_port", "fal's metrics server port (fal run --local --exposed-metrics-port; make serve uses PORT + 1010")],
)
def test_a_held_port_is_refused_naming_it_and_what_it_is_for(held_port, name, role):
    ports = {"port": free_port(), "metrics_port": free_port(), name: held_port}
    with pytest.raises(PortInUseError) as info:
        check_ports_free(ports)
    assert str(info.value).startswith(f"port {held_port} is already in use: it is {role}")


@pytest.mark.slow
@pytest.mark.parametrize("held", ["--exposed-port", "--exposed-metrics-port"])
def test_fal_run_local_with_a_held_port_fails_before_setup_naming_the_port(tmp_path, held_port, held):
    if not FAL.exists():
        pytest.skip(f"the fal CLI is not installed next to {sys.executable}")
    ports = {"--exposed-port": free_port(), "--exposed-metrics-port": free_port(), held: held_port}
    env = {**os.environ, "APP_PROFILE": "demo", "APP_DATA_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("FAL_KEY", None)
    command = [str(FAL), "run", "--local", *(str(part) for pair in ports.items() for part in pair), "flashpack-t2i"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert f"port {held_port} is already in use" in output
    assert "app INFO lookup:" not in output and not (tmp_path / "flashpack").exists()  # setup() never began
