"""bench/device_check.py (the report of bench/device_check.sh) and the script's own guards. Fast:
every step's output is written by hand here; no benchmark runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench import device_check as dc
from bench import loader

REPO = Path(__file__).resolve().parents[1]


# --- packages ------------------------------------------------------------------------------------


def test_requirements_are_read_with_their_includes(tmp_path):
    (tmp_path / "base.txt").write_text("# pinned\ntorch==2.13.0\nnumpy==2.4.6  # comment\n\n")
    (tmp_path / "test.txt").write_text("-r base.txt\nfal==1.83.0\nuvicorn[standard]==0.1 ; python_version > '3'\n"
                                       "--index-url https://example.invalid\nloose\n-r base.txt\n")
    assert dc.parse_requirements(tmp_path / "test.txt") == [
        ("torch", "2.13.0"), ("numpy", "2.4.6"), ("fal", "1.83.0"), ("uvicorn", "0.1"), ("loose", None)]


def test_the_projects_own_requirements_parse():
    names = dict(dc.parse_requirements(dc.REQUIREMENTS))
    assert {"torch", "diffusers", "flashpack", "fal", "pytest", "xxhash"} <= set(names)


def test_missing_and_other_versions_are_told_apart():
    installed = {"torch": "2.13.0+cu128", "numpy": "2.4.5", "fal": "1.83.0"}
    out = dc.check_packages([("torch", "2.13.0"), ("numpy", "2.4.6"), ("fal", "1.83.0"), ("flashpack", "0.4.5"),
                             ("loose", None)], installed.get)
    assert out["missing"] == ["flashpack==0.4.5", "loose"]
    assert out["mismatched"] == [{"name": "numpy", "want": "2.4.6", "have": "2.4.5"}]
    assert out["present"] == ["torch==2.13.0+cu128", "fal==1.83.0"]  # a CUDA build of the pin matches
    assert out["ok"] is False
    assert dc.check_packages([("fal", "1.83.0")], installed.get)["ok"] is True


# --- steps, tests, results -----------------------------------------------------------------------


def test_step_status_from_the_exit_code():
    assert [dc.step_status(rc) for rc in (0, 1, 2, 124, 137, -1)] == [
        "ok", "failed", "failed", "timed out", "timed out", "skipped: no time left"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_reader" name="test_cuda_round_trip_is_bit_exact"><skipped type="pytest.skip" message="needs a CUDA device"/></testcase>
<testcase classname="tests.test_reader" name="test_concurrent_cuda_loads"><failure message="boom"/></testcase>
<testcase classname="tests.test_reader" name="test_a_bare_cuda_device"/>
<testcase classname="tests.test_reader" name="test_other"><error message="fixture"/></testcase>
</testsuite></testsuites>"""


def test_the_junit_report_is_counted(tmp_path):
    (tmp_path / "j.xml").write_text(JUNIT)
    out = dc.parse_junit(tmp_path / "j.xml")
    assert out["tests"] == 4 and out["passed"] == 1
    assert out["failed"] == ["tests.test_reader::test_concurrent_cuda_loads", "tests.test_reader::test_other"]
    assert out["skipped"] == ["tests.test_reader::test_cuda_round_trip_is_bit_exact (needs a CUDA device)"]
    assert dc.parse_junit(tmp_path / "none.xml") is None
    (tmp_path / "bad.xml").write_text("<testsuites")
    assert "error" in dc.parse_junit(tmp_path / "bad.xml")


def _loader_results(rows_ok=True, cuda=False) -> dict:
    device = "cuda" if cuda else "cpu"
    runs = [{"run": 0, "device": device, "cache": c, "peer": "ours", "level": "state_dict", "ok": True, "ready_s": 1.0,
             "load_s": 0.9, "touch_s": 0.1, "process_s": 2.0, "peak_rss_gb": 1.0, "verified": rows_ok} for c in ("hot", "cold")]
    hw = {"odirect_read": {"gbps": 2.0, "threads": 8, "chunk_mib": 32, "grid": [{"threads": 8, "chunk_mib": 32, "gbps": 2.0}]}}
    hw["cuda_skipped" if not cuda else "x"] = "no CUDA device (torch.cuda.is_available() is False)"
    return {"summary": loader.summarize(runs, 10**9), "hardware": hw, "notes": ["cold runs: at most 0.0% cached"],
            "data": {"payload_bytes": 10**9, "dtype": "float16"}, "config": {"runs": 1}, "runs": runs}


