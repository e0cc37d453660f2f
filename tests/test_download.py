"""Downloads with the real huggingface_hub client against a loopback Hub, and fal's
download_model_weights with data: URLs: file selection, tokens, stalls, corrupt caches."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from conversion.config import ConversionConfig
from conversion.download import (
    DownloadPolicy,
    checkpoint_problem,
    fal_weights_dir,
    fetch_hub,
    fetch_url,
    hub_cache_dir,
    preread,
    xet_environment,
)
from conversion.download import url as url_download
from conversion.errors import AuthError, DownloadError, DownloadStalledError, SourceError
from conversion.sources import parse_checker_source, parse_source
from tests.hub_server import HubRepo, HubServer, decoy_files, use_hub
from tests.tiny_models import make_tiny_checker_repo, make_tiny_sd, make_tiny_sd_with_safety_checker

TOKEN = "hf_loopbackTOKEN_0123456789abcdef"
FAST = DownloadPolicy(stall_timeout_s=1.5, attempts=3, max_workers=8, poll_s=0.1, preread_workers=4)
PIPELINE_FILES = {
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}


def fetch(source, root: Path, commit: str | None, policy: DownloadPolicy):
    """``fetch_hub`` of a parsed Hub source's files, with the config the environment gives now."""
    return fetch_hub(source.hub_files(), root, commit, policy, ConversionConfig.from_env())


def fetch_file(url: str, root: Path) -> Path:
    """``fetch_url`` of a URL source, as UrlSource fetches it."""
    return fetch_url(url, parse_source(url).display, root, FAST, ConversionConfig.from_env())


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="module")
def repos(tiny_sd, tmp_path_factory) -> list[HubRepo]:
    checker = make_tiny_checker_repo(tmp_path_factory.mktemp("checker") / "repo")
    sd_with_checker = make_tiny_sd_with_safety_checker(tmp_path_factory.mktemp("sd-checker") / "repo")
    return [
        HubRepo.from_dir("org/tiny-sd", tiny_sd, extra=decoy_files(tiny_sd)),
        HubRepo.from_dir("org/private-sd", tiny_sd, private=True),
        HubRepo.from_dir("org/tiny-checker", checker, extra={".gitattributes": b"*.bin filter=lfs\n"}),
        HubRepo.from_dir("org/tiny-sd-with-checker", sd_with_checker),
    ]


@pytest.fixture
def hub(repos, monkeypatch, tmp_path_factory):
    with HubServer(repos, token=TOKEN) as server:
        use_hub(monkeypatch, server, tmp_path_factory.mktemp("hf-home"))
        yield server


# ---------------------------------------------------------------------------------------------
# hf_xet tuning


def test_xet_high_performance_only_on_hosts_with_64_gb():
    assert xet_environment({}, total_ram=64 * 1024**3)["HF_XET_HIGH_PERFORMANCE"] == "1"
    assert "HF_XET_HIGH_PERFORMANCE" not in xet_environment({}, total_ram=32 * 1024**3)


def test_xet_tuning_sets_fal_recommended_values_and_keeps_explicit_ones():
    env = xet_environment({"HF_XET_NUM_CONCURRENT_RANGE_GETS": "4"}, total_ram=1)
    assert env["HF_XET_NUM_CONCURRENT_RANGE_GETS"] == "4"
    assert env["HF_XET_CHUNK_CACHE_SIZE_BYTES"] == "1000000000000"


# ---------------------------------------------------------------------------------------------
# Hub snapshots


