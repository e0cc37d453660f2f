"""bench/startup.py reads our phase breakdown off the app's log: the lines it parses must exist."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from fastapi.testclient import TestClient

REPO = Path(__file__).resolve().parents[1]


def _startup_module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_startup", REPO / "bench" / "startup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_phase_breakdown_is_read_from_a_real_warm_start_log(tmp_path, caplog, monkeypatch, app_module):
    monkeypatch.setenv("APP_DATA_ROOT", str(tmp_path / "data"))
    app = app_module
    with TestClient(app.TextToImageApp(_allow_init=True)._build_app()):
        pass  # the first start converts the demo model
    caplog.clear()
    with caplog.at_level(logging.INFO), TestClient(app.TextToImageApp(_allow_init=True)._build_app()):
        pass
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    output = "\n".join(fmt.format(r) for r in caplog.records)
    phases = _startup_module(monkeypatch)._our_phases(output)
    assert set(phases) == {"lookup", "store", "load", "import_torch", "import_diffusers", "build", "wait_reads",
                           "assemble", "reads", "warmup", "setup"}
    assert all(value >= 0 for value in phases.values())