def _startup_results() -> dict:
    runs = [{"peer": p, "cache": c, "health_s": 4.0, "first_image_s": 1.0, "peak_rss_gb": 0.8, "round": 0,
             "resident_before": 0.0, **({"phases": {"setup": 3.0}} if p == "ours" else {})}
            for c in ("hot", "cold") for p in ("ours", "stock", "imports-only")]
    runs[1]["error"] = "stock exited with 1 before /health answered"
    from bench.device_check import _startup_module

    return {"summary": _startup_module().summarize(runs), "runs": runs, "payload_bytes": 3 * 10**8,
            "config": {"size": "tiny", "rounds": 1}}


CLEAN_JUNIT = JUNIT.replace('<failure message="boom"/>', "").replace('<error message="fixture"/>', "")


def _out_dir(tmp_path, rcs=None, junit=CLEAN_JUNIT, loader_results=None, startup=True) -> Path:
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "loader").mkdir()
    (out / "startup").mkdir()
    rcs = {"machine": 0, "packages": 0, "tests": 0, "prepare": 0, "loader": 0, "startup": 0} | (rcs or {})
    (out / "steps.tsv").write_text("".join(f"{n}\t{rc}\t1.5\t60\tpython bench/x.py --flag\n" for n, rc in rcs.items()))
    (out / "machine.json").write_text(json.dumps({"python_version": "3.11.7", "torch": "2.13.0+cpu", "torch_cuda": None,
                                                  "cuda_available": False, "machine": {"cpu": "AMD EPYC", "cores": 2,
                                                  "ram_gb": 24.7, "disk": {"fstype": "ext4"}, "gpu": None}}))
    (out / "packages.json").write_text(json.dumps({"missing": [], "mismatched": [], "present": [], "ok": True}))
    if junit is not None:
        (out / "tests-junit.xml").write_text(junit)
    (out / "loader" / "m-1.json").write_text(json.dumps(loader_results or _loader_results()))
    if startup:
        (out / "startup" / "startup-m-1.json").write_text(json.dumps(_startup_results()))
    return out


def test_a_clean_dry_run_passes_and_renders_every_section(tmp_path):
    out = _out_dir(tmp_path)
    report = dc.build_report(out, "cpu", "tiny")
    assert report["ok"] is True and report["failed_steps"] == []
    assert [s["name"] for s in report["steps"]] == ["machine", "packages", "tests", "prepare", "loader", "startup"]
    text = dc.render_markdown(report)
    assert "**all 6 steps passed**" in text
    assert "| tests | ok | 0 | 1.5 | 60 | logs/tests.log |" in text
    assert "skipped: `tests.test_reader::test_cuda_round_trip_is_bit_exact (needs a CUDA device)`" in text
    assert "| cpu | hot | state_dict | ours |" in text  # the loader table
    assert "skipped: no CUDA device" in text  # the loader's CUDA ceilings note
    assert "| hot | ours |" in text and "Our phases" in text  # the startup tables
    assert "ERROR stock hot: stock exited with 1" in text


def test_skipped_gpu_tests_fail_a_gpu_check(tmp_path):
    report = dc.build_report(_out_dir(tmp_path, loader_results=_loader_results(cuda=True)), "cuda", "sdxl")
    tests = next(s for s in report["steps"] if s["name"] == "tests")
    assert tests["status"] == "failed: 1 CUDA test(s) skipped on DEVICE=cuda"
    assert report["failed_steps"] == ["tests"] and report["ok"] is False


