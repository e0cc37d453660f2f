"""Pull pack files into the page cache in the background, so that reading the weights overlaps
heavy imports and module construction.

``prefetch(paths)`` returns at once; daemon threads then read each file in large chunks into a
small scratch buffer, each chunk after a ``POSIX_FADV_WILLNEED`` hint for it (chunks already in
the page cache are skipped). When a load starts on a file, the prefetch stops reading that file
(:func:`claim`) so the loader's own readers take over instead of competing with it.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from . import io as _io

log = logging.getLogger("model_loader.prefetch")

DEFAULT_THREADS = 8
DEFAULT_CHUNK_BYTES = 8 << 20
# A chunk at least this resident is not read again.
HOT_FRACTION = 0.99
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 3)

_active: weakref.WeakSet[Prefetch] = weakref.WeakSet()
_active_lock = threading.Lock()


def claim(dev: int, ino: int) -> None:
    """A load is starting on file ``(dev, ino)``: stop prefetching it."""
    with _active_lock:
        handles = list(_active)
    for handle in handles:
        handle._claimed.add((dev, ino))


@dataclass
class _File:
    path: str
    fd: int
    size: int
    key: tuple[int, int]
    residency: _io.Residency
    failed: bool = False


class Prefetch:
    """Handle on a background prefetch: ``wait()`` until it is finished, ``cancel()`` to stop it."""

    def __init__(
        self,
        paths: Iterable[str] = (),
        threads: int = DEFAULT_THREADS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.paths = [os.fspath(p) for p in paths]
        self.bytes_read = 0
        self.seconds = 0.0
        self._threads = max(1, threads)
        self._chunk_bytes = max(_io.ALIGN, chunk_bytes)
        self._claimed: set[tuple[int, int]] = set()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        with _active_lock:
            _active.add(self)
        self._coordinator = threading.Thread(
            target=self._run, name="model_loader-prefetch", daemon=True
        )
        self._coordinator.start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every file was read (or skipped); False if ``timeout`` passed first."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop reading; threads finish their current chunk and exit."""
        self._cancelled.set()

    def _run(self) -> None:
        t0 = time.perf_counter()
        files: list[_File] = []
        workers: list[threading.Thread] = []
        try:
            files = [f for f in map(self._open, self.paths) if f is not None]
            work = iter([(f, off) for f in files for off in range(0, f.size, self._chunk_bytes)])
            for i in range(self._threads):
                worker = threading.Thread(
                    target=self._worker, args=(work,), name=f"model_loader-prefetch-{i}", daemon=True
                )
                worker.start()
                workers.append(worker)
        except Exception as exc:  # a prefetch is only a hint: never raise from the background
            log.debug("prefetch stopped: %s", exc)
        finally:
            for worker in workers:
                worker.join()
            for f in files:
                f.residency.close()
                os.close(f.fd)
            self.seconds = time.perf_counter() - t0
            with _active_lock:
                _active.discard(self)
            self._done.set()
            log.debug(
                "prefetch: %.2f GB read in %.2f s over %d file(s)",
                self.bytes_read / 1e9, self.seconds, len(files),
            )

    def _open(self, path: str) -> _File | None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            log.debug("prefetch: skipping %s (%s)", path, exc.strerror or exc)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(f"{path} is not a regular file")
        except OSError as exc:
            log.debug("prefetch: skipping %s (%s)", path, exc)
            os.close(fd)
            return None
        _io.fadvise(fd, 0, 0, getattr(os, "POSIX_FADV_SEQUENTIAL", 2))
        return _File(path, fd, st.st_size, (st.st_dev, st.st_ino), _io.Residency(fd, st.st_size))

    def _next(self, work) -> tuple[_File, int] | None:
        with self._lock:
            return next(work, None)

    def _worker(self, work) -> None:
        scratch = memoryview(bytearray(self._chunk_bytes))
        read = 0
        while not self._cancelled.is_set():
            item = self._next(work)
            if item is None:
                break
            f, off = item
            if f.failed or f.key in self._claimed:
                continue
            length = min(self._chunk_bytes, f.size - off)
            if f.residency.known and f.residency.fraction(off, length) >= HOT_FRACTION:
                continue
            # The hint hands the kernel the whole chunk as one readahead; the read then waits for
            # it. Hints go chunk by chunk, so none is pending for a file a load has claimed.
            _io.fadvise(f.fd, off, length, _WILLNEED)
            try:
                n = os.preadv(f.fd, [scratch[:length]], off)
            except OSError as exc:
                log.debug("prefetch: giving up on %s (%s)", f.path, exc.strerror or exc)
                f.failed = True
                continue
            read += n
        with self._lock:
            self.bytes_read += read


def prefetch(
    paths: Iterable[str | os.PathLike[str]],
    threads: int | None = None,
    chunk_bytes: int | None = None,
) -> Prefetch:
    """Start reading ``paths`` into the page cache in daemon threads; returns at once.

    Missing or unreadable paths are skipped. ``threads`` defaults to ``MODEL_LOADER_PREFETCH_THREADS``
    or 8, ``chunk_bytes`` to 8 MiB.
    """
    if threads is None:
        threads = env_int("MODEL_LOADER_PREFETCH_THREADS", DEFAULT_THREADS)
    return Prefetch([os.fspath(p) for p in paths], threads, chunk_bytes or DEFAULT_CHUNK_BYTES)


def env_int(name: str, default: int) -> int:
    """A positive integer from environment variable ``name`` (``default`` when unset)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be >= 1")
    return value
