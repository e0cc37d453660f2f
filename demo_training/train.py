"""Train the demo model: a tiny Stable Diffusion pipeline that draws the scenes of :mod:`.shapes`.

On a 2-core CPU, in about 20 minutes with the defaults, all from one seed:
1. draw ``images`` scenes with their captions (a tenth of the colour/shape/background triples held out);
2. train the VAE (4x down, 4 latent channels) on random crops, reconstruction + a small KL term;
3. encode every image once, set the VAE's ``scaling_factor`` so the latents have unit variance;
4. train the text encoder and UNet together: v-prediction on Stable Diffusion's noise schedule (an
   epsilon target teaches almost nothing at high noise, where the colours and layout are decided),
   min-SNR weighting, offset noise (plain backgrounds are a shift of the whole latent), a tenth of
   the captions dropped so classifier-free guidance and negative prompts work; EMA weights are kept;
5. save the EMA pipeline (``save_pretrained``, float16 safetensors) where the ``demo`` source serves it
   from (``conversion/demo/trained/pipeline/``), and the loss curves as a PNG and a report in
   ``demo_training/report/``: the command, the script's commit, the losses, and how often held-out
   captions come out with the right background, shape colour and position (:func:`.shapes.read_picture`).

The same seed, thread count and torch build give the same weights.
"""

from __future__ import annotations

import json
import math
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conversion.demo import make_clip_tokenizer, tiny_clip_text_config
from conversion.durable import write_atomic, write_errors
from conversion.sources.demo import TRAINED_PIPELINE

from . import shapes

REPO = Path(__file__).resolve().parents[1]
# Where the committed model's report and plots live (its pipeline is TRAINED_PIPELINE, what `demo` serves).
REPORT_DIR = Path(__file__).resolve().parent / "report"
REPORT_NAME = "training.json"
LOSS_PLOT_NAME = "loss.png"
SAMPLES_NAME = "held_out_samples.png"
TOKENS = 24  # the tokenizer's model_max_length: the longest training caption is 13 tokens


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    images: int = 16000
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    unet_steps: int = 2400
    unet_batch: int = 32
    unet_lr: float = 2e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    offset_noise: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    threads: int = 2
    eval_captions: int = 48
    eval_steps: int = 20
    eval_guidance: float = 5.0


def make_tokenizer():
    return make_clip_tokenizer(model_max_length=TOKENS, words=shapes.WORDS)


def make_models(tokenizer):
    """The untrained VAE, text encoder and UNet (drawn from torch's global generator)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.SIDE,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, projection_dim=64, hidden_size=64, layers=2))
    unet = UNet2DConditionModel(
        sample_size=shapes.SIDE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
        # the caption also reaches every block pooled, through the time embedding: colours are global
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    return vae, text_encoder, unet


# Stable Diffusion's noise schedule.
NOISE_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def make_scheduler():
    """The noise schedule trained on (Stable Diffusion's) and the sampler the pipeline ships with."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**NOISE_SCHEDULE, prediction_type="v_prediction", timestep_spacing="trailing",
                                       steps_offset=1)


