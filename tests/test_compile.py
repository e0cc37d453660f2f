"""serving.compile without compiling: [compile] in fal.toml, the cache key, and the inductor cache
archive's round trip on the volume. (Compiling the demo for real: test_compile_inductor.py.)"""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from serving.compile import (
    CACHE_DIR,
    INDUCTOR_CACHE_ENV,
    CacheKey,
    CompileError,
    InductorCache,
    cache_key,
    check_compiler,
    compile_denoiser,
    denoiser,
)
from serving.settings import SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]
FAL_TOML = (REPO / "fal.toml").read_text()
ENTRY = "demo-seed0-7adcd64c94376e6d"


@pytest.fixture(autouse=True)
def _inductor_env(monkeypatch):
    """InductorCache.open() points TORCHINDUCTOR_CACHE_DIR at its directory: put it back afterwards."""
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, "/nonexistent/before-the-test")


DEMO_WARMUP = 'warmup_sizes = ["square_hd"]\nwarmup_steps = 1'


def demo_settings(tmp_path: Path, compile_table: str = "enabled = true", warmup_sizes: str = '["square_hd"]'):
    """The demo profile with ``[profiles.demo.compile]`` and the demo's warm-up sizes replaced."""
    assert FAL_TOML.count(DEMO_WARMUP) == 1, "fal.toml's demo warm-up changed"
    text = FAL_TOML.replace(DEMO_WARMUP, f"warmup_sizes = {warmup_sizes}\nwarmup_steps = 1")
    path = tmp_path / "fal.toml"
    path.write_text(f"{text}\n[profiles.demo.compile]\n{compile_table}\n")
    return load_settings(path, profile="demo")


# --------------------------------------------------------------------------------------------------
# [compile] in fal.toml


def test_compile_is_off_in_every_profile_of_fal_toml():
    for profile in ("", "demo"):
        assert load_settings(REPO / "fal.toml", profile=profile).compile.enabled is False


def test_compile_off_leaves_the_pipeline_and_inductor_alone(tmp_path):
    class Untouchable:
        def compile(self, **_):
            raise AssertionError("compiled although [compile] is off")

    settings = load_settings(REPO / "fal.toml", profile="demo")
    result = compile_denoiser(SimpleNamespace(unet=Untouchable()), settings, root=tmp_path, store_path=tmp_path / ENTRY,
                              device="cpu")
    assert result is None
    assert os.environ[INDUCTOR_CACHE_ENV] == "/nonexistent/before-the-test"
    assert not (tmp_path / CACHE_DIR).exists()


def test_compile_table_takes_mode_and_dynamic(tmp_path):
    settings = demo_settings(tmp_path, 'enabled = true\nmode = "max-autotune"\ndynamic = true')
    assert (settings.compile.enabled, settings.compile.mode, settings.compile.dynamic) == (True, "max-autotune", True)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("enabled = true\nfullgraph = true", "compile.fullgraph: unknown key"),
        ('enabled = true\nmode = "fast"', "compile.mode: Input should be 'default', 'reduce-overhead', 'max-autotune'"),
        ('enabled = "yes"', "compile.enabled: Input should be a valid boolean"),
        ("enabled = 1", "compile.enabled: Input should be a valid boolean"),
    ],
)
def test_a_bad_compile_setting_is_refused_naming_the_key(tmp_path, table, message):
    with pytest.raises(SettingsError, match="profile 'demo'") as info:
        demo_settings(tmp_path, table)
    assert message in str(info.value)


def test_compile_without_warmup_sizes_is_refused_naming_the_key(tmp_path):
    with pytest.raises(SettingsError) as info:
        demo_settings(tmp_path, "enabled = true", "[]")
    assert "compile.enabled: compiling needs at least one serving.warmup_sizes entry" in str(info.value)


# --------------------------------------------------------------------------------------------------
# The cache key


