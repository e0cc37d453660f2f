"""Read a FlashPack file into one flat tensor per dtype on the target device.

The payload is cut into chunks (per block, on a grid of ``chunk_bytes`` in file space) that
several threads read with ``os.preadv`` (the GIL is released while the kernel copies):

- CPU: straight into the owned, writable block memory (``torch.empty``), no staging copy.
- CUDA: into pinned staging buffers leased from a process-wide pool; each buffer has its own
  stream and event, its H2D copy is queued without blocking and the buffer is refilled only once
  its event has completed, so reads and copies overlap.

Chunks whose pages are not in the page cache are read with O_DIRECT (aligned spans, the
unaligned remainder buffered); cached ones with buffered reads. The first error in any thread
stops the others and is raised once every thread has finished; nothing half-read is returned.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from . import io as _io
from .format import FlashPackFormatError, PackLayout, read_layout
from .io import ALIGN, align_down, align_up
from .pinned import PinnedPool, default_pool
from .prefetch import claim, env_int

log = logging.getLogger("model_loader.reader")

DEFAULT_CHUNK_BYTES = 32 << 20
# Chunks are made smaller for small packs so every thread gets work, but not below this.
MIN_AUTO_CHUNK_BYTES = 4 << 20
# Auto mode reads a chunk with O_DIRECT when less than this fraction of it is in the page cache.
COLD_FRACTION = 0.5
# A file at least this resident is "in the page cache" when choosing the thread count.
HOT_FRACTION = 0.9
# Staging buffers per CUDA reader thread: one is filled while the other's copy is in flight.
BUFFERS_PER_THREAD = 2


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 4


def default_threads(resident: float = 0.0) -> int:
    """Reader threads for a file of which ``resident`` (0..1) is in the page cache.

    Reading from storage wants I/O queue depth, so more threads than cores (at most 16); a file
    already in the page cache is a memory copy, where threads beyond the cores only contend.
    """
    cpus = _cpus()
    io_bound = min(16, max(8, 2 * cpus))
    return min(io_bound, max(2, cpus)) if resident >= HOT_FRACTION else io_bound


@dataclass
class ReadStats:
    """What one load did: for logs, benchmarks and tests."""

    bytes: int = 0
    seconds: float = 0.0
    threads: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    direct_bytes: int = 0
    direct_fallbacks: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class PackData:
    """A loaded pack: ``blocks[i]`` is the flat tensor of ``layout.blocks[i]`` on the device."""

    layout: PackLayout
    blocks: list[torch.Tensor]
    stats: ReadStats | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as a view into its block, in file order, with its stored shape."""
        out: dict[str, torch.Tensor] = {}
        for e in self.layout.entries:
            out[e.name] = self.blocks[e.block].narrow(0, e.offset, e.length).view(e.shape)
        return out