def draw_dataset(config: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    """``config.images`` training scenes as uint8 (N, 3, 64, 64) and their captions."""
    rng = random.Random(config.seed)
    images = np.empty((config.images, shapes.SIDE, shapes.SIDE, 3), dtype=np.uint8)
    captions = []
    for i in range(config.images):
        scene = shapes.random_scene(rng)
        images[i] = np.asarray(shapes.draw(scene, rng))
        captions.append(shapes.training_caption(scene, rng))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def _lr(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(vae, images: torch.Tensor, config: TrainConfig, log: Callable[[str], None]) -> list[float]:
    """Reconstruction (L1 + MSE) of random crops plus ``kl_weight`` x KL; returns the loss per step."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    losses = []
    crop, side = config.vae_crop, images.shape[-1]
    vae.train()
    for step in range(config.vae_steps):
        for group in opt.param_groups:
            group["lr"] = config.vae_lr * _lr(step, config.vae_steps, config.warmup_steps)
        idx = torch.randint(0, len(images), (config.vae_batch,), generator=gen)
        x0, y0 = (int(v) for v in torch.randint(0, side - crop + 1, (2,), generator=gen))
        batch = _to_unit(images[idx, :, y0:y0 + crop, x0:x0 + crop])
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        loss = rec + config.kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(rec.item())
        if step % 100 == 0 or step == config.vae_steps - 1:
            log(f"vae step {step}/{config.vae_steps}: reconstruction {rec.item():.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's posterior mean and standard deviation."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(_to_unit(images[start:start + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class _Ema:
    """An exponential moving average of parameters, its decay ramping up from 0 over the first steps."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


class VObjective:
    """The demo models' training objective, shared by the denoiser and its ControlNet: v-prediction on
    Stable Diffusion's noise schedule (NOISE_SCHEDULE), min-SNR-gamma weighting, offset noise."""

    def __init__(self, min_snr_gamma: float, offset_noise: float) -> None:
        from diffusers import DDPMScheduler

        self.schedule = DDPMScheduler(**NOISE_SCHEDULE, prediction_type="v_prediction")
        alphas = self.schedule.alphas_cumprod
        snr = alphas / (1 - alphas)
        self.weights = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)  # min-SNR-gamma for a v target
        self.offset_noise = offset_noise

    def noised(self, means: torch.Tensor, stds: torch.Tensor, idx: torch.Tensor, scaling: float,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents of the images ``idx`` (drawn from their encodings), the noise, the timesteps and
        the noised latents, in that order of draws from ``gen``."""
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        noise += self.offset_noise * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        return latents, noise, t, self.schedule.add_noise(latents, noise, t)

    def loss(self, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted batch loss of ``pred`` against the v target, and each image's unweighted loss."""
        per_image = (pred - self.schedule.get_velocity(latents, noise, t)).pow(2).mean(dim=(1, 2, 3))
        return (self.weights[t] * per_image).mean(), per_image


def train_denoiser(text_encoder, unet, tokenizer, means: torch.Tensor, stds: torch.Tensor, captions: list[str],
                   scaling: float, config: TrainConfig, log: Callable[[str], None]) -> list[float]:
    """The text encoder and UNet together, on the encoded dataset; returns the loss per step."""
    objective = VObjective(config.min_snr_gamma, config.offset_noise)
    ids = tokenizer(captions, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(config.seed + 2)
    params = [*text_encoder.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01)
    ema = _Ema([text_encoder, unet], config.ema_decay)
    text_encoder.train()
    unet.train()
    losses = []
    for step in range(config.unet_steps):
        for group in opt.param_groups:
            group["lr"] = config.unet_lr * _lr(step, config.unet_steps, config.warmup_steps)
        idx = torch.randint(0, len(means), (config.unet_batch,), generator=gen)
        latents, noise, t, noisy = objective.noised(means, stds, idx, scaling, gen)
        batch_ids = ids[idx].clone()
        dropped = torch.rand(config.unet_batch, generator=gen) < config.caption_dropout
        batch_ids[dropped] = empty
        context = text_encoder(batch_ids)[0]
        loss, per_image = objective.loss(unet(noisy, t, context).sample, latents, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        losses.append(per_image.mean().item())
        if step % 100 == 0 or step == config.unet_steps - 1:
            log(f"denoiser step {step}/{config.unet_steps}: loss {losses[-1]:.4f}")
    ema.copy_to_model()
    text_encoder.eval()
    unet.eval()
    return losses


def held_out_captions(count: int, seed: int) -> list[shapes.Scene]:
    """``count`` scenes of held-out triples, with every position, for scoring."""
    rng = random.Random(seed)
    return [shapes.random_scene(rng, held_out=True) for _ in range(count)]


@torch.no_grad()
def score(pipe, scenes: Sequence[shapes.Scene], steps: int, guidance: float, seed: int = 0):
    """Generate each scene's full caption and read the picture back: per-attribute hit rates and the images."""
    hits = {"background": 0, "colour": 0, "position": 0}
    images = []
    for i, scene in enumerate(scenes):
        image = pipe(scene.caption(), num_inference_steps=steps, guidance_scale=guidance,
                     height=shapes.SIDE, width=shapes.SIDE,
                     generator=torch.Generator().manual_seed(seed + i)).images[0]
        reading = shapes.read_picture(image)
        hits["background"] += reading.background == scene.background
        hits["colour"] += reading.colour == scene.colour
        hits["position"] += reading.position == scene.position
        images.append(image)
    return {k: v / len(scenes) for k, v in hits.items()}, images


def plot_losses(curves: dict[str, list[float]], path: Path, width: int = 720, height: int = 260) -> None:
    """One panel per curve: the loss per step (light) and its running mean (dark), log scale."""
    from PIL import Image, ImageDraw

    panel_w = width // len(curves)
    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    for k, (name, values) in enumerate(curves.items()):
        left, top, right, bottom = k * panel_w + 50, 25, (k + 1) * panel_w - 10, height - 30
        logs = np.log10(np.maximum(np.asarray(values, dtype=np.float64), 1e-8))
        window = max(1, len(logs) // 50)
        smooth = np.convolve(logs, np.ones(window) / window, mode="valid")
        lo, hi = float(np.floor(logs.min() * 2) / 2), float(np.ceil(logs.max() * 2) / 2)
        lo, hi = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)

        def xy(i, v, n, left=left, right=right, top=top, bottom=bottom, lo=lo, hi=hi):
            return left + (right - left) * i / max(1, n - 1), bottom - (bottom - top) * (v - lo) / (hi - lo)

        pen.rectangle((left, top, right, bottom), outline="black")
        for decade in np.arange(lo, hi + 1e-9, 0.5):
            y = xy(0, decade, 1)[1]
            pen.line((left, y, right, y), fill=(225, 225, 225))
            pen.text((left - 45, y - 6), f"{10 ** decade:.3g}", fill="black")
        pen.line([xy(i, v, len(logs)) for i, v in enumerate(logs)], fill=(170, 190, 230))
        offset = (len(logs) - len(smooth)) / 2
        pen.line([xy(i + offset, v, len(logs)) for i, v in enumerate(smooth)], fill=(20, 40, 140), width=2)
        pen.text((left, 6), f"{name}: {len(values)} steps (log scale)", fill="black")
        pen.text((left, bottom + 8), "step 0", fill="black")
        pen.text((right - 50, bottom + 8), f"{len(values)}", fill="black")
    with write_errors(path):
        image.save(path)


def _grid(images, columns: int = 8):
    from PIL import Image

    side = images[0].size[0]
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * side, rows * side), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * side, (i // columns) * side))
    return grid


# The code a run depends on (this package and the tokenizer and text-encoder config it takes from
# conversion/demo), not what a run writes.
_SCRIPT_PATHS = ("demo_training", "conversion/demo", ":(exclude)demo_training/report",
                 ":(exclude)conversion/demo/trained")


def _git_commit() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *_SCRIPT_PATHS],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "script_modified": None}
    return {"commit": commit, "script_modified": bool(dirty)}


def train(config: TrainConfig, pipeline_dir: Path = TRAINED_PIPELINE, report_dir: Path = REPORT_DIR,
          log: Callable[[str], None] = print) -> dict:
    """Train, save the pipeline to ``pipeline_dir`` (replacing it) and write the report and the plots to
    ``report_dir``; by default the committed model's places."""
    from diffusers import StableDiffusionPipeline

    started = time.perf_counter()
    script = _git_commit()  # before anything is written
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = make_tokenizer()
    vae, text_encoder, unet = make_models(tokenizer)
    log(f"drawing {config.images} scenes ...")
    images, captions = draw_dataset(config)
    t_data = time.perf_counter()
    vae_losses = train_vae(vae, images, config, log)
    t_vae = time.perf_counter()
    means, stds = encode_dataset(vae, images)
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"latents: std {means.std():.3f}, mean {means.mean():.3f}: scaling_factor {scaling:.4f}")
    denoiser_losses = train_denoiser(text_encoder, unet, tokenizer, means, stds, captions, scaling, config, log)
    t_unet = time.perf_counter()

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    hits, samples = score(pipe, held_out_captions(config.eval_captions, config.seed + 3),
                          config.eval_steps, config.eval_guidance)
    log(f"held-out captions: {hits}")
    report_dir.mkdir(parents=True, exist_ok=True)
    if pipeline_dir.exists():
        shutil.rmtree(pipeline_dir)
    pipe.to(torch.float16)
    with write_errors(pipeline_dir):
        pipe.save_pretrained(pipeline_dir, safe_serialization=True)
    plot_losses({"VAE reconstruction": vae_losses, "denoiser (v MSE)": denoiser_losses}, report_dir / LOSS_PLOT_NAME)
    with write_errors(report_dir / SAMPLES_NAME):
        _grid(samples).save(report_dir / SAMPLES_NAME)
    report = {
        "command": " ".join(["python -m demo_training", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else None,
        **script,
        "config": asdict(config),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "seconds": {"data": round(t_data - started, 1), "vae": round(t_vae - t_data, 1),
                    "denoiser": round(t_unet - t_vae, 1), "total": round(time.perf_counter() - started, 1)},
        "scaling_factor": scaling,
        "held_out_hit_rates": hits,
        "chance": {"background": 1 / len(shapes.COLOURS), "colour": 1 / (len(shapes.COLOURS) - 1),
                   "position": 1 / len(shapes.POSITIONS)},
        "final_losses": {"vae": float(np.mean(vae_losses[-100:])), "denoiser": float(np.mean(denoiser_losses[-100:]))},
        "loss_curves_every_10_steps": {"vae": [round(v, 5) for v in vae_losses[::10]],
                                       "denoiser": [round(v, 5) for v in denoiser_losses[::10]]},
    }
    write_atomic(report_dir / REPORT_NAME, json.dumps(report, indent=1) + "\n")
    log(f"done in {report['seconds']['total']} s: {pipeline_dir}, report in {report_dir}")
    return report
