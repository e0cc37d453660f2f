"""A process-wide pool of pinned (page-locked) host staging buffers, handed out by lease.

Pinning costs about 0.5 s per GB, so buffers outlive a load and are reused by the next one. Each
load takes a :class:`Lease`; a buffer belongs to one lease at a time, so two loads running at
once in the same process never share a buffer. The caller must make sure every copy out of a
buffer has finished before releasing the lease.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch

from .io import ALIGN

Allocator = Callable[[int], torch.Tensor]


def pinned_allocator(nbytes: int) -> torch.Tensor:
    """A page-locked uint8 host tensor of ``nbytes`` (needs CUDA)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _default_max_idle_bytes() -> int:
    try:
        return int(os.environ.get("MODEL_LOADER_PINNED_MAX_MB", "4096")) << 20
    except ValueError:
        return 4096 << 20


class PinnedPool:
    """Idle staging buffers plus the bookkeeping of which lease holds which buffer.

    ``allocate(nbytes)`` makes a new uint8 buffer (pinned by default; tests inject a plain one).
    Idle buffers beyond ``max_idle_bytes`` are dropped when a lease is released.
    """

    def __init__(self, allocate: Allocator = pinned_allocator, max_idle_bytes: int | None = None):
        self._allocate = allocate
        self.max_idle_bytes = _default_max_idle_bytes() if max_idle_bytes is None else max_idle_bytes
        self._lock = threading.Lock()
        self._idle: list[torch.Tensor] = []
        self._leased_bytes = 0
        self.allocations = 0

    def lease(self) -> Lease:
        return Lease(self)

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)

    @property
    def leased_bytes(self) -> int:
        with self._lock:
            return self._leased_bytes

    def clear(self) -> None:
        """Free every idle buffer (leased ones are freed when their lease is released)."""
        with self._lock:
            self._idle.clear()

    def _take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [b for b in self._idle if b.numel() >= nbytes]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                self._idle.remove(buf)
                self._leased_bytes += buf.numel()
                return buf
        buf = self._new_buffer(nbytes)  # outside the lock: pinning is slow
        with self._lock:
            self.allocations += 1
            self._leased_bytes += buf.numel()
        return buf

    def _new_buffer(self, nbytes: int) -> torch.Tensor:
        buf = self._allocate(nbytes)
        if buf.data_ptr() % ALIGN == 0:
            return buf
        # O_DIRECT needs an aligned address; over-allocate and keep an aligned window.
        raw = self._allocate(nbytes + ALIGN)
        return raw.narrow(0, (-raw.data_ptr()) % ALIGN, nbytes)

    def _give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            self._leased_bytes -= sum(b.numel() for b in buffers)
            self._idle.extend(buffers)
            idle = sum(b.numel() for b in self._idle)
            while self._idle and idle > self.max_idle_bytes:
                idle -= self._idle.pop().numel()


class Lease:
    """The buffers one load holds; thread-safe, so every reader thread acquires its own."""

    def __init__(self, pool: PinnedPool):
        self._pool = pool
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []
        self._released = False

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (ALIGN-aligned) that no other lease holds."""
        if self._released:
            raise RuntimeError("lease already released")
        buf = self._pool._take(nbytes)
        with self._lock:
            self._buffers.append(buf)
        return buf

    @property
    def buffers(self) -> list[torch.Tensor]:
        with self._lock:
            return list(self._buffers)

    def release(self) -> None:
        """Return every buffer to the pool; only once all copies out of them are complete."""
        with self._lock:
            buffers, self._buffers = self._buffers, []
            self._released = True
        if buffers:
            self._pool._give_back(buffers)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_default_pool: PinnedPool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> PinnedPool:
    """The process-wide pool of pinned staging buffers used by CUDA loads."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = PinnedPool()
        return _default_pool


def release_pinned_memory() -> None:
    """Free the idle pinned buffers of the process-wide pool (e.g. after the last load)."""
    if _default_pool is not None:
        _default_pool.clear()
    empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
    if empty_host_cache is not None and torch.cuda.is_available():
        empty_host_cache()  # torch's own caching host allocator keeps freed pinned blocks
