"""A tiny Stable-Diffusion-architecture pipeline with seeded random weights (``source = "demo-random"``).

A real *source* directory (what ``save_pretrained`` writes, safetensors weights, a local CLIP
tokenizer), small enough to build in well under a second and to run on a CPU: the tests convert
and serve it where speed matters more than pictures. Its images are structured noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..durable import write_errors
from .tokenizer import make_clip_tokenizer

# 64x64 latents decoded 4x (three VAE blocks): 256x256 images by default.
DEMO_SAMPLE_SIZE = 64


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
