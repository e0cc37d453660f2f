"""Read a whole pack file into host memory, torch-free, checking its checksum as the bytes pass.

The result is a :class:`HostFile`: one buffer holding the file's bytes ``[0, size)``, from which
the reader makes each dtype's block a zero-copy tensor view. Two ways to fill it, chosen per file
by :func:`model_loader.storage.plan_read` (the file system, the page cache, the settings):

- **mapped** (the default): the file is mapped privately (copy-on-write): writable, no copy, a
  write changes only this process's page. On a local disk parallel threads walk the mapping chunk
  by chunk, hashing it (or, without a checksum, ``MADV_POPULATE_READ``), so the kernel's readahead
  brings a cold file in at the disk's rate and no page is left to fault later. On FUSE a cold file
  is first read into the page cache by threads that each open it and read one contiguous part
  (``split``), hashing each chunk from their own buffer, then the chunk's pages are mapped;
- **read**: parallel threads ``preadv`` chunks into owned anonymous memory, with O_DIRECT for
  chunks not in the page cache and buffered reads for the rest.

``MODEL_LOADER_MAP`` chooses: ``always`` (default), ``hot`` (map only a file that is in the page
cache, read the others) or ``never``. On the benchmark VM (docs/BENCHMARKS.md) mapping a cold 5 GB
pack from the local disk ran at 2.1 GB/s and slowed a concurrent Python thread by about 0.7 s,
against 1.6 GB/s and 2.9 s for O_DIRECT into owned memory (whose kernel time, page faults on fresh
memory and pinning, starves the imports it should overlap).

Either way every segment of a :class:`~model_loader.checksum.Checksum` is hashed once (by the
thread that read it, or by a pool over the mapping) and a mismatch raises. Nothing here imports
torch, so the app starts these reads before the heavy imports (:mod:`model_loader.background`).
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from . import posix_io
from .checksum import Checksum
from .config import LAYOUTS, MAP_MODES, LoaderConfig
from .errors import FlashPackFormatError
from .posix_io import ALIGN, align_down, align_up
from .rates import rate_text
from .storage import ReadPlan, plan_read, storage_of

log = logging.getLogger("model_loader.host_read")

# Chunks are made smaller for small files so every thread gets work, but not below this.
MIN_AUTO_CHUNK_BYTES = 4 << 20
# Auto mode reads a chunk with O_DIRECT when less than this fraction of it is in the page cache.
COLD_FRACTION = 0.5


# ----------------------------------------------------------------------------------------------
# Options (arguments win over the loader's config, which comes from the environment)


@dataclass(frozen=True)
class ReadOptions:
    """How one file is read: the :class:`~model_loader.config.LoaderConfig` settings after the
    caller's arguments were applied. ``None`` leaves the choice to :func:`storage.plan_read`."""

    threads: int | None  # None: storage.default_threads() for the file's storage and residency
    chunk_bytes: int
    direct_io: bool | None  # None: per chunk, O_DIRECT when not in the page cache
    mapping: str  # one of MAP_MODES
    hugepages: bool = False  # ask for transparent huge pages behind owned read buffers
    layout: str | None = None  # one of LAYOUTS, or None: by the file system


def resolve_options(
    config: LoaderConfig,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    direct_io: bool | None = None,
    mapping: str | None = None,
    layout: str | None = None,
) -> ReadOptions:
    """Arguments win over ``config`` (the ``MODEL_LOADER_*`` environment as the entry point read
    it, :mod:`model_loader.config`). Forcing O_DIRECT turns mapping off."""
    if threads is None:
        threads = config.threads
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if chunk_bytes is None:
        chunk_bytes = config.chunk_bytes
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if direct_io is None:
        direct_io = config.direct_io
    if mapping is None:
        mapping = config.mapping
    elif mapping not in MAP_MODES:
        raise ValueError(f"mapping must be one of {', '.join(MAP_MODES)}, got {mapping!r}")
    if layout is None:
        layout = config.layout
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return ReadOptions(
        threads, align_up(chunk_bytes), direct_io, "never" if direct_io is True else mapping, config.hugepages,
        layout,
    )


def plan_for(path: str, fd: int, size: int, opts: ReadOptions, can_map: bool = True) -> ReadPlan:
    """The read plan for ``path`` (open as ``fd``): its storage, its page-cache residency, ``opts``."""
    with posix_io.Residency(fd, size) as residency:
        resident = residency.sampled_fraction() if residency.known else 0.0
    return plan_read(storage_of(path), resident, threads=opts.threads, mapping=opts.mapping, layout=opts.layout,
                     direct_io=opts.direct_io, can_map=can_map and size > 0)


