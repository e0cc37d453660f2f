"""Tiny pipelines and models with seeded random weights, built offline from configs.

Shared by the tests: Stable Diffusion (the demo pipeline), SDXL (two text encoders, one with a
projection), Flux (a transformer with a T5 encoder whose embeddings are tied), and a GPT-2 with
tied input/output embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from conversion.demo import make_clip_tokenizer, make_demo_pipeline, tiny_clip_text_config, tiny_vae

SD_HEIGHT = 64  # pixels; the demo VAE upsamples 4x from 16x16 latents


def _seeded(seed: int):
    torch.manual_seed(seed)


def make_tiny_sd(dst: str | os.PathLike[str], seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline source directory (the demo pipeline)."""
    return make_demo_pipeline(dst, seed=seed)


def make_tiny_sd_with_safety_checker(dst: str | os.PathLike[str], seed: int = 0) -> Path:
    """The tiny SD pipeline plus a tiny safety checker (a class from a diffusers pipeline module,
    with a ``requires_grad=False`` parameter) and its CLIP image processor."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    dst = Path(dst)
    base = make_tiny_sd(dst.with_name(dst.name + "-base"), seed)
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    config = CLIPConfig(
        text_config=tiny_clip_text_config(pipe.tokenizer).to_dict(),
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 4, "projection_dim": 32},
        projection_dim=32,
    )
    _seeded(seed)
    pipe.register_modules(
        safety_checker=StableDiffusionSafetyChecker(config),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(dst, safe_serialization=True)
    return dst


def tiny_sdxl_pipeline(seed: int = 0, force_zeros_for_empty_prompt: bool = False, text_encoder_2_width: int = 32):
    """A tiny StableDiffusionXLPipeline in memory (CLIPTextModel + CLIPTextModelWithProjection).

    ``text_encoder_2_width`` is the second encoder's hidden size: a single-file SDXL checkpoint
    needs it to differ from the first's (32), as in SDXL (768 and 1280), for diffusers to tell the
    two encoders apart by shape."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_clip_tokenizer()
    _seeded(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text (32)
        cross_attention_dim=32 + text_encoder_2_width,  # the two text encoders' hidden states side by side
        norm_num_groups=8,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer, hidden_size=text_encoder_2_width))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=make_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )


def make_tiny_sdxl(dst: str | os.PathLike[str], seed: int = 0, text_encoder_2_width: int = 32) -> Path:
    """A tiny StableDiffusionXLPipeline source directory (``force_zeros_for_empty_prompt=False``,
    the opposite of the default, so tests can see pipeline config kwargs survive)."""
    tiny_sdxl_pipeline(seed, text_encoder_2_width=text_encoder_2_width).save_pretrained(dst, safe_serialization=True)
    return Path(dst)


def make_t5_tokenizer(model_max_length: int = 32):
    """A small Unigram ``T5Tokenizer``: specials, the space marker, letters, a few words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("▁" + w, -3.0) for w in ("a", "photo", "of", "the", "cat", "dog", "on")]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(tokenizer, seed: int = 0):
    """A ``T5EncoderModel`` whose ``shared`` and ``encoder.embed_tokens`` weights are tied."""
    from transformers import T5Config, T5EncoderModel

    _seeded(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def make_tiny_flux(dst: str | os.PathLike[str], seed: int = 0, guidance_embeds: bool = False) -> Path:
    """A tiny FluxPipeline source directory (transformer, CLIP + T5 text encoders); with
    ``guidance_embeds`` its transformer takes a guidance scale, as FLUX.1 dev's does (schnell's does not)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = make_clip_tokenizer()
    tokenizer_2 = make_t5_tokenizer()
    _seeded(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    text_encoder_2 = tiny_t5_encoder(tokenizer_2, seed)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(dst, safe_serialization=True)
    return Path(dst)


def tiny_gpt2(seed: int = 0):
    """A GPT-2 LM whose output projection is tied to its input embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(seed)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def make_tiny_checker_repo(dst: str | os.PathLike[str], flag_level: int = 235, weights: str = "bin") -> Path:
    """The demo safety checker laid out as the Hub's CompVis/stable-diffusion-safety-checker is at
    its pinned commit: ``config.json``, ``pytorch_model.bin`` (``weights="bin"``: with that
    checkpoint's older key names, ``vision_model.vision_model.*``; or ``model.safetensors``) and
    ``preprocessor_config.json`` side by side, plus a README."""
    from conversion.demo import demo_safety_checker

    dst = Path(dst)
    checker, extractor = demo_safety_checker(flag_level)
    checker.config.save_pretrained(dst)
    if weights == "bin":
        legacy = {("vision_model." + k if k.startswith("vision_model.") else k): v
                  for k, v in checker.state_dict().items()}
        torch.save(legacy, dst / "pytorch_model.bin")
    else:
        checker.save_pretrained(dst)
    extractor.save_pretrained(dst)
    (dst / "README.md").write_text("a tiny safety checker\n")
    return dst


# LoRAs for the tiny models: PEFT layers with random (non-zero) weights, saved in diffusers' format.
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def _lora_layers(model, targets, rank: int, lora_alpha: int, seed: int) -> dict:
    """The LoRA state dict of a fresh copy of ``model``'s architecture with a random adapter on ``targets``."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    _seeded(seed)
    fresh = type(model).from_config(model.config) if hasattr(type(model), "from_config") else type(model)(model.config)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(targets), init_lora_weights=False)
    inject_adapter_in_model(config, fresh)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(fresh).items()}


