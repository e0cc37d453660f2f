"""The Python half of bench/device_check.sh: machine facts, the package check, preparing the models,
and the combined report (one JSON and one markdown summary) of the steps the script ran.

    python bench/device_check.py machine --device cuda --out OUT/machine.json
    python bench/device_check.py packages --out OUT/packages.json
    python bench/device_check.py prepare --size sdxl [--loader-size-gb 1.0]
    python bench/device_check.py summarize --out OUT --device cuda --size sdxl

The script records each step it ran as one line of ``OUT/steps.tsv`` (name, exit code, seconds,
time limit, command); ``summarize`` reads that, the steps' own outputs (``machine.json``,
``packages.json``, ``tests-junit.xml``, ``loader/*.json``, ``startup/*.json``) and writes
``OUT/device_check.json`` and ``OUT/SUMMARY.md``; it exits 1 if any step failed. Nothing here
needs a GPU: on a machine without one the CUDA-only parts say they were skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The packages the device check needs, from these files (``-r`` includes are followed).
REQUIREMENTS = REPO / "requirements-test.txt"
TIMED_OUT = (124, 137)  # timeout(1): the limit passed (124), or the command ignored SIGTERM and was killed (137)
SKIPPED = -1  # the script's code for a step it did not start (no time left)


# --------------------------------------------------------------------------------------------------
# Packages


def parse_requirements(path: Path, seen: set[Path] | None = None) -> list[tuple[str, str | None]]:
    """``(name, pinned version or None)`` for each requirement line of ``path`` and its ``-r`` files."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    out: list[tuple[str, str | None]] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            out += parse_requirements(path.parent / line.split(None, 1)[1].strip(), seen)
            continue
        if line.startswith("-"):
            continue  # other pip options (--index-url, ...)
        line = line.split(";", 1)[0].strip()  # environment markers: checked as if they held
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?:==\s*([^\s,]+))?", line)
        if m:
            out.append((m[1], m[2]))
    return out


def _installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_packages(
    requirements: list[tuple[str, str | None]], version_of: Callable[[str], str | None] = _installed_version
) -> dict:
    """Which requirements are missing, and which are installed at another version than pinned
    (a local label such as ``+cu128`` is ignored: a CUDA build of the pinned torch matches)."""
    missing, mismatched, present = [], [], []
    for name, want in requirements:
        have = version_of(name)
        if have is None:
            missing.append(name if want is None else f"{name}=={want}")
        elif want is not None and have.split("+", 1)[0] != want.split("+", 1)[0]:
            mismatched.append({"name": name, "want": want, "have": have})
        else:
            present.append(f"{name}=={have}")
    return {"missing": missing, "mismatched": mismatched, "present": present, "ok": not missing}


def packages_main(args: argparse.Namespace) -> int:
    report = check_packages(parse_requirements(Path(args.requirements)))
    fal_cli = Path(sys.executable).with_name("fal")
    report["fal_cli"] = str(fal_cli) if fal_cli.exists() else None
    if report["fal_cli"] is None:
        report["missing"].append(f"the fal CLI next to {sys.executable} (bench/startup.py runs it)")
        report["ok"] = False
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"python: {sys.executable}; {len(report['present'])} of the pinned packages present")
    for m in report["mismatched"]:
        print(f"version differs: {m['name']} {m['have']} (pinned {m['want']})")
    if report["missing"]:
        print("MISSING: " + ", ".join(report["missing"]))
        print("This machine has no network: carry the wheels (see the header of bench/device_check.sh):\n"
              "  networked machine: pip download -d wheels -r requirements-test.txt\n"
              "  here:              python -m pip install --no-index --find-links wheels/ -r requirements-test.txt")
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# Machine


def _nvidia_smi() -> str:
    try:
        r = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).strip() or f"nvidia-smi exited {r.returncode}"
    except FileNotFoundError:
        return "nvidia-smi: not found"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi: {exc}"