def test_snapshot_downloads_only_the_pipeline_files(hub, tmp_path):
    snap = fetch(parse_source("org/tiny-sd"), tmp_path, None, FAST)
    assert set(snap.files) == PIPELINE_FILES
    assert hub.downloaded() == PIPELINE_FILES  # no .bin, flax, onnx, fp16 copy or root checkpoint
    assert (snap.path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert snap.path.is_relative_to(hub_cache_dir(tmp_path, ConversionConfig.from_env()))


def test_fp16_variant_downloads_the_variant_instead_of_the_fp32_weights(hub, tmp_path):
    snap = fetch(parse_source("org/tiny-sd", variant="fp16"), tmp_path, None, FAST)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub.downloaded()
    assert "unet/diffusion_pytorch_model.safetensors" not in hub.downloaded()
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in snap.files


def test_cached_snapshot_of_a_known_commit_makes_no_request(hub, tmp_path):
    first = fetch(parse_source("org/tiny-sd"), tmp_path, None, FAST)
    hub.reset_counts()
    again = fetch(parse_source("org/tiny-sd"), tmp_path, first.identity, FAST)
    assert again.path == first.path
    assert hub.count() == 0


def test_checker_repo_snapshot_downloads_its_config_weights_and_preprocessor_config_only(hub, tmp_path):
    snap = fetch(parse_checker_source("org/tiny-checker"), tmp_path, None, FAST)
    checker_files = {"config.json", "pytorch_model.bin", "preprocessor_config.json"}
    assert set(snap.files) == hub.downloaded() == checker_files  # no README, no .gitattributes
    assert (snap.path / "pytorch_model.bin").is_file()


def test_checker_of_an_sd_pipeline_repo_downloads_its_two_folders_and_nothing_of_the_pipeline(hub, tmp_path):
    snap = fetch(parse_checker_source("org/tiny-sd-with-checker"), tmp_path, None, FAST)
    assert set(snap.files) == hub.downloaded() == {
        "safety_checker/config.json", "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json"}


def test_cached_checker_snapshot_of_a_known_commit_makes_no_request(hub, tmp_path):
    first = fetch(parse_checker_source("org/tiny-checker"), tmp_path, None, FAST)
    hub.reset_counts()
    again = fetch(parse_checker_source("org/tiny-checker"), tmp_path, first.identity, FAST)
    assert (again.path, again.files) == (first.path, first.files)
    assert hub.count() == 0


def test_a_pipeline_repo_without_checker_folders_is_a_source_error_saying_what_a_checker_is(hub, tmp_path):
    with pytest.raises(SourceError, match=r"org/tiny-sd: the repo root holds no safety checker: expected config.json"):
        fetch(parse_checker_source("org/tiny-sd"), tmp_path, None, FAST)


def test_private_repo_without_token_is_an_auth_error_naming_hf_token(hub, tmp_path):
    with pytest.raises(AuthError) as info:
        fetch(parse_source("org/private-sd"), tmp_path, None, FAST)
    assert str(info.value).startswith("repo org/private-sd needs a Hugging Face token")
    assert str(info.value).endswith("set HF_TOKEN (fal secrets set HF_TOKEN=...)")


def test_private_repo_with_token_downloads_and_the_token_is_never_shown(hub, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    snap = fetch(parse_source("org/private-sd"), tmp_path, None, FAST)
    assert set(snap.files) == PIPELINE_FILES
    out, err = capfd.readouterr()
    assert TOKEN not in caplog.text + out + err


def test_refused_token_is_an_auth_error_without_the_token(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN + "-wrong")
    with pytest.raises(AuthError, match="token in HF_TOKEN was refused") as info:
        fetch(parse_source("org/private-sd"), tmp_path, None, FAST)
    assert TOKEN not in str(info.value)


def test_missing_revision_is_a_source_error(hub, tmp_path):
    with pytest.raises(SourceError, match="revision 'no-such-branch' does not exist in repo org/tiny-sd"):
        fetch(parse_source("org/tiny-sd", revision="no-such-branch"), tmp_path, None, FAST)


def test_stalled_download_is_restarted_and_completes(hub, tmp_path, caplog):
    hub.stall("unet/diffusion_pytorch_model.safetensors", times=1)
    caplog.set_level(logging.WARNING, logger="conversion.download")
    snap = fetch(parse_source("org/tiny-sd"), tmp_path, None, FAST)
    assert set(snap.files) == PIPELINE_FILES
    assert hub.count(server="cdn", method="GET") == 4  # unet twice, text encoder and vae once
    assert "no progress for 1.5 s, restarting (attempt 2 of 3)" in caplog.text
    blobs = hub_cache_dir(tmp_path, ConversionConfig.from_env()) / "models--org--tiny-sd" / "blobs"
    assert not list(blobs.glob("*.incomplete"))


def test_download_that_always_stalls_fails_after_the_allowed_attempts(hub, tmp_path):
    hub.stall("unet/*", times=99)
    policy = DownloadPolicy(stall_timeout_s=1.0, attempts=2, max_workers=8, poll_s=0.1, preread_workers=4)
    t0 = time.monotonic()
    with pytest.raises(DownloadStalledError, match=r"no progress for 1 s on each of 2 attempts"):
        fetch(parse_source("org/tiny-sd"), tmp_path, None, policy)
    assert time.monotonic() - t0 < 20
    assert hub.count(server="cdn", method="GET", path_glob="*") >= 2


def test_corrupt_blob_in_the_cache_is_detected_and_downloaded_again(hub, tmp_path, caplog):
    snap = fetch(parse_source("org/tiny-sd"), tmp_path, None, FAST)
    blob = (snap.root / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    good = blob.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    hub.reset_counts()
    caplog.set_level(logging.WARNING, logger="conversion.download")
    again = fetch(parse_source("org/tiny-sd"), tmp_path, snap.identity, FAST)
    assert "1 corrupt file(s) in the Hub cache" in caplog.text
    assert (again.root / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == good
    assert hub.downloaded() == {"unet/diffusion_pytorch_model.safetensors"}


def test_preread_flags_a_cache_file_whose_contents_do_not_match_its_blob_name(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    good, bad = b"good bytes", b"bad bytes"
    (blobs / hashlib.sha256(good).hexdigest()).write_bytes(good)
    (blobs / hashlib.sha256(b"something else").hexdigest()).write_bytes(bad)
    links = []
    for i, blob in enumerate(sorted(blobs.iterdir())):
        links.append(tmp_path / f"file{i}")
        links[-1].symlink_to(blob)
    flagged = preread(links, workers=2)
    assert [p.resolve().read_bytes() for p in flagged] == [bad]


# ---------------------------------------------------------------------------------------------
# URL sources (fal's download_model_weights)


def data_url(payload: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(payload).decode()


def test_url_download_goes_through_download_model_weights_and_is_reused(tmp_path, monkeypatch):
    payload = os.urandom(4096)
    url = data_url(payload)
    path = fetch_file(url, tmp_path)
    assert path.parent == tmp_path / ".fal" / "model_weights" / hashlib.sha256(url.encode()).hexdigest()
    assert path.read_bytes() == payload

    def no_download(*args, **kwargs):
        raise AssertionError("a download was started for a cached file")

    monkeypatch.setattr(url_download, "run_child", no_download)
    assert fetch_file(url, tmp_path) == path


def test_truncated_cached_checkpoint_is_downloaded_again(tmp_path, caplog):
    import torch
    from safetensors.torch import save

    payload = save({"w": torch.arange(1000, dtype=torch.float32)})
    url = data_url(payload)
    cached = fal_weights_dir(tmp_path, url) / "model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(payload[:-100])  # what an interrupted copy could leave behind
    caplog.set_level(logging.WARNING, logger="conversion.download")
    path = fetch_file(url, tmp_path)
    assert "is damaged (safetensors file is" in caplog.text
    assert path.read_bytes() == payload
    assert not cached.exists()


def test_a_cached_download_whose_name_starts_with_dot_fal_is_found_beside_fals_own_files(tmp_path, monkeypatch):
    payload = os.urandom(4096)
    url = data_url(payload)
    weights = fal_weights_dir(tmp_path, url)
    weights.mkdir(parents=True)
    (weights / ".fal_model.safetensors").write_bytes(payload)  # the server's Content-Disposition name
    for own in (".fal_used", ".fal_download.tmp.k3j2", "..fal_download.tmp.k3j2.tmp.x9"):
        (weights / own).write_bytes(b"fal's own")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was started for a cached file")

    monkeypatch.setattr(url_download, "run_child", no_download)
    assert fetch_file(url, tmp_path) == weights / ".fal_model.safetensors"


def test_fals_marker_and_temporary_files_alone_are_no_cached_download(tmp_path):
    payload = os.urandom(4096)
    url = data_url(payload)
    weights = fal_weights_dir(tmp_path, url)
    weights.mkdir(parents=True)
    for own in (".fal_used", ".fal_download.tmp.k3j2", "..fal_download.tmp.k3j2.tmp.x9"):
        (weights / own).write_bytes(b"fal's own")
    path = fetch_file(url, tmp_path)
    assert path.parent == weights and path.read_bytes() == payload


def test_safetensors_header_nested_100000_deep_is_reported_as_unreadable(tmp_path):
    header = b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    assert checkpoint_problem(path) == "unreadable safetensors header: nested more than 64 levels deep"


def test_url_download_outside_fals_volume_leaves_fals_download_paths_alone(tmp_path):
    from fal.toolkit.utils import download_utils

    before = (download_utils.FAL_PERSISTENT_DIR, download_utils.FAL_REPOSITORY_DIR, download_utils.FAL_MODEL_WEIGHTS_DIR)
    url = data_url(b"abc")
    path = fetch_file(url, tmp_path)
    assert path == tmp_path / ".fal" / "model_weights" / hashlib.sha256(url.encode()).hexdigest() / path.name
    assert before == (download_utils.FAL_PERSISTENT_DIR, download_utils.FAL_REPOSITORY_DIR,
            download_utils.FAL_MODEL_WEIGHTS_DIR)


def test_offline_mode_without_a_cached_copy_fails_at_once_saying_so(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="not in the cache and HF_HUB_OFFLINE is set"):
        fetch(parse_source("org/tiny-sd"), tmp_path, None, FAST)
    assert time.monotonic() - t0 < 10  # no retries
    assert hub.count() == 0
