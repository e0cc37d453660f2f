"""The recipes a user would otherwise pick, as fal apps, for bench/startup.py.

- ``StockApp``: ``setup()`` calls ``DiffusionPipeline.from_pretrained(dir, torch_dtype=float16)``
  on the original diffusers directory ($BENCH_SOURCE_DIR).
- ``FalPrereadApp``: fal's documented recipe ("parallel file loading", docs.fal.ai/documentation/
  serverless/optimizations/parallel-file-loading): ``setup()`` imports torch and diffusers, pre-reads
  every file of the model directory in parallel (``find DIR -type f | xargs -P 32 -I {} cat {} >
  /dev/null``, through a shell, as the page shows), then ``DiffusionPipeline.from_pretrained``.
- ``FlashpackApp``: flashpack 0.4.5's recipe on the converted directory ($BENCH_STORE_DIR): each
  torch component built empty (accelerate's ``init_empty_weights``) and filled with
  ``flashpack.assign_from_file``; tokenizers and scheduler with their own ``from_pretrained``.

Both serve ``GET /health`` (200 once setup() is done) and ``POST /`` (one image; the body names
``prompt``, ``width``, ``height``, ``num_inference_steps``, ``guidance_scale``, ``seed``), and log
``recipe: setup done in X s`` so the bench can read the phase off their output.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
from pathlib import Path

import fal
from pydantic import BaseModel

log = logging.getLogger("recipe")


class Request(BaseModel):
    prompt: str
    width: int = 256
    height: int = 256
    num_inference_steps: int = 1
    guidance_scale: float = 1.0
    seed: int = 0


class Response(BaseModel):
    image: str
    seconds: float


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _generate(pipe, request: Request) -> Response:
    import torch

    t0 = time.perf_counter()
    image = pipe(
        prompt=request.prompt, width=request.width, height=request.height,
        num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed), output_type="pil",
    ).images[0]
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return Response(image=base64.b64encode(buf.getvalue()).decode(), seconds=time.perf_counter() - t0)


def _log_setup(started: float) -> None:
    logging.basicConfig(level=logging.INFO)
    log.info("recipe: setup done in %.3f s", time.perf_counter() - started)


class _PipelineRecipe(fal.App):
    """What both loading recipes serve once ``setup()`` has set ``self.pipe``."""

    @fal.endpoint("/")
    def generate(self, request: Request) -> Response:
        return _generate(self.pipe, request)

    @fal.endpoint("/health")
    def health(self) -> dict:
        return {"status": "ok"}


class StockApp(_PipelineRecipe, name="bench-stock"):
    def setup(self) -> None:
        started = time.perf_counter()
        import torch
        from diffusers import DiffusionPipeline

        device = _device()
        kwargs = {"device_map": "cuda"} if device == "cuda" else {}
        self.pipe = DiffusionPipeline.from_pretrained(os.environ["BENCH_SOURCE_DIR"], torch_dtype=torch.float16,
                                                      **kwargs)
        self.pipe.set_progress_bar_config(disable=True)
        _log_setup(started)


class FalPrereadApp(_PipelineRecipe, name="bench-fal-preread"):
    def setup(self) -> None:
        started = time.perf_counter()
        import subprocess

        import torch
        from diffusers import DiffusionPipeline

        model_dir = os.environ["BENCH_SOURCE_DIR"]
        t0 = time.perf_counter()
        # Pre-read all model files in parallel (fal's page, word for word)
        subprocess.check_call(
            f"find '{model_dir}' -type f | xargs -P 32 -I {{}} cat {{}} > /dev/null",
            shell=True,
        )
        logging.basicConfig(level=logging.INFO)
        log.info("recipe: pre-read %.3f s", time.perf_counter() - t0)
        device = _device()
        kwargs = {"device_map": "cuda"} if device == "cuda" else {}
        self.pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float16, **kwargs)
        self.pipe.set_progress_bar_config(disable=True)
        _log_setup(started)


class FlashpackApp(_PipelineRecipe, name="bench-flashpack"):
    def setup(self) -> None:
        started = time.perf_counter()
        import diffusers
        import torch
        import transformers
        from accelerate import init_empty_weights
        from flashpack import assign_from_file

        root = Path(os.environ["BENCH_STORE_DIR"])
        index = json.loads((root / "model_index.json").read_text())
        device = _device()
        parts = {}
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            library = diffusers if spec[0] == "diffusers" else transformers
            cls = getattr(library, spec[1])
            comp = root / name
            if (comp / "model.flashpack").is_file():
                with init_empty_weights():
                    if spec[0] == "diffusers":
                        model = cls.from_config(cls.load_config(comp))
                    else:
                        model = cls._from_config(cls.config_class.from_pretrained(comp), dtype=torch.float16)
                assign_from_file(model, str(comp / "model.flashpack"), device=device)
                parts[name] = model.eval()
            else:
                parts[name] = cls.from_pretrained(comp)
        pipeline_cls = getattr(diffusers, index["_class_name"])
        expected, _ = pipeline_cls._get_signature_keys(pipeline_cls)
        self.pipe = pipeline_cls(**{k: parts.get(k) for k in expected})
        self.pipe.set_progress_bar_config(disable=True)
        _log_setup(started)


class ImportsOnlyApp(fal.App, name="bench-imports-only"):
    """The floor of every recipe: setup() imports what an SDXL pipeline needs and loads nothing."""

    def setup(self) -> None:
        started = time.perf_counter()
        import torch  # noqa: F401
        from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

        _log_setup(started)

    @fal.endpoint("/health")
    def health(self) -> dict:
        return {"status": "ok"}