# ----------------------------------------------------------------------------------------------
# Chunk planning


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[file_offset, file_offset + length)`` of the file, which are bytes
    ``[block_offset, block_offset + length)`` of block ``block``."""

    block: int
    file_offset: int
    block_offset: int
    length: int

    @property
    def span(self) -> tuple[int, int]:
        """The ALIGN-aligned file range covering the chunk (what an O_DIRECT read fetches)."""
        return align_down(self.file_offset), align_up(self.file_offset + self.length)


def plan_chunks(layout: PackLayout, chunk_bytes: int) -> list[Chunk]:
    """Cut every block at the multiples of ``chunk_bytes`` (a multiple of ALIGN) in file space.

    Chunks never span two blocks, and each chunk's aligned span lies within one grid cell, so it
    fits a staging buffer of ``chunk_bytes``; inside a block only the first chunk starts and only
    the last ends off the grid.
    """
    if chunk_bytes <= 0 or chunk_bytes % ALIGN:
        raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}, got {chunk_bytes}")
    chunks: list[Chunk] = []
    for i, b in enumerate(layout.blocks):
        pos, end = b.offset_bytes, b.end_bytes
        while pos < end:
            stop = min(end, align_down(pos, chunk_bytes) + chunk_bytes)
            chunks.append(Chunk(i, pos, pos - b.offset_bytes, stop - pos))
            pos = stop
    chunks.sort(key=lambda c: c.file_offset)
    return chunks


def effective_chunk_bytes(payload_bytes: int, threads: int, chunk_bytes: int) -> int:
    """``chunk_bytes``, or smaller for small packs so each thread gets about two chunks."""
    per_thread = align_up(max(1, math.ceil(payload_bytes / (2 * threads))), 1 << 20)
    return min(chunk_bytes, max(MIN_AUTO_CHUNK_BYTES, per_thread))


# ----------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class ReadOptions:
    threads: int | None  # None: default_threads() for the file's page-cache residency
    chunk_bytes: int
    direct_io: bool | None  # None: per chunk, O_DIRECT when not in the page cache


def resolve_options(
    threads: int | None = None, chunk_bytes: int | None = None, direct_io: bool | None = None
) -> ReadOptions:
    """Arguments win over ``MODEL_LOADER_THREADS`` / ``MODEL_LOADER_CHUNK_MB`` /
    ``MODEL_LOADER_DIRECT_IO`` (``auto``, ``1``, ``0``), which win over the defaults."""
    if threads is None and os.environ.get("MODEL_LOADER_THREADS", "").strip():
        threads = env_int("MODEL_LOADER_THREADS", 1)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if chunk_bytes is None:
        chunk_bytes = env_int("MODEL_LOADER_CHUNK_MB", DEFAULT_CHUNK_BYTES >> 20) << 20
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if direct_io is None:
        raw = os.environ.get("MODEL_LOADER_DIRECT_IO", "auto").strip().lower()
        modes = {"auto": None, "": None, "1": True, "true": True, "0": False, "false": False}
        if raw not in modes:
            raise ValueError(f"MODEL_LOADER_DIRECT_IO={raw!r}: expected auto, 1 or 0")
        direct_io = modes[raw]
    return ReadOptions(threads, align_up(chunk_bytes), direct_io)


# ----------------------------------------------------------------------------------------------
# Reading chunks


class _Source:
    """One open pack: the buffered and O_DIRECT descriptors and the per-chunk read policy."""

    def __init__(self, path: str, fd: int, size: int, direct_io: bool | None, stats: ReadStats):
        self.path = path
        self.fd = fd
        self.stats = stats
        self._lock = threading.Lock()
        self.fd_direct = _io.open_direct(path) if direct_io is not False else None
        if direct_io and self.fd_direct is None:
            log.warning("%s: O_DIRECT is not available on this filesystem; reading buffered", path)
        self.residency = (
            _io.Residency(fd, size) if self.fd_direct is not None and direct_io is None else None
        )

    def close(self) -> None:
        if self.residency is not None:
            self.residency.close()
        if self.fd_direct is not None:
            os.close(self.fd_direct)
            self.fd_direct = None

    def _use_direct(self, chunk: Chunk) -> bool:
        if self.fd_direct is None:
            return False
        if self.residency is None:  # forced on
            return True
        return self.residency.fraction(chunk.file_offset, chunk.length) < COLD_FRACTION

    def read(self, chunk: Chunk, mem: memoryview, mem_addr: int, at: int) -> None:
        """Put the chunk's bytes at ``mem[at:at + chunk.length]``.

        With O_DIRECT the whole aligned span is read, so the caller must own the bytes of ``mem``
        from ``at - (file_offset - span start)`` up to the span's length.
        """
        n = chunk.length
        done = 0
        if self._use_direct(chunk):
            a0, a1 = chunk.span
            lead = chunk.file_offset - a0
            base = at - lead
            if base >= 0 and (mem_addr + base) % ALIGN == 0 and base + (a1 - a0) <= len(mem):
                try:
                    got = _io.pread_direct(self.fd_direct, mem[base : base + a1 - a0], a0, lead + n)
                    done = max(0, min(n, got - lead))
                except OSError:
                    done = 0
            with self._lock:
                self.stats.direct_bytes += done
                if done < n:
                    self.stats.direct_fallbacks += 1
        if done < n:
            _io.pread_exact(self.fd, mem[at + done : at + n], chunk.file_offset + done, self.path)


class _Worker(Protocol):
    def process(self, chunk: Chunk) -> None: ...

    def close(self) -> None: ...


def run_workers(
    chunks: Sequence[Chunk], threads: int, make_worker: Callable[[], _Worker], name: str
) -> None:
    """Process ``chunks`` (in order of their file offsets) with ``threads`` threads, each with its
    own worker. The first exception stops the rest and is raised after all threads have ended."""
    lock = threading.Lock()
    pending = iter(chunks)
    stop = threading.Event()
    errors: list[BaseException] = []

    def fail(exc: BaseException) -> None:
        with lock:
            errors.append(exc)
        stop.set()

    def body() -> None:
        worker = None
        try:
            worker = make_worker()
            while not stop.is_set():
                with lock:
                    chunk = next(pending, None)
                if chunk is None:
                    break
                worker.process(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            fail(exc)
        finally:
            if worker is not None:
                try:
                    worker.close()
                except BaseException as exc:  # noqa: BLE001
                    fail(exc)

    pool = [
        threading.Thread(target=body, name=f"{name}-{i}", daemon=True) for i in range(threads)
    ]
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    except BaseException:
        stop.set()  # e.g. KeyboardInterrupt while joining: let the readers wind down first
        for t in pool:
            if t.is_alive():
                t.join()
        raise
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------------------------
# Destinations


def use_hugepages() -> bool:
    """Whether to ask for transparent huge pages behind CPU blocks: off unless
    ``MODEL_LOADER_HUGEPAGES=1``.

    On the 2-core VM of docs/BENCHMARKS.md the hint helped or hurt depending on how fragmented
    memory was (cold loads: 0.71 s with it vs 1.45 s without in one hour, 1.67 s vs 1.16 s the
    next; hot loads: 1.68 s vs 0.55 s), so it is opt-in.
    """
    raw = os.environ.get("MODEL_LOADER_HUGEPAGES", "0").strip().lower()
    if raw not in ("", "0", "1", "false", "true"):
        raise ValueError(f"MODEL_LOADER_HUGEPAGES={raw!r}: expected 1 or 0")
    return raw in ("1", "true")


def _alloc_cpu_blocks(
    layout: PackLayout, huge: bool
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, int]]]:
    """Owned CPU memory for each block, placed so that file offset and address agree modulo
    ALIGN (O_DIRECT can then read into it), with room for aligned spans overhanging the block."""
    blocks: list[torch.Tensor] = []
    raws: list[tuple[torch.Tensor, int]] = []
    for b in layout.blocks:
        phase = b.offset_bytes % ALIGN
        raw, start = _io.alloc_phased(b.length_bytes, phase, head=phase, tail=ALIGN)
        if huge:
            _io.advise_hugepages(raw)
        blocks.append(raw.narrow(0, start, b.length_bytes).view(b.dtype))
        raws.append((raw, start))
    return blocks, raws


class _CpuWorker:
    def __init__(self, source: _Source, targets: list[tuple[memoryview, int, int]]):
        self.source = source
        self.targets = targets  # per block: (memoryview of raw, its address, block start in raw)

    def process(self, chunk: Chunk) -> None:
        mem, addr, start = self.targets[chunk.block]
        self.source.read(chunk, mem, addr, start + chunk.block_offset)

    def close(self) -> None:
        pass


def _read_cpu(
    source: _Source, layout: PackLayout, chunks: list[Chunk], threads: int, huge: bool
) -> list[torch.Tensor]:
    blocks, raws = _alloc_cpu_blocks(layout, huge)
    targets = []
    for raw, start in raws:
        mem = _io.tensor_memoryview(raw)
        targets.append((mem, raw.data_ptr(), start))
    run_workers(chunks, threads, lambda: _CpuWorker(source, targets), "model_loader-reader")
    return blocks


class StagingEngine(Protocol):
    """What a staged load needs from its device: block memory, streams, events, async copies.

    :class:`CudaEngine` is the real one; tests drive the same pipeline with a host fake.
    """

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor: ...

    def begin(self) -> None: ...  # blocks allocated, reader threads about to start

    def start_thread(self) -> None: ...  # once in every reader thread

    def new_stream(self) -> object: ...

    def new_event(self) -> object: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: object, event: object) -> None:
        """Queue ``dst.copy_(src)`` on ``stream`` without waiting, then record ``event``."""

    def is_done(self, event: object) -> bool: ...

    def wait(self, event: object) -> None: ...

    def finish(self) -> None: ...  # wait for every queued copy


class CudaEngine:
    """Host-to-device copies on one CUDA device, each staging buffer with its own stream."""

    def __init__(self, device: torch.device):
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._alloc_ready: torch.cuda.Event | None = None

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self.device)

    def begin(self) -> None:
        # Blocks were allocated on the caller's stream; readers' streams wait for that.
        self._alloc_ready = torch.cuda.Event()
        self._alloc_ready.record(torch.cuda.current_stream(self.device))

    def start_thread(self) -> None:
        torch.cuda.set_device(self.device)  # thread-local: a new thread starts on cuda:0

    def new_stream(self) -> torch.cuda.Stream:
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_event(self._alloc_ready)
        return stream

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def copy(self, dst, src, stream, event) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event.record(stream)

    def is_done(self, event) -> bool:
        return event.query()

    def wait(self, event) -> None:
        event.synchronize()

    def finish(self) -> None:
        torch.cuda.synchronize(self.device)


@dataclass
class _Slot:
    buf: torch.Tensor
    mem: memoryview
    stream: object
    event: object
    used: bool = False


class _StagingWorker:
    """One reader thread of a staged load: up to BUFFERS_PER_THREAD leased staging buffers, each
    with its own stream and event; a buffer is refilled only after its last copy completed."""

    def __init__(self, source: _Source, dests, lease, engine: StagingEngine, buffer_bytes: int):
        engine.start_thread()
        self.source = source
        self.dests = dests  # per block: flat uint8 view of the destination block
        self.lease = lease
        self.engine = engine
        self.buffer_bytes = buffer_bytes
        self.slots: list[_Slot] = []
        self.turn = 0

    def _free_slot(self) -> _Slot:
        # A buffer whose last copy is done; else a new one while below the limit; else wait.
        for slot in self.slots:
            if not slot.used or self.engine.is_done(slot.event):
                return slot
        if len(self.slots) < BUFFERS_PER_THREAD:
            buf = self.lease.acquire(self.buffer_bytes)
            slot = _Slot(
                buf, _io.tensor_memoryview(buf), self.engine.new_stream(), self.engine.new_event()
            )
            self.slots.append(slot)
            return slot
        slot = self.slots[self.turn % len(self.slots)]
        self.turn += 1
        self.engine.wait(slot.event)
        return slot

    def process(self, chunk: Chunk) -> None:
        slot = self._free_slot()
        at = chunk.file_offset - align_down(chunk.file_offset)
        self.source.read(chunk, slot.mem, slot.buf.data_ptr(), at)
        dst = self.dests[chunk.block].narrow(0, chunk.block_offset, chunk.length)
        slot.used = True
        self.engine.copy(dst, slot.buf.narrow(0, at, chunk.length), slot.stream, slot.event)

    def close(self) -> None:
        # Even after an error: a buffer goes back to the pool only once its copy has landed.
        for slot in self.slots:
            if slot.used:
                self.engine.wait(slot.event)


def _read_staged(
    source: _Source,
    layout: PackLayout,
    chunks: list[Chunk],
    threads: int,
    engine: StagingEngine,
    buffer_bytes: int,
    pool: PinnedPool,
) -> list[torch.Tensor]:
    blocks = [engine.empty(b.length_elems, b.dtype) for b in layout.blocks]
    dests = [blk.view(torch.uint8) for blk in blocks]
    engine.begin()
    lease = pool.lease()
    try:
        run_workers(
            chunks,
            threads,
            lambda: _StagingWorker(source, dests, lease, engine, buffer_bytes),
            "model_loader-reader",
        )
    except BaseException:
        try:
            engine.finish()
        except Exception:  # noqa: BLE001 - broken device: keep the buffers out of the pool
            pass
        else:
            lease.release()
        raise
    lease.release()
    return blocks


# ----------------------------------------------------------------------------------------------
# Entry points


def _open_checked(path: str) -> tuple[int, os.stat_result, PackLayout]:
    """Open ``path`` and parse its footer, making sure both saw the same file (an atomic
    replacement in between is retried once)."""
    for _ in range(2):
        before = os.stat(path)
        layout = read_layout(path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(fd)
        same = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns) == (
            st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
        )
        if same:
            return fd, st, layout
        os.close(fd)
    raise FlashPackFormatError(f"{path}: the file keeps changing while it is opened; retry the load")


def read_pack(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    direct_io: bool | None = None,
    pool: PinnedPool | None = None,
    engine: StagingEngine | None = None,
) -> PackData:
    """Read every block of the pack at ``path`` onto ``device`` with parallel chunked reads.

    ``threads``, ``chunk_bytes`` and ``direct_io`` (None: O_DIRECT for chunks not in the page
    cache) default to the environment (see :func:`resolve_options`). ``pool`` is the pinned
    staging pool for CUDA targets (the process-wide one by default). ``engine`` replaces the
    CUDA copy engine (tests run the staged pipeline on the host with it).
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    device = torch.device(device)
    opts = resolve_options(threads, chunk_bytes, direct_io)
    fd, st, layout = _open_checked(path)
    source: _Source | None = None
    try:
        claim(st.st_dev, st.st_ino)  # a running prefetch leaves this file to us
        payload = sum(b.length_bytes for b in layout.blocks)
        threads = opts.threads
        if threads is None:
            with _io.Residency(fd, st.st_size) as residency:
                threads = default_threads(residency.sampled_fraction() if residency.known else 0.0)
        chunk = effective_chunk_bytes(payload, threads, opts.chunk_bytes)
        chunks = plan_chunks(layout, chunk)
        n_threads = max(1, min(threads, len(chunks)))
        stats = ReadStats(bytes=payload, threads=n_threads, chunks=len(chunks), chunk_bytes=chunk)
        source = _Source(path, fd, st.st_size, opts.direct_io, stats)
        if engine is None and device.type == "cuda":
            engine = CudaEngine(device)
        if engine is not None:
            blocks = _read_staged(
                source, layout, chunks, n_threads, engine, opts.chunk_bytes, pool or default_pool()
            )
        else:
            blocks = _read_cpu(source, layout, chunks, n_threads, use_hugepages())
            if device.type != "cpu":
                blocks = [b.to(device) for b in blocks]
    finally:
        if source is not None:
            source.close()
        os.close(fd)
    stats.seconds = time.perf_counter() - t0
    log.info("load %s: %.2f GB in %.2f s (%.2f GB/s)", path, payload / 1e9, stats.seconds, stats.gbps)
    log.debug(
        "load %s: %d threads, %d chunks of <= %d MiB, %.0f%% via O_DIRECT (%d fallbacks)",
        path, n_threads, len(chunks), chunk >> 20, 100 * stats.direct_bytes / max(1, payload),
        stats.direct_fallbacks,
    )
    return PackData(layout, blocks, stats)


def load_state_dict(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", **options
) -> dict[str, torch.Tensor]:
    """The tensors of a FlashPack file, each a view into its dtype's flat block on ``device``.

    ``options`` are those of :func:`read_pack`.
    """
    return read_pack(path, device, **options).tensors()
