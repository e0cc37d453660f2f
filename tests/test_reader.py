"""The stream-pipelined reader: exact round trips, block views, chunking, O_DIRECT, errors."""

from __future__ import annotations

import errno
import logging
import os
import queue
import random
import re
import threading
import time

import pytest
import torch

from conversion.writer import pack_state_dict
from model_loader import background, host_read, posix_io, reader, storage
from model_loader.checksum import file_checksum
from model_loader.config import LoaderConfig
from model_loader.errors import ChecksumMismatchError, FlashPackFormatError, PackReadError
from model_loader.host_read import Chunk, ReadOptions, plan_chunks, read_file, resolve_options
from model_loader.pinned import PinnedPool
from model_loader.posix_io import ALIGN, Residency, drop_page_cache, open_direct
from model_loader.reader import load_state_dict, read_pack


def mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "unet.conv.weight": torch.randn(256, 129, generator=g),
        "unet.norm.weight": torch.randn(257, generator=g).half(),
        "text.embed": torch.randn(1000, 17, generator=g).to(torch.bfloat16),
        "quant.weight": torch.randn(301, generator=g).to(torch.float8_e4m3fn),
        "ids": torch.arange(0, 5_000_000_000, 50_000_000, dtype=torch.int64),
        "mask": torch.rand(77, generator=g) > 0.5,
        "scale": torch.tensor(0.125),
        "empty": torch.zeros(0, 3),
        "gewicht.größe.权重": torch.randn(5, generator=g),
    }


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(sorted(got)) == list(sorted(want))
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert torch.equal(as_bytes(g), as_bytes(w)), name


@pytest.fixture
def pack(tmp_path):
    path = tmp_path / "model.flashpack"
    sd = mixed_state_dict()
    pack_state_dict(sd, path)
    return path, sd


class HostEngine:
    """A stand-in for CUDA: every "stream" is a thread that performs queued copies after a
    random delay, so a staging buffer refilled before its copy ran would corrupt the result."""

    def __init__(self, max_delay: float = 0.002):
        self.max_delay = max_delay
        self.rng = random.Random(0)
        self.streams: list[queue.SimpleQueue] = []
        self.events: list[threading.Event] = []

    def empty(self, numel, dtype):
        return torch.empty(numel, dtype=dtype)

    def begin(self):
        pass

    def start_thread(self):
        pass

    def new_stream(self):
        q: queue.SimpleQueue = queue.SimpleQueue()

        def run():
            while (job := q.get()) is not None:
                job()

        threading.Thread(target=run, daemon=True).start()
        self.streams.append(q)
        return q

    def new_event(self):
        ev = threading.Event()
        ev.set()
        self.events.append(ev)
        return ev

    def copy(self, dst, src, stream, event):
        event.clear()
        delay = self.rng.random() * self.max_delay

        def job():
            time.sleep(delay)
            dst.copy_(src)
            event.set()

        stream.put(job)

    def is_done(self, event):
        return event.is_set()

    def wait(self, event):
        event.wait()

    def finish(self):
        for q in self.streams:
            done = threading.Event()
            q.put(done.set)
            done.wait()

    def close(self):
        for q in self.streams:
            q.put(None)


def host_pool() -> PinnedPool:
    return PinnedPool(allocate=lambda n: torch.empty(n, dtype=torch.uint8))


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("model_loader-reader")]


def cold_cache_supported(path) -> bool:
    drop_page_cache(path)
    return posix_io.resident_fraction(path) < 0.5


# ----------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("align", [0, 64, 128, 4096])
def test_round_trip_of_packs_from_our_writer_is_bit_exact(tmp_path, align):
    sd = mixed_state_dict()
    pack_state_dict(sd, tmp_path / "m.flashpack", align_bytes=align)
    assert_bit_exact(load_state_dict(tmp_path / "m.flashpack"), sd)