def make_tiny_lora(dst: str | os.PathLike[str], unet, text_encoder=None, *, seed: int = 1, rank: int = 4,
                   lora_alpha: int | None = None, metadata: bool = False) -> Path:
    """A LoRA file for ``unet`` (and ``text_encoder``'s attention when given): random A and B on
    the attention projections, written by ``StableDiffusionPipeline.save_lora_weights`` (diffusers'
    own format, ``unet.``/``text_encoder.`` prefixes). ``lora_alpha`` defaults to the rank; with
    ``metadata`` the file records it in ``lora_adapter_metadata``, as diffusers' training scripts do.
    Returns the file."""
    from diffusers import StableDiffusionPipeline

    alpha = lora_alpha if lora_alpha is not None else rank
    unet_layers = _lora_layers(unet, UNET_ATTENTION, rank, alpha, seed)
    text_layers = _lora_layers(text_encoder, CLIP_ATTENTION, rank, alpha, seed + 1) if text_encoder is not None else None
    config = {"r": rank, "lora_alpha": alpha, "init_lora_weights": False}
    extra = {}
    if metadata:
        extra["unet_lora_adapter_metadata"] = {**config, "target_modules": list(UNET_ATTENTION)}
        if text_encoder is not None:
            extra["text_encoder_lora_adapter_metadata"] = {**config, "target_modules": list(CLIP_ATTENTION)}
    StableDiffusionPipeline.save_lora_weights(dst, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
                                              safe_serialization=True, **extra)
    return Path(dst) / "pytorch_lora_weights.safetensors"


def data_uri(path: str | os.PathLike[str]) -> str:
    """A file as a ``data:`` URI (how the tests hand LoRAs to the app without a network)."""
    import base64

    return "data:application/octet-stream;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def passthrough_vae():
    """The demo VAE's architecture with weights set by hand (not drawn) so that it roughly
    reconstructs its input, unlike the demo's random VAE, whose decoder ignores what it is given:
    with it, image-to-image can be seen to keep the input's layout.

    RGB travels in the first three channels, every residual and attention branch is zeroed (an
    identity), each downsampler averages 2x2 pixels and each upsampler repeats them, and the two
    GroupNorm -> SiLU ends are biased far into SiLU's linear range. What comes back is the input
    averaged over 4x4 blocks and normalized per image by the GroupNorms (so correlated with the
    input, not equal to it). ``scaling_factor = 1``: the latents keep unit scale, so low strength adds
    little noise to them. Latent variance ~0 (log-variance -30): encoding is deterministic.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=256, scaling_factor=1.0,
    )
    linear = 10.0  # SiLU(z + 10) ~ z + 10 for a normalized z

    def identity(conv, channels=None):
        weight, kernel = conv.weight, conv.weight.shape[-1]
        for c in range(channels or min(weight.shape[0], weight.shape[1])):
            weight[c, c, kernel // 2, kernel // 2] = 1.0

    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
        encoder, decoder = vae.encoder, vae.decoder
        identity(encoder.conv_in)
        for block in encoder.down_blocks:
            for resnet in block.resnets:
                if resnet.conv_shortcut is not None:
                    identity(resnet.conv_shortcut)
            for down in block.downsamplers or []:  # stride 2 after a (0, 1, 0, 1) pad: taps 1-2 average 2x2
                for c in range(down.conv.weight.shape[0]):
                    down.conv.weight[c, c, 1:3, 1:3] = 0.25
        encoder.conv_norm_out.bias.fill_(linear)
        identity(encoder.conv_out, 3)
        encoder.conv_out.bias[:3] = -linear
        encoder.conv_out.bias[4:] = -30.0  # log-variance
        identity(vae.quant_conv)
        identity(vae.post_quant_conv)
        identity(decoder.conv_in, 3)
        for block in decoder.up_blocks:
            for resnet in block.resnets:
                if resnet.conv_shortcut is not None:
                    identity(resnet.conv_shortcut)
            for up in block.upsamplers or []:
                identity(up.conv)
        decoder.conv_norm_out.bias.fill_(linear)
        identity(decoder.conv_out, 3)
        decoder.conv_out.weight.mul_(0.5)
        decoder.conv_out.bias[:3] = -0.5 * linear
    return vae


def make_tiny_sd_passthrough(dst: str | os.PathLike[str], seed: int = 0) -> Path:
    """The demo pipeline with :func:`passthrough_vae` in place of its random VAE."""
    dst = make_demo_pipeline(dst, seed=seed)
    passthrough_vae().save_pretrained(dst / "vae", safe_serialization=True)
    return dst
