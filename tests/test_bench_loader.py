"""bench/loader.py and bench/common.py: the logic around the measurements (which runs verify, the
ceiling grid, the hot CUDA path's copy loop run on the CPU, the workers' environment). Fast."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench import common, loader
from bench.loader import PEERS_BY_NAME

# --- the ceiling grid ----------------------------------------------------------------------------


def test_the_best_grid_point_is_the_fastest_that_measured():
    points = [{"threads": 4, "chunk_mib": 16, "gbps": 1.2}, {"threads": 4, "chunk_mib": 32, "error": "EINVAL"},
              {"threads": 8, "chunk_mib": 16, "gbps": 2.5}, {"threads": 16, "chunk_mib": 64, "gbps": 2.5}]
    assert common.best_point(points) == points[2]  # a tie keeps the first (fewer threads)
    assert common.best_point([{"error": "x"}]) is None
    assert common.best_point([]) is None


def test_the_odirect_ceiling_runs_the_whole_grid_and_reports_the_best(monkeypatch, tmp_path):
    calls = []

    def fake(path, threads, chunk):
        calls.append((threads, chunk >> 20))
        if threads == 16:
            return {"error": "O_DIRECT read failed: boom"}
        return {"bytes": 1, "seconds": 1.0, "gbps": threads * 10 + (chunk >> 20) / 100}

    monkeypatch.setattr(common, "odirect_read_gbps", fake)
    out = common.odirect_ceiling(tmp_path / "f", threads=(4, 8, 16), chunks_mib=(16, 32, 64))
    assert calls == [(t, c) for t in (4, 8, 16) for c in (16, 32, 64)]
    assert len(out["grid"]) == 9 and all({"threads", "chunk_mib"} <= set(p) for p in out["grid"])
    assert (out["threads"], out["chunk_mib"], out["gbps"]) == (8, 64, 80.64)
    assert "8x64 MiB 80.64" in common.grid_text(out["grid"]) and "16x16 MiB error" in common.grid_text(out["grid"])


def test_an_odirect_ceiling_with_no_point_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "odirect_read_gbps", lambda *a, **k: {"error": "O_DIRECT not available"})
    out = common.odirect_ceiling(tmp_path / "f", threads=(4,), chunks_mib=(16,))
    assert out["error"] == "O_DIRECT not available" and "gbps" not in out


def test_the_real_odirect_probe_reads_a_small_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom((3 << 20) + 123))
    out = common.odirect_ceiling(path, threads=(1, 2), chunks_mib=(1,))
    assert len(out["grid"]) == 2
    # O_DIRECT may be refused by the filesystem (tmpfs); then every point says so.
    assert "gbps" in out or all("error" in p for p in out["grid"])
    if "gbps" in out:
        assert all(p["bytes"] == path.stat().st_size for p in out["grid"])


# --- the hot CUDA path's copy loop, run on the host ------------------------------------------


@pytest.mark.parametrize(("threads", "buffers"), [(1, 2), (3, 2), (2, 1)])
def test_the_staged_copy_puts_every_byte_in_place(tmp_path, threads, buffers):
    path = tmp_path / "pack.bin"
    data = os.urandom(5 * (1 << 20) + 777)  # 5.0007 chunks of 1 MiB: a short last chunk
    path.write_bytes(data)
    dest = torch.zeros(len(data) + 4096, dtype=torch.uint8)
    common.StagedCopy(path, dest, chunk=1 << 20, threads=threads, buffers=buffers, pin=False).run()
    assert bytes(dest[: len(data)].numpy()) == data
    assert int(dest[len(data):].sum()) == 0
    assert common.same_bytes(path, dest, chunk=1 << 20)
    dest[12345] ^= 0xFF
    assert not common.same_bytes(path, dest, chunk=1 << 20)


def test_the_staged_copy_refuses_a_destination_too_small(tmp_path):
    path = tmp_path / "pack.bin"
    path.write_bytes(b"x" * 10000)
    with pytest.raises(ValueError, match="at least 10000 bytes"):
        common.StagedCopy(path, torch.empty(9999, dtype=torch.uint8), chunk=4096, pin=False)


# --- pinning ---------------------------------------------------------------------------------


def test_the_cheaper_way_to_pin_counts_the_unregister_too():
    assert common.faster_pinning({"torch_pinned_s": 0.30, "host_register_s": 0.20, "host_unregister_s": 0.05}) == "host_register"
    assert common.faster_pinning({"torch_pinned_s": 0.30, "host_register_s": 0.20, "host_unregister_s": 0.15}) == "torch_pinned"
    assert common.faster_pinning({"torch_pinned_s": 0.30}) is None


def test_gpu_only_measurements_are_skipped_with_a_reason():
    assert loader.cuda_skip_reason(False, ["cpu", "cuda"]) == "no CUDA device (torch.cuda.is_available() is False)"
    assert loader.cuda_skip_reason(True, ["cpu"]) == "cuda is not in --devices"
    assert loader.cuda_skip_reason(True, ["cuda"]) is None


def test_the_hardware_worker_without_a_gpu_measures_the_disk_and_notes_the_skip(tmp_path, capsys):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    loader.hardware_worker({"pack": str(path), "threads": [1], "chunks_mib": [1], "devices": ["cpu"]})
    out = json.loads(capsys.readouterr().out.split("RESULT ", 1)[1])
    assert out["cuda_skipped"] and len(out["odirect_read"]["grid"]) == 1
    lines = loader.hardware_lines(out)
    assert any("CUDA ceilings" in line and "skipped" in line for line in lines)


def test_the_ceiling_lines_cover_every_gpu_measurement():
    hw = {
        "odirect_read": {"gbps": 3.1, "threads": 16, "chunk_mib": 64, "grid": [{"threads": 16, "chunk_mib": 64, "gbps": 3.1}]},
        "pinned_h2d": {"gbps_median": 50.2, "gbps_best": 51.0, "pin_alloc_s": 0.3},
        "hot_h2d": {"gbps": 20.5, "threads": 4, "chunk_mib": 64, "bytes_match": True,
                    "grid": [{"threads": 4, "chunk_mib": 64, "gbps": 20.5}]},
        "pin_costs": {"bytes": 1 << 30, "repeats": 3, "torch_pinned_s": 0.31, "host_register_s": 0.2,
                      "host_register_written_s": 0.1, "host_unregister_s": 0.05, "host_register_copy_gbps": 49.9,
                      "faster": "host_register"},
    }
    text = "\n".join(loader.hardware_lines(hw))
    for piece in ("3.10 GB/s (16 threads x 64 MiB)", "50.2 GB/s median", "20.50 GB/s (4 threads x 64 MiB)",
                  "device bytes match the file: yes", "cudaHostRegister 0.200 s fresh", "cheaper: host_register"):
        assert piece in text
    assert "skipped" not in text


# --- which runs verify, and what the summary says ----------------------------------------------


def test_each_peer_verifies_once_hot_and_once_cold_on_each_device():
    ours, ceiling = PEERS_BY_NAME["ours"], PEERS_BY_NAME["read-ceiling"]
    done: set = set()
    plan = [(cache, device) for _ in range(3) for cache in ("hot", "cold") for device in ("cpu", "cuda")]
    verified_runs = []
    for cache, device in plan:
        if loader.should_verify(ours, device, cache, done, True):
            verified_runs.append((cache, device))
            done.add((ours.name, device, cache))
    assert sorted(verified_runs) == sorted({("hot", "cpu"), ("cold", "cpu"), ("hot", "cuda"), ("cold", "cuda")})
    assert not loader.should_verify(ceiling, "cpu", "cold", set(), True)  # raw bytes: nothing to compare
    assert not loader.should_verify(ours, "cpu", "cold", set(), False)  # --no-verify


def test_a_run_is_verified_only_if_each_load_it_checked_matched():
    assert loader.run_verified({}) is None
    assert loader.run_verified({"verify": {"ok": True}}) is True
    assert loader.run_verified({"verify": {"ok": True}, "second": {"ready_s": 1.0, "verify": {"ok": False}}}) is False
    assert loader.run_verified({"verify": {"ok": True}, "second": {"ready_s": 1.0}}) is True


def _run(cache, peer="ours", verified=None, ready=1.0, second=None, i=0):
    rec = {"run": i, "device": "cuda", "cache": cache, "peer": peer, "level": PEERS_BY_NAME[peer].level,
           "ok": True, "ready_s": ready, "load_s": ready * 0.9, "touch_s": ready * 0.1, "process_s": 3.0,
           "peak_rss_gb": 1.0, "verified": verified}
    if second is not None:
        rec["second"] = {"ready_s": second, "load_s": second * 0.9, "touch_s": second * 0.1, "resident_before": 0.0}
    return rec


def test_the_summary_marks_verified_per_cache_state():
    runs = [_run("hot", verified=True, i=0), _run("cold", verified=False, i=0),
            _run("hot", i=1), _run("cold", i=1)]
    rows = {r["cache"]: r for r in loader.summarize(runs, payload=10**9)}
    assert rows["hot"]["verified"] is True and rows["hot"]["verified_runs"] == 1
    assert rows["cold"]["verified"] is False
    table = loader.markdown_table(loader.summarize(runs, payload=10**9))
    assert "| cuda | hot | state_dict | ours |" in table and "| NO |" in table
    unverified = loader.summarize([_run("cold")], payload=10**9)[0]
    assert unverified["verified"] is None and unverified["verified_runs"] == 0


def test_the_second_load_is_summarized_beside_the_first():
    runs = [_run("hot", ready=2.0, second=1.0, i=0), _run("hot", ready=4.0, second=1.5, i=1), _run("cold", peer="flashpack")]
    rows = loader.summarize(runs, payload=10**9)
    ours = next(r for r in rows if r["peer"] == "ours")
    assert ours["second_ready_s"] == 1.25 and ours["ready_s"] == 3.0
    table = loader.second_load_table(rows)
    assert "| cuda | hot | ours | 3.000 | 1.250 | 0.42x |" in table
    assert "flashpack" not in table  # no second load: no row
    assert loader.second_load_table(loader.summarize([_run("cold")], payload=1)) is None


# --- the workers' environment --------------------------------------------------------------------


def test_workers_keep_the_callers_pythonpath_after_the_repo():
    base = {"PYTHONPATH": os.pathsep.join(["/opt/site", str(loader.REPO), "/more"]), "FLASHPACK_CPU_PARALLEL_READ": "1",
            "HOME": "/root"}
    env = loader.child_env(base, {"FLASHPACK_CPU_PARALLEL_READ": "1", "X": "y"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(loader.REPO), "/opt/site", "/more"]
    assert env["HOME"] == "/root" and env["X"] == "y" and env["HF_HUB_OFFLINE"] == "1"
    assert env["FLASHPACK_CPU_PARALLEL_READ"] == "1"  # only because the peer asked for it
    assert "FLASHPACK_CPU_PARALLEL_READ" not in loader.child_env(base, {})
    assert loader.child_env({}, {})["PYTHONPATH"] == str(loader.REPO)


def test_ceiling_grid_arguments_are_parsed_and_checked():
    args = loader.parse_args(["--ceiling-threads", "2,4", "--ceiling-chunks-mib", "8"])
    assert args.ceiling_threads == [2, 4] and args.ceiling_chunks_mib == [8] and args.second_load == "auto"
    defaults = loader.parse_args([])
    assert defaults.ceiling_threads == [4, 8, 16] and defaults.ceiling_chunks_mib == [16, 32, 64]
    with pytest.raises(SystemExit):
        loader.parse_args(["--ceiling-threads", "0"])
