"""``python -m conversion``: real subprocess runs for each command, in-process runs for the
argument and error paths (no torch import per case)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conversion import cli
from conversion.manifest import MANIFEST_NAME, verify_converted, write_manifest
from conversion.sources import directory_fingerprint
from conversion.writer import pack_safetensors, pack_state_dict
from model_loader import load_state_dict, read_layout

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conversion", *map(str, args)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "conv.weight": torch.randn(4, 3, 3, generator=g),
        "norm.bias": torch.randn(6, generator=g).bfloat16(),
        "scale": torch.tensor(0.5),
        "position_ids": torch.arange(2040, 2060),
    }


@pytest.fixture
def safetensors_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(state_dict(), path)
    return path


@pytest.fixture
def pack(tmp_path) -> Path:
    path = tmp_path / "model.flashpack"
    pack_state_dict(state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------
# Subprocess runs: the real entry point


def test_pack_writes_a_flashpack_with_target_dtype_and_align(tmp_path, safetensors_file):
    dst = tmp_path / "out.flashpack"
    proc = run_cli("pack", safetensors_file, dst, "--dtype", "fp16", "--align", "64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {dst}: 4 tensors in 2 block(s) (float16, int64)")
    layout = read_layout(dst)
    assert layout.align_bytes == 64
    loaded = load_state_dict(dst)
    want = load_file(safetensors_file)
    assert loaded["conv.weight"].dtype == torch.float16
    assert torch.equal(loaded["conv.weight"], want["conv.weight"].half())
    assert torch.equal(loaded["position_ids"], want["position_ids"])  # ints are never cast


def test_inspect_prints_block_table(pack):
    proc = run_cli("inspect", pack)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "format:    flashpack_v4"
    assert lines[3] == "tensors:   4"
    header = lines.index("block  dtype     offset  bytes  elements  tensors")
    # float32: conv.weight (36) at 0, scale at 64 (128-byte alignment = 32 elements).
    assert lines[header + 2].split() == ["0", "float32", "0", "260", "65", "2"]
    assert lines[header + 3].split() == ["1", "int64", "384", "160", "20", "1"]
    assert lines[header + 4].split() == ["2", "bfloat16", "640", "12", "6", "1"]


def test_inspect_json_is_the_full_index(pack):
    proc = run_cli("inspect", pack, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    layout = read_layout(pack)
    assert info["schema_version"] == 1
    assert info["format"] == "flashpack_v4"
    assert info["file_bytes"] == pack.stat().st_size
    assert info["payload_bytes"] == layout.payload_bytes == 652
    assert info["tensor_count"] == 4
    assert [b["dtype"] for b in info["blocks"]] == ["float32", "int64", "bfloat16"]
    assert info["tensors"][0] == {
        "name": "conv.weight",
        "dtype": "float32",
        "shape": [4, 3, 3],
        "block": 0,
        "offset": 0,
        "length": 36,
        "offset_bytes": 0,
        "nbytes": 144,
    }
    assert {t["name"]: t["shape"] for t in info["tensors"]}["scale"] == []
    assert info["tensor_bytes"] == 144 + 160 + 12 + 4


def test_verify_good_file_exits_0(pack):
    proc = run_cli("verify", pack)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"OK {pack}: 4 tensors in 3 block(s)")


def test_verify_corrupt_file_exits_1_with_message_and_no_traceback(pack):
    data = pack.read_bytes()
    pack.write_bytes(data[:100] + data[108:])  # 8 payload bytes lost
    proc = run_cli("verify", pack)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"error: {pack}: invalid FlashPack footer: macroblock")
    assert "Traceback" not in proc.stderr


@pytest.fixture
def converted_dir(tmp_path, pack) -> Path:
    root = tmp_path / "converted"
    (root / "unet").mkdir(parents=True)
    os.replace(pack, root / "unet" / "model.flashpack")
    (root / "model_index.json").write_text("{}")
    write_manifest(root, {"kind": "local"})
    return root


def test_verify_converted_directory_exits_0(converted_dir):
    proc = run_cli("verify", converted_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"OK {converted_dir}: 2 files")


def test_verify_modified_converted_directory_exits_1(converted_dir, capsys):
    (converted_dir / "model_index.json").write_text("[]")  # same size, other bytes
    assert cli.main(["verify", str(converted_dir)]) == 1
    assert capsys.readouterr().err == (
        f"error: {converted_dir / 'model_index.json'}: sha256 mismatch (contents changed since conversion); "
        "convert again\n"
    )


def test_revert_round_trips_through_safetensors(tmp_path, safetensors_file):
    packed = tmp_path / "model.flashpack"
    pack_safetensors([safetensors_file], packed)
    out = tmp_path / "reverted.safetensors"
    proc = run_cli("revert", packed, out)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.flashpack",
        "model.safetensors",
        "reverted.safetensors",
    ]
    got, want = load_file(out), load_file(safetensors_file)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_bad_dtype_is_a_usage_error_exit_2(tmp_path, safetensors_file):
    proc = run_cli("pack", safetensors_file, tmp_path / "o.flashpack", "--dtype", "int4")
    assert proc.returncode == 2
    assert "error: argument --dtype: unknown dtype 'int4'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.flashpack").exists()


def test_convert_local_directory_end_to_end(tmp_path, tiny_sd_dir):
    src = tiny_sd_dir
    dst = tmp_path / "out" / "converted"
    proc = run_cli("convert", src, dst, "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(dst)
    verify_converted(dst, full=True)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["converted"]  # no temp dir left
    assert read_layout(dst / "unet" / "model.flashpack").blocks[0].dtype == torch.bfloat16
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    assert (manifest["source"]["kind"], manifest["source"]["ref"]) == ("local", str(Path(src).resolve()))


# ---------------------------------------------------------------------------------------------
# In-process: argument handling and error paths


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ["pack", "convert", "inspect", "verify", "revert"]:
        assert f"    {command} " in out


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
    ],
)
def test_dtype_names(name, dtype):
    assert cli.parse_target_dtype(name) is dtype


def test_missing_command_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith("error: the following arguments are required: COMMAND\n")


def test_negative_align_is_usage_error(tmp_path, safetensors_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pack", str(safetensors_file), str(tmp_path / "o.flashpack"), "--align", "-8"])
    assert exit_info.value.code == 2
    assert "error: argument --align: must be >= 0, got -8" in capsys.readouterr().err


def test_pack_missing_source_exits_1(tmp_path, capsys):
    code = cli.main(["pack", str(tmp_path / "nope.safetensors"), str(tmp_path / "o.flashpack")])
    assert code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.safetensors'}: no such file\n"


def test_pack_refuses_existing_destination_without_force(tmp_path, safetensors_file, pack, capsys):
    before = pack.read_bytes()
    assert cli.main(["pack", str(safetensors_file), str(pack)]) == 1
    assert capsys.readouterr().err == f"error: {pack}: already exists (use --force to overwrite)\n"
    assert pack.read_bytes() == before
    assert cli.main(["pack", str(safetensors_file), str(pack), "--force", "--dtype", "bf16"]) == 0
    assert load_state_dict(pack)["conv.weight"].dtype == torch.bfloat16


def test_pack_refuses_its_own_source_as_destination_even_with_force(safetensors_file, capsys):
    before = safetensors_file.read_bytes()
    assert cli.main(["pack", str(safetensors_file), str(safetensors_file), "--force"]) == 1
    assert capsys.readouterr().err == (
        f"error: destination {safetensors_file} is the source {safetensors_file}; write to another path\n"
    )
    assert safetensors_file.read_bytes() == before


def test_pack_refuses_a_destination_that_resolves_to_a_source_through_a_symlink(tmp_path, safetensors_file, capsys):
    link = tmp_path / "link.flashpack"
    link.symlink_to(safetensors_file)
    before = safetensors_file.read_bytes()
    assert cli.main(["pack", str(safetensors_file), str(link), "--force"]) == 1
    assert capsys.readouterr().err == f"error: destination {link} is the source {safetensors_file}; write to another path\n"
    assert safetensors_file.read_bytes() == before


def test_pack_several_shards(tmp_path, capsys):
    save_file({"a": torch.ones(3)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.zeros(2, dtype=torch.int32)}, tmp_path / "s2.safetensors")
    dst = tmp_path / "m.flashpack"
    assert cli.main(["pack", str(tmp_path / "s1.safetensors"), str(tmp_path / "s2.safetensors"), str(dst)]) == 0
    assert sorted(load_state_dict(dst)) == ["a", "b"]


def test_inspect_not_a_flashpack_exits_1(tmp_path, capsys):
    path = tmp_path / "x.flashpack"
    path.write_bytes(b"hello world, this is not a pack")
    assert cli.main(["inspect", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"error: {path}: not a FlashPack file (no FLASHPK magic at the end; truncated or another format)\n"
    )


def test_verify_missing_path_exits_1(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such file or directory\n"


def test_verify_a_device_says_it_is_not_a_regular_file(capsys):
    assert cli.main(["verify", "/dev/zero"]) == 1
    assert capsys.readouterr().err == "error: /dev/zero: not a regular file or a converted directory\n"


def test_verify_directory_without_manifest_exits_1(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / MANIFEST_NAME}: missing")


def test_revert_refuses_existing_destination(tmp_path, pack, capsys):
    dst = tmp_path / "exists.safetensors"
    dst.write_bytes(b"keep me")
    assert cli.main(["revert", str(pack), str(dst)]) == 1
    assert capsys.readouterr().err == f"error: {dst}: already exists (use --force to overwrite)\n"
    assert dst.read_bytes() == b"keep me"


def test_revert_refuses_its_own_source_as_destination_even_with_force(pack, capsys):
    before = pack.read_bytes()
    assert cli.main(["revert", str(pack), str(pack), "--force"]) == 1
    assert capsys.readouterr().err == f"error: destination {pack} is the source {pack}; write to another path\n"
    assert pack.read_bytes() == before


def test_revert_into_an_unwritable_directory_says_permission_denied(tmp_path, pack, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def refused(*args, **kwargs):  # what save_file raises there for a non-root user
        raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")

    monkeypatch.setattr(safetensors.torch, "save_file", refused)
    dst = tmp_path / "read-only" / "out.safetensors"
    assert cli.main(["revert", str(pack), str(dst)]) == 1
    assert capsys.readouterr().err == f"error: cannot write {dst}: permission denied\n"
    assert list(dst.parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_revert_into_a_read_only_directory_says_permission_denied(tmp_path, pack, capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    assert cli.main(["revert", str(pack), str(read_only / "out.safetensors")]) == 1
    assert capsys.readouterr().err == f"error: cannot write {read_only / 'out.safetensors'}: permission denied\n"


def test_revert_on_a_full_disk_is_a_disk_full_error_naming_the_destination(tmp_path, pack, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    dst = tmp_path / "out.safetensors"
    assert cli.main(["revert", str(pack), str(dst)]) == 1
    assert capsys.readouterr().err == (
        f"error: no space left writing {dst} (No space left on device); free space there and retry\n"
    )


def pipeline_dir(path: Path) -> Path:
    """A directory the CLI takes for a local pipeline (the fake conversion reads nothing else)."""
    path.mkdir()
    (path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return path


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace conversion.convert with a recorder that writes a minimal converted directory."""
    calls = []

    def convert_pipeline(src_dir, dst_dir, dtype=None, source=None, show_progress=True, **kwargs):
        calls.append((Path(src_dir), Path(dst_dir), dtype, source, kwargs))
        dst_dir = Path(dst_dir)
        assert not dst_dir.exists()
        (dst_dir / "unet").mkdir(parents=True)
        pack_state_dict({"w": torch.ones(2)}, dst_dir / "unet" / "model.flashpack")
        if getattr(convert_pipeline, "fail", False):
            raise RuntimeError("boom while converting")
        write_manifest(dst_dir, source or {})
        return dst_dir

    monkeypatch.setitem(sys.modules, "conversion.convert", types.SimpleNamespace(convert_pipeline=convert_pipeline))
    convert_pipeline.calls = calls
    return convert_pipeline


