"""The pinned staging pool: leases, reuse, alignment and the idle cap (host allocator injected)."""

from __future__ import annotations

import threading

import pytest
import torch

from model_loader import pinned
from model_loader.config import LoaderConfig
from model_loader.pinned import PinnedPool
from model_loader.posix_io import ALIGN


def aligned(n: int) -> torch.Tensor:
    """A host buffer of ``n`` bytes at an ALIGN-aligned address, as pinned memory is."""
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    return raw.narrow(0, (-raw.data_ptr()) % ALIGN, n)


def host_pool(**kwargs) -> PinnedPool:
    return PinnedPool(allocate=lambda n: torch.empty(n, dtype=torch.uint8), **kwargs)


def test_two_concurrent_leases_get_disjoint_buffers():
    pool = host_pool()
    a, b = pool.lease(), pool.lease()
    bufs_a = [a.acquire(ALIGN) for _ in range(3)]
    bufs_b = [b.acquire(ALIGN) for _ in range(3)]
    ptrs = {t.data_ptr() for t in bufs_a + bufs_b}
    assert len(ptrs) == 6
    assert pool.allocations == 6 and pool.leased_bytes == 6 * ALIGN


def test_a_released_buffer_is_reused_by_the_next_lease():
    pool = host_pool()
    with pool.lease() as first:
        ptr = first.acquire(ALIGN).data_ptr()
    assert pool.idle_bytes == ALIGN and pool.leased_bytes == 0
    with pool.lease() as second:
        assert second.acquire(ALIGN).data_ptr() == ptr
    assert pool.allocations == 1


def test_a_buffer_held_by_one_lease_is_not_handed_to_another():
    pool = host_pool()
    with pool.lease() as first:
        first.acquire(ALIGN)
    holder = pool.lease()
    held = holder.acquire(ALIGN)
    other = pool.lease().acquire(ALIGN)
    assert other.data_ptr() != held.data_ptr()
    assert pool.allocations == 2


def test_a_smaller_idle_buffer_is_not_used_for_a_larger_request():
    pool = host_pool()
    with pool.lease() as lease:
        lease.acquire(ALIGN)
    with pool.lease() as lease:
        big = lease.acquire(4 * ALIGN)
        assert big.numel() == 4 * ALIGN
    assert pool.allocations == 2


def test_buffers_are_aligned_even_from_a_misaligned_allocator():
    def misaligned(n):
        raw = torch.empty(n + ALIGN + 8, dtype=torch.uint8)
        off = (-raw.data_ptr()) % ALIGN + 8
        return raw.narrow(0, off, n)

    pool = PinnedPool(allocate=misaligned)
    buf = pool.lease().acquire(3 * ALIGN)
    assert buf.data_ptr() % ALIGN == 0
    assert buf.numel() == 4 * ALIGN  # the power of two torch's pinned allocator would pin anyway


def test_buffers_are_pinned_in_powers_of_two_and_counted_as_pinned():
    sizes = []
    pool = PinnedPool(allocate=lambda n: sizes.append(n) or aligned(n))
    lease = pool.lease()
    assert lease.acquire(24 << 20).numel() == 32 << 20
    assert lease.acquire(32 << 20).numel() == 32 << 20
    assert sizes == [32 << 20, 32 << 20]
    assert pool.leased_bytes == 64 << 20


def test_dropping_buffers_beyond_the_cap_unpins_them():
    unpinned = []
    pool = PinnedPool(allocate=lambda n: torch.empty(n, dtype=torch.uint8), max_idle_bytes=2 * ALIGN,
                      release_freed=lambda: unpinned.append(True))
    lease = pool.lease()
    for _ in range(2):
        lease.acquire(ALIGN)
    lease.release()
    assert unpinned == []  # within the cap: kept
    lease = pool.lease()
    for _ in range(3):
        lease.acquire(ALIGN)
    lease.release()
    assert unpinned == [True] and pool.idle_bytes == 2 * ALIGN


def test_reserved_buffers_are_pinned_in_the_background_and_taken_instead_of_new_ones():
    gate = threading.Event()
    calls = []

    def slow(n):
        gate.wait(5)
        calls.append(n)
        return aligned(n)

    pool = PinnedPool(allocate=slow)
    thread = pool.reserve(3, ALIGN)
    got = []
    taker = threading.Thread(target=lambda: got.append(pool.lease().acquire(ALIGN)))
    taker.start()
    taker.join(0.2)
    assert taker.is_alive()  # waits for the reservation rather than pinning a buffer of its own
    gate.set()
    taker.join(5)
    thread.join(5)
    assert len(got) == 1 and pool.allocations == 3 == len(calls)
    assert pool.idle_bytes == 2 * ALIGN


def test_a_reservation_counts_buffers_already_idle_and_stays_within_the_cap():
    pool = host_pool(max_idle_bytes=4 * ALIGN)
    with pool.lease() as lease:
        lease.acquire(ALIGN)
    pool.reserve(10, ALIGN).join(5)
    assert pool.allocations == 4 and pool.idle_bytes == 4 * ALIGN


def test_idle_buffers_beyond_the_cap_are_dropped_on_release():
    pool = host_pool(max_idle_bytes=2 * ALIGN)
    lease = pool.lease()
    for _ in range(5):
        lease.acquire(ALIGN)
    lease.release()
    assert pool.idle_bytes == 2 * ALIGN and pool.leased_bytes == 0


def test_acquire_after_release_raises():
    pool = host_pool()
    lease = pool.lease()
    lease.release()
    with pytest.raises(RuntimeError, match="released"):
        lease.acquire(ALIGN)


def test_threads_acquiring_at_once_get_distinct_buffers():
    pool = host_pool()
    with pool.lease() as warm:
        for _ in range(4):
            warm.acquire(ALIGN)
    lease = pool.lease()
    got: list[int] = []
    lock = threading.Lock()

    def take():
        for _ in range(2):
            ptr = lease.acquire(ALIGN).data_ptr()
            with lock:
                got.append(ptr)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 8
    assert pool.allocations == 8  # 4 reused + 4 new
    lease.release()
    assert pool.idle_bytes == 8 * ALIGN


def test_the_process_wide_pool_takes_its_idle_cap_from_model_loader_pinned_max_mb_once(monkeypatch):
    monkeypatch.setattr(pinned, "_default_pool", None)
    monkeypatch.setenv("MODEL_LOADER_PINNED_MAX_MB", "3")
    pool = pinned.default_pool()
    assert pool.max_idle_bytes == 3 << 20
    monkeypatch.setenv("MODEL_LOADER_PINNED_MAX_MB", "5")
    assert pinned.default_pool() is pool and pool.max_idle_bytes == 3 << 20


def test_a_pool_of_ones_own_does_not_read_the_environment(monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_PINNED_MAX_MB", "not a number")
    assert host_pool().max_idle_bytes == LoaderConfig().pinned_max_bytes
