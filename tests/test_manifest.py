"""conversion.manifest: what write_manifest records and what verify_converted / check_warm catch.

Cheap mode (full=False) checks sizes and FlashPack footers only -- it never hashes -- so a flipped
payload byte that keeps the size passes it; full mode (sha256) catches that, and so does the
loader's per-segment checksum while it reads the pack (tests/test_reader.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest
import torch
import xxhash

from conversion.durable import temp_path
from conversion.errors import ConversionError
from conversion.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    VerificationError,
    check_warm,
    packs_to_read,
    verify_converted,
    write_manifest,
)
from conversion.writer import pack_state_dict
from model_loader.checksum import file_checksum
from model_loader.format import MAGIC, TRAILER

SOURCE = {"kind": "local", "path": "/src/tiny-sd", "revision": None}


@pytest.fixture
def converted(tmp_path) -> Path:
    """A small hand-made converted directory with its manifest."""
    root = tmp_path / "converted"
    g = torch.Generator().manual_seed(0)
    (root / "unet").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "tokenizer").mkdir()
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "unet" / "config.json").write_text('{"sample_size": 8}')
    pack_state_dict(
        {"conv.weight": torch.randn(4, 4, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)},
        root / "unet" / "model.flashpack",
        target_dtype=torch.float16,
    )
    (root / "text_encoder" / "config.json").write_text('{"hidden_size": 8}')
    pack_state_dict(
        {"emb.weight": torch.randn(10, 8, generator=g), "position_ids": torch.arange(7)},
        root / "text_encoder" / "model.flashpack",
    )
    (root / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    write_manifest(root, SOURCE)
    return root


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def footer_start(path: Path) -> int:
    data = path.read_bytes()
    footer_len, _ = TRAILER.unpack(data[-TRAILER.size :])
    return len(data) - TRAILER.size - footer_len


def test_manifest_lists_every_file_with_size_and_sha256(converted):
    files = json.loads((converted / MANIFEST_NAME).read_text())["files"]
    expected = [
        "model_index.json",
        "text_encoder/config.json",
        "text_encoder/model.flashpack",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/model.flashpack",
    ]
    assert list(files) == expected
    for rel, entry in files.items():
        data = (converted / rel).read_bytes()
        expected_entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if rel.endswith(".flashpack"):  # packs also carry the loader's per-segment checksum
            expected_entry["checksum"] = {
                "algorithm": "xxh3_64", "segment_bytes": 8 << 20, "segments": [f"{xxhash.xxh3_64_intdigest(data):016x}"],
            }
        assert entry == expected_entry


def test_warm_check_returns_the_manifest_of_an_intact_directory(converted):
    assert check_warm(converted)["files"].keys() == json.loads((converted / MANIFEST_NAME).read_text())["files"].keys()


def test_warm_check_catches_a_changed_small_file_by_its_sha256(converted):
    (converted / "tokenizer" / "vocab.json").write_text('{"b": 0}')  # same size as before
    with pytest.raises(VerificationError, match=r"tokenizer/vocab\.json: sha256 mismatch"):
        check_warm(converted)


def test_warm_check_does_not_read_packs(converted):
    pack = converted / "unet" / "model.flashpack"
    data = bytearray(pack.read_bytes())
    data[0] ^= 0xFF  # the loader's checksum catches this while it reads the pack
    pack.write_bytes(bytes(data))
    check_warm(converted)


def test_warm_check_rebuilds_an_entry_made_before_pack_checksums(converted):
    manifest = json.loads((converted / MANIFEST_NAME).read_text())
    del manifest["files"]["unet/model.flashpack"]["checksum"]
    (converted / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(VerificationError, match=r"unet/model\.flashpack: converted before packs carried load-time checksums"):
        check_warm(converted)


@pytest.mark.parametrize("full", [True, False])
def test_a_file_missing_from_the_manifest_fails_verification(converted, full):
    (converted / "unet" / "extra.json").write_text("{}")
    with pytest.raises(VerificationError, match=r"unet/extra\.json: not in the manifest"):
        verify_converted(converted, full=full)
    with pytest.raises(VerificationError, match=r"unet/extra\.json: not in the manifest"):
        check_warm(converted)


def test_packs_to_read_lists_each_component_pack_with_its_checksum(converted):
    packs = packs_to_read(converted)
    assert [(name, path) for name, path, _ in packs] == [
        ("text_encoder", converted / "text_encoder" / "model.flashpack"),
        ("unet", converted / "unet" / "model.flashpack"),
    ]
    for _, path, checksum in packs:
        assert checksum == file_checksum(str(path))


def test_manifest_records_version_source_tools_and_time(converted):
    manifest = json.loads((converted / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 1
    assert manifest["source"] == SOURCE
    # the installed distribution's version: PyPI's CUDA wheel says 2.15.0 where torch.__version__ says 2.15.0+cu132
    assert manifest["tools"]["torch"] == metadata.version("torch")
    assert torch.__version__.startswith(manifest["tools"]["torch"])
    assert set(manifest["tools"]) >= {"python", "torch", "diffusers", "transformers"}
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo is not None


def test_write_manifest_returns_what_it_wrote(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    returned = write_manifest(tmp_path, {"path": Path("/src")})
    assert returned == json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert returned["source"] == {"path": "/src"}


def test_manifest_excludes_itself_and_temp_files(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    temp_path(tmp_path / "model.flashpack").write_bytes(b"partial")
    (tmp_path / ".packtmp_x1y2").write_bytes(b"partial")
    write_manifest(tmp_path, SOURCE)
    write_manifest(tmp_path, SOURCE)  # a second run must not list the first manifest
    assert list(json.loads((tmp_path / MANIFEST_NAME).read_text())["files"]) == ["model_index.json"]


def test_manifest_is_mode_0644_even_with_restrictive_umask(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    old_umask = os.umask(0o077)
    try:
        write_manifest(tmp_path, SOURCE)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / MANIFEST_NAME).stat().st_mode) == 0o644


def test_write_manifest_leaves_no_temp_file(converted):
    assert sorted(p.name for p in converted.iterdir()) == [
        MANIFEST_NAME,
        "model_index.json",
        "text_encoder",
        "tokenizer",
        "unet",
    ]


@pytest.mark.parametrize("full", [True, False])
def test_verify_passes_on_fresh_manifest(converted, full):
    assert verify_converted(converted, full=full) is None


def test_flipped_payload_byte_fails_full_verify_naming_file(converted):
    pack = converted / "unet" / "model.flashpack"
    flip_byte(pack, 0)
    with pytest.raises(VerificationError, match=re.escape(f"{pack}: sha256 mismatch")):
        verify_converted(converted, full=True)


def test_flipped_payload_byte_passes_cheap_verify_which_does_not_hash(converted):
    flip_byte(converted / "unet" / "model.flashpack", 0)
    verify_converted(converted, full=False)


def test_flipped_footer_byte_fails_cheap_verify(converted):
    pack = converted / "text_encoder" / "model.flashpack"
    flip_byte(pack, footer_start(pack))  # the footer's opening "{"
    with pytest.raises(VerificationError, match=re.escape(f"{pack}: invalid FlashPack footer: not UTF-8 JSON")):
        verify_converted(converted, full=False)


def test_flipped_byte_in_a_json_file_fails_full_verify(converted):
    flip_byte(converted / "tokenizer" / "vocab.json", 1)
    with pytest.raises(
        VerificationError, match=re.escape(f"{converted / 'tokenizer' / 'vocab.json'}: sha256 mismatch")
    ):
        verify_converted(converted)


@pytest.mark.parametrize("full", [True, False])
def test_missing_file_fails(converted, full):
    (converted / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(
        VerificationError,
        match=re.escape(f"{converted / 'tokenizer' / 'vocab.json'}: listed in the manifest but missing"),
    ):
        verify_converted(converted, full=full)


@pytest.mark.parametrize("full", [True, False])
def test_truncated_file_fails_on_size(converted, full):
    pack = converted / "unet" / "model.flashpack"
    size = pack.stat().st_size
    os.truncate(pack, size - 4)
    with pytest.raises(VerificationError, match=re.escape(f"{pack}: size {size - 4} bytes, the manifest says {size}")):
        verify_converted(converted, full=full)


def test_pack_truncated_before_manifest_was_written_fails_cheap_verify_on_footer(converted):
    """Sizes match the manifest, but the pack itself lost payload bytes: its footer check fails."""
    pack = converted / "unet" / "model.flashpack"
    data = pack.read_bytes()
    pack.write_bytes(data[:16] + data[32:])  # 16 payload bytes gone, footer intact
    write_manifest(converted, SOURCE)
    with pytest.raises(
        VerificationError, match=re.escape(f"{pack}: invalid FlashPack footer: macroblock 0 ends at byte")
    ):
        verify_converted(converted, full=False)


def test_missing_manifest_fails(converted):
    (converted / MANIFEST_NAME).unlink()
    with pytest.raises(
        VerificationError, match=re.escape(f"{converted / MANIFEST_NAME}: missing (the conversion did not finish")
    ):
        verify_converted(converted, full=False)


def test_bad_manifest_json_fails(converted):
    (converted / MANIFEST_NAME).write_text('{"format_version": 1, "files": ')
    with pytest.raises(VerificationError, match=re.escape(f"{converted / MANIFEST_NAME}: not valid JSON")):
        verify_converted(converted, full=False)


def test_manifest_nested_100000_deep_fails_naming_the_file(converted):
    path = converted / MANIFEST_NAME
    path.write_text('{"format_version": 1, "source": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(
        VerificationError, match=re.escape(f"{path}: not a manifest (JSON nested more than 64 levels deep)")
    ):
        verify_converted(converted, full=False)


def test_manifest_larger_than_the_limit_fails_naming_the_file(converted, monkeypatch):
    monkeypatch.setattr("conversion.manifest.MAX_MANIFEST_BYTES", 1024)
    path = converted / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["source"]["notes"] = "x" * 2000
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        VerificationError, match=re.escape(f"{path}: not a manifest (JSON more than the limit of 1024 bytes)")
    ):
        verify_converted(converted, full=False)


def test_pack_footer_nested_100000_deep_fails_verify_naming_the_pack(converted):
    pack = converted / "unet" / "model.flashpack"
    payload = pack.read_bytes()[: footer_start(pack)]
    footer = b"[" * 100_000 + b"]" * 100_000
    pack.write_bytes(payload + footer + TRAILER.pack(len(footer), MAGIC))
    write_manifest(converted, SOURCE)
    with pytest.raises(
        VerificationError, match=re.escape(f"{pack}: invalid FlashPack footer: JSON nested more than 64 levels deep")
    ):
        verify_converted(converted, full=False)


@pytest.mark.parametrize("version", [0, 2, "1", True, None])
def test_wrong_format_version_fails(converted, version):
    path = converted / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["format_version"] = version
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        VerificationError, match=re.escape(f"{path}: format_version {version!r}, this code reads version 1")
    ):
        verify_converted(converted, full=False)


@pytest.mark.parametrize("bad_path", ["../outside.json", "/etc/passwd", ""])
def test_manifest_path_outside_the_directory_fails(converted, bad_path):
    path = converted / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"][bad_path] = {"size": 0, "sha256": "0" * 64}
    path.write_text(json.dumps(manifest))
    with pytest.raises(VerificationError, match=re.escape(f"file path {bad_path!r} is not a relative path inside")):
        verify_converted(converted, full=False)


def test_manifest_entry_without_sha256_fails(converted):
    path = converted / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    del manifest["files"]["model_index.json"]["sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(VerificationError, match=re.escape("entry for 'model_index.json' must be")):
        verify_converted(converted, full=False)


def test_not_a_directory_fails(tmp_path):
    with pytest.raises(VerificationError, match=re.escape(f"{tmp_path / 'nope'}: not a directory")):
        verify_converted(tmp_path / "nope")


def test_verification_error_is_a_conversion_error():
    assert issubclass(VerificationError, ConversionError)


def test_packs_hashed_while_written_are_not_read_again_and_get_the_same_record(converted, monkeypatch):
    from conversion import manifest as manifest_module

    before = json.loads((converted / MANIFEST_NAME).read_text())["files"]
    packs = [rel for rel in before if rel.endswith(".flashpack")]
    known = {converted / rel: manifest_module.hash_file(converted / rel, segments=True) for rel in packs}
    hashed: list[str] = []
    real = manifest_module.hash_file
    monkeypatch.setattr(manifest_module, "hash_file", lambda path, segments=False: hashed.append(str(path))
                        or real(path, segments))
    write_manifest(converted, SOURCE, known)
    assert not any(h.endswith(".flashpack") for h in hashed) and hashed
    assert json.loads((converted / MANIFEST_NAME).read_text())["files"] == before


def test_a_known_digest_whose_size_no_longer_matches_is_hashed_again(converted):
    from conversion import manifest as manifest_module

    pack = converted / "unet" / "model.flashpack"
    sha, checksum = manifest_module.hash_file(pack, segments=True)
    with open(pack, "ab") as f:
        f.write(b"\0")
    write_manifest(converted, SOURCE, {pack: (sha, checksum)})
    entry = json.loads((converted / MANIFEST_NAME).read_text())["files"]["unet/model.flashpack"]
    assert entry["sha256"] == hashlib.sha256(pack.read_bytes()).hexdigest() != sha
