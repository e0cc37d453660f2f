"""Helpers for the benchmarks: page-cache control, touching weights, machine facts, raw bandwidths.

Kept free of project imports so every benchmark worker can use it without changing what it measures.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


# --- page cache -------------------------------------------------------------------------------


def resident_fraction(path: str | os.PathLike[str]) -> float | None:
    """Fraction of ``path``'s pages in the page cache (mincore), or None if it cannot be asked."""
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            return None
        try:
            npages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * npages)()
            if _libc.mincore(addr, size, vec) != 0:
                return None
            return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) / npages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def evict(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Drop ``paths`` from the page cache (fsync first: dirty pages cannot be dropped)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Iterable[str | os.PathLike[str]], chunk: int = 64 << 20) -> None:
    """Read ``paths`` whole so their pages are in the page cache."""
    buf = bytearray(chunk)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --- touching weights -------------------------------------------------------------------------


def touch(tensors: Iterable, mode: str = "page") -> int:
    """Read the tensors' bytes: one byte per page (``page``: forces lazy mmap views in at the cost of
    a page walk) or every byte (``full``: adds a pass at memory bandwidth). Returns a sum that depends
    on what was read, so the reads cannot be optimized away (it is not comparable across layouts).

    On CUDA the reductions run on the device; the caller synchronizes.
    """
    import torch

    partial = []
    for t in tensors:
        if t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        b = flat.view(torch.uint8)
        if mode == "page":
            partial.append(b[::PAGE].sum(dtype=torch.int64))
        else:
            partial.extend(_sum_bytes(b))
    if not partial:
        return 0
    return int(torch.stack([p.to(partial[0].device) for p in partial]).sum().item())


def _sum_bytes(b) -> list:
    """Partial sums reading every byte of ``b`` (uint8): the aligned middle as int64 words (no
    widening copy), the few bytes at either edge one by one."""
    import torch

    start = (-b.storage_offset()) % 8
    words = max(0, (b.numel() - start) // 8)
    if words == 0:
        return [b.sum(dtype=torch.int64)]
    end = start + words * 8
    out = [b[start:end].view(torch.int64).sum()]
    for edge in (b[:start], b[end:]):
        if edge.numel():
            out.append(edge.sum(dtype=torch.int64))
    return out


# --- statistics -------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float:
    """Median of the values that are not None (NaN when there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else float("nan")


# --- machine facts ----------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _mount_of(path: str) -> dict:
    """The mount holding ``path``: source device, mount point, filesystem type."""
    real = os.path.realpath(path)
    best: dict = {}
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        src, mnt, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best.get("mount", "")):
            best = {"source": src, "mount": mnt, "fstype": fstype}
    dev = os.path.basename(best.get("source", ""))
    base = re.sub(r"p?\d+$", "", dev) if not dev.startswith("nvme") else re.sub(r"p\d+$", "", dev)
    model = _read(f"/sys/block/{base}/device/model").strip() or _read(f"/sys/block/{base}/device/vendor").strip()
    rot = _read(f"/sys/block/{base}/queue/rotational").strip()
    if model:
        best["model"] = model
    if rot:
        best["rotational"] = rot == "1"
    try:
        st = os.statvfs(real)
        best["size_gb"] = round(st.f_blocks * st.f_frsize / 1e9, 1)
        best["free_gb"] = round(st.f_bavail * st.f_frsize / 1e9, 1)
    except OSError:
        pass
    return best


def machine_info(workdir: str | os.PathLike[str]) -> dict:
    """CPU, memory, disk, GPU and library versions of this machine, plus its load right now."""
    import torch

    cpu = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    info = {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gb": round(mem_kb / 1e6, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "disk": _mount_of(os.fspath(workdir)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "versions": _versions(["diffusers", "transformers", "safetensors", "flashpack", "accelerate", "numpy"]),
        "gpu": None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": p.name,
            "memory_gb": round(p.total_memory / 1e9, 1),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
        }
    return info


def _versions(names: Sequence[str]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def _nvidia_driver() -> str | None:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine_slug(info: dict) -> str:
    """A short file-name-safe name for the machine: the GPU's if there is one, else CPU and cores."""
    name = info["gpu"]["name"] if info.get("gpu") else f"{info['cpu']} {info['cores']}c"
    name = re.sub(r"(NVIDIA|AMD|Intel\(R\)|\(R\)|\(TM\)|CPU|Processor|@.*)", " ", name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "machine"


# --- raw bandwidths ---------------------------------------------------------------------------


def odirect_read_gbps(path: str | os.PathLike[str], threads: int = 8, chunk: int = 16 << 20) -> dict:
    """Sequential O_DIRECT read of ``path`` by ``threads`` threads (page cache bypassed): GB/s."""
    if not hasattr(os, "O_DIRECT"):
        return {"error": "O_DIRECT not available on this platform"}
    size = os.path.getsize(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return {"error": f"open(O_DIRECT) failed: {exc}"}
    offsets = list(range(0, size, chunk))
    lock = threading.Lock()
    state = {"next": 0, "bytes": 0, "error": None}

    def reader() -> None:
        buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
        try:
            while True:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= len(offsets) or state["error"]:
                    return
                try:
                    n = os.preadv(fd, [buf], offsets[i])
                except OSError as exc:
                    state["error"] = str(exc)
                    return
                with lock:
                    state["bytes"] += n
        finally:
            buf.close()

    try:
        workers = [threading.Thread(target=reader) for _ in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    if state["error"]:
        return {"error": f"O_DIRECT read failed: {state['error']}"}
    return {
        "bytes": state["bytes"], "seconds": round(dt, 4), "gbps": round(state["bytes"] / dt / 1e9, 3),
        "threads": threads, "chunk_mib": chunk >> 20,
    }


def pinned_h2d_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Host-to-device bandwidth from one pinned buffer (CUDA events), and the cost of pinning it."""
    import torch

    t0 = time.perf_counter()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pin_s = time.perf_counter() - t0
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    best = min(times)
    return {
        "bytes": nbytes, "pin_alloc_s": round(pin_s, 4), "pin_alloc_s_per_gb": round(pin_s / (nbytes / 1e9), 4),
        "copy_s_median": round(median(times), 5), "gbps_median": round(nbytes / median(times) / 1e9, 2),
        "gbps_best": round(nbytes / best / 1e9, 2),
    }
