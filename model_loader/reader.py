"""Read a FlashPack file into one flat tensor per dtype on the target device.

- CPU: the whole file lands in host memory (:mod:`model_loader.host_read`: a private mapping, or
  parallel ``preadv``/O_DIRECT into owned memory) and each dtype's block is a zero-copy tensor
  view of it.
- CUDA: threads read a grid of chunks into pinned staging buffers leased from a process-wide
  pool; each thread has its own stream and each buffer its own event, its H2D copy into one device
  buffer (the file's payload, blocks are views of it) is queued without blocking and the buffer is
  refilled only once its event has completed, so reads and copies overlap.

Given a :class:`~model_loader.checksum.Checksum`, every segment is hashed by the thread that read
it and a mismatch raises ChecksumMismatchError. The first error in any thread stops the others and
is raised once every thread has finished; nothing half-read is returned.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from . import posix_io
from .checksum import SEGMENT_BYTES, Checksum
from .config import LoaderConfig
from .format import PackLayout, layout_from_bytes, read_layout
from .host_read import (
    ALIGN,
    Chunk,
    HostFile,
    ReadOptions,
    ReadStats,
    SourceFactory,
    check_segments,
    effective_chunk_bytes,
    open_checked,
    plan_chunks,
    plan_for,
    read_file,
    resolve_options,
    run_workers,
)
from .pinned import Lease, PinnedPool, default_pool
from .rates import rate_text
from .storage import default_threads

log = logging.getLogger("model_loader.reader")

# Staging buffers per CUDA reader thread: one is filled while the other's copy is in flight.
BUFFERS_PER_THREAD = 2


def staging_plan(
    pack_sizes: list[int], config: LoaderConfig, threads: int | None = None, chunk_bytes: int | None = None
) -> tuple[int, int]:
    """``(count, nbytes)`` of the pinned staging buffers that loading packs of ``pack_sizes`` to a
    GPU with ``config`` uses at most (from a cold page cache), for :meth:`PinnedPool.reserve`."""
    if not pack_sizes:
        return 0, 0
    opts = resolve_options(config, threads, chunk_bytes, mapping="never")
    n_threads = opts.threads or default_threads(0.0)
    chunk = max(effective_chunk_bytes(size, n_threads, opts.chunk_bytes, SEGMENT_BYTES) for size in pack_sizes)
    return n_threads * BUFFERS_PER_THREAD, chunk


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


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` with a CUDA index filled in from the calling thread's current device (a reader
    thread would otherwise resolve a bare ``cuda`` to its own current device, always cuda:0)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def pack_on_device(host: HostFile, device: torch.device) -> PackData:
    """:func:`pack_from_host`, its blocks moved to ``device`` unless that is the CPU."""
    pack = pack_from_host(host)
    if device.type != "cpu":
        pack = PackData(pack.layout, [b.to(device) for b in pack.blocks], pack.stats)
    return pack


def pack_from_host(host: HostFile) -> PackData:
    """The pack whose whole file is in ``host``: footer parsed from memory, blocks as views."""
    view = memoryview(host.buffer)[: host.size]
    layout = layout_from_bytes(view, host.path)
    blocks = []
    for b in layout.blocks:
        if b.length_bytes == 0:
            blocks.append(torch.empty(0, dtype=b.dtype))
            continue
        raw = torch.frombuffer(host.buffer, dtype=torch.uint8, count=b.length_bytes, offset=b.offset_bytes)
        blocks.append(raw.view(b.dtype))
    view.release()
    return PackData(layout, blocks, host.stats)


# ----------------------------------------------------------------------------------------------
# CUDA: staged through pinned buffers


def reserve_staging(pack_sizes: list[int], config: LoaderConfig, pool: PinnedPool | None = None) -> None:
    """Start pinning, in the background, the staging buffers loading these packs with ``config``
    will use (in ``pool``, the process-wide one by default), so no load pays for pinning (about
    0.5 s per GB) on its own clock."""
    count, nbytes = staging_plan(pack_sizes, config)
    if count:
        (pool or default_pool()).reserve(count, nbytes)


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
        # blocking: waiting on it sleeps instead of spinning a core the reader threads need
        return torch.cuda.Event(blocking=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event.record(stream)

    def is_done(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def wait(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def finish(self) -> None:
        torch.cuda.synchronize(self.device)


@dataclass
class _Slot:
    buf: torch.Tensor
    mem: memoryview
    event: object
    used: bool = False


class _StagingWorker:
    """One reader thread of a staged load: one stream, up to BUFFERS_PER_THREAD leased staging
    buffers each with its own event; a buffer is refilled only after its last copy completed.
    (One stream per thread, not per buffer: 16 threads x 2 streams would take all of torch's
    pooled streams, which share 8 hardware queues.)"""

    def __init__(self, sources: SourceFactory, dest: torch.Tensor, lease: Lease, engine: StagingEngine,
                 buffer_bytes: int, checksum: Checksum | None):
        engine.start_thread()
        self.sources = sources
        self.source = sources.acquire()
        self.dest = dest  # flat uint8 device buffer holding the file's bytes [0, payload end)
        self.checksum = checksum
        self.lease = lease
        self.engine = engine
        self.buffer_bytes = buffer_bytes
        self.slots: list[_Slot] = []
        self.turn = 0
        self.stream = engine.new_stream()

    def _free_slot(self) -> _Slot:
        # A buffer whose last copy is done; else a new one while below the limit; else wait.
        for slot in self.slots:
            if not slot.used or self.engine.is_done(slot.event):
                return slot
        if len(self.slots) < BUFFERS_PER_THREAD:
            buf = self.lease.acquire(self.buffer_bytes)
            slot = _Slot(buf, posix_io.tensor_memoryview(buf), self.engine.new_event())
            self.slots.append(slot)
            return slot
        slot = self.slots[self.turn % len(self.slots)]
        self.turn += 1
        self.engine.wait(slot.event)
        return slot

    def process(self, chunk: Chunk) -> None:
        slot = self._free_slot()
        self.source.read(chunk, slot.mem, slot.buf.data_ptr(), 0)  # grid chunks start aligned
        check_segments(self.checksum, chunk, slot.mem[: chunk.length], self.source.path)
        length = min(chunk.length, self.dest.numel() - chunk.offset)  # the footer stays on the host
        if length <= 0:
            return
        slot.used = True
        self.engine.copy(self.dest.narrow(0, chunk.offset, length), slot.buf.narrow(0, 0, length), self.stream,
                         slot.event)

    def close(self) -> None:
        # Even after an error: a buffer goes back to the pool only once its copy has landed.
        try:
            for slot in self.slots:
                if slot.used:
                    self.engine.wait(slot.event)
        finally:
            self.sources.release(self.source)


def _read_staged(
    path: str,
    fd: int,
    size: int,
    layout: PackLayout,
    opts: ReadOptions,
    engine: StagingEngine,
    pool: PinnedPool,
    checksum: Checksum | None,
) -> tuple[list[torch.Tensor], ReadStats]:
    payload = layout.payload_bytes
    # With a checksum the footer is read too (it is hashed); it is not copied to the device.
    end = size if checksum is not None else payload
    plan = plan_for(path, fd, size, opts, can_map=False)
    grain = checksum.segment_bytes if checksum is not None else ALIGN
    chunk = effective_chunk_bytes(end, plan.threads, opts.chunk_bytes, grain)
    chunks = plan_chunks(end, chunk)
    n_threads = max(1, min(plan.threads, len(chunks)))
    stats = ReadStats(payload, threads=n_threads, chunks=len(chunks), chunk_bytes=chunk, checked=checksum is not None,
                      layout=plan.layout, storage=plan.storage.name)
    dest = engine.empty(max(1, payload), torch.uint8)[:payload]
    blocks = [dest.narrow(0, b.offset_bytes, b.length_bytes).view(b.dtype) for b in layout.blocks]
    sources = SourceFactory(path, fd, size, plan, stats)
    engine.begin()
    lease = pool.lease()
    try:
        run_workers(
            chunks, n_threads, lambda: _StagingWorker(sources, dest, lease, engine, chunk, checksum),
            "model_loader-reader", plan.layout,
        )
    except BaseException:
        try:
            engine.finish()
        except Exception:  # noqa: BLE001 - broken device: keep the buffers out of the pool
            pass
        else:
            lease.release()
        raise
    finally:
        sources.close()
    lease.release()
    return blocks, stats


# ----------------------------------------------------------------------------------------------
# Entry points


def read_pack(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    checksum: Checksum | None = None,
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    direct_io: bool | None = None,
    mapping: str | None = None,
    layout: str | None = None,
    pool: PinnedPool | None = None,
    engine: StagingEngine | None = None,
    config: LoaderConfig | None = None,
) -> PackData:
    """Read every block of the pack at ``path`` onto ``device`` with parallel chunked reads,
    checking ``checksum`` (when given) as the bytes pass.

    ``threads``, ``chunk_bytes``, ``direct_io`` (None: O_DIRECT for chunks not in the page
    cache), ``mapping`` (CPU: ``always``, ``hot`` or ``never`` map the file) and ``layout``
    (``grid`` or ``split``) default to ``config`` (by default the environment, read once per
    call), then to what suits the file's storage (see
    :func:`model_loader.host_read.resolve_options` and :mod:`model_loader.storage`).
    ``pool`` is the pinned staging pool for CUDA targets (the process-wide one by default). ``engine`` replaces the CUDA copy engine
    (tests run the staged pipeline on the host with it).
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    if config is None:
        config = LoaderConfig.from_env()
    device = resolve_device(device) if engine is None else torch.device(device)
    if engine is None and device.type == "cuda":
        engine = CudaEngine(device)
    if engine is None:
        host = read_file(path, checksum, threads=threads, chunk_bytes=chunk_bytes, direct_io=direct_io,
                         mapping=mapping, layout=layout, config=config)
        pack = pack_on_device(host, device)
        stats = pack.stats
    else:
        opts = resolve_options(config, threads, chunk_bytes, direct_io, mapping="never", layout=layout)
        pack_layout, fd, st = _open_layout(path)
        try:
            if checksum is not None:
                checksum.check_size(st.st_size, path)
            blocks, stats = _read_staged(path, fd, st.st_size, pack_layout, opts, engine, pool or default_pool(),
                                         checksum)
        finally:
            os.close(fd)
        pack = PackData(pack_layout, blocks, stats)
    stats.seconds = time.perf_counter() - t0
    log.info(
        "load %s: %s%s, %d threads (%s)%s", path, rate_text(stats.bytes, stats.seconds),
        " mapped" if stats.mapped else "", stats.threads, stats.layout, ", checksum ok" if stats.checked else "",
    )
    return pack


def _open_layout(path: str) -> tuple[PackLayout, int, os.stat_result]:
    """Parse the footer and open the file, making sure both saw the same file (an atomic
    replacement in between is retried once)."""
    from .errors import FlashPackFormatError

    for _ in range(2):
        before = os.stat(path)
        layout = read_layout(path)
        fd, st = open_checked(path)
        same = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns) == (
            st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
        )
        if same:
            return layout, fd, st
        os.close(fd)
    raise FlashPackFormatError(f"{path}: the file keeps changing while it is opened; retry the load")


def load_state_dict(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", **options: Any
) -> dict[str, torch.Tensor]:
    """The tensors of a FlashPack file, each a view into its dtype's flat block on ``device``.

    ``options`` are those of :func:`read_pack`.
    """
    return read_pack(path, device, **options).tensors()
