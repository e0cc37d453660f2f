"""The demo model's training script and its world: scenes drawn from captions are read back exactly,
held-out triples are never trained on, the same seed trains the same weights, and the committed
model comes with the report of the run that made it."""

from __future__ import annotations

import json
import random
import re

import pytest
from PIL import Image as PILImage

from conversion.sources.demo import TRAINED_PIPELINE
from demo_training import shapes
from demo_training.train import LOSS_PLOT_NAME, REPORT_DIR, REPORT_NAME, TrainConfig, train

TINY = TrainConfig(images=64, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, warmup_steps=2, eval_captions=2,
                   eval_steps=2, threads=1)


def test_read_picture_reads_back_the_background_colour_and_position_of_every_drawn_scene():
    rng = random.Random(0)
    for _ in range(200):
        scene = shapes.random_scene(rng)
        reading = shapes.read_picture(shapes.draw(scene, rng))
        assert (reading.background, reading.colour, reading.position) == (scene.background, scene.colour,
                                                                          scene.position), scene


def test_read_picture_sees_no_shape_on_a_plain_image():
    assert shapes.read_picture(PILImage.new("RGB", (64, 64), shapes.COLOURS["green"])) == shapes.Reading(
        "green", None, None)


def test_training_scenes_never_use_a_held_out_triple_and_held_out_scenes_always_do():
    rng = random.Random(1)
    held = set(shapes.held_out_triples())
    assert 20 <= len(held) <= 30
    assert ("red", "circle", "blue") not in held  # the README's example is a training caption
    for _ in range(500):
        s = shapes.random_scene(rng)
        assert (s.colour, s.shape, s.background) not in held
        h = shapes.random_scene(rng, held_out=True)
        assert (h.colour, h.shape, h.background) in held


def test_captions_use_only_the_tokenizers_whole_words():
    from demo_training.train import make_tokenizer

    tokenizer, rng = make_tokenizer(), random.Random(2)
    for _ in range(100):
        caption = shapes.training_caption(shapes.random_scene(rng), rng)
        ids = tokenizer(caption).input_ids
        assert len(ids) == len(caption.split()) + 2, caption  # one token per word, plus start and end


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return [train(TINY, root / name / "pipeline", root / name, log=lambda _: None) and root / name for name in "ab"]


def test_training_twice_with_one_seed_writes_byte_identical_weights(two_runs):
    a, b = two_runs
    weights = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert len(weights) == 3  # vae, text encoder, unet
    for rel in weights:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_training_writes_a_pipeline_a_report_and_the_loss_curves(two_runs):
    out = two_runs[0]
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["config"]["unet_steps"] == TINY.unet_steps
    assert len(report["loss_curves_every_10_steps"]["denoiser"]) == 1
    assert set(report["held_out_hit_rates"]) == {"background", "colour", "position"}
    assert PILImage.open(out / LOSS_PLOT_NAME).format == "PNG"
    assert (out / "pipeline" / "model_index.json").is_file()


def test_the_committed_model_comes_with_the_report_of_the_run_that_made_it():
    assert (TRAINED_PIPELINE / "model_index.json").is_file()
    report = json.loads((REPORT_DIR / REPORT_NAME).read_text())
    # (`python -m conversion.demo train` was its name at the commit the committed report names)
    assert report["command"].startswith(("python -m demo_training train", "python -m conversion.demo train"))
    assert re.fullmatch(r"[0-9a-f]{40}", report["commit"]) and report["script_modified"] is False
    assert report["config"] == {**TrainConfig().__dict__}  # trained with the defaults
    hits, chance = report["held_out_hit_rates"], report["chance"]
    assert hits["background"] >= 3 * chance["background"] and hits["colour"] >= 3 * chance["colour"], hits


def test_the_readme_pictures_command_without_a_server_says_so_and_writes_nothing(tmp_path):
    from demo_training.__main__ import main

    with pytest.raises(SystemExit, match=r"cannot reach the demo server at http://127\.0\.0\.1:9 .*make serve"):
        main(["images", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "pictures")])
    assert not (tmp_path / "pictures").exists()


# --------------------------------------------------------------------------------------------------
# The demo model's ControlNet (demo_training.controlnet)


@pytest.fixture(scope="module")
def two_controlnet_runs(tmp_path_factory):
    from demo_training.controlnet import ControlNetConfig
    from demo_training.controlnet import train as train_controlnet

    tiny = ControlNetConfig(images=32, steps=3, batch=4, warmup_steps=1, eval_scenes=2, eval_steps=2, samples=2,
                            threads=1)
    root = tmp_path_factory.mktemp("controlnet")
    for name in "ab":
        train_controlnet(tiny, root / name / "controlnet", root / name, log=lambda _: None)
    return tiny, root / "a", root / "b"


def test_controlnet_training_twice_with_one_seed_writes_byte_identical_weights(two_controlnet_runs):
    _, a, b = two_controlnet_runs
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (a / "controlnet" / name).read_bytes() == (b / "controlnet" / name).read_bytes(), name


def test_controlnet_training_writes_a_controlnet_folder_and_its_report(two_controlnet_runs):
    from diffusers import ControlNetModel

    from demo_training.controlnet import LOSS_PLOT_NAME as CONTROLNET_LOSS
    from demo_training.controlnet import REPORT_NAME as CONTROLNET_REPORT

    tiny, out, _ = two_controlnet_runs
    net = ControlNetModel.from_pretrained(out / "controlnet")
    assert list(net.config.conditioning_embedding_out_channels) == [16, 32, 64]  # 4x, as the demo VAE
    report = json.loads((out / CONTROLNET_REPORT).read_text())
    assert report["config"]["steps"] == tiny.steps
    assert set(report["held_out_placement"]) == {"with_controlnet", "without_controlnet"}
    assert PILImage.open(out / CONTROLNET_LOSS).format == "PNG"


def test_the_committed_controlnet_comes_with_its_report_and_places_shapes_where_told():
    from conversion.sources.demo import TRAINED_CONTROLNET
    from demo_training.controlnet import REPORT_NAME as CONTROLNET_REPORT
    from demo_training.controlnet import ControlNetConfig

    assert sorted(p.name for p in TRAINED_CONTROLNET.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    report = json.loads((REPORT_DIR / CONTROLNET_REPORT).read_text())
    assert report["command"].startswith("python -m demo_training controlnet")
    assert report["config"] == {**ControlNetConfig().__dict__}  # trained with the defaults
    placed, alone = report["held_out_placement"]["with_controlnet"], report["held_out_placement"]["without_controlnet"]
    assert placed["mean_distance"] < 0.05 and placed["within_0.1"] >= 0.9 and alone["within_0.1"] < 0.5
