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


# --- on a JuiceFS volume ---------------------------------------------------------------------------


def test_the_loaders_a_user_would_pick_are_peers_and_a_missing_package_skips_one():
    for name in ("safetensors-pread", "fastsafetensors", "runai-streamer", "ours-staged"):
        assert name in PEERS_BY_NAME
    assert PEERS_BY_NAME["fastsafetensors"].requires == "fastsafetensors"
    assert PEERS_BY_NAME["ours-staged"].devices == ("cpu",)
    assert loader.missing_package(PEERS_BY_NAME["ours"]) is None
    fake = loader.Peer("x", "state_dict", "safetensors", "x", requires="no_such_package_anywhere")
    assert loader.missing_package(fake) == "no_such_package_anywhere"


def test_volume_arguments_pick_the_mounts_ceiling_grid():
    args = loader.parse_args(["--volume", "juicefs", "--tiers", "node,object", "--size-gb", "0.1", "--runs", "1"])
    assert args.volume == "juicefs" and args.tiers == ["node", "object"]
    assert args.ceiling_threads == [1, 4, 8, 16] and args.ceiling_chunks_mib == [4, 32]
    mine = loader.parse_args(["--volume", "juicefs", "--ceiling-threads", "2", "--ceiling-chunks-mib", "8"])
    assert mine.ceiling_threads == [2] and mine.ceiling_chunks_mib == [8]
    with pytest.raises(SystemExit):
        loader.parse_args(["--volume", "juicefs", "--tiers", "warm"])


def test_the_model_is_moved_onto_the_mount_with_every_path(tmp_path):
    root = tmp_path / "local" / "unet-c32"
    for sub in ("source/unet", "converted/unet"):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text("{}")
    data = {"source_dir": str(root / "source" / "unet"), "converted_dir": str(root / "converted" / "unet"),
            "pack": str(root / "converted" / "unet" / "model.flashpack"), "tensors": 3, "dtype": "float16"}
    moved = loader.on_mount(data, tmp_path / "mnt" / "loader")
    assert moved["pack"] == str(tmp_path / "mnt" / "loader" / "unet-c32" / "converted" / "unet" / "model.flashpack")
    assert (tmp_path / "mnt" / "loader" / "unet-c32" / "source" / "unet" / "config.json").is_file()
    assert moved["tensors"] == 3 and moved["dtype"] == "float16"


def _ceilings(tier, best=1.0):
    return {"tier": tier, "bytes": 10**9, "o_direct": True, "sequential_gb_s": 0.6, "points": [
        {"kind": "sequential", "gb_s": 0.6, "cpu_share": {"mount_a": 0.7, "object_store": 0.1}},
        {"kind": "split", "threads": 4, "gb_s": best, "cpu_share": {"mount_a": 1.0, "object_store": 0.2}},
        {"kind": "grid", "threads": 8, "chunk_mib": 32, "gb_s": 0.4, "cpu_share": {"mount_a": 0.5, "object_store": 0.1}},
        {"kind": "split_direct", "threads": 4, "gb_s": best * 0.9, "cpu_share": {"mount_a": 0.9, "object_store": 0.2}}],
        "best": {"kind": "split", "threads": 4, "gb_s": best}}


def test_the_ceilings_table_gives_each_kind_of_read_its_best_point():
    from bench import on_volume

    s = on_volume.ceiling_summary(_ceilings("node"))
    assert s["split"]["threads"] == 4 and s["grid"]["chunk_mib"] == 32 and s["split_direct"]["gb_s"] == 0.9
    table = on_volume.ceilings_table([_ceilings("node"), {**_ceilings("object", 0.5), "o_direct": False}])
    assert "| node | 1000 | 0.60 (CPU 0.70 / 0.10) | 1.00 (4 thr; CPU 1.00 / 0.20) | 0.40 (8 thr x 32 MiB; CPU 0.50 / 0.10) " \
           "| 0.90 (4 thr; CPU 0.90 / 0.20) | 1.00 |" in table
    assert "| refused | 0.50 |" in table
    assert on_volume.percent_of(0.85, _ceilings("node")) == 85.0
    assert on_volume.percent_of(None, _ceilings("node")) is None and on_volume.percent_of(1.0, None) is None


