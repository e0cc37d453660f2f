"""A tiny safety checker whose weights are set by hand rather than drawn, so its verdict is known in
advance: it flags near-white images and nothing else (random weights would flag nothing or
everything, unpredictably)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from model_loader.diffusers_layout import (
    FEATURE_EXTRACTOR,
    MODEL_INDEX_NAME,
    SAFETY_CHECKER,
    safety_checker_index,
)

from ..durable import write_atomic, write_errors

# The demo checker flags an image whose pixels are all at least this gray level (0-255): near-white.
DEMO_CHECKER_FLAG_LEVEL = 250
_CHECKER_SIDE = 32  # the checker sees a 32x32 center crop as four 16x16 patches
_CHECKER_HIDDEN = 32


def demo_safety_checker(flag_level: int = DEMO_CHECKER_FLAG_LEVEL):
    """A tiny ``StableDiffusionSafetyChecker`` and its ``CLIPImageProcessor``, with weights set by
    hand so that the checker flags exactly the images that are about as bright as a uniform gray
    of ``flag_level`` or brighter (``0``: every image).

    How: each patch embeds to its mean brightness (in one hidden dimension, beside two constant
    ones that fix the scale of the layer norms); uniform attention carries the mean over the
    patches to the class token; the projection keeps that dimension and a constant one, so the
    image embedding turns toward the first concept embedding as the image gets brighter, and the
    concept's threshold is that cosine for the uniform ``flag_level`` gray. The score rises with
    every patch's brightness: an image whose pixels are all at least ``flag_level`` is flagged, one
    clearly darker is not. The other concepts and the special-care ones never fire.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor

    if not 0 <= flag_level <= 255:
        raise ValueError(f"flag_level must be a gray level 0-255, got {flag_level}")
    small = {"hidden_size": _CHECKER_HIDDEN, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 1}
    config = CLIPConfig(text_config=small, projection_dim=_CHECKER_HIDDEN,
                        vision_config={**small, "image_size": _CHECKER_SIDE, "patch_size": _CHECKER_SIDE // 2})
    checker = StableDiffusionSafetyChecker(config).eval()
    extractor = CLIPImageProcessor(size={"shortest_edge": _CHECKER_SIDE},
                                   crop_size={"height": _CHECKER_SIDE, "width": _CHECKER_SIDE})
    vision = checker.vision_model
    layer = vision.encoder.layers[0]
    patch = vision.embeddings.patch_embedding.weight
    with torch.no_grad():
        for param in checker.parameters():
            param.zero_()
        patch[0] = 1.0 / patch[0].numel()  # hidden 0: the patch's mean (normalized) brightness
        vision.embeddings.position_embedding.weight[:, 1] = 4.0  # hidden 1 and 2: constants
        vision.embeddings.position_embedding.weight[:, 2] = -4.0
        for norm in (vision.pre_layrnorm, layer.layer_norm1, layer.layer_norm2, vision.post_layernorm):
            norm.weight.fill_(1.0)
        layer.self_attn.v_proj.weight[3, 0] = 1.0  # zero queries and keys: uniform attention
        layer.self_attn.out_proj.weight[3, 3] = 4.0  # hidden 3 of the class token: the mean brightness
        checker.visual_projection.weight[0, 3] = 1.0
        checker.visual_projection.weight[1, 1] = 1.0
        checker.concept_embeds[0, 0] = 1.0  # "bright"; concepts 1-16 and the special-care ones are empty
        checker.concept_embeds_weights.fill_(2.0)  # a cosine never exceeds 2: never flagged
        checker.special_care_embeds_weights.fill_(2.0)
        gray = Image.new("RGB", (_CHECKER_SIDE, _CHECKER_SIDE), (flag_level,) * 3)
        pixels = extractor([gray], return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        cosine = float(cosine_distance(embeds, checker.concept_embeds[:1])[0, 0])
        # diffusers flags when round(cosine - threshold, 3) > 0: the flag_level gray scores 0.001
        checker.concept_embeds_weights[0] = cosine - 0.001
    return checker, extractor


def make_demo_safety_checker(dst_dir: str | os.PathLike[str], flag_level: int = DEMO_CHECKER_FLAG_LEVEL) -> Path:
    """Write :func:`demo_safety_checker` to ``dst_dir`` as a safety checker source directory:
    ``safety_checker/`` (config + safetensors), ``feature_extractor/`` and ``model_index.json``."""
    dst = Path(dst_dir)
    checker, extractor = demo_safety_checker(flag_level)
    with write_errors(dst):
        checker.save_pretrained(dst / SAFETY_CHECKER, safe_serialization=True)
        extractor.save_pretrained(dst / FEATURE_EXTRACTOR)
        write_atomic(dst / MODEL_INDEX_NAME, json.dumps(safety_checker_index(), indent=2) + "\n")
    return dst
