"""Reads of packs in the background: the config read once at the call, torch-free for the CPU,
the reader reached only for another device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conversion.writer import pack_state_dict
from model_loader import background, reader
from model_loader.config import LoaderConfig
from model_loader.errors import ConfigError
from model_loader.host_read import HostFile
from model_loader.reader import PackData

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pack(tmp_path):
    path = tmp_path / "model.flashpack"
    sd = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(7, dtype=torch.bfloat16)}
    pack_state_dict(sd, path)
    return path, sd


def test_the_environment_is_read_once_when_the_reads_start(monkeypatch, pack):
    path, _ = pack
    calls = []
    real = LoaderConfig.from_env.__func__
    monkeypatch.setattr(LoaderConfig, "from_env", classmethod(lambda cls, env=None: calls.append(1) or real(cls, env)))
    reads = background.start_pack_reads([(name, path, None) for name in ("a", "b", "c")])
    assert all(isinstance(reads.result(name), HostFile) for name in reads.names)
    assert len(calls) == 1


def test_a_bad_setting_is_refused_at_the_call_not_in_a_background_read(monkeypatch, pack):
    monkeypatch.setenv("MODEL_LOADER_MAP", "sometimes")
    with pytest.raises(ConfigError, match="MODEL_LOADER_MAP='sometimes'"):
        background.start_pack_reads([("a", pack[0], None)])


def test_a_config_given_wins_over_the_environment(monkeypatch, pack):
    monkeypatch.setenv("MODEL_LOADER_MAP", "always")
    reads = background.start_pack_reads([("a", pack[0], None)], config=LoaderConfig(mapping="never"))
    assert not reads.result("a").stats.mapped


def test_reads_for_another_device_go_through_the_reader_with_the_same_config(pack):
    path, sd = pack
    reads = background.start_pack_reads([("a", path, None)], "meta", LoaderConfig(mapping="never"))
    data = reads.result("a")
    assert isinstance(data, PackData)
    assert not data.stats.mapped
    assert {name: (t.device.type, t.dtype, tuple(t.shape)) for name, t in data.tensors().items()} == {
        name: ("meta", t.dtype, tuple(t.shape)) for name, t in sd.items()
    }


def test_reads_for_a_gpu_reserve_staging_first_and_pass_the_config_down(monkeypatch, pack):
    path, _ = pack
    calls = []
    monkeypatch.setattr(reader, "reserve_staging", lambda sizes, config: calls.append(("reserve", sizes, config)))
    monkeypatch.setattr(reader, "read_pack", lambda p, device, checksum, config: calls.append(
        ("read", p, device, config)) or "on the device")
    config = LoaderConfig(threads=2)
    reads = background.start_pack_reads([("a", path, None)], "cuda:1", config)
    assert reads.result("a") == "on the device"
    assert calls == [("reserve", [path.stat().st_size], config), ("read", path, "cuda:1", config)]


def test_cpu_reads_in_the_background_import_neither_torch_nor_the_reader(pack):
    path, _ = pack
    code = (
        "import sys\n"
        "from model_loader.background import start_pack_reads\n"
        f"reads = start_pack_reads([('unet', {str(path)!r}, None)])\n"
        "host = reads.result('unet')\n"
        "print(host.size, 'torch' in sys.modules, 'model_loader.reader' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_LOADER_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    assert out.stdout.split() == [str(path.stat().st_size), "False", "False"]