@pytest.mark.parametrize("align", [0, 64, 128, 4096])
def test_round_trip_of_packs_from_flashpack_is_bit_exact(tmp_path, align):
    from flashpack.serialization import pack_to_file

    sd = mixed_state_dict()
    pack_to_file(sd, str(tmp_path / "f.flashpack"), target_dtype=None, align_bytes=align)
    assert_bit_exact(load_state_dict(tmp_path / "f.flashpack", threads=3, chunk_bytes=ALIGN), sd)


def test_tensors_are_views_into_one_block_per_dtype(pack):
    path, sd = pack
    data = read_pack(path)
    assert [b.dtype for b in data.blocks] == [b.dtype for b in data.layout.blocks]
    assert len({b.dtype for b in data.blocks}) == len(data.blocks) == len({v.dtype for v in sd.values()})
    for name, t in data.tensors().items():
        block = data.blocks[next(e.block for e in data.layout.entries if e.name == name)]
        assert t.dtype == block.dtype
        assert t.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()


def test_in_place_writes_to_loaded_tensors_work(pack):
    path, sd = pack
    data = read_pack(path)
    t = data.tensors()["unet.conv.weight"]
    t.add_(1.0)
    assert torch.equal(data.tensors()["unet.conv.weight"], sd["unet.conv.weight"] + 1.0)
    data.tensors()["ids"].zero_()
    assert int(data.tensors()["ids"].abs().sum()) == 0


def test_many_tiny_chunks_over_many_threads_equal_a_single_threaded_read(pack):
    path, sd = pack
    many = read_pack(path, threads=8, chunk_bytes=ALIGN)
    one = read_pack(path, threads=1, chunk_bytes=64 << 20)
    assert many.stats.chunks > 2 * len(many.layout.blocks)
    assert many.stats.threads == 8 and one.stats.threads == 1
    assert_bit_exact(many.tensors(), one.tensors())
    assert_bit_exact(many.tensors(), sd)


def test_concurrent_loads_in_one_process_return_the_same_tensors(pack):
    path, sd = pack
    results: list[dict] = [{}, {}, {}]

    def load(i):
        results[i] = load_state_dict(path, threads=3, chunk_bytes=ALIGN)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert_bit_exact(r, sd)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_pack(tmp_path / "absent.flashpack")


# ----------------------------------------------------------------------------------------------
# Chunk planning and options


def test_plan_chunks_cut_the_file_on_the_grid_and_cover_it_exactly():
    assert plan_chunks(10_000, ALIGN) == [Chunk(0, 4096), Chunk(4096, 4096), Chunk(8192, 1808)]
    assert plan_chunks(8192, ALIGN) == [Chunk(0, 4096), Chunk(4096, 4096)]
    assert plan_chunks(0, ALIGN) == []


def test_plan_chunks_from_an_offset_start_on_the_next_grid_line():
    assert plan_chunks(10_000, ALIGN, start=100) == [Chunk(100, 3996), Chunk(4096, 4096), Chunk(8192, 1808)]


def test_chunks_hold_whole_checksum_segments():
    assert host_read.effective_chunk_bytes(100 << 20, 8, 32 << 20, grain=8 << 20) == 8 << 20
    assert host_read.effective_chunk_bytes(1000, 8, 32 << 20, grain=8 << 20) == 8 << 20
    assert host_read.effective_chunk_bytes(1 << 30, 8, 12 << 20, grain=8 << 20) == 16 << 20