def machine_main(args: argparse.Namespace) -> int:
    out: dict = {"python": sys.executable, "python_version": sys.version.split()[0], "device": args.device,
                 "nvidia_smi": _nvidia_smi()}
    print(out["nvidia_smi"])
    rc = 0
    try:
        import torch

        out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                   cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0)
        from bench.common import machine_info

        out["machine"] = machine_info(REPO)
    except Exception as exc:  # noqa: BLE001 - reported; the other steps still run
        out["error"] = f"{type(exc).__name__}: {exc}"
        rc = 1
    print(f"python {out['python_version']} ({sys.executable}); torch {out.get('torch', '-')} "
          f"(built for CUDA {out.get('torch_cuda') or '-'}); CUDA available: {out.get('cuda_available', '-')}")
    if "machine" in out:
        m = out["machine"]
        gpu = m["gpu"]
        print(f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, disk {m['disk'].get('fstype', '?')} on "
              f"{m['disk'].get('source', '?')}; GPU: " + (f"{gpu['count']} x {gpu['name']} ({gpu['memory_gb']} GB), "
                                                         f"driver {gpu['driver']}" if gpu else "none"))
    if args.device == "cuda" and not out.get("cuda_available"):
        out["error"] = out.get("error") or ("DEVICE=cuda but torch.cuda.is_available() is False"
                                            + (" (a CPU-only torch build)" if out.get("torch") and not out.get("torch_cuda") else ""))
        rc = 1
    if "error" in out:
        print(f"ERROR: {out['error']}")
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    return rc


# --------------------------------------------------------------------------------------------------
# Prepare


