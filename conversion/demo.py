"""A tiny Stable-Diffusion-architecture pipeline with seeded random weights, and a tiny safety checker.

The pipeline is a real *source* directory (what ``save_pretrained`` writes, safetensors weights, a
local CLIP tokenizer), small enough to build in well under a second and to run on a CPU: the app's
offline ``demo`` profile serves it and the tests convert it. Its images are structured noise.

The safety checker (:func:`make_demo_safety_checker`) is a ``StableDiffusionSafetyChecker`` whose
weights are set by hand rather than drawn, so its verdict is known in advance: it flags near-white
images and nothing else (random weights would flag nothing or everything, unpredictably).
"""

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

from .durable import write_atomic, write_errors

# 64x64 latents decoded 4x (three VAE blocks): 256x256 images by default.
DEMO_SAMPLE_SIZE = 64
CLIP_MAX_LENGTH = 77


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level CLIP BPE vocabulary: every byte alone and as a word end, plus a few merges.

    Any text tokenizes (unknown words fall back to single bytes), which is all a demo needs.
    """
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in ["a", "photo", "of", "the", "cat", "dog", "an", "astronaut", "on", "horse"]:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    return vocab, merges


def make_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """A ``CLIPTokenizer`` over :func:`clip_vocab_and_merges` (no download)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_clip_text_config(tokenizer, projection_dim: int = 32, hidden_size: int = 32, layers: int = 2):
    """A small ``CLIPTextConfig`` whose vocabulary and special ids match ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae():
    """An ``AutoencoderKL`` with three small blocks: latents are decoded 4x larger."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=DEMO_SAMPLE_SIZE * 4,
    )


def make_demo_pipeline(dst_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny ``StableDiffusionPipeline`` with weights drawn from ``seed`` to ``dst_dir``.

    The same seed gives byte-identical files.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    dst = Path(dst_dir)
    tokenizer = make_clip_tokenizer()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=DEMO_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            # attention only at the coarsest level (16x16 tokens for 64x64 latents) keeps it fast
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with write_errors(dst):
        pipe.save_pretrained(dst, safe_serialization=True)
    return dst


# The demo checker flags an image whose pixels are all at least this gray level (0-255): near-white.
DEMO_CHECKER_FLAG_LEVEL = 235
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))