def test_options_come_from_arguments_then_environment(monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_THREADS", "3")
    monkeypatch.setenv("MODEL_LOADER_CHUNK_MB", "2")
    monkeypatch.setenv("MODEL_LOADER_DIRECT_IO", "0")
    monkeypatch.setenv("MODEL_LOADER_MAP", "never")
    config = LoaderConfig.from_env()
    assert resolve_options(config) == ReadOptions(3, 2 << 20, False, "never")
    assert resolve_options(config, threads=5, chunk_bytes=5000, direct_io=False, mapping="hot") == ReadOptions(
        5, 2 * ALIGN, False, "hot"
    )


def test_an_unknown_mapping_mode_is_named(monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_MAP", "sometimes")
    with pytest.raises(ValueError, match="MODEL_LOADER_MAP='sometimes'"):
        read_file(__file__)


def test_forcing_o_direct_turns_mapping_off():
    assert resolve_options(LoaderConfig(), direct_io=True, mapping="always").mapping == "never"


@pytest.mark.parametrize(("setting", "advised"), [(None, False), ("0", False), ("1", True)])
def test_huge_pages_are_asked_for_only_when_model_loader_hugepages_is_on(monkeypatch, pack, setting, advised):
    if setting is None:
        monkeypatch.delenv("MODEL_LOADER_HUGEPAGES", raising=False)
    else:
        monkeypatch.setenv("MODEL_LOADER_HUGEPAGES", setting)
    calls = []
    monkeypatch.setattr(posix_io, "advise_hugepages", lambda address, nbytes: calls.append(nbytes) or True)
    read_file(pack[0], mapping="never")
    assert bool(calls) is advised


def test_invalid_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_THREADS", "many")
    with pytest.raises(ValueError, match="MODEL_LOADER_THREADS"):
        read_pack(__file__)


# ----------------------------------------------------------------------------------------------
# O_DIRECT and page-cache residency


def test_forced_o_direct_reads_the_same_bytes(pack):
    path, sd = pack
    fd = open_direct(str(path))
    if fd is None:
        pytest.skip(f"O_DIRECT is not supported on the filesystem of {path}")
    os.close(fd)
    data = read_pack(path, threads=4, chunk_bytes=ALIGN, direct_io=True)
    assert data.stats.direct_bytes == data.stats.bytes
    assert data.stats.direct_fallbacks == 0
    assert_bit_exact(data.tensors(), sd)


def test_o_direct_refused_by_the_filesystem_falls_back_to_buffered(pack, monkeypatch):
    path, sd = pack
    if (fd := open_direct(str(path))) is None:
        pytest.skip(f"O_DIRECT is not supported on the filesystem of {path}")
    os.close(fd)

    def refuse(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(posix_io, "pread_direct", refuse)
    data = read_pack(path, threads=2, chunk_bytes=ALIGN, direct_io=True)
    assert data.stats.direct_bytes == 0
    assert data.stats.direct_fallbacks == data.stats.chunks
    assert_bit_exact(data.tensors(), sd)


def test_auto_mode_reads_cold_chunks_direct_and_cached_chunks_buffered(pack):
    path, sd = pack
    if (fd := open_direct(str(path))) is None:
        pytest.skip(f"O_DIRECT is not supported on the filesystem of {path}")
    os.close(fd)
    if not cold_cache_supported(path):
        pytest.skip("POSIX_FADV_DONTNEED does not evict pages here")
    cold = read_pack(path, chunk_bytes=ALIGN, mapping="never")
    assert 0 <= cold.stats.bytes - cold.stats.direct_bytes < 2 * ALIGN
    path.read_bytes()  # now in the page cache
    hot = read_pack(path, chunk_bytes=ALIGN, mapping="never")
    assert hot.stats.direct_bytes == 0
    assert_bit_exact(cold.tensors(), sd)
    assert_bit_exact(hot.tensors(), sd)


def test_residency_is_full_after_reading_and_low_after_dontneed(tmp_path):
    path = tmp_path / "blob"
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())
    path.read_bytes()
    assert posix_io.resident_fraction(path) == 1.0
    drop_page_cache(path)
    after = posix_io.resident_fraction(path)
    if after == 1.0:
        pytest.skip("POSIX_FADV_DONTNEED does not evict pages here")
    assert after < 0.5
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 1 << 20, 0)
        with Residency(fd, 4 << 20) as res:
            assert res.fraction(0, 1 << 20) == 1.0
            assert res.fraction(3 << 20, 1 << 20) < 0.5
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Errors


def test_truncated_file_raises_format_error_naming_the_file(pack):
    path, _ = pack
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FlashPackFormatError, match=re.escape(str(path))):
        read_pack(path)


