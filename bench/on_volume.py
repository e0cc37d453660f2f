"""What the benches share when they run on a JuiceFS volume (bench/volume.py) instead of the local disk.

- the command-line options (``--volume juicefs --tiers hot,node,object`` and the store's shaping);
- :class:`Tiers`: puts a run's files in a tier and reads the CPU the mount and the object store
  used, so every figure is reported with the CPU it cost them;
- :class:`CpuSampler`: that CPU over a window timed in another process (a loader's worker);
- the mount's ceilings of a tier in a few numbers and a table, and a figure's share of the best.

Kept small and free of project imports: ``bench/startup.py``, ``bench/loader.py`` and
``bench/first_start.py`` use it.
"""

from __future__ import annotations

import argparse
import bisect
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

VOLUMES = ("juicefs",)
TIERS = ("hot", "node", "object")


def add_arguments(ap: argparse.ArgumentParser, default_tiers: str = ",".join(TIERS)) -> None:
    """``--volume``, ``--tiers`` and the object store's shaping (defaults: bench/volume.py's Shaping)."""
    from volume import Shaping

    shaping = Shaping()
    g = ap.add_argument_group("on a JuiceFS volume (bench/volume.py; needs root, /dev/fuse, juicefs, nginx-extras)")
    g.add_argument("--volume", choices=VOLUMES, default=None,
                   help="run on a real JuiceFS volume over a shaped object store, as on fal's /data "
                        "(default: the local disk)")
    g.add_argument("--tiers", default=default_tiers,
                   help="with --volume: comma-separated subset of hot (page cache), node (JuiceFS's node "
                        f"cache), object (every block from the object store); default {default_tiers}")
    g.add_argument("--latency-ms", type=float, default=shaping.latency_ms,
                   help="object store: first-byte latency of every GET")
    g.add_argument("--conn-mb-s", type=float, default=shaping.conn_mb_s,
                   help="object store: MB/s per connection (0: no cap)")
    g.add_argument("--total-mb-s", type=float, default=shaping.total_mb_s,
                   help="object store: MB/s shared by all connections (0: no cap)")


def parse_tiers(text: str) -> list[str]:
    """``hot,object`` -> ``["hot", "object"]``, in the order given; ValueError naming what is wrong."""
    tiers = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tiers if t not in TIERS]
    if unknown or not tiers:
        raise ValueError(f"--tiers: unknown or empty {unknown or tiers} (choose from {', '.join(TIERS)})")
    if len(set(tiers)) != len(tiers):
        raise ValueError(f"--tiers: {text!r} names a tier twice")
    return tiers


def shaping_of(args: argparse.Namespace):
    from volume import Shaping

    return Shaping(args.latency_ms, args.conn_mb_s, args.total_mb_s)


def open_volume(args: argparse.Namespace):
    """The volume of ``--volume`` (one mount, ``a``), or SystemExit saying why this machine cannot."""
    from volume import Volume, VolumeUnavailable

    try:
        return Volume(shaping_of(args), mounts=("a",))
    except VolumeUnavailable as exc:
        raise SystemExit(f"--volume {args.volume}: {exc}") from None


def copy_in(src: str | os.PathLike[str], dst: Path) -> float:
    """Copy the directory ``src`` (local disk) to ``dst`` on the volume; seconds taken."""
    t0 = time.perf_counter()
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    return time.perf_counter() - t0


def files_under(*roots: str | os.PathLike[str]) -> list[str]:
    return sorted(str(p) for root in roots for p in Path(root).rglob("*") if p.is_file())


# --- tiers and CPU ------------------------------------------------------------------------------


class Tiers:
    """A run's files put in a tier of ``volume`` (``set``), and the CPU seconds so far of its mounts
    and its object store (``cpu``)."""

    def __init__(self, volume, mount: str = "a"):
        self.volume = volume
        self.mount = mount

    def set(self, tier: str, files: Iterable[str | os.PathLike[str]]) -> None:
        self.volume.set_tier(tier, list(files), self.mount)

    def cpu(self) -> dict[str, float]:
        return self.volume.cpu_seconds()


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds used by the mounts (together) and the object store between two
    :meth:`Volume.cpu_seconds` readings. A process restarted in between counts from zero."""
    if not before or not after:
        return {}

    def used(key: str) -> float:
        delta = after.get(key, 0.0) - before.get(key, 0.0)
        return after.get(key, 0.0) if delta < 0 else delta  # a new process: its whole time

    return {"mount": sum(used(k) for k in after if k.startswith("mount")), "object_store": used("object_store")}


def cpu_share(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores used on average over ``seconds`` by the mounts (together) and the object store."""
    used = cpu_used(before, after)
    if not used or seconds <= 0:
        return {}
    return {k: round(v / seconds, 3) for k, v in used.items()}


