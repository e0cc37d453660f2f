"""Background page-cache prefetch: harmless on missing paths, fills the cache, yields to loads."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import model_loader.io as mio
from conversion.writer import pack_state_dict
from model_loader.prefetch import Prefetch, claim, prefetch
from model_loader.reader import read_pack


def write_blob(path, nbytes: int = 4 << 20):
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())
    return path


def make_cold(path) -> None:
    mio.drop_page_cache(path)
    if mio.resident_fraction(path) >= 0.5:
        pytest.skip("POSIX_FADV_DONTNEED does not evict pages here")


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("model_loader-prefetch")]


def test_prefetch_of_missing_paths_and_directories_is_harmless(tmp_path):
    handle = prefetch([tmp_path / "nope.flashpack", str(tmp_path / "also" / "missing"), tmp_path])
    assert handle.wait(timeout=10)
    assert handle.done and handle.bytes_read == 0


def test_prefetch_pulls_a_cold_file_into_the_page_cache(tmp_path):
    path = write_blob(tmp_path / "blob")
    make_cold(path)
    handle = prefetch([path, tmp_path / "missing"], threads=3, chunk_bytes=1 << 20)
    assert handle.wait(timeout=30)
    assert mio.resident_fraction(path) == 1.0
    assert 0 < handle.bytes_read <= 4 << 20


def test_prefetch_skips_chunks_already_in_the_page_cache(tmp_path):
    path = write_blob(tmp_path / "blob")
    path.read_bytes()
    handle = prefetch([path], threads=2, chunk_bytes=1 << 20)
    assert handle.wait(timeout=30)
    assert handle.bytes_read == 0


def test_prefetch_threads_are_daemons_and_end_when_done(tmp_path):
    path = write_blob(tmp_path / "blob")
    make_cold(path)
    handle = prefetch([path], threads=2, chunk_bytes=1 << 20)
    assert all(t.daemon for t in prefetch_threads())
    assert handle.wait(timeout=30)
    handle._coordinator.join(timeout=10)
    assert prefetch_threads() == []


def gate_open(monkeypatch) -> threading.Event:
    """Hold every prefetch before it opens its files until the returned event is set."""
    gate = threading.Event()
    original = Prefetch._open

    def gated(self, path):
        gate.wait(timeout=30)
        return original(self, path)

    monkeypatch.setattr(Prefetch, "_open", gated)
    return gate


def test_claimed_file_is_not_read_by_the_prefetch(tmp_path, monkeypatch):
    path = write_blob(tmp_path / "blob")
    make_cold(path)
    gate = gate_open(monkeypatch)
    handle = prefetch([path], threads=2, chunk_bytes=1 << 20)
    st = os.stat(path)
    claim(st.st_dev, st.st_ino)
    gate.set()
    assert handle.wait(timeout=30)
    assert handle.bytes_read == 0


def test_a_load_takes_its_file_over_from_a_running_prefetch(tmp_path, monkeypatch):
    loaded = tmp_path / "a.flashpack"
    other = write_blob(tmp_path / "b.bin", 1 << 20)
    sd = {"w": torch.arange(300_000, dtype=torch.float32)}
    pack_state_dict(sd, loaded)
    make_cold(loaded)
    make_cold(other)
    gate = gate_open(monkeypatch)
    handle = prefetch([loaded, other], threads=2, chunk_bytes=1 << 20)
    data = read_pack(loaded, direct_io=False)
    gate.set()
    assert handle.wait(timeout=30)
    assert handle.bytes_read == 1 << 20  # only the other file
    assert torch.equal(data.tensors()["w"], sd["w"])


def test_cancel_stops_the_prefetch(tmp_path, monkeypatch):
    path = write_blob(tmp_path / "blob")
    make_cold(path)
    gate = gate_open(monkeypatch)
    handle = prefetch([path], threads=2, chunk_bytes=1 << 20)
    handle.cancel()
    gate.set()
    assert handle.wait(timeout=30)
    assert handle.bytes_read == 0


def test_invalid_prefetch_thread_count_in_the_environment_is_rejected(monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_PREFETCH_THREADS", "0")
    with pytest.raises(ValueError, match="MODEL_LOADER_PREFETCH_THREADS"):
        prefetch([])
