"""bench/startup.py reads our phase breakdown off the app's log: the lines it parses must exist. Its
volume mode, bench/on_volume.py and bench/first_start.py: arguments, summaries, tables, CPU shares."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import pytest
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


# --- on a JuiceFS volume: the arguments, the tables, the CPU shares, the first start -------------


def _run(peer, cache, health, image=None, cpu=None, **extra):
    record = {"peer": peer, "cache": cache, "health_s": health, "peak_rss_gb": 1.0, **extra}
    if image is not None:
        record["first_image_s"] = image
    if cpu is not None:
        record["cpu_share"] = {"mount": cpu, "object_store": cpu / 10}
    return record


def test_volume_arguments_choose_the_tiers_and_leave_the_local_bench_as_it_was(monkeypatch):
    startup = _startup_module(monkeypatch)
    local = startup.parse_args([])
    assert local.volume is None and local.states == ["hot", "cold"]
    assert "fal-preread" in local.peers
    args = startup.parse_args(["--volume", "juicefs", "--tiers", "object,node", "--size", "small", "--rounds", "1",
                               "--latency-ms", "5"])
    assert args.states == ["object", "node"] and args.latency_ms == 5 and args.rounds == 1
    assert startup.parse_args(["--volume", "juicefs"]).states == ["hot", "node", "object"]
    for bad in (["--tiers", "cold"], ["--tiers", "hot,hot"], ["--tiers", ""]):
        with pytest.raises(SystemExit):
            startup.parse_args(["--volume", "juicefs", *bad])


def test_the_volume_summary_orders_tiers_as_run_and_compares_sums_with_ours(monkeypatch):
    startup = _startup_module(monkeypatch)
    runs = [_run("ours", "object", 10.0, 2.0, cpu=0.8), _run("stock", "object", 6.0, 12.0, cpu=0.4),
            _run("imports-only", "object", 5.0), _run("ours", "node", 7.0, 1.0, cpu=0.6),
            _run("ours", "object", 12.0, 2.0, cpu=1.0), _run("fal-preread", "object", 9.0, error="boom")]
    rows = startup.summarize(runs)
    assert [(r["cache"], r["peer"]) for r in rows] == [
        ("object", "ours"), ("object", "stock"), ("object", "fal-preread"), ("object", "imports-only"), ("node", "ours")]
    ours, stock, pre, floor = rows[:4]
    assert ours["ready_s"] == 13.0 and ours["cpu_share"]["mount"] == 0.9
    assert stock["ready_s"] == 18.0 and stock["ready_vs_ours"] == 1.38 and stock["vs_ours"] == 0.55
    assert pre["ready_s"] != pre["ready_s"] and pre["runs"] == "0/1"  # no image: NaN, and the failure counted
    assert floor["load_s"] == 0.0 and floor["ready_vs_ours"] is None
    table = startup.markdown(rows)
    assert table.splitlines()[0].startswith("| tier | peer |") and "mount / object store CPU (cores)" in table
    assert "| object | ours | 11.00 | 6.0 | 2.00 | 13.00 | 1.0x | 1.0x | 0.90 / 0.09 |" in table
    assert "| object | fal-preread | 9.00 | 4.0 | - | - | - | 0.82x | - |" in table
    local = startup.markdown(startup.summarize([_run("ours", "hot", 5.0, 1.0)]))
    assert local.startswith("| cache | peer |") and "CPU" not in local


def test_the_recipes_phases_are_read_from_their_log(monkeypatch):
    startup = _startup_module(monkeypatch)
    log = "INFO:recipe:recipe: pre-read 1.250 s\nINFO:recipe:recipe: setup done in 6.500 s\n"
    assert startup._recipe_phases(log) == {"preread": 1.25, "setup": 6.5}
    assert startup._recipe_phases("nothing") == {}


def test_cpu_shares_count_a_restarted_process_from_zero():
    from bench import on_volume

    before = {"mount_a": 10.0, "object_store": 2.0}
    after = {"mount_a": 11.0, "object_store": 3.0}
    assert on_volume.cpu_share(before, after, 2.0) == {"mount": 0.5, "object_store": 0.5}
    restarted = {"mount_a": 0.5, "object_store": 2.5}  # the mount restarted in between: 0.5 s since
    assert on_volume.cpu_used(before, restarted) == {"mount": 0.5, "object_store": 0.5}
    assert on_volume.cpu_share({}, after, 1.0) == {} and on_volume.cpu_share(before, after, 0) == {}
    assert on_volume.cpu_text({"mount": 0.456, "object_store": 0.1}) == "0.46 / 0.10" and on_volume.cpu_text(None) == "-"


def test_the_cpu_sampler_tells_the_cpu_over_a_window_timed_elsewhere():
    from bench import on_volume

    times, samples = [0.0, 1.0, 3.0], [{"mount_a": 0.0}, {"mount_a": 1.0}, {"mount_a": 1.0}]
    assert on_volume.interpolate(times, samples, 0.5) == {"mount_a": 0.5}
    assert on_volume.interpolate(times, samples, -1) == {"mount_a": 0.0}
    assert on_volume.interpolate(times, samples, 9) == {"mount_a": 1.0}
    clock = iter(range(1000))
    with on_volume.CpuSampler(lambda: {"mount_a": float(next(clock)), "object_store": 0.0}, period=0.01) as s:
        time.sleep(0.05)
    start, end = s.times[0], s.times[-1]
    share = s.share(start, end)
    assert share["mount"] > 0 and share["object_store"] == 0.0


def _first_start_module():
    from bench import first_start

    return first_start


def test_the_first_start_is_compared_with_a_byte_copy_per_tier():
    fs = _first_start_module()
    runs = [{"tier": "node", "op": "clone", "copy_s": 0.03}, {"tier": "node", "op": "copy", "copy_s": 2.0,
                                                              "cpu_share": {"mount": 0.5, "object_store": 0.4}},
            {"tier": "node", "op": "first_start", "first_start_s": 3.0, "process_s": 7.0},
            {"tier": "object", "op": "copy", "copy_s": 4.0}, {"tier": "object", "op": "first_start", "error": "x"}]
    rows = fs.summarize(runs, source_bytes=4 * 10**9)
    node, obj = rows
    assert node["ratio"] == 1.5 and node["copy_gb_s"] == 2.0 and node["first_start_gb_s"] == 4 / 3
    assert node["clone_s"] == 0.03 and node["copy_cpu"] == {"mount": 0.5, "object_store": 0.4}
    assert obj["ratio"] is None and obj["runs"] == "1/2"
    table = fs.markdown(rows)
    assert "| node | 0.030 | 2.00 | 2.00 | 3.00 | 1.33 | 1.50x | 7.00 | 0.50 / 0.40 | - | 3/3 |" in table
    assert "| object | - | 4.00 | 1.00 | - | - | -x |" in table
    args = fs.parse_args(["--size", "tiny", "--tiers", "node,object", "--rounds", "1"])
    assert args.volume == "juicefs" and args.tiers == ["node", "object"]


def test_a_saved_volume_run_reports_its_filesystem_and_shaping(monkeypatch):
    startup = _startup_module(monkeypatch)
    saved = {"config": {"size": "small", "rounds": 1}, "payload_bytes": 10**9,
             "hardware": {"cpu": "EPYC", "cores": 2, "ram_gb": 24, "torch": "2.x"},
             "volume": {"filesystem": "JuiceFS 1.4.2", "object_store": "nginx WebDAV", "shaping_text": "20 ms"},
             "runs": [_run("ours", "node", 5.0, 1.0, cpu=0.5, phases={"reads": 2.0}),
                      _run("fal-preread", "node", 6.0, 1.0, cpu=0.5, phases={"preread": 1.5})]}
    text = startup.tables(saved)
    assert "on the JuiceFS 1.4.2 over nginx WebDAV (20 ms)" in text
    assert "| ours | node | - | - | - | - | 2.00 |" in text and "pre-read (xargs -P 32 cat), median s: node 1.50" in text