def test_a_gpu_check_whose_loader_skipped_the_gpu_ceilings_fails(tmp_path):
    report = dc.build_report(_out_dir(tmp_path, junit=JUNIT.split("<testcase")[0] + '<testcase classname="t" name="x"/>'
                                      "</testsuite></testsuites>"), "cuda", "sdxl")
    loader_step = next(s for s in report["steps"] if s["name"] == "loader")
    assert "no cuda rows" in loader_step["status"] and "CUDA ceilings skipped" in loader_step["status"]


def test_wrong_tensors_missing_results_and_exit_codes_fail_their_steps(tmp_path):
    out = _out_dir(tmp_path, rcs={"startup": 1, "prepare": 124, "packages": -1}, loader_results=_loader_results(rows_ok=False),
                   startup=False, junit=None)
    report = dc.build_report(out, "cpu", "tiny")
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status["loader"].startswith("failed: tensors differ from the source: ours (cpu, cold), ours (cpu, hot)")
    assert status["startup"] == "failed; no results file"
    assert status["prepare"] == "timed out"
    assert status["packages"] == "skipped: no time left"
    assert status["tests"] == "failed: no junit report"
    text = dc.render_markdown(report)
    assert "**FAILED: packages, tests, prepare, loader, startup**" in text
    assert "no results (see logs/startup.log)" in text


def test_summarize_writes_the_json_and_the_markdown_and_exits_by_the_verdict(tmp_path, capsys):
    out = _out_dir(tmp_path)
    assert dc.main(["summarize", "--out", str(out), "--device", "cpu", "--size", "tiny"]) == 0
    saved = json.loads((out / "device_check.json").read_text())
    assert saved["ok"] is True and saved["loader"]["results"].endswith("m-1.json")
    assert (out / "SUMMARY.md").read_text() == capsys.readouterr().out.rstrip("\n") + "\n"
    (out / "steps.tsv").write_text((out / "steps.tsv").read_text().replace("startup\t0", "startup\t3"))
    assert dc.main(["summarize", "--out", str(out), "--device", "cpu", "--size", "tiny"]) == 1


def test_no_steps_is_not_a_pass(tmp_path):
    (tmp_path / "o").mkdir()
    report = dc.build_report(tmp_path / "o", "cpu", "tiny")
    assert report["ok"] is False and "no step ran" in dc.render_markdown(report)


# --- the script ------------------------------------------------------------------------------------


def test_the_script_parses_and_refuses_an_unknown_device(tmp_path):
    script = REPO / "bench" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    r = subprocess.run(["bash", str(script)], env={"DEVICE": "tpu", "OUT": str(tmp_path / "o"), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "DEVICE must be cuda or cpu" in r.stderr


def test_the_script_records_a_timed_out_and_a_failing_step_and_goes_on(tmp_path):
    """A fake python: the first steps fail at once, pytest hangs; the script times it out, skips
    what the budget leaves no time for, and exits 1."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\ncase "$1 $2 $3" in "-m pytest "*) sleep 30 ;; *" summarize "*) exit 0 ;; *) exit 3 ;; esac\n')
    fake.chmod(0o755)
    out = tmp_path / "o"
    r = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh")], capture_output=True, text=True, timeout=60,
                       env={"DEVICE": "cpu", "OUT": str(out), "PYTHON": str(fake), "PATH": "/usr/bin:/bin",
                            "BUDGET_S": "3", "RESERVE_S": "0"})
    assert r.returncode == 1, r.stdout + r.stderr  # even though the (fake) summary said all was well
    steps = dc.read_steps(out / "steps.tsv")
    assert [s["name"] for s in steps] == ["machine", "packages", "tests", "prepare", "loader", "startup"]
    by = {s["name"]: s for s in steps}
    assert by["machine"]["rc"] == 3 and by["machine"]["status"] == "failed"
    assert by["tests"]["status"] == "timed out" and by["tests"]["limit_s"] <= 3
    assert all(s["status"] == "skipped: no time left" for s in steps[3:])  # the budget was spent
    assert "TIMED OUT" in r.stdout and "FAILED (exit 3)" in r.stdout
    assert "FAILED (machine packages tests prepare loader startup" in r.stdout
