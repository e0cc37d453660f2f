"""Tiny single-file checkpoints in the original (non-diffusers) key layouts of each family, built
from tiny diffusers pipelines: the inverse of diffusers' conversions (``single_file_utils``), for
these architectures. The tests check each round trip against the diffusers directory.

- SD 1.x (LDM): ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
  ``cond_stage_model.transformer.*`` (CLIP, transformers' names)
- SDXL: the same UNet and VAE layout (plus ``label_emb``), ``conditioner.embedders.0.transformer.*``
  (CLIP) and ``conditioner.embedders.1.model.*`` (OpenCLIP bigG: fused qkv, ``resblocks``,
  transposed ``text_projection``)
- Flux: Black Forest Labs' transformer-only file (``double_blocks``, ``single_blocks``, fused qkv
  and qkv+mlp, ``final_layer`` with shift/scale swapped), as ``flux1-dev.safetensors`` is
"""

from __future__ import annotations

import base64
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch


def checkpoint_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The tensors as the bytes of one safetensors file."""
    from safetensors.torch import save

    return save(tensors)


def data_url(tensors: dict[str, torch.Tensor] | bytes) -> str:
    """The tensors (or a file's bytes) as one file in a ``data:`` URL."""
    data = tensors if isinstance(tensors, bytes) else checkpoint_bytes(tensors)
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# ---------------------------------------------------------------------------------------------
# SD 1.x and SDXL: the LDM UNet and VAE


def ldm_checkpoint(pipeline_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny SD pipeline as an original (LDM) single-file checkpoint: the inverse of diffusers'
    convert_ldm_unet/vae/clip_checkpoint, for this architecture (the test checks the round trip)."""
    out = _ldm_unet_and_vae(pipeline_dir)
    for k, v in _load(pipeline_dir / "text_encoder" / "model.safetensors").items():
        out["cond_stage_model.transformer." + _text_model_key(k)] = v
    return out


def sdxl_checkpoint(pipeline_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny SDXL pipeline as an original (SGM) single-file checkpoint, as
    ``sd_xl_base_1.0.safetensors`` is laid out: the inverse of diffusers' convert_ldm_unet_checkpoint
    (with ``label_emb``), convert_ldm_clip_checkpoint and convert_open_clip_checkpoint."""
    out = _ldm_unet_and_vae(pipeline_dir)
    for k, v in _load(pipeline_dir / "text_encoder" / "model.safetensors").items():
        out["conditioner.embedders.0.transformer." + _text_model_key(k)] = v
    out.update(_open_clip(_load(pipeline_dir / "text_encoder_2" / "model.safetensors"), "conditioner.embedders.1.model."))
    return out


def _text_model_key(key: str) -> str:
    # transformers >= 5.6 saves CLIPTextModel without its text_model. wrapper; checkpoints keep it
    return key if key.startswith("text_model.") else "text_model." + key


_OPEN_CLIP_LEAVES = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def _open_clip(text_encoder: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's names (the inverse of diffusers'
    convert_open_clip_checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in text_encoder.items():
        if k in _OPEN_CLIP_LEAVES:
            out[prefix + _OPEN_CLIP_LEAVES[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault(f"{m[1]}.{m[3]}", {})[m[2]] = v
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.*)", k):
            rest = m[2]
            for new, old in _OPEN_CLIP_LAYER:
                rest = rest.replace(new, old)
            out[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = v
        else:
            raise KeyError(k)
    for name, parts in qkv.items():
        layer, leaf = name.split(".")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def _ldm_unet_and_vae(pipeline_dir: Path) -> dict[str, torch.Tensor]:
    ucfg = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    vcfg = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    up_attn = [t.startswith("CrossAttn") for t in ucfg["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for k, v in _load(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").items():
        out["model.diffusion_model." + _ldm_unet_key(k, ucfg["layers_per_block"], up_attn)] = v
    for k, v in _load(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors").items():
        if ".mid_block.attentions." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out["first_stage_model." + _ldm_vae_key(k, len(vcfg["up_block_types"]))] = v
    return out


_RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                 ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _ldm_resnet(rest: str) -> str:
    for new, old in _RESNET_NAMES:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def _ldm_unet_key(key: str, layers: int, up_attn: list[bool]) -> str:
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    per = layers + 1
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{1 + b * per + i}.0.{_ldm_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + b * per + i}.1.{rest}"
        return f"input_blocks.{1 + b * per + layers}.0.op.{rest.removeprefix('conv.')}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[2])}.{_ldm_resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{b * per + i}.0.{_ldm_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{b * per + i}.1.{rest}"
        return f"output_blocks.{b * per + layers}.{2 if up_attn[b] else 1}.{rest}"
    raise KeyError(key)


def _ldm_vae_key(key: str, n_up: int) -> str:
    head, _, leaf = key.rpartition(".")
    if head in ("encoder.conv_norm_out", "decoder.conv_norm_out"):
        return f"{head.split('.')[0]}.norm_out.{leaf}"
    key = key.replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        if m[2] == "resnets":
            return f"{m[1]}.mid.block_{int(m[3]) + 1}.{m[4]}"
        name, leaf = m[4].rsplit(".", 1)
        short = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[name]
        return f"{m[1]}.mid.attn_1.{short}.{leaf}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(?:resnets\.(\d+)|downsamplers\.0)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}" if m[2] else f"encoder.down.{m[1]}.downsample.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.*)", key):
        i = n_up - 1 - int(m[1])
        return f"decoder.up.{i}.block.{m[2]}.{m[3]}" if m[2] else f"decoder.up.{i}.upsample.{m[3]}"
    return key


# ---------------------------------------------------------------------------------------------
# Flux: Black Forest Labs' transformer-only layout

_FLUX_FIXED = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
                "proj_out": "linear2"}
_FLUX_FUSED = {  # fused original tensor <- its diffusers parts, in order
    "double": {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
    "single": {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
}


def flux_checkpoint(pipeline_dir: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tiny Flux pipeline's transformer as Black Forest Labs' single file (``prefix``
    ``"model.diffusion_model."`` gives ComfyUI's naming): the inverse of diffusers'
    convert_flux_transformer_checkpoint_to_diffusers."""
    sd = _load(pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for k in list(sd):
        head, _, leaf = k.rpartition(".")
        leaf_name = "scale" if head.endswith(("norm_q", "norm_k", "norm_added_q", "norm_added_k")) else leaf
        if head in _FLUX_FIXED:
            out[f"{_FLUX_FIXED[head]}.{leaf}"] = sd.pop(k)
        elif head == "norm_out.linear":
            shift_scale = sd.pop(k).chunk(2, dim=0)  # diffusers keeps (scale, shift), the original (shift, scale)
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift_scale[1], shift_scale[0]])
        elif m := re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)", head):
            names = _FLUX_DOUBLE if m[1] == "transformer_blocks" else _FLUX_SINGLE
            block = ("double_blocks." if m[1] == "transformer_blocks" else "single_blocks.") + m[2]
            if m[3] in names:
                out[f"{block}.{names[m[3]]}.{leaf_name}"] = sd.pop(k)
    for kind, block_re in (("double", "transformer_blocks"), ("single", "single_transformer_blocks")):
        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith(block_re + ".")})
        for i in blocks:
            name = ("double_blocks." if kind == "double" else "single_blocks.") + str(i)
            for fused, parts in _FLUX_FUSED[kind].items():
                for leaf in ("weight", "bias"):
                    out[f"{name}.{fused}.{leaf}"] = torch.cat([sd.pop(f"{block_re}.{i}.{p}.{leaf}") for p in parts])
    if sd:
        raise KeyError(sorted(sd))
    return {prefix + k: v for k, v in out.items()}


@contextmanager
def flux_mapping_for_tiny_models():
    """diffusers' Flux transformer mapping, made to work at a tiny width.

    ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes FLUX.1's width (``inner_dim =
    3072``, MLP 12288) to split each single block's fused ``linear1`` into q, k, v and the MLP, so a
    tiny checkpoint cannot go through it as is. This runs the real mapping on a copy whose
    ``linear1`` tensors are padded to that width (each part at the offset FLUX.1's would have) and
    cuts its four outputs back: everything else, and the split itself, is diffusers' own code.
    """
    from diffusers.loaders import single_file_model

    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    real = entry["checkpoint_mapping_fn"]
    width, mlp = 3072, 4 * 3072

    def tiny(checkpoint, **kwargs):
        checkpoint = {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.items()}
        dim = checkpoint["img_in.weight"].shape[0]
        sizes = (dim, dim, dim, 4 * dim)
        for k in [k for k in checkpoint if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)]:
            parts = torch.split(checkpoint[k], sizes, dim=0)
            padded = torch.zeros((3 * width + mlp, *parts[0].shape[1:]), dtype=parts[0].dtype)
            for part, offset in zip(parts, (0, width, 2 * width, 3 * width), strict=True):
                padded[offset:offset + part.shape[0]] = part
            checkpoint[k] = padded
        out = real(checkpoint, **kwargs)
        for k in [k for k in out if k.startswith("single_transformer_blocks.")]:
            if re.search(r"\.attn\.to_[qkv]\.(weight|bias)$", k):
                out[k] = out[k][:dim].contiguous()
            elif re.search(r"\.proj_mlp\.(weight|bias)$", k):
                out[k] = out[k][:4 * dim].contiguous()
        return out

    entry["checkpoint_mapping_fn"] = tiny
    try:
        yield
    finally:
        entry["checkpoint_mapping_fn"] = real
