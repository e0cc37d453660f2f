"""The lock a runner holds while it builds a store entry, on ``filelock``.

The lock only avoids duplicate work. ``flock`` is released by the kernel when its holder dies,
so a killed runner never blocks the next one; and correctness never depends on the lock (each
builder works in its own directory, publication is one atomic rename), so where locks do not
work the store warns and goes on without one.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import TracebackType

import filelock

from .durable import host_tag
from .errors import StoreError

log = logging.getLogger("conversion.store")


class BuildLock:
    """``with BuildLock(path, what, timeout_s):`` holds an exclusive lock on ``path``.

    A runner that has to wait says once whom it waits for (the holder writes a note into the
    lock file), and gives up with a StoreError after ``timeout_s`` seconds.
    """

    def __init__(self, path: Path, what: str, timeout_s: float) -> None:
        self.path = Path(path)
        self.what = what
        self.timeout_s = timeout_s
        self.waited_s = 0.0
        self._lock = filelock.FileLock(self.path, fallback_to_soft=False, thread_local=False,
                                       on_acquired=_write_holder, poll_interval=0.2)

    def __enter__(self) -> BuildLock:
        t0 = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._lock.acquire(timeout=0)
            except filelock.Timeout:
                log.info("store: waiting for another runner building %s (%s)", self.what, self._holder())
                self._lock.acquire(timeout=self.timeout_s)
        except filelock.Timeout:
            raise StoreError(
                f"gave up waiting {time.monotonic() - t0:.0f} s for the lock on {self.what} ({self._holder()}); "
                f"if no runner is building it, remove {self.path}"
            ) from None
        except (NotImplementedError, OSError) as exc:  # no flock on this filesystem, or no lock file
            log.warning("store: cannot lock %s (%s); going on without the lock", self.path, exc)
        self.waited_s = time.monotonic() - t0
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def _holder(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")[:200].strip()
        except OSError:
            text = ""
        return f"held by {text}" if text else "holder unknown"


def _write_holder(fd: int) -> None:
    """Record who holds the lock, for the message of a runner that waits (best effort). fsynced: a
    network filesystem (JuiceFS) shows other hosts what a file holds only once it is flushed, and
    the holder keeps the file open until it releases the lock."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{host_tag()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        os.fsync(fd)
    except OSError:
        pass
