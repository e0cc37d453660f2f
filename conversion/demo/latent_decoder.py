"""The demo model's VAE decoder as a plain torch module (neither a diffusers nor a transformers
model): latents in, images in [-1, 1] out. module_app.py serves it through the store and the loader
(``factory = "conversion.demo.latent_decoder:build_latent_decoder"``); the store converts its
weights from the ``demo-vae-decoder`` source (the decoder's tensors of the trained demo VAE)."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..sources.demo import TRAINED_PIPELINE

VAE_CONFIG = TRAINED_PIPELINE / "vae" / "config.json"
# The tensors of the demo VAE that the decoder holds (the rest is the encoder's).
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


class LatentDecoder(nn.Module):
    """``post_quant_conv`` then the decoder of an AutoencoderKL, after undoing its scaling factor."""

    def __init__(self, config: dict[str, Any]) -> None:
        from diffusers.models.autoencoders.vae import Decoder

        super().__init__()
        channels = int(config["latent_channels"])
        self.latent_channels = channels
        self.upscale = 2 ** (len(config["block_out_channels"]) - 1)
        self.scaling_factor = float(config["scaling_factor"])
        self.post_quant_conv = nn.Conv2d(channels, channels, 1)
        self.decoder = Decoder(in_channels=channels, out_channels=config["out_channels"],
                               up_block_types=tuple(config["up_block_types"]),
                               block_out_channels=tuple(config["block_out_channels"]),
                               layers_per_block=config["layers_per_block"], norm_num_groups=config["norm_num_groups"],
                               act_fn=config["act_fn"], mid_block_add_attention=config["mid_block_add_attention"])

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents / self.scaling_factor))


def build_latent_decoder() -> LatentDecoder:
    """The demo decoder, built from the trained demo VAE's config (weights come from the store)."""
    return LatentDecoder(json.loads(VAE_CONFIG.read_text()))
