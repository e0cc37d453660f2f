"""Tiny ControlNets, IP-Adapters and image encoders for a given UNet, built offline, saved as their
real sources are (a ControlNet and an image encoder as ``save_pretrained`` folders, an IP-Adapter
as one ``.safetensors`` file with ``image_proj.*`` and ``ip_adapter.*`` tensors, as h94/IP-Adapter's)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# The demo VAE and the tiny test VAEs scale by 4 (64 px -> 16 latents): the ControlNet's control image
# embedding must too (two stride-2 convolutions, where SD's scale by 8 has three).
CONDITIONING_CHANNELS = (8, 16, 32)


def tiny_controlnet(unet, seed: int = 0):
    """A ControlNet of ``unet``'s architecture (diffusers' ``ControlNetModel.from_unet``), its zero
    convolutions drawn at random so that it changes the image (as trained ones do)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    with torch.no_grad():
        net.controlnet_cond_embedding.conv_out.weight.normal_(0, 0.3)
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    return net


def make_tiny_controlnet(dst: str | os.PathLike[str], unet, seed: int = 0, variant: str | None = None) -> Path:
    """:func:`tiny_controlnet` saved as a diffusers model folder (``config.json`` + safetensors)."""
    tiny_controlnet(unet, seed).save_pretrained(dst, safe_serialization=True, variant=variant)
    return Path(dst)


def tiny_image_encoder(seed: int = 0, projection_dim: int = 32):
    """A CLIPVisionModelWithProjection at 32x32 pixels, as IP-Adapters' image encoders are (ViT-H's
    1024-wide projection there, ``projection_dim`` here)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=4, projection_dim=projection_dim)
    return CLIPVisionModelWithProjection(config)


def make_tiny_image_encoder(dst: str | os.PathLike[str], seed: int = 0) -> Path:
    """:func:`tiny_image_encoder` saved as a transformers model folder."""
    tiny_image_encoder(seed).save_pretrained(dst, safe_serialization=True)
    return Path(dst)


def ip_adapter_tensors(unet, image_embed_dim: int = 32, seed: int = 0, tokens: int = 4) -> dict[str, torch.Tensor]:
    """An IP-Adapter for ``unet`` as h94/IP-Adapter's files hold it: the image projection
    (``image_proj.proj``: the image embedding to ``tokens`` extra context tokens, and its norm)
    and per cross-attention layer, numbered as diffusers numbers them (1, 3, 5, ...), the key and
    value projections of those tokens (``ip_adapter.<n>.to_k_ip`` / ``to_v_ip``)."""
    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(cross * tokens, image_embed_dim) * 0.2,
        "image_proj.proj.bias": torch.randn(cross * tokens) * 0.1,
        "image_proj.norm.weight": 1 + torch.randn(cross) * 0.1,
        "image_proj.norm.bias": torch.randn(cross) * 0.1,
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attention = unet.get_submodule(name.removesuffix(".processor"))
        for projection in ("to_k", "to_v"):
            shape = getattr(attention, projection).weight.shape
            tensors[f"ip_adapter.{key_id}.{projection}_ip.weight"] = torch.randn(shape) * 0.3
        key_id += 2
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def make_tiny_ip_adapter(dst: str | os.PathLike[str], unet, seed: int = 0) -> Path:
    """:func:`ip_adapter_tensors` written as one ``.safetensors`` file (``dst``); returns it."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_tensors(unet, seed=seed), str(dst))
    return dst