class CpuSampler:
    """Reads ``cpu()`` (a :meth:`Volume.cpu_seconds`) every ``period`` seconds in a thread, so the
    CPU over a window timed elsewhere (``time.time()`` in a worker process) can be told after."""

    def __init__(self, cpu, period: float = 0.05):
        self._cpu = cpu
        self.period = period
        self.times: list[float] = []
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _take(self) -> None:
        sample = self._cpu()
        self.times.append(time.time())
        self.samples.append(sample)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._take()

    def at(self, t: float) -> dict[str, float]:
        """The reading at ``t``, interpolated between the two samples around it."""
        return interpolate(self.times, self.samples, t)

    def share(self, start: float, end: float) -> dict[str, float]:
        return cpu_share(self.at(start), self.at(end), end - start)


def interpolate(times: Sequence[float], samples: Sequence[dict[str, float]], t: float) -> dict[str, float]:
    """Linear interpolation of cumulative readings taken at ``times`` (ascending), clamped at the ends."""
    if not times:
        return {}
    i = bisect.bisect_left(times, t)
    if i <= 0:
        return dict(samples[0])
    if i >= len(times):
        return dict(samples[-1])
    t0, t1 = times[i - 1], times[i]
    w = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
    a, b = samples[i - 1], samples[i]
    return {k: a.get(k, 0.0) + w * (b[k] - a.get(k, 0.0)) for k in b}


def cpu_text(share: dict | None) -> str:
    """``0.85 / 0.12`` (cores: the mount, the object store), ``-`` when not measured."""
    if not share:
        return "-"
    return f"{share.get('mount', float('nan')):.2f} / {share.get('object_store', float('nan')):.2f}"


# --- ceilings -----------------------------------------------------------------------------------


def ceiling_summary(result: dict) -> dict:
    """The few numbers of a :func:`volume.ceilings` result: one thread sequential, and the best
    point of each kind (split: own descriptor and contiguous part per thread; grid: chunks of a
    shared descriptor; split_direct: split with O_DIRECT) and overall."""
    out: dict = {"tier": result["tier"], "bytes": result["bytes"], "o_direct": result.get("o_direct"),
                 "sequential_gb_s": result["sequential_gb_s"], "best": result["best"]}
    for kind in ("split", "grid", "split_direct"):
        points = [p for p in result["points"] if p["kind"] == kind]
        out[kind] = max(points, key=lambda p: p["gb_s"]) if points else None
    return out


def _point_text(p: dict | None) -> str:
    if not p:
        return "-"
    where = f"{p['threads']} thr" + (f" x {p['chunk_mib']} MiB" if "chunk_mib" in p else "")
    return f"{p['gb_s']:.2f} ({where}; CPU {cpu_text(_cores(p.get('cpu_share')))})"


def _cores(share: dict | None) -> dict | None:
    """A ceiling point's ``cpu_share`` (per mount and store) as :func:`cpu_share`'s two numbers."""
    if not share:
        return None
    return {"mount": sum(v for k, v in share.items() if k.startswith("mount")), "object_store": share.get("object_store", 0.0)}


def ceilings_table(results: Sequence[dict]) -> str:
    """One row per tier: GB/s of each kind of read (its best point, and the mount / object store CPU
    in cores while it ran)."""
    lines = ["| tier | MB read | one thread sequential | best split (own fd, contiguous part) | best grid (shared fd, "
             "chunks) | best split O_DIRECT | best parallel GB/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        s = ceiling_summary(r)
        seq = next((p for p in r["points"] if p["kind"] == "sequential"), None)
        seq_text = f"{s['sequential_gb_s']:.2f} (CPU {cpu_text(_cores(seq.get('cpu_share')) if seq else None)})"
        direct = _point_text(s["split_direct"]) if s["o_direct"] else "refused"
        lines.append(f"| {s['tier']} | {s['bytes'] / 1e6:.0f} | {seq_text} | {_point_text(s['split'])} "
                     f"| {_point_text(s['grid'])} | {direct} | {s['best']['gb_s']:.2f} |")
    return "\n".join(lines)


def percent_of(gbps: float | None, ceiling: dict | None) -> float | None:
    """``gbps`` as a percentage of the best parallel point of a ceilings result (None if unknown)."""
    if gbps is None or gbps != gbps or not ceiling or not ceiling.get("best"):
        return None
    best = ceiling["best"]["gb_s"]
    return round(100 * gbps / best, 1) if best > 0 else None
