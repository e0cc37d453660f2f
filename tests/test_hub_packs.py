"""Packs on the Hub, both ways, against the loopback Hub with the real huggingface_hub client:
a conversion pushed once (`python -m conversion push`) is served by a fresh volume with nothing
converted; diffusers' own from_pretrained(use_flashpack=True) loads what we push; a repo diffusers
wrote with save_pretrained(use_flashpack=True) is served; a damaged or gated repo is refused."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from starlette.testclient import TestClient

from conversion.config import ConversionConfig
from conversion.errors import AuthError, ConversionError
from conversion.manifest import read_manifest
from conversion.push import push_to_hub
from conversion.sources import parse_source
from conversion.sources.demo import TRAINED_PIPELINE
from conversion.store import Store
from model_loader import load_state_dict
from serving.settings import ModelSettings
from tests.hub_server import HubServer, use_hub

TOKEN = "hf_test_token_for_pushing"
REPO = "org/demo-flashpack"
SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "output_format": "png", "seed": 7}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The trained demo pipeline converted by the store (float32, as the demo profile serves it)."""
    root = tmp_path_factory.mktemp("converting")
    return Store(root, ConversionConfig()).ensure(parse_source("demo"), "float32")


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    with HubServer([], token=TOKEN) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def pushed(converted: Path, repo: str = REPO, **kwargs) -> str:
    return push_to_hub(converted, repo, ConversionConfig(hf_token=TOKEN), **kwargs).commit


def serve(app_module, model: ModelSettings, data_root: Path, monkeypatch, caplog) -> np.ndarray:
    """One image from the demo app serving ``model`` from the volume ``data_root``."""
    monkeypatch.setenv("APP_DATA_ROOT", str(data_root))

    class App(app_module.TextToImageApp):
        pass

    App.settings = app_module.TextToImageApp.settings.model_copy(update={"model": model})
    with caplog.at_level(logging.INFO), TestClient(App(_allow_init=True)._build_app()) as client:
        response = client.post("/", json={"prompt": "a red circle on a blue background", **SMALL})
    assert response.status_code == 200, response.text
    data = response.json()["images"][0]["url"].partition(",")[2]
    return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(data))))


def test_a_pushed_conversion_is_one_commit_with_the_manifest_the_packs_and_a_model_card(hub, converted):
    commit = pushed(converted)
    repo = hub.repos[REPO]
    assert repo.branches["main"] == commit
    files = repo.commits[commit]
    assert set(read_manifest(converted)["files"]) <= set(files)
    assert {"flashpack_manifest.json", "README.md", "text_encoder/model.safetensors"} <= set(files)
    assert b"use_flashpack=True" in files["README.md"] and REPO.encode() in files["README.md"]


def test_a_fresh_volume_serves_the_pushed_conversion_with_nothing_converted_and_the_same_images(
        hub, converted, app_module, tmp_path, monkeypatch, caplog):
    commit = pushed(converted)
    original = serve(app_module, ModelSettings(source="demo", dtype="float32", device="cpu"), tmp_path / "a",
                     monkeypatch, caplog)
    caplog.clear()
    pulled = serve(app_module, ModelSettings(source=REPO, revision=commit, dtype="float32", device="cpu"),
                   tmp_path / "b", monkeypatch, caplog)
    assert np.array_equal(pulled, original)
    pipeline_builds = [r for r in caplog.records if r.name == "conversion.convert" and "unet" in r.getMessage()]
    assert pipeline_builds == []
    assert any(r.name == "conversion.adopt" and "nothing converted" in r.getMessage() for r in caplog.records)
    fetched = hub.downloaded()
    assert "text_encoder/model.safetensors" not in fetched and "README.md" not in fetched


def test_diffusers_loads_a_pushed_conversion_tensor_for_tensor(hub, converted, tmp_path):
    from diffusers import DiffusionPipeline
    from huggingface_hub import snapshot_download

    commit = pushed(converted)
    # diffusers 0.42.1 reads FlashPack from a local directory; its own Hub download fetches no .flashpack
    local = snapshot_download(REPO, revision=commit, cache_dir=tmp_path / "cache")
    pipe = DiffusionPipeline.from_pretrained(local, use_flashpack=True)
    for name in ("unet", "vae", "text_encoder"):
        ours = load_state_dict(converted / name / "model.flashpack")
        theirs = getattr(pipe, name).state_dict()
        assert all(torch.equal(theirs[k], ours[k]) for k in ours), name
        assert set(ours) <= set(theirs), name