# ----------------------------------------------------------------------------------------------
# Chunks and worker threads


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[offset, offset + length)`` of the file."""

    offset: int
    length: int

    @property
    def span(self) -> tuple[int, int]:
        """The ALIGN-aligned file range covering the chunk (what an O_DIRECT read fetches)."""
        return align_down(self.offset), align_up(self.offset + self.length)


def plan_chunks(size: int, chunk_bytes: int, start: int = 0) -> list[Chunk]:
    """Bytes ``[start, size)`` cut at the multiples of ``chunk_bytes`` (a multiple of ALIGN)."""
    if chunk_bytes <= 0 or chunk_bytes % ALIGN:
        raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}, got {chunk_bytes}")
    chunks = []
    pos = start
    while pos < size:
        stop = min(size, align_down(pos, chunk_bytes) + chunk_bytes)
        chunks.append(Chunk(pos, stop - pos))
        pos = stop
    return chunks


def effective_chunk_bytes(nbytes: int, threads: int, chunk_bytes: int, grain: int = 1 << 20) -> int:
    """``chunk_bytes``, or smaller for small files so each thread gets about two chunks; always a
    multiple of ``grain`` (the checksum's segment size, so every chunk holds whole segments)."""
    per_thread = max(1, -(-nbytes // (2 * threads)))
    chosen = min(chunk_bytes, max(MIN_AUTO_CHUNK_BYTES, per_thread))
    return align_up(max(chosen, grain), grain)


class Worker(Protocol):
    def process(self, chunk: Chunk) -> None: ...

    def close(self) -> None: ...


def split_runs(chunks: Sequence[Chunk], parts: int) -> list[list[Chunk]]:
    """``chunks`` (in file order) cut into at most ``parts`` contiguous runs of about equal bytes
    (each chunk goes to the part its middle byte falls in)."""
    total = sum(c.length for c in chunks)
    runs: dict[int, list[Chunk]] = {}
    done = 0
    for chunk in chunks:
        part = min(parts - 1, int((done + chunk.length / 2) * parts / total))
        runs.setdefault(part, []).append(chunk)
        done += chunk.length
    return list(runs.values())


def run_workers(chunks: Sequence[Chunk], threads: int, make_worker: Callable[[], Worker], name: str,
                layout: str = "grid") -> None:
    """Process ``chunks`` (in file order) with ``threads`` threads, each with its own worker:
    ``grid`` hands the chunks out in file order to whichever thread is free; ``split`` gives each
    thread one contiguous run to read in order. The first exception stops the rest and is raised
    after all threads have ended."""
    lock = threading.Lock()
    if layout == "split":
        runs = [iter(run) for run in split_runs(chunks, threads)]
    else:
        shared = iter(chunks)
        runs = [shared] * threads
    stop = threading.Event()
    errors: list[BaseException] = []

    def fail(exc: BaseException) -> None:
        with lock:
            errors.append(exc)
        stop.set()

    def body(pending: Iterator[Chunk]) -> None:
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

    pool = [threading.Thread(target=body, args=(run,), name=f"{name}-{i}", daemon=True) for i, run in enumerate(runs)]
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


@dataclass
class ReadStats:
    """What one read did: for logs, benchmarks and tests."""

    bytes: int = 0
    seconds: float = 0.0
    threads: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    direct_bytes: int = 0
    direct_fallbacks: int = 0
    mapped: bool = False
    checked: bool = False
    layout: str = "grid"
    storage: str = ""
    prefetched: bool = False  # read into the page cache through the threads' own handles, then mapped
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_direct(self, nbytes: int, fell_back: bool) -> None:
        """Count bytes read with O_DIRECT (from any reader thread)."""
        with self._lock:
            self.direct_bytes += nbytes
            self.direct_fallbacks += fell_back


class FileSource:
    """One open file: the buffered and O_DIRECT descriptors and the per-chunk read policy.

    ``fd`` is the caller's descriptor; with ``None`` the source opens its own and closes it with
    :meth:`close` (a ``split`` reader thread's own file handle)."""

    def __init__(self, path: str, fd: int | None, size: int, direct_io: bool | None, stats: ReadStats):
        self.path = path
        self._own_fd = fd is None
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if fd is None else fd
        self.stats = stats
        self.fd_direct = posix_io.open_direct(path) if direct_io is not False else None
        if direct_io and self.fd_direct is None:
            log.warning("%s: O_DIRECT is not available on this filesystem; reading buffered", path)
        self.residency = posix_io.Residency(self.fd, size) if self.fd_direct is not None and direct_io is None else None

    def close(self) -> None:
        if self.residency is not None:
            self.residency.close()
            self.residency = None
        if self.fd_direct is not None:
            os.close(self.fd_direct)
            self.fd_direct = None
        if self._own_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _use_direct(self, chunk: Chunk) -> bool:
        if self.fd_direct is None:
            return False
        if self.residency is None:  # forced on
            return True
        return self.residency.fraction(chunk.offset, chunk.length) < COLD_FRACTION

    def read(self, chunk: Chunk, mem: memoryview, mem_addr: int, at: int) -> None:
        """Put the chunk's bytes at ``mem[at:at + chunk.length]``.

        With O_DIRECT the whole aligned span is read, so the caller must own the bytes of ``mem``
        from ``at - (offset - span start)`` up to the span's length.
        """
        n = chunk.length
        done = 0
        if self._use_direct(chunk):
            a0, a1 = chunk.span
            lead = chunk.offset - a0
            base = at - lead
            if base >= 0 and (mem_addr + base) % ALIGN == 0 and base + (a1 - a0) <= len(mem):
                try:
                    got = posix_io.pread_direct(self.fd_direct, mem[base : base + a1 - a0], a0, lead + n)
                    done = max(0, min(n, got - lead))
                except OSError:
                    done = 0
            self.stats.add_direct(done, done < n)
        if done < n:
            posix_io.pread_exact(self.fd, mem[at + done : at + n], chunk.offset + done, self.path)


def check_segments(checksum: Checksum | None, chunk: Chunk, data: memoryview, path: str) -> None:
    """Hash the checksum segments that ``chunk`` (whose bytes are ``data``) holds."""
    if checksum is None:
        return
    seg = checksum.segment_bytes
    first = chunk.offset // seg
    for index in range(first, -(-(chunk.offset + chunk.length) // seg)):
        start, end = checksum.span(index)
        if start < chunk.offset or end > chunk.offset + chunk.length:
            raise ValueError(f"chunk {chunk} does not hold whole checksum segments of {seg} bytes")
        checksum.check(index, data[start - chunk.offset : end - chunk.offset], path)


# ----------------------------------------------------------------------------------------------
# Whole files into host memory


@dataclass
class HostFile:
    """The bytes ``[0, size)`` of the file at ``path`` in ``buffer`` (a private mapping of the
    file, or owned anonymous memory), checked against its checksum when one was given."""

    path: str
    size: int
    buffer: mmap.mmap | bytearray
    stats: ReadStats


class SourceFactory:
    """The :class:`FileSource` each reader thread reads through: one shared by all (``grid``),
    or each thread its own descriptors (``split``: a file handle per sequential stream)."""

    def __init__(self, path: str, fd: int, size: int, plan: ReadPlan, stats: ReadStats):
        self.path, self.size, self.plan, self.stats = path, size, plan, stats
        self.shared = None if plan.layout == "split" else self._source(fd)

    def _source(self, fd: int | None) -> FileSource:
        return FileSource(self.path, fd, self.size, self.plan.direct_io, self.stats)

    def acquire(self) -> FileSource:
        return self.shared or self._source(None)

    def release(self, source: FileSource) -> None:
        if source is not self.shared:
            source.close()

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()


class _HostWorker:
    def __init__(self, sources: SourceFactory, mem: memoryview, addr: int, checksum: Checksum | None):
        self.sources, self.mem, self.addr, self.checksum = sources, mem, addr, checksum
        self.source = sources.acquire()

    def process(self, chunk: Chunk) -> None:
        a0, a1 = chunk.span
        posix_io.populate_write(self.addr + a0, min(a1, len(self.mem)) - a0)
        self.source.read(chunk, self.mem, self.addr, chunk.offset)
        check_segments(self.checksum, chunk, self.mem[chunk.offset : chunk.offset + chunk.length], self.source.path)

    def close(self) -> None:
        self.sources.release(self.source)


class _MapWorker:
    """Brings a chunk of a mapped file in: hashing it faults it in (the kernel reads ahead of the
    faults); without a checksum, MADV_POPULATE_READ does, so no fault is left for the first use.
    (Populating before hashing too cost the concurrent imports about 0.2 s more on the hot SDXL
    start of docs/BENCHMARKS.md, for no faster read.)"""

    def __init__(self, mem: memoryview, addr: int, checksum: Checksum | None, path: str):
        self.mem, self.addr, self.checksum, self.path = mem, addr, checksum, path

    def process(self, chunk: Chunk) -> None:
        if self.checksum is None:
            posix_io.populate_read(self.addr + chunk.offset, chunk.length)
        else:
            check_segments(self.checksum, chunk, self.mem[chunk.offset : chunk.offset + chunk.length], self.path)

    def close(self) -> None:
        pass


class _PrefetchWorker:
    """Reads its chunks through its own buffered descriptor into one reused buffer: the pages land
    in the page cache, each segment is hashed from the buffer as it passes, and the chunk's pages
    are then mapped (``MADV_POPULATE_READ``, no I/O left), so the mapping needs no second pass and
    its first use no page faults."""

    def __init__(self, sources: SourceFactory, chunk_bytes: int, checksum: Checksum | None, map_addr: int):
        self.sources, self.checksum, self.map_addr = sources, checksum, map_addr
        self.source = sources.acquire()
        self.buffer = mmap.mmap(-1, chunk_bytes)
        self.mem = memoryview(self.buffer)

    def process(self, chunk: Chunk) -> None:
        view = self.mem[: chunk.length]
        posix_io.pread_exact(self.source.fd, view, chunk.offset, self.source.path)
        check_segments(self.checksum, chunk, view, self.source.path)
        posix_io.populate_read(self.map_addr + chunk.offset, chunk.length)

    def close(self) -> None:
        self.mem.release()
        self.buffer.close()
        self.sources.release(self.source)


def open_checked(path: str) -> tuple[int, os.stat_result]:
    """An open read-only descriptor of the regular file ``path`` and its stat."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FlashPackFormatError(f"{path}: not a regular file")
    return fd, st


def read_file(
    path: str | os.PathLike[str],
    checksum: Checksum | None = None,
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    direct_io: bool | None = None,
    mapping: str | None = None,
    layout: str | None = None,
    config: LoaderConfig | None = None,
) -> HostFile:
    """All bytes of ``path`` in host memory (see the module docstring), checked against
    ``checksum`` when given (ChecksumMismatchError names the bytes that differ). Settings left
    None come from ``config`` (by default the environment, read once per call), then are chosen
    for the file's storage and page-cache residency (:mod:`model_loader.storage`)."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    if config is None:
        config = LoaderConfig.from_env()
    opts = resolve_options(config, threads, chunk_bytes, direct_io, mapping, layout)
    fd, st = open_checked(path)
    size = st.st_size
    try:
        if checksum is not None:
            checksum.check_size(size, path)
        plan = plan_for(path, fd, size, opts)
        mapped = plan.mapped
        grain = checksum.segment_bytes if checksum is not None else ALIGN
        chunk = effective_chunk_bytes(size, plan.threads, opts.chunk_bytes, grain)
        chunks = plan_chunks(size, chunk)
        n_threads = max(1, min(plan.threads, len(chunks)))
        stats = ReadStats(size, threads=n_threads, chunks=len(chunks), chunk_bytes=chunk, layout=plan.layout,
                          storage=plan.storage.name)
        if size == 0:
            buffer: mmap.mmap | bytearray = bytearray(0)
        elif mapped:
            buffer = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            stats.mapped = True
            stats.prefetched = plan.prefetch
            mem = memoryview(buffer)
            addr = posix_io.buffer_address(mem)
            if plan.prefetch:
                sources = SourceFactory(path, fd, size, replace(plan, direct_io=False), stats)
                try:
                    run_workers(chunks, n_threads, lambda: _PrefetchWorker(sources, chunk, checksum, addr),
                                "model_loader-reader", plan.layout)
                finally:
                    sources.close()
            else:
                run_workers(chunks, n_threads, lambda: _MapWorker(mem, addr, checksum, path), "model_loader-map")
            mem.release()
        else:
            buffer = mmap.mmap(-1, align_up(size, ALIGN))  # anonymous, page-aligned, writable
            if opts.hugepages:
                posix_io.advise_hugepages(posix_io.buffer_address(memoryview(buffer)), len(buffer))
            mem = memoryview(buffer)
            sources = SourceFactory(path, fd, size, plan, stats)
            try:
                addr = posix_io.buffer_address(mem)
                run_workers(chunks, n_threads, lambda: _HostWorker(sources, mem, addr, checksum), "model_loader-reader",
                            plan.layout)
            finally:
                sources.close()
                mem.release()
        stats.checked = checksum is not None
    finally:
        os.close(fd)
    stats.seconds = time.perf_counter() - t0
    log.debug(
        "read %s: %s, %s, %d threads (%s), %.0f%% via O_DIRECT%s",
        path, rate_text(size, stats.seconds), "mapped" if stats.mapped else "read", n_threads, stats.layout,
        100 * stats.direct_bytes / max(1, size), ", checksum ok" if stats.checked else "",
    )
    return HostFile(path, size, buffer, stats)
