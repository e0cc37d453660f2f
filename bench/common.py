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
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memset.restype = ctypes.c_void_p
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


DEFAULT_CEILING_THREADS = (4, 8, 16)
DEFAULT_CEILING_CHUNKS_MIB = (16, 32, 64)


def best_point(points: Sequence[dict]) -> dict | None:
    """The point with the highest ``gbps`` among those that measured one (errors are skipped); on a
    tie the first (the fewest threads and smallest chunk, as the grid is ordered)."""
    best = None
    for p in points:
        if isinstance(p.get("gbps"), (int, float)) and (best is None or p["gbps"] > best["gbps"]):
            best = p
    return best


def odirect_ceiling(
    path: str | os.PathLike[str],
    threads: Sequence[int] = DEFAULT_CEILING_THREADS,
    chunks_mib: Sequence[int] = DEFAULT_CEILING_CHUNKS_MIB,
) -> dict:
    """The disk's O_DIRECT read rate over a grid of thread counts and chunk sizes (one pass each,
    page cache bypassed): the best point (the ceiling any loader of ``path`` is held to) and all."""
    points = [odirect_read_gbps(path, threads=t, chunk=c << 20) | {"threads": t, "chunk_mib": c}
              for t in threads for c in chunks_mib]
    best = best_point(points)
    out: dict = {"grid": points}
    if best is None:
        out["error"] = next((p["error"] for p in points if "error" in p), "no grid point measured")
    else:
        out.update(best=best, gbps=best["gbps"], threads=best["threads"], chunk_mib=best["chunk_mib"])
    return out


def grid_text(points: Sequence[dict]) -> str:
    """``4x16 MiB 1.20, 4x32 MiB 1.31, ...`` (GB/s per threads x chunk), errors as ``error``."""
    return ", ".join(f"{p.get('threads', '?')}x{p.get('chunk_mib', '?')} MiB "
                     + (f"{p['gbps']:.2f}" if isinstance(p.get("gbps"), (int, float)) else "error")
                     for p in points)


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


# --- CUDA: the hot path (page cache -> pinned -> device) and the cost of pinning ----------------


class StagedCopy:
    """Copy a file into ``dest`` (a flat uint8 tensor, on any device) the way a hot CUDA load can
    at best: buffered ``preadv`` (page cache) into ``buffers`` staging buffers per thread of
    ``chunk`` bytes, each copied to ``dest`` asynchronously on its own stream; a buffer is refilled
    only once its event says its last copy has landed.

    The buffers, streams and events are made in ``__init__`` (not timed); ``run()`` is the copy
    (the caller synchronizes the device before reading a clock). On the CPU the same loop runs with
    plain buffers and synchronous copies, which is how the tests check it.
    """

    def __init__(self, path: str | os.PathLike[str], dest, chunk: int = 32 << 20, threads: int = 1,
                 buffers: int = 2, pin: bool | None = None):
        import torch

        self.path = os.fspath(path)
        self.size = os.path.getsize(self.path)
        if dest.dtype != torch.uint8 or dest.dim() != 1 or dest.numel() < self.size:
            raise ValueError(f"dest must be a flat uint8 tensor of at least {self.size} bytes")
        self.dest, self.chunk = dest, chunk
        self.cuda = dest.device.type == "cuda"
        pin = self.cuda if pin is None else pin
        self.offsets = list(range(0, self.size, chunk))
        self.threads = max(1, min(threads, len(self.offsets) or 1))
        self.slots = []  # per thread: [(tensor, memoryview, stream, event)]
        for _ in range(self.threads):
            mine = []
            for _ in range(buffers):
                buf = torch.empty(chunk, dtype=torch.uint8, pin_memory=pin)
                stream = torch.cuda.Stream(device=dest.device) if self.cuda else None
                event = torch.cuda.Event() if self.cuda else None
                mine.append([buf, memoryview(buf.numpy()), stream, event, False])
            self.slots.append(mine)

    def run(self) -> None:
        import torch

        lock = threading.Lock()
        state = {"next": 0}
        errors: list[BaseException] = []
        fd = os.open(self.path, os.O_RDONLY)

        def body(mine: list) -> None:
            turn = 0
            try:
                if self.cuda:
                    torch.cuda.set_device(self.dest.device)  # a new thread starts on cuda:0
                while not errors:
                    with lock:
                        i = state["next"]
                        state["next"] += 1
                    if i >= len(self.offsets):
                        break
                    slot = mine[turn % len(mine)]
                    turn += 1
                    buf, mem, stream, event, used = slot
                    if used and self.cuda:
                        event.synchronize()  # its last copy has landed: safe to overwrite
                    off = self.offsets[i]
                    n = min(self.chunk, self.size - off)
                    got = 0
                    while got < n:
                        r = os.preadv(fd, [mem[got:n]], off + got)
                        if r <= 0:
                            raise EOFError(f"{self.path}: short read at {off + got}")
                        got += r
                    if self.cuda:
                        with torch.cuda.stream(stream):
                            self.dest.narrow(0, off, n).copy_(buf.narrow(0, 0, n), non_blocking=True)
                            event.record(stream)
                    else:
                        self.dest.narrow(0, off, n).copy_(buf.narrow(0, 0, n))
                    slot[4] = True
            except BaseException as exc:  # noqa: BLE001 - raised in the caller
                errors.append(exc)
            finally:
                if self.cuda:
                    for s in mine:
                        if s[4]:
                            s[3].synchronize()

        try:
            if self.threads == 1:
                body(self.slots[0])
            else:
                pool = [threading.Thread(target=body, args=(m,)) for m in self.slots]
                for t in pool:
                    t.start()
                for t in pool:
                    t.join()
        finally:
            os.close(fd)
        if errors:
            raise errors[0]


