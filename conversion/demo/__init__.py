"""The demo models: a tiny pipeline trained by this project to draw shapes (``source = "demo"``, its
weights committed under ``trained/pipeline/``), the same family with seeded random weights for fast
tests (``source = "demo-random"``), and a tiny safety checker with a known verdict.

Only what the app needs at run time lives here. The code that trained the drawing model, its
training report and ``python -m demo_training train`` (which retrains it) are in the top-level
``demo_training`` package, which is not uploaded to fal runners.
"""

from .checker import DEMO_CHECKER_FLAG_LEVEL, demo_safety_checker, make_demo_safety_checker
from .random_model import DEMO_SAMPLE_SIZE, make_demo_pipeline, tiny_clip_text_config, tiny_vae
from .tokenizer import CLIP_MAX_LENGTH, clip_vocab_and_merges, make_clip_tokenizer

__all__ = [
    "CLIP_MAX_LENGTH", "DEMO_CHECKER_FLAG_LEVEL", "DEMO_SAMPLE_SIZE", "clip_vocab_and_merges", "demo_safety_checker",
    "make_clip_tokenizer", "make_demo_pipeline", "make_demo_safety_checker", "tiny_clip_text_config", "tiny_vae",
]