def test_volume_rows_carry_their_share_of_the_ceiling_and_the_mounts_cpu():
    runs = [_run("node", ready=1.25) | {"device": "cpu", "cpu_share": {"mount": 0.8, "object_store": 0.0}},
            _run("object", ready=2.5) | {"device": "cpu", "cpu_share": {"mount": 0.6, "object_store": 0.2}},
            _run("object", peer="safetensors", ready=5.0) | {"device": "cpu"}]
    rows = loader.summarize(runs, payload=10**9)
    assert [(r["cache"], r["peer"]) for r in rows] == [("node", "ours"), ("object", "ours"), ("object", "safetensors")]
    loader.add_volume_figures(rows, runs, {"node": _ceilings("node"), "object": _ceilings("object", 0.5)})
    assert rows[0]["pct_of_ceiling"] == 80.0 and rows[1]["pct_of_ceiling"] == 80.0
    assert rows[1]["cpu_share"] == {"mount": 0.6, "object_store": 0.2} and "cpu_share" not in rows[2]
    table = loader.volume_table(rows)
    assert "| cpu | object | state_dict | ours | 2.500 | 0.40 | 80 % | 1.00x | 2.250 | 0.250 | 0.60 / 0.20 |" in table
    assert "| cpu | object | state_dict | safetensors | 5.000 | 0.20 | 40 % | 2.00x |" in table


def test_the_staged_pipeline_with_a_host_copy_reads_every_tensor_exactly(tmp_path):
    from bench.host_staging import read_pack_staged
    from conversion.writer import pack_state_dict

    sd = {f"w{i}": torch.randn(300 + i, 129) for i in range(12)}
    sd["half"] = torch.randn(4099).half()
    sd["ints"] = torch.arange(77, dtype=torch.int64)
    path = tmp_path / "model.flashpack"
    pack_state_dict(sd, path)
    pack = read_pack_staged(str(path), threads=3, chunk_bytes=1 << 20)
    tensors = pack.tensors()
    assert pack.stats.threads >= 1 and not pack.stats.mapped
    assert all(torch.equal(tensors[k], v) for k, v in sd.items())


def test_on_a_juicefs_volume_the_bench_runs_end_to_end(tmp_path, capsys):
    """The smoke test: a tiny UNet, three peers, two tiers, one run, on a real JuiceFS volume."""
    import sys

    sys.path.insert(0, str(loader.REPO / "bench"))
    from volume import unavailable_reason

    if reason := unavailable_reason():
        pytest.skip(f"no JuiceFS volume: {reason}")
    rc = loader.main(["--volume", "juicefs", "--tiers", "hot,object", "--size-gb", "0.005", "--runs", "1",
                      "--peers", "ours,ours-staged,safetensors-pread", "--ceiling-threads", "2",
                      "--ceiling-chunks-mib", "4", "--workdir", str(tmp_path / "work"),
                      "--results-dir", str(tmp_path / "results"), "--timeout", "120"])
    out = capsys.readouterr().out
    assert rc == 0
    saved = json.loads(next((tmp_path / "results").glob("loader-volume-*.json")).read_text())
    assert saved["volume"]["shaping"] == saved["shaping"] and [c["tier"] for c in saved["ceilings"]] == ["hot", "object"]
    rows = {(r["cache"], r["peer"]): r for r in saved["summary"]}
    assert set(rows) == {(t, p) for t in ("hot", "object") for p in ("ours", "ours-staged", "safetensors-pread")}
    assert all(r["runs"] == 1 and r["verified"] is True and r["pct_of_ceiling"] for r in rows.values())
    # measured over each load (a tiny one may use less than the 10 ms a CPU tick counts)
    assert all(set(r["cpu_share"]) == {"mount", "object_store"} for r in rows.values())
    assert "% of best parallel ceiling" in out and "read ceilings on each tier" in out


def test_on_a_volume_the_disk_ceiling_line_points_to_the_mounts_ceilings():
    lines = loader.hardware_lines({"odirect_read": {"skipped": "on a volume: the mount's ceilings"},
                                   "cuda_skipped": "no CUDA device"})
    assert lines[0] == "- disk O_DIRECT read: on a volume: the mount's ceilings"