def test_the_key_of_a_start_names_its_device_torch_store_entry_and_warmup_shapes(tmp_path):
    settings = demo_settings(tmp_path, 'enabled = true\nmode = "default"')
    key = cache_key(settings, store_path=tmp_path / ENTRY, device="cpu")
    assert key.device.startswith("cpu ") and torch.backends.cpu.get_cpu_capability() in key.device
    assert key.torch == f"torch {torch.__version__}"
    assert key.entry == ENTRY
    assert key.shapes == ((64, 64),)  # the demo's square_hd
    assert (key.guided, key.mode, key.dynamic) == (True, "default", False)
    assert cache_key(settings, store_path=tmp_path / ENTRY, device="cpu") == key  # the next start: the same key
    archive = key.archive(tmp_path)
    assert archive.parent.parent == tmp_path / CACHE_DIR
    assert archive.name == f"{ENTRY}-{key.digest()}.zip"


def test_warmup_sizes_in_another_order_are_the_same_shape_set(tmp_path):
    one = demo_settings(tmp_path, "enabled = true", '["portrait_4_3", "square_hd"]')
    other = demo_settings(tmp_path, "enabled = true", '["square_hd", "portrait_4_3", "square"]')
    key = cache_key(one, store_path=ENTRY, device="cpu")
    assert key.shapes == ((48, 64), (64, 64))
    assert cache_key(other, store_path=ENTRY, device="cpu") == key


BASE_KEY = CacheKey(device="cuda NVIDIA H100 80GB HBM3 sm_90 CUDA 12.8", torch="torch 2.13.0+cu128 triton 3.6.0",
                    python="3.11.7", entry=ENTRY, shapes=((1024, 1024),), guided=True, mode="default", dynamic=False)


@pytest.mark.parametrize(
    "change",
    [
        {"device": "cuda NVIDIA A100-SXM4-80GB sm_80 CUDA 12.8"},  # another GPU
        {"device": "cpu x86_64 AMD EPYC 7B13 AVX2"},  # a CPU
        {"torch": "torch 2.14.0+cu128 triton 3.6.0"},
        {"torch": "torch 2.13.0+cu128 triton 3.7.0"},
        {"python": "3.12.1"},
        {"entry": "stabilityai-stable-diffusion-xl-base-1.0-0123456789abcdef"},  # another model, revision or dtype
        {"shapes": ((1024, 1024), (768, 1024))},
        {"shapes": ((512, 512),)},
        {"guided": False},
        {"mode": "max-autotune"},
        {"dynamic": True},
    ],
)
def test_a_start_that_differs_in_anything_compiled_code_depends_on_gets_another_archive(tmp_path, change):
    other = dataclasses.replace(BASE_KEY, **change)
    assert other.digest() != BASE_KEY.digest()
    assert other.archive(tmp_path) != BASE_KEY.archive(tmp_path)


def test_archives_of_different_machines_live_in_different_directories(tmp_path):
    a100 = dataclasses.replace(BASE_KEY, device="cuda NVIDIA A100-SXM4-80GB sm_80 CUDA 12.8")
    assert BASE_KEY.archive(tmp_path).parent.name == "cuda-NVIDIA-H100-80GB-HBM3-sm-90-CUDA-12.8"
    assert a100.archive(tmp_path).parent != BASE_KEY.archive(tmp_path).parent


# --------------------------------------------------------------------------------------------------
# The archive on the volume


def opened(tmp_path: Path, archive: Path) -> InductorCache:
    return InductorCache(archive, local_root=tmp_path / "local").open()


def test_a_published_cache_is_what_the_next_start_unpacks(tmp_path):
    archive = tmp_path / "volume" / "key.zip"
    first = opened(tmp_path, archive)
    assert os.environ[INDUCTOR_CACHE_ENV] == str(first.directory) and first.found == {}
    (first.directory / "fxgraph" / "ab").mkdir(parents=True)
    (first.directory / "fxgraph" / "ab" / "entry").write_bytes(b"compiled graph")
    (first.directory / "kernel.so").write_bytes(b"\x7fELF kernel")
    assert first.publish() == 2
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["fxgraph/ab/entry", "kernel.so"]

    second = opened(tmp_path, archive)
    assert second.directory != first.directory
    assert os.environ[INDUCTOR_CACHE_ENV] == str(second.directory)
    assert (second.directory / "fxgraph" / "ab" / "entry").read_bytes() == b"compiled graph"
    assert (second.directory / "kernel.so").read_bytes() == b"\x7fELF kernel"
    assert second.found == {"fxgraph/ab/entry": 14, "kernel.so": 11}


