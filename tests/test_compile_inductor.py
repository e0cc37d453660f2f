"""torch.compile of the demo's unet for real, on the CPU (inductor's C++ backend): two starts of the
app in processes of their own, on one data root, the way two runners start on one volume.

The first start compiles during its warm-up and saves inductor's cache; the second unpacks it and
compiles nothing, which inductor's own counters say (an FX graph cache hit and no miss) and the
cache directory shows (no file added). Compiling the tiny unet takes about a minute on two CPU
cores; the second start about five seconds, for dynamo's tracing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from serving.compile import CACHE_DIR, INDUCTOR_CACHE_ENV

REPO = Path(__file__).resolve().parents[1]
START = Path(__file__).with_name("compile_start.py")
# Compiled and eager pixels (floats in [0, 1]) may differ this much: inductor fuses and reorders
# float32 arithmetic, so the two are close, not bit-identical (measured: about 4e-6).
TOLERANCE = 1e-4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def start(root: Path, settings: Path, report: Path, *extra: str) -> dict:
    """One start of the app (tests/compile_start.py) on ``root``; its report."""
    env = {**os.environ, "APP_PROFILE": "demo", "APP_DATA_ROOT": str(root), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(root.parent / "tmp")}
    env.pop(INDUCTOR_CACHE_ENV, None)
    (root.parent / "tmp").mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, str(START), str(settings), str(report), *extra], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stderr[-4000:]
    return {**json.loads(report.read_text()), "log": result.stderr}


@pytest.fixture(scope="module")
def two_starts(tmp_path_factory):
    """The first and the second start of the demo app with [compile] on, and the archive's stat
    after each."""
    base = tmp_path_factory.mktemp("compile")
    root = base / "data"
    root.mkdir()
    settings = base / "fal.toml"
    settings.write_text((REPO / "fal.toml").read_text() + "\n[profiles.demo.compile]\nenabled = true\n")
    first = start(root, settings, base / "first.json", "--eager")
    [archive] = (root / CACHE_DIR).glob("*/*.zip")
    after_first = archive.stat()
    second = start(root, settings, base / "second.json")
    after_second = archive.stat()
    return {"first": first, "second": second, "archive": archive, "root": root,
            "stats": [(s.st_ino, s.st_mtime_ns, s.st_size) for s in (after_first, after_second)]}


def test_compiled_images_equal_eager_ones_within_the_tolerance(two_starts):
    first = two_starts["first"]
    assert first["pixels_compared"] == 64 * 64 * 3
    assert first["max_abs_difference"] <= TOLERANCE


def test_the_first_start_compiles_and_saves_inductors_cache_on_the_volume(two_starts):
    first, archive = two_starts["first"], two_starts["archive"]
    assert first["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert first["counters"]["inductor"].get("fxgraph_cache_hit", 0) == 0
    assert archive.is_relative_to(two_starts["root"] / CACHE_DIR)
    assert sorted(zipfile.ZipFile(archive).namelist()) == first["cache_files"]
    assert "compile: unet (mode default, static shapes: 64x64)" in first["log"]
    assert "none yet, the warm-up compiles" in first["log"]


def test_the_second_start_compiles_nothing(two_starts):
    second, archive = two_starts["second"], two_starts["archive"]
    inductor, aot = second["counters"]["inductor"], second["counters"]["aot_autograd"]
    assert inductor.get("fxgraph_cache_miss", 0) == 0 and inductor.get("fxgraph_cache_hit", 0) >= 1
    assert aot.get("autograd_cache_miss", 0) == 0 and aot.get("autograd_cache_hit", 0) >= 1
    assert second["cache_files"] == sorted(zipfile.ZipFile(archive).namelist())  # nothing added to the cache
    assert two_starts["stats"][1] == two_starts["stats"][0]  # so the archive was not rewritten
    assert "compile: nothing compiled, every graph came from" in second["log"]


def test_a_request_at_a_warmed_up_shape_compiles_nothing(two_starts):
    for report in (two_starts["first"], two_starts["second"]):
        assert report["counters_after_request"] == report["counters"]