def test_convert_local_dir_builds_beside_dst_then_renames(tmp_path, fake_convert, capsys):
    src = pipeline_dir(tmp_path / "src")
    dst = tmp_path / "out" / "converted"
    assert cli.main(["convert", str(src), str(dst), "--dtype", "half"]) == 0
    assert capsys.readouterr().out == f"{dst}\n"
    (called_src, built_in, dtype, source, kwargs) = fake_convert.calls[0]
    assert called_src == src and dtype is torch.float16 and kwargs == {}
    assert built_in.parent == dst.parent and built_in.name.startswith(".converted.")
    assert source == {"kind": "local", "ref": str(src.resolve()), "identity": directory_fingerprint(src)}
    verify_converted(dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["converted"]


def test_convert_failure_removes_temp_dir_and_creates_no_dst(tmp_path, fake_convert, capsys):
    fake_convert.fail = True
    src = pipeline_dir(tmp_path / "src")
    dst = tmp_path / "out" / "converted"
    assert cli.main(["convert", str(src), str(dst)]) == 1
    assert capsys.readouterr().err == "error: unexpected RuntimeError: boom while converting\n"
    assert list(dst.parent.iterdir()) == []


def test_convert_refuses_existing_dst(tmp_path, fake_convert, capsys):
    src = pipeline_dir(tmp_path / "src")
    dst = tmp_path / "converted"
    dst.mkdir()
    assert cli.main(["convert", str(src), str(dst)]) == 1
    assert capsys.readouterr().err == f"error: {dst}: already exists; remove it or choose another destination\n"
    assert fake_convert.calls == []


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink"])
def test_convert_refuses_a_destination_that_is_its_source(tmp_path, fake_convert, capsys, spelling):
    src = pipeline_dir(tmp_path / "src")
    dst = {"same": src, "dotdot": src / ".." / "src", "symlink": tmp_path / "link"}[spelling]
    if spelling == "symlink":
        dst.symlink_to(src)
    assert cli.main(["convert", str(src), str(dst)]) == 1
    assert capsys.readouterr().err == f"error: destination {dst} is the source {src}; write to another path\n"
    assert fake_convert.calls == []
    assert [p.name for p in src.iterdir()] == ["model_index.json"]


def test_convert_again_with_the_same_arguments_recognises_the_verified_conversion(tmp_path, fake_convert, capsys):
    src = pipeline_dir(tmp_path / "src")
    dst = tmp_path / "converted"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    capsys.readouterr()
    assert cli.main(["convert", str(src), str(dst)]) == 0
    assert capsys.readouterr().out == f"{dst}: already a verified conversion of {src}\n"
    assert len(fake_convert.calls) == 1


def test_convert_again_after_the_source_changed_refuses_the_existing_dst(tmp_path, fake_convert, capsys):
    src = pipeline_dir(tmp_path / "src")
    dst = tmp_path / "converted"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    (src / "model_index.json").write_text("{}")
    capsys.readouterr()
    assert cli.main(["convert", str(src), str(dst)]) == 1
    assert capsys.readouterr().err == f"error: {dst}: already exists; remove it or choose another destination\n"


def test_convert_again_into_a_damaged_conversion_says_it_fails_verification(tmp_path, fake_convert, capsys):
    src = pipeline_dir(tmp_path / "src")
    dst = tmp_path / "converted"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    pack = dst / "unet" / "model.flashpack"
    data = bytearray(pack.read_bytes())
    data[0] ^= 0xFF
    pack.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["convert", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {dst}: a conversion of {src.resolve()} that fails verification ({pack}: sha256 mismatch")
    assert err.endswith("; remove it and convert again\n")


def test_convert_a_directory_without_model_index_says_exactly_that(tmp_path, fake_convert, capsys):
    assert cli.main(["convert", "/etc", str(tmp_path / "dst")]) == 1
    assert capsys.readouterr().err == (
        "error: /etc: no model_index.json; a local source must be a diffusers pipeline directory\n"
    )
    assert fake_convert.calls == []


def test_convert_passes_a_single_files_pipeline_class_and_config_to_the_store(monkeypatch, tmp_path, capsys):
    import conversion.store

    calls = []
    monkeypatch.setattr(conversion.store, "convert_source", lambda src, **kw: calls.append((src, kw)) or tmp_path)
    assert cli.main(["convert", "org/base/model.safetensors", "--pipeline-class", "FluxPipeline",
                     "--config", "org/base", "--revision", "main"]) == 0
    assert calls == [("org/base/model.safetensors", {"dst": None, "dtype": None, "revision": "main",
                                                     "pipeline_class": "FluxPipeline", "config": "org/base"})]


def test_convert_local_dir_with_revision_is_usage_error(tmp_path, fake_convert, capsys):
    assert cli.main(["convert", str(tmp_path), str(tmp_path / "dst"), "--revision", "main"]) == 2
    assert capsys.readouterr().err == "error: --revision applies to Hub repo ids, not local directories\n"


def test_convert_local_dir_passes_variant(tmp_path, fake_convert):
    src = pipeline_dir(tmp_path / "src")
    assert cli.main(["convert", str(src), str(tmp_path / "dst"), "--variant", "fp16"]) == 0
    assert fake_convert.calls[0][4] == {"variant": "fp16"}


def test_convert_repo_id_goes_through_the_store(tmp_path, monkeypatch, capsys):
    calls = []

    def convert_source(src, dst=None, dtype=None, **kwargs):
        calls.append((src, dst, dtype, kwargs))
        return tmp_path / "store" / "entry"

    monkeypatch.setitem(sys.modules, "conversion.store", types.SimpleNamespace(convert_source=convert_source))
    assert cli.main(["convert", "org/tiny-sd", "--dtype", "bf16", "--revision", "abc123", "--variant", "fp16"]) == 0
    assert calls == [("org/tiny-sd", None, torch.bfloat16, {"revision": "abc123", "variant": "fp16"})]
    assert capsys.readouterr().out == f"{tmp_path / 'store' / 'entry'}\n"


def test_convert_a_single_file_whose_header_is_damaged_names_the_source_and_the_field(tmp_path, monkeypatch, capsys):
    from conversion.sources import parse_source
    from tests.single_files import data_url

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, "16"]}}).encode()
    url = data_url(len(header).to_bytes(8, "little") + header + bytes(16))
    monkeypatch.setenv("APP_DATA_ROOT", str(tmp_path))
    assert cli.main(["-q", "convert", url]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {parse_source(url).display}: the downloaded file is not a valid checkpoint (unreadable safetensors "
        "header: tensor 'w': data_offsets must be two integers 0 <= begin <= end)")