def test_a_warm_up_that_compiled_nothing_leaves_the_archive_untouched(tmp_path, caplog):
    archive = tmp_path / "volume" / "key.zip"
    first = opened(tmp_path, archive)
    (first.directory / "entry").write_bytes(b"graph")
    first.publish()
    before = archive.stat()
    second = opened(tmp_path, archive)
    with caplog.at_level(logging.INFO, logger="serving.compile"):
        assert second.publish() == 0
    after = archive.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert f"compile: nothing compiled, every graph came from {archive} (1 file(s))" in caplog.text


def test_a_warm_up_that_compiled_more_saves_everything_again(tmp_path):
    archive = tmp_path / "volume" / "key.zip"
    first = opened(tmp_path, archive)
    (first.directory / "old").write_bytes(b"1")
    first.publish()
    second = opened(tmp_path, archive)
    (second.directory / "new").write_bytes(b"2")
    assert second.publish() == 1
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["new", "old"]


def test_lock_files_are_neither_compared_nor_saved(tmp_path):
    archive = tmp_path / "volume" / "key.zip"
    cache = opened(tmp_path, archive)
    (cache.directory / "locks").mkdir()
    (cache.directory / "locks" / "ab.lock").touch()
    (cache.directory / "entry.lock").touch()
    assert cache.publish() == 0
    assert not archive.exists()


def test_a_damaged_archive_is_ignored_and_replaced_by_the_warm_ups_cache(tmp_path, caplog):
    archive = tmp_path / "volume" / "key.zip"
    archive.parent.mkdir()
    archive.write_bytes(b"PK\x03\x04 not really a zip")
    with caplog.at_level(logging.WARNING, logger="serving.compile"):
        cache = opened(tmp_path, archive)
    assert f"compile: the cache {archive} cannot be read" in caplog.text
    assert cache.found == {} and list(cache.directory.iterdir()) == []
    (cache.directory / "entry").write_bytes(b"graph")
    assert cache.publish() == 1
    assert zipfile.ZipFile(archive).namelist() == ["entry"]


def test_a_cache_that_cannot_be_saved_is_logged_and_the_start_goes_on(tmp_path, caplog):
    (tmp_path / "volume").write_text("a file where the archive's directory should be")
    archive = tmp_path / "volume" / "key.zip"
    cache = opened(tmp_path, archive)
    (cache.directory / "entry").write_bytes(b"graph")
    with caplog.at_level(logging.WARNING, logger="serving.compile"):
        assert cache.publish() == 1
    assert f"compile: the cache could not be saved to {archive}" in caplog.text
    assert "the next start compiles again" in caplog.text


def test_local_directories_of_ended_processes_are_removed_and_live_ones_kept(tmp_path):
    from conversion.durable import host_tag

    local = tmp_path / "local"
    local.mkdir()
    dead = local / f".other-key.{host_tag()}.999999999.0123abcd.work"  # no such pid
    alive = local / f".other-key.{host_tag()}.{os.getpid()}.0123abcd.work"
    dead.mkdir()
    alive.mkdir()
    opened(tmp_path, tmp_path / "volume" / "key.zip")
    assert not dead.exists() and alive.exists()


# --------------------------------------------------------------------------------------------------
# What compiling needs


def test_the_denoiser_is_the_transformer_or_else_the_unet():
    assert denoiser(SimpleNamespace(unet="u"))[0] == "unet"
    assert denoiser(SimpleNamespace(transformer="t", unet=None))[0] == "transformer"
    with pytest.raises(CompileError, match=r"has no transformer or unet to compile; set \[compile\] enabled = false"):
        denoiser(SimpleNamespace(vae="v"))


def test_compiling_on_a_cpu_without_a_cxx_compiler_is_refused_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no g++, c++ or clang++
    with pytest.raises(CompileError) as info:
        check_compiler("cpu")
    assert "inductor needs a compiler on cpu and none of g++, c++, clang++ is on PATH" in str(info.value)
    assert "set [compile] enabled = false" in str(info.value)
