"""A process-wide pool of pinned (page-locked) host staging buffers, handed out by lease.

Pinning costs about 0.5 s per GB, so buffers outlive a load and are reused by the next one, and
:meth:`PinnedPool.reserve` pins them in the background before the first load asks (the app does
so as soon as torch is imported). Each load takes a :class:`Lease`; a buffer belongs to one lease
at a time, so two loads running at once in the same process never share a buffer. The caller must
make sure every copy out of a buffer has finished before releasing the lease.

torch's caching host allocator rounds every pinned block up to a power of two and keeps freed
blocks pinned for the process's life, so buffers are asked for in powers of two (what is pinned
is what the pool counts) and dropping buffers beyond the cap empties that cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from . import private_api
from .config import LoaderConfig
from .posix_io import ALIGN

Allocator = Callable[[int], torch.Tensor]
log = logging.getLogger("model_loader.pinned")


def buffer_size(nbytes: int) -> int:
    """The size a staging buffer of at least ``nbytes`` is pinned at: the next power of two (what
    torch's host allocator pins anyway), at least ALIGN."""
    return max(ALIGN, 1 << (max(1, nbytes) - 1).bit_length())


def empty_host_cache() -> None:
    """Unpin the blocks torch's caching host allocator keeps after they are freed (no-op on CPU)."""
    if torch.cuda.is_available():
        private_api.empty_host_cache()


def pinned_allocator(nbytes: int) -> torch.Tensor:
    """A page-locked uint8 host tensor of ``nbytes`` (needs CUDA)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class PinnedPool:
    """Idle staging buffers plus the bookkeeping of which lease holds which buffer.

    ``allocate(nbytes)`` makes a new uint8 buffer (pinned by default; tests inject a plain one).
    Idle buffers beyond ``max_idle_bytes`` (default: :class:`LoaderConfig`'s default; the
    process-wide pool, :func:`default_pool`, takes ``MODEL_LOADER_PINNED_MAX_MB``) are dropped
    when a lease is released.
    """

    def __init__(
        self,
        allocate: Allocator = pinned_allocator,
        max_idle_bytes: int = LoaderConfig.pinned_max_bytes,
        release_freed: Callable[[], None] = empty_host_cache,
    ):
        self._allocate = allocate
        self._release_freed = release_freed
        self.max_idle_bytes = max_idle_bytes
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._idle: list[torch.Tensor] = []
        self._leased_bytes = 0
        self._reserving = 0  # buffers a reserve() thread has yet to pin
        self.allocations = 0

    def reserve(self, count: int, nbytes: int) -> threading.Thread:
        """Pin ``count`` buffers of ``nbytes`` (rounded, see :func:`buffer_size`) in a background
        thread, each idle in the pool as soon as it is pinned; a lease asking meanwhile waits for
        them instead of pinning its own. Returns the thread."""
        size = buffer_size(nbytes)
        with self._lock:
            have = sum(1 for b in self._idle if b.numel() >= size)
            count = max(0, min(count - have, (self.max_idle_bytes // size) - have))
            self._reserving += count

        def pin() -> None:
            t0 = time.perf_counter()
            try:
                for _ in range(count):
                    buf = self._new_buffer(size)
                    with self._lock:
                        self.allocations += 1
                        self._reserving -= 1
                        self._idle.append(buf)
                        self._ready.notify_all()
            except BaseException as exc:  # noqa: BLE001 - leases then pin their own buffers
                log.warning("pinned: reserving staging buffers failed: %s", exc)
            finally:
                with self._lock:
                    self._reserving = 0
                    self._ready.notify_all()
            log.info("pinned: %d staging buffer(s) of %d MiB pinned in %.2f s", count, size >> 20,
                     time.perf_counter() - t0)

        thread = threading.Thread(target=pin, name="model_loader-pin", daemon=True)
        thread.start()
        return thread

    def lease(self) -> Lease:
        """A new lease on this pool (one per load)."""
        return Lease(self)

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)

    @property
    def leased_bytes(self) -> int:
        with self._lock:
            return self._leased_bytes

    def _take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            while True:
                fits = [b for b in self._idle if b.numel() >= nbytes]
                if fits:
                    buf = min(fits, key=lambda b: b.numel())
                    self._idle.remove(buf)
                    self._leased_bytes += buf.numel()
                    return buf
                if not self._reserving:
                    break
                self._ready.wait()  # a reserve() thread is pinning buffers: take one of those
        buf = self._new_buffer(buffer_size(nbytes))  # outside the lock: pinning is slow
        with self._lock:
            self.allocations += 1
            self._leased_bytes += buf.numel()
        return buf

    def _new_buffer(self, size: int) -> torch.Tensor:
        buf = self._allocate(size)
        if buf.data_ptr() % ALIGN == 0:
            return buf
        # O_DIRECT needs an aligned address (pinned memory is page-aligned; other allocators may
        # not be): keep an aligned window of the next power of two.
        raw = self._allocate(2 * size)
        return raw.narrow(0, (-raw.data_ptr()) % ALIGN, size)

    def _give_back(self, buffers: list[torch.Tensor]) -> None:
        dropped = False
        with self._lock:
            self._leased_bytes -= sum(b.numel() for b in buffers)
            self._idle.extend(buffers)
            idle = sum(b.numel() for b in self._idle)
            while self._idle and idle > self.max_idle_bytes:
                idle -= self._idle.pop().numel()
                dropped = True
        if dropped:
            self._release_freed()


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
    """The process-wide pool of pinned staging buffers used by CUDA loads, made on first use."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            # The one place beneath the entry points that reads the environment: once, when the
            # pool is made (its idle cap, MODEL_LOADER_PINNED_MAX_MB, holds for the process).
            _default_pool = PinnedPool(max_idle_bytes=LoaderConfig.from_env().pinned_max_bytes)
        return _default_pool
