"""conversion.writer: atomic, durable, streaming writes and safetensors packing."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conversion.errors import ConversionError, DiskFullError
from conversion.writer import pack_safetensors, pack_state_dict, stored_dtype, write_pack
from model_loader import load_state_dict

REPO = Path(__file__).resolve().parents[1]


def small_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "conv.weight": torch.randn(4, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g).half(),
        "norm.weight": torch.randn(6, generator=g).bfloat16(),
        "position_ids": torch.arange(0, 3000, 100),
        "mask": torch.tensor([True, False]),
    }


def specs_of(sd: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def test_exception_mid_write_leaves_no_temp_and_keeps_old_destination(tmp_path):
    dst = tmp_path / "model.flashpack"
    pack_state_dict({"old": torch.ones(3)}, dst)
    old = dst.read_bytes()
    sd = small_state_dict()
    calls = []

    def get_tensor(name: str) -> torch.Tensor:
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("source read failed")
        return sd[name]

    with pytest.raises(RuntimeError, match="source read failed"):
        write_pack(specs_of(sd), get_tensor, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.flashpack"]
    assert dst.read_bytes() == old


def test_get_tensor_called_once_per_tensor_in_file_order(tmp_path):
    sd = small_state_dict()
    calls = []

    def get_tensor(name: str) -> torch.Tensor:
        calls.append(name)
        return sd[name]

    layout = write_pack(specs_of(sd), get_tensor, tmp_path / "m.flashpack")
    assert calls == layout.names()
    assert sorted(calls) == sorted(sd)


def test_getter_returning_wrong_shape_raises_and_leaves_nothing(tmp_path):
    sd = small_state_dict()
    with pytest.raises(ConversionError, match=r"'conv.weight' has shape \(36,\), expected \(4, 3, 3\)"):
        write_pack(specs_of(sd), lambda n: sd[n].reshape(-1), tmp_path / "m.flashpack")
    assert list(tmp_path.iterdir()) == []


def test_written_file_is_mode_0644_even_with_restrictive_umask(tmp_path):
    old_umask = os.umask(0o077)
    try:
        pack_state_dict(small_state_dict(), tmp_path / "m.flashpack")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "m.flashpack").stat().st_mode) == 0o644


def test_rewrite_replaces_existing_destination(tmp_path):
    dst = tmp_path / "m.flashpack"
    pack_state_dict({"old": torch.ones(3)}, dst)
    pack_state_dict(small_state_dict(), dst)
    assert sorted(load_state_dict(dst)) == sorted(small_state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.flashpack"]


_DISK_FULL_CHILD = """
import resource, signal, sys
import torch
from conversion.errors import DiskFullError
from conversion.writer import pack_state_dict

sd = {"w": torch.zeros(1 << 18)}  # 1 MiB, over the 64 KiB file-size limit below
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
try:
    pack_state_dict(sd, sys.argv[1])
except DiskFullError as exc:
    print(f"DiskFullError: {exc}")
    sys.exit(0)
sys.exit(3)
"""


def test_full_disk_raises_disk_full_error_and_leaves_no_temp(tmp_path):
    dst = tmp_path / "out" / "m.flashpack"
    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_CHILD, str(dst)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"DiskFullError: no space left writing {dst}")
    assert list(dst.parent.iterdir()) == []


def test_stored_dtype_casts_floats_only():
    assert stored_dtype(torch.float32, torch.float16) == torch.float16
    assert stored_dtype(torch.float8_e4m3fn, torch.bfloat16) == torch.bfloat16
    assert stored_dtype(torch.int64, torch.float16) == torch.int64
    assert stored_dtype(torch.bool, torch.float16) == torch.bool
    assert stored_dtype(torch.complex64, torch.float16) == torch.complex64
    assert stored_dtype(torch.float32, None) == torch.float32


@pytest.mark.parametrize("target", [None, torch.float16])
def test_pack_safetensors_equals_pack_state_dict(tmp_path, target):
    save_file(small_state_dict(), tmp_path / "m.safetensors")
    sd = load_file(tmp_path / "m.safetensors")  # the file's own tensor order
    pack_safetensors([tmp_path / "m.safetensors"], tmp_path / "a.flashpack", target_dtype=target)
    pack_state_dict(sd, tmp_path / "b.flashpack", target_dtype=target)
    assert (tmp_path / "a.flashpack").read_bytes() == (tmp_path / "b.flashpack").read_bytes()


def test_pack_safetensors_shards_equal_merged_state_dict(tmp_path):
    sd = small_state_dict()
    names = list(sd)
    save_file({k: sd[k] for k in names[:2]}, tmp_path / "s1.safetensors")
    save_file({k: sd[k] for k in names[2:]}, tmp_path / "s2.safetensors")
    merged = {**load_file(tmp_path / "s1.safetensors"), **load_file(tmp_path / "s2.safetensors")}
    pack_safetensors([tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"], tmp_path / "a.flashpack")
    pack_state_dict(merged, tmp_path / "b.flashpack")
    assert (tmp_path / "a.flashpack").read_bytes() == (tmp_path / "b.flashpack").read_bytes()


def test_pack_safetensors_rejects_tensor_in_two_shards(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "s2.safetensors")
    with pytest.raises(ConversionError, match="tensor 'w' appears in more than one shard"):
        pack_safetensors([tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"], tmp_path / "m.flashpack")
    assert not (tmp_path / "m.flashpack").exists()


def test_pack_safetensors_rejects_a_file_that_is_not_safetensors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ConversionError, match=f"{bad}: not a readable safetensors file"):
        pack_safetensors([bad], tmp_path / "m.flashpack")


def test_disk_full_error_is_a_conversion_error():
    assert issubclass(DiskFullError, ConversionError)


def test_a_pack_is_hashed_as_it_is_written_to_the_digests_of_its_bytes(tmp_path):
    import hashlib

    from model_loader.checksum import file_checksum

    sd = small_state_dict()
    path = tmp_path / "m.flashpack"
    digests = {}
    write_pack(specs_of(sd), sd.__getitem__, path, digests=digests)
    data = path.read_bytes()
    assert digests == {path: (hashlib.sha256(data).hexdigest(), file_checksum(str(path)))}


def test_a_failed_write_records_no_digest(tmp_path):
    sd = small_state_dict()
    digests = {}

    def broken(name):
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError):
        write_pack(specs_of(sd), broken, tmp_path / "m.flashpack", digests=digests)
    assert digests == {}