def same_bytes(path: str | os.PathLike[str], dest, chunk: int = 64 << 20) -> bool:
    """Whether ``dest`` (a flat uint8 tensor, any device) starts with exactly the bytes of ``path``."""
    import torch

    size = os.path.getsize(path)
    if dest.numel() < size:
        return False
    buf = torch.empty(chunk, dtype=torch.uint8)
    mem = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        for off in range(0, size, chunk):
            n = f.readinto(mem[: min(chunk, size - off)])
            if not torch.equal(dest.narrow(0, off, n).cpu(), buf.narrow(0, 0, n)):
                return False
    return True


def hot_h2d_ceiling(
    path: str | os.PathLike[str],
    threads: Sequence[int] = (1, 4, 8),
    chunks_mib: Sequence[int] = (16, 64),
    buffers: int = 2,
) -> dict:
    """The hot CUDA path's ceiling: ``path`` from the page cache through ``buffers`` pinned buffers
    per thread to one device buffer (:class:`StagedCopy`), over a small grid; the best point and
    all, and whether the device then held exactly the file's bytes (checked once, not timed)."""
    import torch

    warm([path])
    size = os.path.getsize(path)
    dest = torch.empty(max(1, size), dtype=torch.uint8, device="cuda")
    points = []
    for t in threads:
        for c in chunks_mib:
            point: dict = {"threads": t, "chunk_mib": c, "buffers": buffers}
            try:
                copy = StagedCopy(path, dest, chunk=c << 20, threads=t, buffers=buffers)
                dest.zero_()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                copy.run()
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                point.update(seconds=round(dt, 4), gbps=round(size / dt / 1e9, 3))
                del copy
            except Exception as exc:  # noqa: BLE001 - recorded, the grid goes on
                point["error"] = f"{type(exc).__name__}: {exc}"
            points.append(point)
    best = best_point(points)
    out: dict = {"bytes": size, "grid": points}
    if best is None:
        out["error"] = next((p["error"] for p in points if "error" in p), "no grid point measured")
    else:
        out.update(best=best, gbps=best["gbps"], threads=best["threads"], chunk_mib=best["chunk_mib"],
                   bytes_match=same_bytes(path, dest))  # dest holds the last point's copy
    return out


def _anonymous_map(nbytes: int) -> int:
    addr = _libc.mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap of anonymous memory failed")
    return addr


def pin_costs(nbytes: int = 1 << 30, repeats: int = 3) -> dict:
    """Seconds to get ``nbytes`` of page-locked host memory, two ways (medians of ``repeats``):

    - ``torch_pinned``: ``torch.empty(nbytes, pin_memory=True)`` (cudaHostAlloc; torch's caching
      host allocator is emptied first so each repeat really allocates);
    - ``host_register``: ``cudaHostRegister(ptr, nbytes, 0)`` on an anonymous page-aligned mmap
      (the memory this project reads packs into), fresh (registering faults every page in) and
      already written (as after a read into it), plus ``cudaHostUnregister``; and the H2D copy
      rate from the registered memory.
    """
    import torch

    cudart = torch.cuda.cudart()
    empty_cache = getattr(torch._C, "_host_emptyCache", None)
    times: dict[str, list[float]] = {"torch_pinned": [], "host_register": [], "host_register_written": [],
                                     "host_unregister": []}
    copy_gbps = None
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for i in range(repeats):
        if empty_cache is not None:
            empty_cache()
        t0 = time.perf_counter()
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        times["torch_pinned"].append(time.perf_counter() - t0)
        del pinned
        if empty_cache is not None:
            empty_cache()
        for key in ("host_register", "host_register_written"):
            addr = _anonymous_map(nbytes)
            try:
                if key == "host_register_written":
                    _libc.memset(addr, 1, nbytes)
                t0 = time.perf_counter()
                err = int(cudart.cudaHostRegister(addr, nbytes, 0))
                times[key].append(time.perf_counter() - t0)
                if err != 0:
                    raise RuntimeError(f"cudaHostRegister failed with cudaError {err}")
                if key == "host_register_written" and i == 0:
                    host = torch.frombuffer((ctypes.c_ubyte * nbytes).from_address(addr), dtype=torch.uint8)
                    dev.copy_(host, non_blocking=True)
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    dev.copy_(host, non_blocking=True)
                    end.record()
                    end.synchronize()
                    copy_gbps = round(nbytes / (start.elapsed_time(end) / 1e3) / 1e9, 2)
                    del host
                t0 = time.perf_counter()
                err = int(cudart.cudaHostUnregister(addr))
                times["host_unregister"].append(time.perf_counter() - t0)
                if err != 0:
                    raise RuntimeError(f"cudaHostUnregister failed with cudaError {err}")
            finally:
                _libc.munmap(addr, nbytes)
    out: dict = {"bytes": nbytes, "repeats": repeats}
    for key, values in times.items():
        out[f"{key}_s"] = round(median(values), 4)
        out[f"{key}_s_all"] = [round(v, 4) for v in values]
    out["host_register_copy_gbps"] = copy_gbps
    out["faster"] = faster_pinning(out)
    return out


def faster_pinning(costs: dict) -> str | None:
    """``torch_pinned`` or ``host_register``: the cheaper way to get page-locked memory, comparing
    torch's pinned allocation with mmap + cudaHostRegister of fresh memory (+ the unregister it
    needs later); None when either was not measured."""
    alloc = costs.get("torch_pinned_s")
    register, unregister = costs.get("host_register_s"), costs.get("host_unregister_s") or 0.0
    if not isinstance(alloc, (int, float)) or not isinstance(register, (int, float)):
        return None
    return "torch_pinned" if alloc <= register + unregister else "host_register"
