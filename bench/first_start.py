"""The first start on the volume: acquiring a local source, converting it and publishing it into a
cold store, against copying the source once on the same mount.

The source (the SDXL-shaped pipeline of bench/startup.py, random fp16 weights) is copied to a
JuiceFS volume (bench/volume.py) once. Then, interleaved, each round and tier:

- ``copy``: ``cp -r --reflink=never SOURCE COPY`` on the mount: the bytes read once and written
  once, what any first start has to beat. (A plain ``cp -r`` is shown too, as ``clone``: coreutils
  9 asks for ``copy_file_range``, which JuiceFS answers by sharing the source's blocks in its
  metadata: no byte is read or written, about 0.03 s for any size.)
- ``first start``: in a fresh process, ``conversion.store.ensure_converted(SOURCE, root=DATA,
  dtype=float16)`` into an empty store on the mount (acquire, convert, verify, fsync, publish),
  timed after the imports (which the process wall time also shows).

Before each, the source is put in the tier (``node``: JuiceFS's node cache; ``object``: every
block from the object store; ``hot``: the page cache). The copy and the store are deleted after
each, untimed. Reported: medians, the ratio first start / copy (the issue's target: within 1.5x),
and the CPU in cores the mount and the object store used. Always on a volume (``--volume juicefs``).

    python bench/first_start.py --size small --rounds 1          # a few minutes here
    python bench/first_start.py --size sdxl --rounds 3 --tiers node,object
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import on_volume  # noqa: E402
from common import machine_info, machine_slug, median  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the two operations -----------------------------------------------------------------------


OPS = ("clone", "copy", "first_start")


def copy_once(source: Path, dst: Path, clone: bool = False) -> float:
    """``cp -r source dst`` (``clone``: as typed, so JuiceFS may share blocks; else with
    ``--reflink=never``, every byte read and written): seconds."""
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", *([] if clone else ["--reflink=never"]), str(source), str(dst)], check=True)
    return time.perf_counter() - t0


def worker(spec: dict) -> None:
    """In a fresh process: the imports, then the first start into an empty store, each timed."""
    t0 = time.perf_counter()
    import torch  # noqa: F401

    from conversion.store import ensure_converted

    t1 = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stderr)
    w0 = time.time()
    entry = ensure_converted(spec["source"], root=spec["data_root"], dtype="float16")
    t2 = time.perf_counter()
    print("RESULT " + json.dumps({"import_s": round(t1 - t0, 3), "first_start_s": round(t2 - t1, 3),
                                  "window": [w0, time.time()], "entry": str(entry)}), flush=True)


def first_start(source: Path, data_root: Path, timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
           json.dumps({"source": str(source), "data_root": str(data_root)})]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["process_s"] = round(wall, 3)
            out["log"] = [x for x in proc.stderr.splitlines() if x.startswith(("conversion", "model_loader"))][-20:]
            return out
    raise RuntimeError(f"first start failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")


# --- the summary ------------------------------------------------------------------------------


def summarize(runs: list[dict], source_bytes: int) -> list[dict]:
    """One row per tier: medians of the copy and of the first start, their ratio, the CPU shares."""
    rows = []
    for tier in dict.fromkeys(r["tier"] for r in runs):
        mine = [r for r in runs if r["tier"] == tier and "error" not in r]
        copy = median([r["copy_s"] for r in mine if r["op"] == "copy"])
        first = median([r["first_start_s"] for r in mine if r["op"] == "first_start"])
        row = {"tier": tier, "clone_s": median([r["copy_s"] for r in mine if r["op"] == "clone"]),
               "copy_s": copy, "first_start_s": first,
               "copy_gb_s": source_bytes / 1e9 / copy if copy == copy and copy > 0 else None,
               "first_start_gb_s": source_bytes / 1e9 / first if first == first and first > 0 else None,
               "ratio": round(first / copy, 2) if copy == copy and first == first and copy > 0 else None,
               "process_s": median([r.get("process_s") for r in mine if r["op"] == "first_start"]),
               "runs": f"{len(mine)}/{sum(r['tier'] == tier for r in runs)}"}
        for op in ("copy", "first_start"):
            shares = [r["cpu_share"] for r in mine if r["op"] == op and r.get("cpu_share")]
            if shares:
                row[f"{op}_cpu"] = {k: median([s.get(k) for s in shares]) for k in ("mount", "object_store")}
        rows.append(row)
    return rows


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None or value != value else format(value, fmt)


def markdown(rows: list[dict]) -> str:
    lines = ["| tier | cp -r s (a JuiceFS clone) | copy s (cp -r --reflink=never) | copy GB/s | first start s (acquire, convert, publish) | first start GB/s "
             "| first start / copy | process s (with imports) | mount / store CPU, copy | mount / store CPU, "
             "first start | runs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tier']} | {_num(r.get('clone_s'), '.3f')} | {_num(r['copy_s'])} | {_num(r['copy_gb_s'])} | {_num(r['first_start_s'])} "
                     f"| {_num(r['first_start_gb_s'])} | {_num(r['ratio'])}x | {_num(r['process_s'])} "
                     f"| {on_volume.cpu_text(r.get('copy_cpu'))} | {on_volume.cpu_text(r.get('first_start_cpu'))} "
                     f"| {r['runs']} |")
    return "\n".join(lines)


# --- the driver -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("sdxl", "small", "tiny"), default="sdxl",
                    help="the SDXL-shaped pipeline of bench/startup.py: sdxl (6.9 GB), small (~0.8 GB), tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "startup",
                    help="where the source is written on the local disk (shared with bench/startup.py)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a first start may take")
    ap.add_argument("--machine", default=None)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    on_volume.add_arguments(ap, default_tiers="node")
    ap.set_defaults(volume="juicefs")
    args = ap.parse_args(argv)
    try:
        args.tiers = on_volume.parse_tiers(args.tiers)
    except ValueError as exc:
        ap.error(str(exc))
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    from startup import local_source

    local = local_source(args.workdir, args.size)
    with on_volume.open_volume(args) as vol:
        return bench(args, vol, local)


def bench(args: argparse.Namespace, vol, local: Path) -> int:
    tiers = on_volume.Tiers(vol)
    base = vol.mount() / "first-start"
    source = base / "source"
    log(f"volume: {vol.describe()['shaping_text']}; copying the source to {source} ...")
    on_volume.copy_in(local, source)
    files = on_volume.files_under(source)
    source_bytes = sum(os.path.getsize(f) for f in files)
    info = machine_info(base)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"first-start-{args.machine or machine_slug(info)}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    runs: list[dict] = []

    def save(done: bool) -> list[dict]:
        rows = summarize(runs, source_bytes)
        saved = {"benchmark": "bench/first_start.py", "hardware": info, "volume": vol.describe(),
                 "config": vars(args) | {"workdir": str(args.workdir), "results": str(args.results)},
                 "source_bytes": source_bytes, "source_files": len(files), "summary": rows, "runs": runs}
        if not done:
            saved["partial"] = "stopped before the end, or still running"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(saved, indent=1, default=str) + "\n")
        os.replace(tmp, out)
        return rows

    log(f"source: {len(files)} files, {source_bytes / 1e9:.2f} GB")
    for round_ in range(args.rounds):
        for tier in args.tiers:
            for op in OPS:
                target = base / f"{op}-{round_}-{tier}"
                tiers.set(tier, files)
                cpu0 = tiers.cpu()
                record: dict = {"round": round_, "tier": tier, "op": op}
                try:
                    if op in ("clone", "copy"):
                        record["copy_s"] = round(copy_once(source, target, clone=op == "clone"), 3)
                        seconds = record["copy_s"]
                    else:
                        record.update(first_start(source, target, args.timeout))
                        seconds = record["first_start_s"]  # the mount is idle during the imports
                    record["cpu_share"] = on_volume.cpu_share(cpu0, tiers.cpu(), seconds)
                except Exception as exc:  # noqa: BLE001 - recorded, the bench goes on
                    record["error"] = str(exc)
                shutil.rmtree(target, ignore_errors=True)
                runs.append(record)
                save(False)
                took = record.get("copy_s", record.get("first_start_s", "-"))
                log(f"round {round_ + 1}/{args.rounds} {tier:6} {op:11} {took} s, CPU mount/store "
                    f"{on_volume.cpu_text(record.get('cpu_share'))}" + (f"  ERROR {record['error']}" if "error" in record else ""))
    rows = save(True)
    v = vol.describe()
    print(f"First start on {v['filesystem']} over {v['object_store']} ({v['shaping_text']}): SDXL-shaped ({args.size}) "
          f"source, {len(files)} files, {source_bytes / 1e9:.2f} GB; {args.rounds} rounds; {info['cpu']}, "
          f"{info['cores']} cores\n")
    print(markdown(rows))
    last = next((r for r in reversed(runs) if r.get("log")), None)
    if last:
        print("\nThe last first start's log:\n\n    " + "\n    ".join(last["log"]))
    log(f"raw runs: {out}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