def test_file_shrinking_during_the_load_raises_format_error(pack, monkeypatch):
    path, _ = pack
    original = host_read.open_checked

    def open_then_shrink(p):
        fd, st = original(p)  # st keeps the size before the file shrinks
        os.truncate(p, st.st_size // 2)
        return fd, st

    monkeypatch.setattr(host_read, "open_checked", open_then_shrink)
    with pytest.raises(FlashPackFormatError, match=re.escape(str(path)) + ".*file ends at byte"):
        read_pack(path, threads=4, chunk_bytes=ALIGN, direct_io=False, mapping="never")
    assert reader_threads() == []


def test_read_error_in_one_thread_stops_the_others_and_propagates(pack, monkeypatch):
    path, _ = pack
    original = posix_io.pread_exact
    calls = []
    lock = threading.Lock()

    def flaky(fd, view, offset, p):
        with lock:
            calls.append(offset)
            n = len(calls)
        if n == 3:
            raise PackReadError(errno.EIO, f"{p}: read failed at byte {offset}: Input/output error")
        time.sleep(0.01)
        original(fd, view, offset, p)

    monkeypatch.setattr(posix_io, "pread_exact", flaky)
    total = len(plan_chunks(path.stat().st_size, ALIGN))
    with pytest.raises(PackReadError, match=re.escape(str(path))):
        read_pack(path, threads=4, chunk_bytes=ALIGN, direct_io=False, mapping="never")
    assert reader_threads() == []
    assert len(calls) <= 3 + 4 < total  # the others stopped after their current chunk


def test_os_error_from_preadv_becomes_pack_read_error_naming_the_file(pack, monkeypatch):
    path, _ = pack

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(posix_io.os, "preadv", broken)
    with pytest.raises(PackReadError, match=re.escape(str(path)) + ".*Input/output error") as info:
        read_pack(path, threads=2, direct_io=False, mapping="never")
    assert info.value.errno == errno.EIO
    assert isinstance(info.value, OSError)


def test_one_info_line_is_logged_per_load(pack, caplog):
    path, _ = pack
    with caplog.at_level(logging.INFO, logger="model_loader.reader"):
        read_pack(path)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 1
    assert re.fullmatch(
        re.escape(f"load {path}: ") + r"\d+\.\d\d GB in \d+\.\d\d s \(\d+\.\d\d GB/s\)( mapped)?, "
        r"\d+ threads \((grid|split)\)", lines[0]
    )


# ----------------------------------------------------------------------------------------------
# The staged (CUDA-shaped) pipeline, run on the host


@pytest.mark.parametrize("direct_io", [False, True])
def test_staged_pipeline_is_bit_exact_with_asynchronous_copies(pack, direct_io):
    path, sd = pack
    if direct_io and (fd := open_direct(str(path))) is None:
        pytest.skip(f"O_DIRECT is not supported on the filesystem of {path}")
    if direct_io:
        os.close(fd)
    engine = HostEngine()
    try:
        data = read_pack(path, threads=3, chunk_bytes=ALIGN, direct_io=direct_io, engine=engine, pool=host_pool())
    finally:
        engine.close()
    assert data.stats.direct_bytes == (data.stats.bytes if direct_io else 0)
    assert_bit_exact(data.tensors(), sd)


def test_staged_loads_return_buffers_to_the_pool_and_reuse_them(pack):
    path, sd = pack
    pool = host_pool()
    engine = HostEngine(max_delay=0.0005)
    try:
        read_pack(path, threads=2, chunk_bytes=ALIGN, engine=engine, pool=pool)
        first = pool.allocations
        assert pool.leased_bytes == 0 and pool.idle_bytes == first * ALIGN
        data = read_pack(path, threads=2, chunk_bytes=ALIGN, engine=engine, pool=pool)
    finally:
        engine.close()
    assert 1 <= first <= 2 * reader.BUFFERS_PER_THREAD
    assert pool.allocations == first
    assert_bit_exact(data.tensors(), sd)


def test_staged_error_releases_the_lease_after_pending_copies(pack, monkeypatch):
    path, _ = pack
    pool = host_pool()
    original = posix_io.pread_exact
    calls = []

    def flaky(fd, view, offset, p):
        calls.append(offset)
        if len(calls) == 5:
            raise PackReadError(errno.EIO, f"{p}: boom")
        original(fd, view, offset, p)

    monkeypatch.setattr(posix_io, "pread_exact", flaky)
    engine = HostEngine(max_delay=0.02)
    copies_pending_at_release = []
    give_back = pool._give_back

    def checked_give_back(buffers):
        copies_pending_at_release.append(sum(not ev.is_set() for ev in engine.events))
        give_back(buffers)

    monkeypatch.setattr(pool, "_give_back", checked_give_back)
    try:
        with pytest.raises(PackReadError, match="boom"):
            read_pack(path, threads=2, chunk_bytes=ALIGN, direct_io=False, engine=engine, pool=pool)
    finally:
        engine.close()
    assert copies_pending_at_release == [0]
    assert reader_threads() == []
    assert pool.leased_bytes == 0 and pool.idle_bytes > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip_is_bit_exact(pack):
    path, sd = pack
    data = read_pack(path, "cuda", threads=4, chunk_bytes=ALIGN)
    assert all(b.is_cuda for b in data.blocks)
    assert_bit_exact({k: v.cpu() for k, v in data.tensors().items()}, sd)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_concurrent_cuda_loads_share_the_pool_without_sharing_buffers(pack):
    path, sd = pack
    results: list[dict] = [{}, {}]

    def load(i):
        results[i] = load_state_dict(path, "cuda", threads=3, chunk_bytes=ALIGN)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert_bit_exact({k: v.cpu() for k, v in r.items()}, sd)


# ----------------------------------------------------------------------------------------------
# Host memory: mapped when in the page cache, owned memory otherwise; checksums as bytes pass


def test_a_pack_is_mapped_by_default_and_writes_stay_in_this_process(pack):
    path, sd = pack
    before = path.read_bytes()
    data = read_pack(path)
    assert data.stats.mapped
    tensors = data.tensors()
    assert_bit_exact(tensors, sd)
    tensors["unet.conv.weight"].add_(1.0)  # copy-on-write: no SIGSEGV, the file is unchanged
    assert path.read_bytes() == before
    assert_bit_exact(read_pack(path).tensors(), sd)


def test_a_pack_read_into_owned_memory_is_bit_exact_and_writable(pack):
    path, sd = pack
    data = read_pack(path, mapping="never", threads=3, chunk_bytes=ALIGN)
    assert not data.stats.mapped
    tensors = data.tensors()
    assert_bit_exact(tensors, sd)
    tensors["unet.norm.weight"].zero_()
    assert not tensors["unet.norm.weight"].any()


@pytest.mark.parametrize("how", ["mapped", "read", "staged"])
def test_a_flipped_byte_fails_the_checksum_naming_its_segment(pack, how):
    path, _ = pack
    checksum = file_checksum(str(path), segment_bytes=ALIGN)
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x01
    path.write_bytes(bytes(data))
    options = {"mapped": {}, "read": {"mapping": "never"}, "staged": {"engine": HostEngine(), "pool": host_pool()}}[how]
    with pytest.raises(ChecksumMismatchError, match=re.escape(f"{path}: bytes 4096-8192 do not match")):
        read_pack(path, checksum=checksum, threads=2, chunk_bytes=ALIGN, **options)


@pytest.mark.parametrize("how", ["mapped", "read", "staged"])
def test_an_intact_pack_passes_its_checksum(pack, how):
    path, sd = pack
    checksum = file_checksum(str(path), segment_bytes=ALIGN)
    options = {"mapped": {}, "read": {"mapping": "never"}, "staged": {"engine": HostEngine(), "pool": host_pool()}}[how]
    data = read_pack(path, checksum=checksum, threads=2, chunk_bytes=ALIGN, **options)
    assert data.stats.checked
    assert_bit_exact(data.tensors(), sd)


def test_a_pack_of_another_size_than_its_checksum_is_refused(pack):
    path, _ = pack
    checksum = file_checksum(str(path))
    with open(path, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ChecksumMismatchError, match=re.escape(str(path)) + ".*truncated or replaced"):
        read_file(path, checksum)


def test_pack_reads_run_in_order_and_raise_each_error_at_its_result(pack, tmp_path):
    path, sd = pack
    reads = background.start_pack_reads([("a", path, None), ("missing", tmp_path / "nope", None), ("b", path, None)])
    assert reads.names == ["a", "missing", "b"]
    assert_bit_exact(reader.pack_from_host(reads.result("a")).tensors(), sd)
    with pytest.raises(FileNotFoundError):
        reads.result("missing")
    assert_bit_exact(reader.pack_from_host(reads.result("b")).tensors(), sd)
    assert reads.wait(5)


def test_starting_cpu_pack_reads_does_not_import_torch(pack):
    import subprocess
    import sys

    path, _ = pack
    code = (
        "import sys\n"
        "from model_loader import start_pack_reads\n"
        f"reads = start_pack_reads([('unet', {str(path)!r}, None)])\n"
        "host = reads.result('unet')\n"
        "print(host.size, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == [str(path.stat().st_size), "False"]


def test_a_bare_cuda_device_is_pinned_to_the_callers_current_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert reader.resolve_device("cuda") == torch.device("cuda", 3)
    assert reader.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert reader.resolve_device("cpu") == torch.device("cpu")


def test_hot_mapping_maps_a_cached_pack_and_reads_a_cold_one(pack):
    path, sd = pack
    path.read_bytes()
    assert read_pack(path, mapping="hot").stats.mapped
    if not cold_cache_supported(path):
        pytest.skip("POSIX_FADV_DONTNEED does not evict pages here")
    cold = read_pack(path, mapping="hot")
    assert not cold.stats.mapped
    assert_bit_exact(cold.tensors(), sd)


def test_the_staging_plan_covers_every_reader_thread_with_two_buffers_of_the_largest_chunk(monkeypatch):
    monkeypatch.setattr(storage, "cpus", lambda: 8)
    count, nbytes = reader.staging_plan([5 << 30, 200 << 20], LoaderConfig(), chunk_bytes=32 << 20)
    assert (count, nbytes) == (16 * reader.BUFFERS_PER_THREAD, 32 << 20)
    assert reader.staging_plan([], LoaderConfig()) == (0, 0)


def test_each_staging_thread_uses_one_stream_for_all_its_buffers(pack):
    path, sd = pack
    engine = HostEngine()
    try:
        data = read_pack(path, threads=3, chunk_bytes=ALIGN, engine=engine, pool=host_pool())
    finally:
        engine.close()
    assert_bit_exact(data.tensors(), sd)
    assert len(engine.streams) == data.stats.threads
    assert len(engine.events) <= data.stats.threads * reader.BUFFERS_PER_THREAD


def test_casting_a_pack_replaces_its_blocks_one_by_one(pack):
    from model_loader.assemble import cast_tensors

    path, sd = pack
    data = read_pack(path)
    originals = list(data.blocks)
    out = cast_tensors(data, torch.float16)
    for before, after, meta in zip(originals, data.blocks, data.layout.blocks, strict=True):
        if meta.dtype.is_floating_point and meta.dtype != torch.float16:
            assert after.dtype == torch.float16 and after is not before  # the pack holds the cast one
        else:
            assert after is before
    assert torch.equal(out["unet.conv.weight"], sd["unet.conv.weight"].half())
    assert torch.equal(out["ids"], sd["ids"])
