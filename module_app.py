"""latent-decoder: any torch module served through the store and the loader.

The module here is the demo model's VAE decoder (conversion.demo.latent_decoder: a plain
``nn.Module``), served as a latent-to-image endpoint. Your own module in three steps: write a
function that builds it (``factory``), name its safetensors weights (``source``), and replace the
endpoint. setup() runs the phases of app.py: **lookup** (the store entry found offline, its pack
read started), **store** (the weights acquired and converted once), **load** (the module built on
the meta device, its tensors views of the pack; strict names and shapes; a damaged entry rebuilt
once).

Run it: ``make serve-module`` (offline), ``fal run latent-decoder``, ``fal deploy latent-decoder``.
"""

import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import fal
from fal.exceptions import FieldException
from fal.toolkit import Image
from fastapi import Request
from pydantic import BaseModel, Field, model_validator

from serving.app_base import ServingApp
from serving.cancel import CancelOutput, InFlight, cancel_request, request_id_of
from serving.devices import early_device, resolve_device
from serving.module_model import ModuleSettings, module_factory, module_source
from serving.output import encode_image
from serving.phases import SetupPhases, configure_logging
from serving.settings import read_requirements

log = logging.getLogger("app")

HERE = Path(__file__).resolve().parent
MODULE = ModuleSettings(
    factory="conversion.demo.latent_decoder:build_latent_decoder",  # builds the module (no weights)
    source="demo-vae-decoder",  # its weights: a .safetensors file or folder, org/name, org/name/file, https://
    dtype="float32",
    device="auto",
)
MAX_LATENT_SIDE = 128  # latent rows and columns (the image is 4x that for the demo decoder)
INLINE_IMAGES = True  # data: URIs (offline, no credentials); False uploads them to fal's CDN


class DecodeInput(BaseModel):
    latents: list[list[list[Annotated[float, Field(allow_inf_nan=False)]]]] = Field(
        title="Latents",
        description="Channels x rows x columns of the demo VAE's latent space (4 channels), finite values.",
        examples=[[[[0.5, -0.5], [1.0, 0.0]], [[0.0, 0.2], [0.3, 0.1]], [[-1.0, 0.5], [0.0, 0.0]],
                   [[0.1, 0.1], [0.1, 0.1]]]],
        min_length=1, max_length=64,
    )
    output_format: Literal["png", "jpeg"] = Field(default="png", title="Output format")

    @model_validator(mode="after")
    def _rectangular(self) -> "DecodeInput":
        rows = {len(channel) for channel in self.latents}
        columns = {len(row) for channel in self.latents for row in channel}
        if len(rows) != 1 or len(columns) != 1 or not 1 <= min(rows | columns) <= max(rows | columns) <= MAX_LATENT_SIDE:
            raise ValueError(f"latents must be channels x rows x columns, every row as long, 1 to "
                             f"{MAX_LATENT_SIDE} rows and columns")
        return self


class DecodeOutput(BaseModel):
    image: Image = Field(description="The decoded image.")
    timings: dict[str, float] = Field(description="Seconds spent decoding and encoding.")


class LatentDecoderApp(ServingApp, name="latent-decoder"):
    """The demo VAE decoder, a plain torch module, served from the store."""

    machine_type = "S"  # a CPU is plenty for the demo decoder; a GPU type for your own module
    keep_alive = 60
    requirements = read_requirements(HERE / "requirements.txt")
    app_files = ["model_loader", "conversion", "serving"]
    max_request_bytes = 4 * 1024 * 1024

    def setup(self) -> None:
        configure_logging()
        phases = SetupPhases(log)
        self.phase_seconds = phases.seconds
        from conversion.entry import lookup, open_store  # torch-free

        store = open_store()
        with phases("lookup") as phase:
            self.entry = lookup(store, module_source(MODULE), MODULE.dtype, early_device(MODULE.device), "module")
            phase.detail = self.entry.describe()
        with phases("store") as phase:
            phase.detail = f"{self.entry.ensure()} ({self.entry.origin})"
        with phases("load") as phase:
            import torch

            from model_loader import load_module

            self.device, dtype = resolve_device(MODULE.device), getattr(torch, MODULE.dtype)
            factory = module_factory(MODULE)
            self.module = self.entry.load(lambda path, reads: load_module(
                factory, path, self.device, torch_dtype=dtype, reads=reads, strict=MODULE.strict), self.device)
            phase.detail = f"{type(self.module).__name__} on {self.device}"
        self._lock, self._in_flight = threading.Lock(), InFlight()
        log.info("setup: ready in %.2f s (module %s, device %s)", phases.done(), MODULE.source, self.device)

    @fal.endpoint("/")
    def decode(self, input: DecodeInput, request: Request) -> DecodeOutput:
        """Decode ``latents`` into an image."""
        import torch

        channels = self.module.latent_channels
        if len(input.latents) != channels:
            raise FieldException("latents", f"latents must have {channels} channels, got {len(input.latents)}")
        with self._in_flight.register(request_id_of(request.headers)):
            started = time.perf_counter()
            latents = torch.tensor([input.latents], dtype=next(self.module.parameters()).dtype, device=self.device)
            with self._lock, torch.inference_mode():
                pixels = self.module(latents)[0]
            decoded = time.perf_counter()
            image = encode_image(to_pil(pixels), input.output_format, INLINE_IMAGES)
        return DecodeOutput(image=image, timings={"decode": round(decoded - started, 4),
                                                  "encode": round(time.perf_counter() - decoded, 4)})

    @fal.endpoint("/cancel")
    def cancel(self, request: Request) -> CancelOutput:
        """fal's cancellation call; a decode is too short to stop midway, so it answers for a running one."""
        return cancel_request(self._in_flight, request)

    @fal.endpoint("/health")
    def health(self) -> dict[str, Any]:
        """Readiness and setup timings (fal also serves this method on GET /health)."""
        return {"status": "ok", "module": MODULE.factory, "store": str(self.entry.path), "device": str(self.device),
                "setup_seconds": self.phase_seconds}


def to_pil(pixels: Any) -> Any:
    """An image tensor in [-1, 1] (channels x rows x columns) as an 8-bit RGB PIL image."""
    import torch
    from PIL import Image as PILImage

    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to("cpu", dtype=torch.uint8)
    return PILImage.fromarray(array.permute(1, 2, 0).numpy())