def test_a_pushed_repo_with_a_damaged_pack_is_refused_naming_the_file(hub, converted, tmp_path):
    commit = pushed(converted)
    files = dict(hub.repos[REPO].commits[commit])
    pack = bytearray(files["unet/model.flashpack"])
    pack[10] ^= 0xFF
    damaged = hub.repos[REPO].push({**files, "unet/model.flashpack": bytes(pack)})
    store = Store(tmp_path / "volume", ConversionConfig(hf_token=TOKEN))
    with pytest.raises(ConversionError, match=r"does not hold what its manifest says: .*unet/model.flashpack: sha256 mismatch"):
        store.ensure(parse_source(REPO, revision=damaged), "float32")
    assert not list(store.dir.glob("org--demo-flashpack-*"))


def test_a_directory_that_does_not_verify_is_not_pushed(hub, converted, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    config = copy / "vae" / "config.json"
    config.write_text(config.read_text().replace('"silu"', '"relu"'))
    with pytest.raises(ConversionError, match=r"does not verify, so nothing was pushed: .*vae/config.json: sha256 mismatch"):
        pushed(copy)
    assert REPO not in hub.repos


def test_a_push_without_a_token_says_to_set_one(hub, converted):
    with pytest.raises(AuthError, match="needs a Hugging Face token with write access: set HF_TOKEN"):
        push_to_hub(converted, REPO, ConversionConfig(hf_token=None))


def test_a_repo_diffusers_saved_with_flashpack_is_served_as_its_original_directory(
        hub, app_module, tmp_path, monkeypatch, caplog):
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi

    saved = tmp_path / "saved"
    DiffusionPipeline.from_pretrained(TRAINED_PIPELINE).save_pretrained(saved, use_flashpack=True)
    assert (saved / "unet" / "model.flashpack").is_file() and not (saved / "text_encoder" / "model.flashpack").exists()
    api = HfApi(token=TOKEN)
    api.create_repo("org/diffusers-flashpack")
    commit = api.upload_folder(repo_id="org/diffusers-flashpack", folder_path=saved).oid
    original = serve(app_module, ModelSettings(source=str(TRAINED_PIPELINE), dtype="float32", device="cpu"),
                     tmp_path / "a", monkeypatch, caplog)
    served = serve(app_module, ModelSettings(source="org/diffusers-flashpack", revision=commit, dtype="float32",
                                             device="cpu"), tmp_path / "b", monkeypatch, caplog)
    assert np.array_equal(served, original)


def test_pulling_a_gated_repo_without_a_token_says_so(hub, converted, tmp_path, monkeypatch):
    commit = pushed(converted)
    hub.repos[REPO].gated = True
    monkeypatch.delenv("HF_TOKEN")
    store = Store(tmp_path / "volume", ConversionConfig(hf_token=None))
    with pytest.raises(AuthError, match=f"repo {REPO} is gated: accept its terms .* and set HF_TOKEN"):
        store.ensure(parse_source(REPO, revision=commit), "float32")


def test_an_interrupted_push_leaves_the_branch_as_it_was(hub, converted):
    from huggingface_hub import HfApi

    HfApi(token=TOKEN).create_repo(REPO)
    before = hub.head(REPO)
    hub.fail_lfs_uploads(1, status=403)  # S3's answer to an expired link: not retried
    with pytest.raises(ConversionError, match=f"cannot push to {REPO}: .*the repo is as it was"):
        pushed(converted)
    assert hub.head(REPO) == before and set(hub.files(REPO)) == {".gitattributes"}


def test_the_pulled_entry_is_found_offline_on_the_next_start(hub, converted, tmp_path):
    commit = pushed(converted)
    source = parse_source(REPO, revision=commit)
    store = Store(tmp_path / "volume", ConversionConfig(hf_token=TOKEN))
    entry = store.ensure(source, "float32")
    hub.reset_counts()
    assert Store(tmp_path / "volume", ConversionConfig()).warm(source, "float32") == entry
    assert hub.count() == 0


def test_the_cli_pushes_and_prints_what_to_put_in_fal_toml(hub, converted, capsys):
    from conversion.cli import main

    assert main(["push", str(converted), REPO, "--no-diffusers-weights"]) == 0
    commit = hub.head(REPO)
    assert capsys.readouterr().out.splitlines() == [
        f"pushed {converted} to {REPO}@main: commit {commit}",
        f'serve it with [model] source = "{REPO}", revision = "{commit}"',
    ]
    assert "text_encoder/model.safetensors" not in hub.files(REPO)
