"""Train a tiny ControlNet for the demo model: a white-on-black silhouette says where (and how big)
the frozen demo model draws its shape.

The demo model (:mod:`.train`) only knows five caption positions, and even those loosely; a ControlNet
makes placement continuous and measurable. On a 2-core CPU, in about 15 minutes with the defaults,
all from one seed:
1. draw ``images`` training scenes (never a held-out colour/shape/background triple) at continuous
   random centres, each with its silhouette (the control image) and its caption without a position
   (the control image says where; the size word half the time, as the demo model was trained);
2. load the committed pipeline in float32 and freeze all of it; encode every image once with its VAE
   and every caption once with its text encoder;
3. train ``ControlNetModel.from_unet`` (a copy of the UNet's encoder half, plus zero convolutions and
   a 4x conditioning embedding to match the VAE's 16x16 latents) with the demo model's own objective:
   v-prediction on Stable Diffusion's noise schedule, min-SNR weighting, offset noise, a tenth of the
   captions dropped (so classifier-free guidance still works with a control image); its residuals go
   into the frozen UNet; AdamW, warm-up and cosine decay, gradient clipping, EMA weights;
4. score it on held-out scenes at random centres: how far the generated shape's centroid lies from the
   silhouette's, how often within a tenth of the side, how often the colour is right; and the same
   distance for the demo model alone (the baseline: without the ControlNet, it cannot know where);
5. save the EMA ControlNet (float16 safetensors) to ``conversion/demo/trained/controlnet/``, and a report,
   the loss curve and a sample grid (control image, with the ControlNet, without) to ``demo_training/report/``.

The same seed, thread count and torch build give the same weights.
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conversion.durable import write_atomic, write_errors
from conversion.sources.demo import TRAINED_CONTROLNET, TRAINED_PIPELINE

from . import shapes
from .train import REPORT_DIR, TOKENS, VObjective, _Ema, _git_commit, _grid, _lr, encode_dataset, plot_losses

# Beside the pipeline it controls; not part of it (the `demo` source's digest covers the pipeline only).
CONTROLNET_DIR = TRAINED_CONTROLNET
REPORT_NAME = "controlnet.json"
LOSS_PLOT_NAME = "controlnet_loss.png"
SAMPLES_NAME = "controlnet_samples.png"
# Two stride-2 convolutions: 64 px control images to the VAE's 16x16 latents (diffusers' default is 8x).
CONDITIONING_CHANNELS = (16, 32, 64)


@dataclass(frozen=True)
class ControlNetConfig:
    seed: int = 0
    images: int = 12000
    centre_min: float = 0.22  # the shape's centre, x and y, as fractions of the side
    centre_max: float = 0.78
    steps: int = 1500
    batch: int = 32
    lr: float = 1e-3
    zero_conv_lr_scale: float = 2.0  # the zero convolutions start at 0: a larger step gets them going
    warmup_steps: int = 50
    caption_dropout: float = 0.1
    offset_noise: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    threads: int = 2
    eval_scenes: int = 40
    eval_steps: int = 20
    eval_guidance: float = 5.0
    samples: int = 8


@dataclass(frozen=True)
class Placed:
    """A scene drawn with its centre at (x, y), fractions of the side."""

    scene: shapes.Scene
    x: float
    y: float

    def image(self) -> Image.Image:
        return shapes.draw_at(self.scene, self.x, self.y)

    def control(self) -> Image.Image:
        return shapes.draw_silhouette(self.scene, self.x, self.y)


def random_placed(rng: random.Random, config: ControlNetConfig, *, held_out: bool = False) -> Placed:
    """A random scene (training or held-out triple) at a continuous random centre."""
    scene = shapes.random_scene(rng, held_out=held_out)
    x, y = (rng.uniform(config.centre_min, config.centre_max) for _ in range(2))
    return Placed(scene, x, y)


def placement_caption(scene: shapes.Scene, rng: random.Random | None = None) -> str:
    """The caption without a position (the control image says where); the size word, when the size
    is a named one, half the time with ``rng`` (as :func:`.shapes.training_caption`), always without."""
    with_size = scene.size in shapes.SIZES.values() and (rng is None or rng.random() < 0.5)
    return scene.caption(with_size=with_size, with_position=False)


def draw_dataset(config: ControlNetConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``config.images`` training scenes and their silhouettes as uint8 (N, 3, 64, 64), and captions."""
    rng = random.Random(config.seed)
    images = np.empty((config.images, shapes.SIDE, shapes.SIDE, 3), dtype=np.uint8)
    controls = np.empty_like(images)
    captions = []
    for i in range(config.images):
        placed = random_placed(rng, config)
        images[i] = np.asarray(placed.image())
        controls[i] = np.asarray(placed.control())
        captions.append(placement_caption(placed.scene, rng))

    def chw(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()

    return chw(images), chw(controls), captions


def load_frozen_pipeline(path: Path = TRAINED_PIPELINE):
    """The committed demo pipeline in float32, every part frozen and in eval mode."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_controlnet(unet):
    """``ControlNetModel.from_unet`` with a 4x conditioning embedding, its add-embedding's head count
    fixed: ``from_unet`` does not copy ``addition_embed_type_num_heads`` (diffusers 0.42), so the
    pooled-caption embedding it copies would split into 64 heads where the UNet's uses 4."""
    from diffusers import ControlNetModel

    copied = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    # without the private keys: "_use_default_values" would put the default back
    config = {k: v for k, v in copied.config.items() if not k.startswith("_")}
    config["addition_embed_type_num_heads"] = unet.config.addition_embed_type_num_heads
    net = ControlNetModel.from_config(config)
    net.load_state_dict(copied.state_dict())
    return net


@torch.no_grad()
def encode_captions(pipe, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each distinct caption's text-encoder states (the empty caption's last), each caption's index
    into them, and the empty caption's index."""
    distinct = sorted(set(captions)) + [""]
    index = {caption: i for i, caption in enumerate(distinct)}
    ids = pipe.tokenizer(distinct, padding="max_length", max_length=TOKENS, truncation=True,
                         return_tensors="pt").input_ids
    states = pipe.text_encoder(ids)[0]
    return states, torch.tensor([index[c] for c in captions]), torch.tensor(len(distinct) - 1)


def _param_groups(net, config: ControlNetConfig) -> list[dict]:
    """The zero convolutions (into the UNet) at ``zero_conv_lr_scale`` x the learning rate, the rest at it."""
    zero = [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]
    zero_ids = {id(p) for p in zero}
    rest = [p for p in net.parameters() if id(p) not in zero_ids]
    return [{"params": rest, "scale": 1.0}, {"params": zero, "scale": config.zero_conv_lr_scale}]


def train_controlnet(net, unet, means: torch.Tensor, stds: torch.Tensor, controls: torch.Tensor,
                     states: torch.Tensor, caption_index: torch.Tensor, empty: torch.Tensor, scaling: float,
                     config: ControlNetConfig, log: Callable[[str], None]) -> list[float]:
    """The ControlNet against the frozen UNet, on the encoded dataset; returns the loss per step."""
    objective = VObjective(config.min_snr_gamma, config.offset_noise)
    gen = torch.Generator().manual_seed(config.seed + 2)
    groups = _param_groups(net, config)
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.01)
    ema = _Ema([net], config.ema_decay)
    net.train()
    losses = []
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * group["scale"] * _lr(step, config.steps, config.warmup_steps)
        idx = torch.randint(0, len(means), (config.batch,), generator=gen)
        latents, noise, t, noisy = objective.noised(means, stds, idx, scaling, gen)
        which = caption_index[idx].clone()
        which[torch.rand(config.batch, generator=gen) < config.caption_dropout] = empty
        context = states[which]
        control = controls[idx].float().div(255.0)  # [0, 1], as the ControlNet pipelines feed it
        down, mid = net(noisy, t, encoder_hidden_states=context, controlnet_cond=control, return_dict=False)
        pred = unet(noisy, t, context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss, per_image = objective.loss(pred, latents, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(step)
        losses.append(per_image.mean().item())
        if step % 50 == 0 or step == config.steps - 1:
            log(f"controlnet step {step}/{config.steps}: loss {losses[-1]:.4f}")
    ema.copy_to_model()
    net.eval()
    return losses


def held_out_placed(count: int, config: ControlNetConfig, seed: int) -> list[Placed]:
    """``count`` held-out scenes at random centres, for scoring."""
    rng = random.Random(seed)
    return [random_placed(rng, config, held_out=True) for _ in range(count)]


def centroid(image: Image.Image) -> tuple[float, float] | None:
    """The centroid (x, y, fractions of the side) of the pixels that are not the background, classified as
    :func:`.shapes.read_picture` does (nearest palette colour; the commonest is the background); None
    when every pixel is the background."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = pixels.shape
    palette = np.array(list(shapes.COLOURS.values()), dtype=np.float32)
    nearest = ((pixels[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)
    background = int(np.bincount(nearest.ravel(), minlength=len(palette)).argmax())
    ys, xs = np.nonzero(nearest != background)
    if len(xs) == 0:
        return None
    return float((xs.mean() + 0.5) / width), float((ys.mean() + 0.5) / height)


def _distance(generated: tuple[float, float] | None, target: tuple[float, float]) -> float:
    """How far the generated centroid lies from the target, in fractions of the side; an image with no
    shape counts as if its shape stood in the middle."""
    gx, gy = generated if generated is not None else (0.5, 0.5)
    return float(np.hypot(gx - target[0], gy - target[1]))


@torch.no_grad()
def score_placement(pipe, cases: Sequence[Placed], steps: int, guidance: float, controlled: bool,
                    seed: int = 0) -> tuple[dict, list]:
    """Generate each case's caption (no position), with its silhouette as the control image when
    ``controlled``; how far the shape's centroid lies from the silhouette's, and the images."""
    distances, colours, backgrounds, no_shape, images = [], 0, 0, 0, []
    for i, case in enumerate(cases):
        control = case.control()
        extra = {"image": control} if controlled else {}
        image = pipe(placement_caption(case.scene), num_inference_steps=steps, guidance_scale=guidance,
                     height=shapes.SIDE, width=shapes.SIDE, generator=torch.Generator().manual_seed(seed + i),
                     **extra).images[0]
        generated = centroid(image)
        no_shape += generated is None
        distances.append(_distance(generated, centroid(control)))
        reading = shapes.read_picture(image)
        colours += reading.colour == case.scene.colour
        backgrounds += reading.background == case.scene.background
        images.append(image)
    d = np.asarray(distances)
    metrics = {"mean_distance": float(d.mean()), "median_distance": float(np.median(d)),
               "within_0.1": float((d < 0.1).mean()), "colour": colours / len(cases),
               "background": backgrounds / len(cases), "no_shape": no_shape}
    return metrics, images


def _sample_grid(cases: Sequence[Placed], controlled: list[Image.Image], baseline: list[Image.Image]) -> Image.Image:
    """Per scene: the control image, the image with the ControlNet, the image without; two scenes a row."""
    tiles = [tile for case, a, b in zip(cases, controlled, baseline, strict=False) for tile in (case.control(), a, b)]
    return _grid(tiles, columns=6)


def train(config: ControlNetConfig, controlnet_dir: Path = CONTROLNET_DIR, report_dir: Path = REPORT_DIR,
          pipeline_dir: Path = TRAINED_PIPELINE, log: Callable[[str], None] = print) -> dict:
    """Train, save the ControlNet to ``controlnet_dir`` (replacing it) and write the report and the plots
    to ``report_dir``; by default beside the committed model and its report."""
    from diffusers import StableDiffusionControlNetPipeline

    started = time.perf_counter()
    script = _git_commit()  # before anything is written
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    pipe = load_frozen_pipeline(pipeline_dir)
    net = make_controlnet(pipe.unet)
    log(f"drawing {config.images} placed scenes ...")
    images, controls, captions = draw_dataset(config)
    means, stds = encode_dataset(pipe.vae, images)
    states, caption_index, empty = encode_captions(pipe, captions)
    scaling = float(pipe.vae.config.scaling_factor)
    t_data = time.perf_counter()
    losses = train_controlnet(net, pipe.unet, means, stds, controls, states, caption_index, empty, scaling,
                              config, log)
    t_train = time.perf_counter()

    cases = held_out_placed(config.eval_scenes, config, config.seed + 3)
    controlled_pipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=net)
    controlled_pipe.set_progress_bar_config(disable=True)
    with_net, with_images = score_placement(controlled_pipe, cases, config.eval_steps, config.eval_guidance, True)
    log(f"held-out placement with the ControlNet: {with_net}")
    without_net, without_images = score_placement(pipe, cases, config.eval_steps, config.eval_guidance, False)
    log(f"held-out placement without it: {without_net}")
    t_score = time.perf_counter()

    report_dir.mkdir(parents=True, exist_ok=True)
    if controlnet_dir.exists():
        shutil.rmtree(controlnet_dir)
    net.to(torch.float16)
    with write_errors(controlnet_dir):
        net.save_pretrained(controlnet_dir, safe_serialization=True)
    plot_losses({"ControlNet (v MSE)": losses}, report_dir / LOSS_PLOT_NAME, width=480)
    with write_errors(report_dir / SAMPLES_NAME):
        count = config.samples
        _sample_grid(cases[:count], with_images[:count], without_images[:count]).save(report_dir / SAMPLES_NAME)
    report = {
        "command": " ".join(["python -m demo_training", *sys.argv[1:]]) if sys.argv[1:2] == ["controlnet"] else None,
        **script,
        "config": asdict(config),
        "conditioning_embedding_out_channels": list(CONDITIONING_CHANNELS),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "seconds": {"data": round(t_data - started, 1), "controlnet": round(t_train - t_data, 1),
                    "scoring": round(t_score - t_train, 1), "total": round(time.perf_counter() - started, 1)},
        "held_out_placement": {"with_controlnet": with_net, "without_controlnet": without_net},
        "samples": "per scene: control image, with the ControlNet, without; two scenes a row",
        "final_loss": float(np.mean(losses[-100:])),
        "loss_curve_every_10_steps": [round(v, 5) for v in losses[::10]],
    }
    write_atomic(report_dir / REPORT_NAME, json.dumps(report, indent=1) + "\n")
    log(f"done in {report['seconds']['total']} s: {controlnet_dir}, report in {report_dir}")
    return report