def _startup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_startup", REPO / "bench" / "startup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_main(args: argparse.Namespace) -> int:
    """Build (once) the models the benches use, so their steps time loads, not model generation."""
    from bench import loader

    t0 = time.perf_counter()
    data = _startup_module().prepare(Path(args.startup_workdir), args.size)
    t1 = time.perf_counter()
    print(f"startup bench model ({args.size}): {data['payload_bytes'] / 1e9:.2f} GB of packs in {data['store']} "
          f"({t1 - t0:.1f} s)")
    ldata = loader.prepare(Path(args.loader_workdir), args.loader_size_gb, "float16", 0)
    print(f"loader bench model: {ldata['payload_bytes'] / 1e9:.2f} GB UNet, pack {ldata['pack']} "
          f"({time.perf_counter() - t1:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------------------
# The report


def step_status(rc: int) -> str:
    if rc == 0:
        return "ok"
    if rc == SKIPPED:
        return "skipped: no time left"
    if rc in TIMED_OUT:
        return "timed out"
    return "failed"


def read_steps(path: Path) -> list[dict]:
    """The steps the script recorded: one tab-separated line each (name, rc, seconds, limit, command)."""
    steps = []
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        name, rc, seconds, limit = parts[:4]
        steps.append({"name": name, "rc": int(rc), "seconds": float(seconds), "limit_s": int(float(limit)),
                      "command": parts[4] if len(parts) > 4 else "", "status": step_status(int(rc)),
                      "log": f"logs/{name}.log"})
    return steps


def parse_junit(path: Path) -> dict | None:
    """Counts and names from a pytest ``--junitxml`` report (None if there is none)."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable junit report: {exc}"}
    out = {"tests": 0, "passed": 0, "failed": [], "skipped": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        out["tests"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(name)
        elif case.find("skipped") is not None:
            reason = case.find("skipped").get("message", "")
            out["skipped"].append(f"{name} ({reason})" if reason else name)
        else:
            out["passed"] += 1
    return out


def _newest_json(folder: Path, pattern: str = "*.json") -> Path | None:
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return files[-1] if files else None


def _load_json(path: Path | None) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fail(step: dict | None, why: str) -> None:
    if step is not None and step["status"] == "ok":
        step["status"] = f"failed: {why}"
    elif step is not None:
        step["status"] += f"; {why}"


def build_report(out: Path, device: str, size: str) -> dict:
    """Everything the steps left under ``out``, with each step's status checked against its output."""
    steps = read_steps(out / "steps.tsv")
    by_name = {s["name"]: s for s in steps}
    report: dict = {"check": "bench/device_check.sh", "created": dt.datetime.now().isoformat(timespec="seconds"),
                    "device": device, "size": size, "out": str(out), "steps": steps}
    report["machine"] = _load_json(out / "machine.json")
    report["packages"] = _load_json(out / "packages.json")

    tests = parse_junit(out / "tests-junit.xml")
    report["tests"] = tests
    if "tests" in by_name:
        if tests is None:
            _fail(by_name["tests"], "no junit report")
        elif "error" in tests:
            _fail(by_name["tests"], tests["error"])
        elif tests["tests"] == 0:
            _fail(by_name["tests"], "no CUDA test was collected")
        elif device == "cuda" and tests["skipped"]:
            _fail(by_name["tests"], f"{len(tests['skipped'])} CUDA test(s) skipped on DEVICE=cuda")

    path = _newest_json(out / "loader")
    saved = _load_json(path)
    report["loader"] = None if saved is None else {
        "results": str(path), "summary": saved.get("summary", []), "hardware": saved.get("hardware", {}),
        "notes": saved.get("notes", []), "data": saved.get("data", {}), "config": saved.get("config", {})}
    if "loader" in by_name:
        if saved is None:
            _fail(by_name["loader"], "no results file")
        else:
            rows = saved.get("summary", [])
            broken = sorted({f"{r['peer']} ({r['device']}, {r['cache']})" for r in rows if not r.get("runs")})
            wrong = sorted({f"{r['peer']} ({r['device']}, {r['cache']})" for r in rows if r.get("verified") is False})
            if broken:
                _fail(by_name["loader"], "peer runs failed: " + ", ".join(broken))
            if wrong:
                _fail(by_name["loader"], "tensors differ from the source: " + ", ".join(wrong))
            if not any(r.get("device") == device for r in rows):
                _fail(by_name["loader"], f"no {device} rows")
            hw = saved.get("hardware", {})
            if device == "cuda":
                if hw.get("cuda_skipped"):
                    _fail(by_name["loader"], f"CUDA ceilings skipped: {hw['cuda_skipped']}")
                bad = [k for k in ("pin_costs", "pinned_h2d", "hot_h2d") if "error" in hw.get(k, {})]
                if bad:
                    _fail(by_name["loader"], "CUDA ceilings failed: " + ", ".join(bad))
                if hw.get("hot_h2d", {}).get("bytes_match") is False:
                    _fail(by_name["loader"], "the hot path ceiling's device bytes differ from the file")

    path = _newest_json(out / "startup", "startup-*.json")
    saved = _load_json(path)
    report["startup"] = None if saved is None else {
        "results": str(path), "summary": saved.get("summary", []), "runs": saved.get("runs", []),
        "payload_bytes": saved.get("payload_bytes"), "config": saved.get("config", {}), "partial": saved.get("partial")}
    if "startup" in by_name and saved is None:
        _fail(by_name["startup"], "no results file")

    report["failed_steps"] = [s["name"] for s in steps if s["status"] != "ok"]
    report["ok"] = bool(steps) and not report["failed_steps"]
    return report


def _cell(text: object) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def render_markdown(report: dict) -> str:
    try:
        from bench import loader
    except ImportError as exc:  # e.g. numpy missing: the steps' own tables cannot be drawn
        loader = None
        missing_import = f"{type(exc).__name__}: {exc}"
    m = report.get("machine") or {}
    info = m.get("machine") or {}
    gpu = info.get("gpu")
    where = gpu["name"] if gpu else (info.get("cpu") or "unknown machine")
    steps = report["steps"]
    verdict = (f"**all {len(steps)} steps passed**" if report["ok"]
               else f"**FAILED: {', '.join(report['failed_steps']) or 'no step ran'}**")
    lines = [f"# Device check: {where}, DEVICE={report['device']}, SIZE={report['size']}", "",
             f"{report['created']}; {verdict}. Raw: `device_check.json`; logs: `logs/`.", "",
             "| step | status | exit code | seconds | limit s | log |", "|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['name']} | {_cell(s['status'])} | {s['rc']} | {s['seconds']:.1f} | {s['limit_s']} | {s['log']} |")

    lines += ["", "## Machine", ""]
    if m:
        lines.append(f"- python {m.get('python_version', '?')}, torch {m.get('torch', '?')} (CUDA build "
                     f"{m.get('torch_cuda') or '-'}), CUDA available: {m.get('cuda_available', '?')}")
        if info:
            lines.append(f"- {info.get('cpu')}, {info.get('cores')} cores, {info.get('ram_gb')} GB RAM, disk "
                         f"{info.get('disk', {}).get('fstype', '?')} on {info.get('disk', {}).get('source', '?')}")
        lines.append("- GPU: " + (f"{gpu['count']} x {gpu['name']}, {gpu['memory_gb']} GB, CUDA {gpu['cuda']}, "
                                  f"driver {gpu['driver']}" if gpu else "none"))
        if m.get("error"):
            lines.append(f"- ERROR: {m['error']}")
    else:
        lines.append("- no machine report")

    p = report.get("packages")
    lines += ["", "## Packages", ""]
    if p is None:
        lines.append("- no package report")
    else:
        lines.append("- missing: " + (", ".join(p["missing"]) if p["missing"] else "none"))
        if p["mismatched"]:
            lines.append("- other versions than pinned: " + ", ".join(f"{x['name']} {x['have']} (pinned {x['want']})"
                                                                      for x in p["mismatched"]))

    t = report.get("tests")
    lines += ["", "## Tests that need CUDA (`pytest -k cuda`)", ""]
    if t is None or "error" in t:
        lines.append(f"- {'no junit report' if t is None else t['error']}")
    else:
        lines.append(f"- {t['tests']} selected: {t['passed']} passed, {len(t['failed'])} failed, "
                     f"{len(t['skipped'])} skipped")
        lines += [f"- failed: `{n}`" for n in t["failed"]] + [f"- skipped: `{n}`" for n in t["skipped"]]

    lo = report.get("loader")
    lines += ["", "## Loader (`bench/loader.py`)", ""]
    if lo is None:
        lines.append("- no results (see logs/loader.log)")
    elif loader is None:
        lines.append(f"- results in `{lo['results']}`, not drawn here: {missing_import}")
    else:
        d = lo.get("data", {})
        if d:
            lines += [f"{d.get('payload_bytes', 0) / 1e9:.2f} GB {d.get('dtype', '')} UNet, "
                      f"{lo['config'].get('runs', '?')} run(s) per row. Raw: `{lo['results']}`", ""]
        lines.append(loader.markdown_table(lo["summary"]))
        second = loader.second_load_table(lo["summary"])
        if second:
            lines += ["", "Second load of the same pack in one process:", "", second]
        lines += [""] + loader.hardware_lines(lo["hardware"]) + [f"- {n}" for n in lo.get("notes", [])]

    st = report.get("startup")
    lines += ["", "## Warm start (`bench/startup.py`)", ""]
    if st is None:
        lines.append("- no results (see logs/startup.log)")
    elif loader is None:
        lines.append(f"- results in `{st['results']}`, not drawn here: {missing_import}")
    else:
        startup = _startup_module()
        size = st["config"].get("size", report["size"])
        lines += [f"SDXL-shaped ({size}), {(st.get('payload_bytes') or 0) / 1e9:.2f} GB of packs, "
                  f"{st['config'].get('rounds', '?')} round(s). Raw: `{st['results']}`", "",
                  startup.markdown(st["summary"]), "", "Our phases (medians, seconds):", "",
                  startup.phase_table(st["runs"])]
        if st.get("partial"):
            lines.append(f"- PARTIAL: {st['partial']}")
        errors = [f"{r['peer']} {r['cache']}: {r['error']}" for r in st["runs"] if "error" in r]
        lines += [f"- ERROR {_cell(e)[:300]}" for e in errors]
    return "\n".join(lines) + "\n"


def summarize_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    report = build_report(out, args.device, args.size)
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = render_markdown(report)
    (out / "SUMMARY.md").write_text(text)
    print(text)
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("machine")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    p = sub.add_parser("packages")
    p.add_argument("--out", required=True)
    p.add_argument("--requirements", default=str(REQUIREMENTS))
    p = sub.add_parser("prepare")
    p.add_argument("--size", default="sdxl", choices=("sdxl", "small", "tiny"))
    p.add_argument("--loader-size-gb", type=float, default=None, help="default: the SD1.5 UNet (1.72 GB)")
    p.add_argument("--startup-workdir", default=str(REPO / "bench" / "out" / "startup"))
    p.add_argument("--loader-workdir", default=str(REPO / "bench" / "out"))
    p = sub.add_parser("summarize")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="sdxl")
    args = ap.parse_args(argv)
    return {"machine": machine_main, "packages": packages_main, "prepare": prepare_main,
            "summarize": summarize_main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
