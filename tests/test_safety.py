"""serving.safety and the demo checker: which images are flagged, how flagged images are replaced
(black, as fal's endpoints do), one batch per request, and the checker loaded from its store entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conversion.config import ConversionConfig
from conversion.demo import DEMO_CHECKER_FLAG_LEVEL, demo_safety_checker
from serving.safety import SafetyChecker, black_like, checker_source, load_safety_checker, screen
from serving.settings import SafetyCheckerSettings


def in_memory(flag_level: int = DEMO_CHECKER_FLAG_LEVEL) -> SafetyChecker:
    model, extractor = demo_safety_checker(flag_level)
    return SafetyChecker(model, extractor, "cpu", torch.float32)


@pytest.fixture(scope="module")
def demo() -> SafetyChecker:
    return in_memory()


def gray(level: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, (level, level, level))


def noise(seed: int, low: int = 0, high: int = 256, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(low, high, (size[1], size[0], 3), dtype=np.uint8))


class NeverCalled:
    def flags(self, images):
        raise AssertionError("the checker ran")


# --------------------------------------------------------------------------------------------------
# The demo checker


def test_demo_checker_flags_a_uniform_gray_exactly_from_its_flag_level_up(demo):
    levels = list(range(0, 256, 5))
    flags = demo.flags([gray(level) for level in levels])
    assert [level for level, flag in zip(levels, flags, strict=True) if flag] == [250, 255]
    assert demo.flags([gray(249), gray(250)]) == [False, True]


def test_demo_checker_flags_noisy_near_white_images_and_no_full_range_noise(demo):
    assert demo.flags([noise(seed, low=250) for seed in range(4)]) == [True] * 4
    assert demo.flags([noise(seed) for seed in range(4)]) == [False] * 4


def test_a_checker_built_with_flag_level_zero_flags_every_image():
    assert in_memory(flag_level=0).flags([gray(0), noise(1), gray(255)]) == [True, True, True]


def test_demo_checker_is_the_same_on_every_build():
    first, second = demo_safety_checker()[0].state_dict(), demo_safety_checker()[0].state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------------------------------
# Screening a request's images


def test_screen_replaces_each_flagged_image_by_a_black_image_of_its_size_and_keeps_the_others(demo):
    white, dark = gray(255, (48, 40)), noise(3, size=(64, 32))
    images, flags = screen([white, dark], demo, enabled=True)
    assert flags == [True, False]
    assert images[0].mode == "RGB" and images[0].size == (48, 40)
    assert np.array_equal(np.asarray(images[0]), np.zeros((40, 48, 3), dtype=np.uint8))
    assert images[1] is dark and np.array_equal(np.asarray(dark), np.asarray(noise(3, size=(64, 32))))


def test_screen_runs_the_checker_once_for_all_images_of_a_request(demo, monkeypatch):
    batches = []
    forward = type(demo.model).forward

    def spy(self, clip_input, images):
        batches.append(clip_input.shape[0])
        return forward(self, clip_input, images)

    monkeypatch.setattr(type(demo.model), "forward", spy)
    _, flags = screen([gray(255), gray(0), gray(250), gray(10)], demo, enabled=True)
    assert batches == [4] and flags == [True, False, True, False]


def test_screen_with_the_checker_disabled_checks_nothing_and_flags_nothing():
    white = gray(255)
    images, flags = screen([white, white], NeverCalled(), enabled=False)  # type: ignore[arg-type]
    assert images == [white, white] and images[0] is white and flags == [False, False]


def test_screen_without_a_checker_flags_nothing():
    white = gray(255)
    images, flags = screen([white], None, enabled=True)
    assert images[0] is white and flags == [False]


def test_black_like_is_black_rgb_of_the_same_size():
    black = black_like(Image.new("RGBA", (7, 3), (255, 255, 255, 255)))
    assert (black.mode, black.size, black.getextrema()) == ("RGB", (7, 3), ((0, 0), (0, 0), (0, 0)))


# --------------------------------------------------------------------------------------------------
# The checker's source and its load from the store


def test_no_checker_source_for_source_none():
    assert checker_source(SafetyCheckerSettings(source="none")) is None
    assert checker_source(SafetyCheckerSettings(source="demo")).kind == "demo-safety-checker"


def test_the_demo_checker_loads_from_its_store_entry_with_the_reads_started_for_it(tmp_path, monkeypatch):
    import model_loader.pipeline
    from conversion.manifest import packs_to_read
    from conversion.sources import DemoCheckerSource
    from conversion.store import Store
    from model_loader import start_pack_reads

    path = Store(tmp_path, ConversionConfig.from_env()).ensure(DemoCheckerSource(), "float32")
    reads = start_pack_reads(packs_to_read(path), "cpu")

    def no_second_read(*args, **kwargs):
        raise AssertionError("the pack was read again")

    monkeypatch.setattr(model_loader.pipeline, "read_pack", no_second_read)
    checker = load_safety_checker(path, "cpu", torch.float32, reads)
    assert reads.names == ["safety_checker"]
    assert checker.flags([gray(255), gray(200)]) == [True, False]
    assert checker.model.concept_embeds.requires_grad is False
