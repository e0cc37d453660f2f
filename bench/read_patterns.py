"""How to read a pack from a JuiceFS mount: the read patterns behind ``model_loader/storage.py``,
timed on each tier with the CPU they cost (ours and the mount's), alone and beside a busy Python
thread (what the app's imports are while its packs are read).

    python bench/read_patterns.py                       # 1 GB pack, node and object tiers, 3 rounds
    python bench/read_patterns.py --size-gb 0.5 --rounds 1 --tiers node

Patterns (every one reads the whole pack, checked against its segment checksums):
- ``ours``: ``model_loader.read_file`` as the loader plans it for the mount;
- ``grid-mapped``: the local-disk plan (a private mapping walked by threads in a grid of chunks);
- ``split-odirect``: each thread its own descriptor and contiguous part, O_DIRECT into owned memory
  (``MODEL_LOADER_MAP=hot``, and the CUDA staging path's way);
- ``split-buffered``: the same with buffered reads into owned memory;
- ``split-1mib``: ``ours`` with 1 MiB reads instead of one read per 32 MiB chunk.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from volume import TIERS, Shaping, Volume  # noqa: E402


def _patterns(path: Path, checksum) -> dict:
    from model_loader.host_read import read_file

    def split_1mib():
        from model_loader import host_read

        real = host_read.posix_io.pread_exact

        def small_reads(fd, view, offset, p):
            for start in range(0, len(view), 1 << 20):
                real(fd, view[start : start + (1 << 20)], offset + start, p)

        host_read.posix_io.pread_exact = small_reads
        try:
            return read_file(path, checksum)
        finally:
            host_read.posix_io.pread_exact = real

    return {
        "ours": lambda: read_file(path, checksum),
        "grid-mapped": lambda: read_file(path, checksum, mapping="always", layout="grid"),
        "split-odirect": lambda: read_file(path, checksum, mapping="never", layout="split", direct_io=None),
        "split-buffered": lambda: read_file(path, checksum, mapping="never", layout="split", direct_io=False),
        "split-1mib": split_1mib,
    }


def _busy(stop: threading.Event, count: list[float]) -> None:
    """Pure Python work holding the GIL, like imports: ``count`` = [iterations, its own CPU s]."""
    n = 0
    t0 = time.thread_time()
    while not stop.is_set():
        for i in range(1000):
            n += i * i % 7
        count[0] += 1
    count[1] = time.thread_time() - t0


def _busy_alone(seconds: float = 1.0) -> float:
    """Iterations per second of :func:`_busy` with nothing else running."""
    stop, count = threading.Event(), [0, 0.0]
    t = threading.Thread(target=_busy, args=(stop, count))
    t.start()
    time.sleep(seconds)
    stop.set()
    t.join()
    return count[0] / seconds


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--tiers", default="node,object")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    tiers = [t for t in args.tiers.split(",") if t in TIERS]

    import torch

    from conversion.writer import pack_state_dict
    from model_loader.checksum import file_checksum

    runs: list[dict] = []
    with Volume(Shaping()) as vol:
        path = vol.mount() / "model.flashpack"
        n = int(args.size_gb * 1e9 / 2)
        pack_state_dict({"w": torch.randn(n // 4096, 4096).half()}, path)
        checksum = file_checksum(str(path))
        size = path.stat().st_size
        patterns = _patterns(path, checksum)
        for r in range(args.rounds):
            for tier in tiers:
                for busy in (False, True):
                    for name, fn in patterns.items():
                        vol.set_tier(tier, [path])
                        alone = _busy_alone() if busy else 0.0
                        stop, count = threading.Event(), [0, 0.0]
                        thread = threading.Thread(target=_busy, args=(stop, count)) if busy else None
                        if thread:
                            thread.start()
                        c0, m0 = _cpu_self(), sum(vol.cpu_seconds().values())
                        t0 = time.perf_counter()
                        host = fn()
                        wall = time.perf_counter() - t0
                        c1, m1 = _cpu_self(), sum(vol.cpu_seconds().values())
                        if thread:
                            stop.set()
                            thread.join()
                        # the busy thread's own CPU is not the read's
                        runs.append({"round": r, "tier": tier, "busy": busy, "pattern": name, "seconds": wall,
                                     "gb_s": size / 1e9 / wall, "cpu_ours_s": c1 - c0 - count[1], "cpu_mount_s": m1 - m0,
                                     "python_speed": count[0] / wall / alone if busy else None,
                                     "layout": host.stats.layout, "mapped": host.stats.mapped})
                        del host
                        print(json.dumps(runs[-1]), flush=True)
        describe = vol.describe()
    print(f"\n{size / 1e9:.2f} GB pack, {args.rounds} rounds, medians; {describe['shaping_text']}\n")
    print("| tier | beside a busy Python thread | pattern | s | GB/s | CPU s per GB: ours + mount = total "
          "| busy thread's speed vs alone |")
    print("|---|---|---|---|---|---|---|")
    for tier in tiers:
        for busy in (False, True):
            for name in patterns:
                rs = [x for x in runs if (x["tier"], x["busy"], x["pattern"]) == (tier, busy, name)]
                med = {k: statistics.median(x[k] for x in rs) for k in ("seconds", "gb_s", "cpu_ours_s", "cpu_mount_s")}
                gb = size / 1e9
                speed = f"{statistics.median(x['python_speed'] for x in rs):.2f}x" if busy else "-"
                print(f"| {tier} | {'yes' if busy else 'no'} | {name} | {med['seconds']:.2f} | {med['gb_s']:.2f} | "
                      f"{med['cpu_ours_s'] / gb:.2f} + {med['cpu_mount_s'] / gb:.2f} = "
                      f"{(med['cpu_ours_s'] + med['cpu_mount_s']) / gb:.2f} | {speed} |")
    if args.json:
        args.json.write_text(json.dumps({"volume": describe, "bytes": size, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
