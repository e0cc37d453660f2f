"""The read plan follows the file system: a grid of chunks over one descriptor (or a mapping) on a
local disk; on FUSE (fal's /data is JuiceFS) each reader thread its own descriptor and contiguous
part, O_DIRECT for what is not cached, a mapping only when the pack is in the page cache."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from conversion.writer import pack_state_dict
from model_loader import host_read, storage
from model_loader.checksum import file_checksum
from model_loader.config import LoaderConfig
from model_loader.host_read import Chunk, plan_chunks, split_runs
from model_loader.reader import read_pack
from model_loader.storage import Storage, plan_read
from tests.test_reader import HostEngine, assert_bit_exact, cold_cache_supported, host_pool, mixed_state_dict

LOCAL = Storage("local", "ext4")
FUSE = Storage("fuse", "fuse.juicefs")


def big_state_dict() -> dict[str, torch.Tensor]:
    """About 40 MB over three dtypes: several 8 MiB checksum segments for several threads."""
    g = torch.Generator().manual_seed(1)
    return {
        **mixed_state_dict(),
        "big.a": torch.randn(4096, 1024, generator=g).half(),
        "big.b": torch.randn(2048, 2048, generator=g),
        "big.c": torch.randn(3000, 1001, generator=g).to(torch.bfloat16),
    }


@pytest.fixture(scope="module")
def big_pack(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "model.flashpack"
    sd = big_state_dict()
    pack_state_dict(sd, path)
    return path, sd


# ----------------------------------------------------------------------------------------------
# The plan


def test_a_local_disk_maps_the_pack_and_shares_one_descriptor():
    plan = plan_read(LOCAL, resident=0.0)
    assert (plan.mapped, plan.prefetch, plan.layout, plan.direct_io) == (True, False, "grid", None)


def test_fuse_reads_a_cold_pack_split_into_the_page_cache_then_maps_it():
    plan = plan_read(FUSE, resident=0.0)
    assert (plan.mapped, plan.prefetch, plan.layout, plan.direct_io) == (True, True, "split", None)


def test_fuse_maps_a_pack_that_is_in_the_page_cache_without_reading_it_first():
    plan = plan_read(FUSE, resident=1.0)
    assert (plan.mapped, plan.prefetch, plan.layout) == (True, False, "grid")


def test_fuse_reads_a_cold_pack_into_owned_memory_split_with_o_direct_when_mapping_is_only_for_hot_packs():
    plan = plan_read(FUSE, resident=0.0, mapping="hot")
    assert (plan.mapped, plan.prefetch, plan.layout, plan.direct_io) == (False, False, "split", None)


def test_settings_win_over_what_the_storage_suggests():
    plan = plan_read(FUSE, resident=0.0, mapping="always", layout="grid", threads=3, direct_io=False)
    assert (plan.mapped, plan.layout, plan.threads, plan.direct_io) == (True, "grid", 3, False)
    assert plan_read(LOCAL, resident=0.0, mapping="never", layout="split").layout == "split"
    assert not plan_read(LOCAL, resident=1.0, direct_io=True).mapped


def test_the_staging_path_never_maps():
    assert not plan_read(FUSE, resident=1.0, can_map=False).mapped
    plan = plan_read(FUSE, resident=0.0, can_map=False)
    assert (plan.mapped, plan.prefetch, plan.layout) == (False, False, "split")


def test_default_threads_exceed_the_cores_only_for_files_not_in_the_page_cache(monkeypatch):
    monkeypatch.setattr(storage, "cpus", lambda: 2)
    assert storage.default_threads(resident=0.0) == 8
    assert storage.default_threads(resident=1.0) == 2
    assert storage.default_threads(resident=0.0, storage=FUSE) == 4
    monkeypatch.setattr(storage, "cpus", lambda: 64)
    assert storage.default_threads(resident=0.0) == storage.default_threads(resident=1.0) == 16
    assert storage.default_threads(resident=0.0, storage=FUSE) == 16


def test_a_local_directory_is_local_storage(tmp_path):
    assert storage.storage_of(tmp_path).kind == "local"


def test_the_layout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_LAYOUT", "split")
    assert host_read.resolve_options(LoaderConfig.from_env()).layout == "split"
    monkeypatch.setenv("MODEL_LOADER_LAYOUT", "auto")
    assert host_read.resolve_options(LoaderConfig.from_env()).layout is None
    monkeypatch.setenv("MODEL_LOADER_LAYOUT", "diagonal")
    with pytest.raises(ValueError, match="MODEL_LOADER_LAYOUT='diagonal'"):
        LoaderConfig.from_env()


# ----------------------------------------------------------------------------------------------
# Split runs


def test_split_runs_are_contiguous_cover_every_chunk_once_and_are_balanced():
    chunks = plan_chunks(100 << 20, 8 << 20)
    runs = split_runs(chunks, 4)
    assert [c for run in runs for c in run] == chunks
    assert len(runs) == 4
    sizes = [sum(c.length for c in run) for run in runs]
    assert max(sizes) - min(sizes) <= 8 << 20


def test_split_runs_never_make_more_runs_than_chunks():
    assert split_runs([Chunk(0, 4096), Chunk(4096, 4096)], 8) == [[Chunk(0, 4096)], [Chunk(4096, 4096)]]
    assert split_runs([], 4) == []


def _reader_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("direct_io", [None, True, False])
def test_a_split_read_is_bit_exact_and_checked(big_pack, direct_io):
    path, sd = big_pack
    data = read_pack(path, checksum=file_checksum(str(path)), mapping="never", layout="split", threads=3,
                     chunk_bytes=8 << 20, direct_io=direct_io)
    assert data.stats.layout == "split" and data.stats.threads == 3 and data.stats.checked
    assert_bit_exact(data.tensors(), sd)


def test_each_split_reader_thread_opens_its_own_descriptor_and_closes_it(big_pack, monkeypatch):
    path, sd = big_pack
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def counting_open(p, flags, *args):
        fd = real_open(p, flags, *args)
        if os.fspath(p) == str(path):
            opened.append((threading.current_thread().name, fd))
        return fd

    before = _reader_fds()
    monkeypatch.setattr(host_read.os, "open", counting_open)
    data = read_pack(path, mapping="never", layout="split", threads=3, chunk_bytes=8 << 20, direct_io=False)
    monkeypatch.undo()
    reader_threads = {name for name, _ in opened if name.startswith("model_loader-reader")}
    assert len(reader_threads) == 3
    assert _reader_fds() == before
    assert_bit_exact(data.tensors(), sd)


def test_the_staged_path_reads_split_too(big_pack):
    path, sd = big_pack
    engine = HostEngine()
    try:
        data = read_pack(path, checksum=file_checksum(str(path)), threads=3, chunk_bytes=8 << 20, layout="split",
                         engine=engine, pool=host_pool())
    finally:
        engine.close()
    assert data.stats.layout == "split"
    assert_bit_exact(data.tensors(), sd)


def test_a_corrupt_segment_in_a_split_read_is_named(big_pack, tmp_path):
    from model_loader.errors import ChecksumMismatchError

    path, _ = big_pack
    checksum = file_checksum(str(path))
    bad = tmp_path / "bad.flashpack"
    raw = bytearray(path.read_bytes())
    raw[20 << 20] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatchError, match="bad.flashpack"):
        read_pack(bad, checksum=checksum, mapping="never", layout="split", threads=3, chunk_bytes=8 << 20)


# ----------------------------------------------------------------------------------------------
# On a real JuiceFS mount


@pytest.fixture(scope="module")
def pack_on_volume(juicefs_volume, big_pack):
    src, sd = big_pack
    dst = juicefs_volume.mount("a") / "storage-test" / "model.flashpack"
    dst.parent.mkdir(exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst, sd


def cold_on_the_mount(volume, path):
    """The pack's checksum, taken before every block of it is dropped from the page cache and the
    node cache (the object tier); skips where the page cache cannot be dropped."""
    checksum = file_checksum(str(path))
    volume.set_tier("object", [path])
    if not cold_cache_supported(path):
        pytest.skip("the page cache of the mount could not be dropped")
    return checksum


def test_a_juicefs_mount_is_fuse_storage(pack_on_volume):
    path, _ = pack_on_volume
    found = storage.storage_of(path)
    assert (found.kind, found.name) == ("fuse", "fuse.juicefs")


def test_a_cold_pack_on_juicefs_is_read_split_into_the_page_cache_checked_and_mapped(juicefs_volume, pack_on_volume):
    path, sd = pack_on_volume
    checksum = cold_on_the_mount(juicefs_volume, path)
    data = read_pack(path, checksum=checksum)
    stats = data.stats
    assert (stats.mapped, stats.prefetched, stats.layout, stats.storage) == (True, True, "split", "fuse.juicefs")
    assert stats.checked and stats.direct_bytes == 0
    assert_bit_exact(data.tensors(), sd)


def test_a_damaged_cold_pack_on_juicefs_is_named_by_its_checksum(juicefs_volume, pack_on_volume):
    from model_loader.errors import ChecksumMismatchError

    path, _ = pack_on_volume
    checksum = file_checksum(str(path))
    bad = path.with_name("damaged.flashpack")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    juicefs_volume.set_tier("object", [bad])
    with pytest.raises(ChecksumMismatchError, match="damaged.flashpack"):
        read_pack(bad, checksum=checksum)


def test_a_cold_pack_on_juicefs_read_into_owned_memory_uses_o_direct(juicefs_volume, pack_on_volume):
    path, sd = pack_on_volume
    checksum = cold_on_the_mount(juicefs_volume, path)
    data = read_pack(path, checksum=checksum, mapping="hot")
    assert (data.stats.mapped, data.stats.layout) == (False, "split")
    assert data.stats.direct_bytes == data.stats.bytes
    assert_bit_exact(data.tensors(), sd)


def test_a_hot_pack_on_juicefs_is_mapped(juicefs_volume, pack_on_volume):
    path, sd = pack_on_volume
    juicefs_volume.set_tier("hot", [path])
    data = read_pack(path, checksum=file_checksum(str(path)))
    assert data.stats.mapped
    assert_bit_exact(data.tensors(), sd)
