"""flashpack-t2i: a fal text-to-image app that starts cold in seconds.

setup() runs five phases, each one log line with its duration: **lookup** finds the served
models' store entries offline and starts reading their packs (no network, no torch), **store**
acquires and converts a model once when it has no entry yet, **load** fills the modules with views
of the packs (checksums checked as the bytes pass; a damaged entry is rebuilt once), **warmup** runs
every served shape once. The configured ControlNets and IP-Adapters are store entries of their own
through the same phases (serving.conditions). That lifecycle is conversion.entry's; the HTTP
conventions every app of this project shares (ports, body limit, billing, short 422s)
serving.app_base's; generating, cancelling, streaming, input images, LoRAs, ControlNets,
IP-Adapters and the answer's images are serving's modules.

Endpoints: POST / (text-to-image), /stream (the same with server-sent progress and previews),
/image-to-image and /inpainting (diffusers' from_pipe: the same modules; /inpaint is a deprecated
alias of /inpainting), each with the request's ``controlnets`` and ``ip_adapter`` where configured;
<endpoint>/cancel (fal's cancellation), GET|POST /health (readiness, setup timings, load).

Run it: ``make serve`` (demo, offline), ``fal run flashpack-t2i``, ``fal deploy flashpack-t2i``.
The settings are fal.toml's (``APP_PROFILE`` picks a profile). Heavy libraries are imported inside
setup(), so importing this file stays cheap and the pack reads start before them.
"""

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from secrets import randbelow
from typing import Any

import anyio
import fal
from fal.exceptions import RequestCancelledException
from fastapi import HTTPException, Request
from starlette.responses import StreamingResponse

from conversion.errors import FetchCancelled
from serving.app_base import ServingApp
from serving.billing import image_units
from serving.cancel import (
    REQUEST_ENDED,
    CancelFlag,
    CancelOutput,
    InFlight,
    cancel_on_disconnect,
    cancel_request,
    request_id_of,
)
from serving.compile import compile_denoiser
from serving.conditions import TEXT_TO_IMAGE, ConditionEntries, RequestConditions
from serving.devices import early_device, resolve_device
from serving.generate import GenerationCancelled, GenerationParams, Step, run_generation
from serving.images import fetch_https
from serving.img2img import IMAGE_TO_IMAGE, INPAINT, build_image_pipelines, overlay, read_sources
from serving.lora import LoraLibrary, RequestLoras, fuse_model_loras
from serving.output import screened_and_encoded
from serving.phases import SetupPhases, configure_logging
from serving.preview import projection_for
from serving.prompts import Prompts
from serving.safety import checker_source, load_safety_checker
from serving.schedulers import Schedulers
from serving.schema import (
    MAX_SEED,
    ConditionChoices,
    HealthOutput,
    ImageToImageOutput,
    TextToImageOutput,
    image_seeds,
    request_models,
    requested_size,
    runner_load,
)
from serving.settings import load_settings, model_source, read_requirements
from serving.stream import event_stream
from serving.warmup import warm_up

log = logging.getLogger("app")

APP_NAME = "flashpack-t2i"
HERE = Path(__file__).resolve().parent
# Local packages that travel with the deployment (uploaded as app files, importable on the runner).
LOCAL_PACKAGES = ["model_loader", "conversion", "serving"]

# The one settings read at import: fal builds the class from it, and the endpoints' request models
# carry [serving]'s bounds.
SETTINGS = load_settings(HERE / "fal.toml")
_MODELS = request_models(SETTINGS.serving, SETTINGS.safety_checker.enabled, SETTINGS.lora,
                         ConditionChoices.of(SETTINGS.model))
TextToImageInput = _MODELS.TextToImageInput
ImageToImageInput = _MODELS.ImageToImageInput
InpaintInput = _MODELS.InpaintInput


class TextToImageApp(ServingApp, name=APP_NAME):
    """Text-to-image on a FlashPack-converted diffusers pipeline."""

    # fal.toml's [deploy], key for key: fal deploys these (they win over pyproject.toml's app table).
    machine_type = SETTINGS.deploy.machine_type
    keep_alive = SETTINGS.deploy.keep_alive
    min_concurrency = SETTINGS.deploy.min_concurrency
    max_concurrency = SETTINGS.deploy.max_concurrency
    concurrency_buffer = SETTINGS.deploy.concurrency_buffer
    concurrency_buffer_perc = SETTINGS.deploy.concurrency_buffer_perc
    scaling_delay = SETTINGS.deploy.scaling_delay
    max_multiplexing = SETTINGS.deploy.max_multiplexing
    request_timeout = SETTINGS.deploy.request_timeout
    startup_timeout = SETTINGS.deploy.startup_timeout
    regions = SETTINGS.deploy.regions
    app_auth = SETTINGS.deploy.auth
    requirements = read_requirements(HERE / "requirements.txt")
    app_files = LOCAL_PACKAGES
    secrets = ["HF_TOKEN"]  # what the app reads (gated Hub repos); only the secrets listed reach the runner
    settings = SETTINGS
    max_request_bytes = SETTINGS.serving.max_request_bytes
    streams = {"/stream": TextToImageOutput}

    def setup(self) -> None:
        configure_logging()
        phases, model = SetupPhases(log), self.settings.model
        self.phase_seconds = phases.seconds
        from conversion.entry import lookup, open_store  # torch-free, like all of "lookup"

        store = open_store()
        with phases("lookup") as phase:  # store entries found offline; their pack reads started
            self.source = fuse_model_loras(model_source(model), model)  # [[model.loras]] are fused before packing
            self.model = lookup(store, self.source, model.dtype, early_device(model.device), "pipeline")
            checker = checker_source(self.settings.safety_checker)
            self.checker = checker and lookup(store, checker, model.dtype, early_device(model.device), "safety checker")
            self.extras = ConditionEntries.lookup(store, model, early_device(model.device))  # ControlNets, IP-Adapters
            phase.detail = self.model.describe()
        with phases("store") as phase:  # acquire + convert once; a warm start has nothing to do here
            phase.detail = "; ".join(f"{entry.what}: {entry.ensure()} ({entry.origin})" for entry in self._entries())
        with phases("load") as phase:  # the reads finish while the modules are built on the meta device
            import torch

            from model_loader import load_pipeline

            imported_torch = time.perf_counter() - phase.started
            self.device, dtype = resolve_device(model.device), getattr(torch, model.dtype)
            self.pipe = self.model.load(lambda path, reads: load_pipeline(path, self.device, dtype, reads), self.device)
            self.pipe.set_progress_bar_config(disable=True)
            self.safety_checker = self.checker and self.checker.load(
                lambda path, reads: load_safety_checker(path, self.device, dtype, reads), self.device)
            self._conditions = self.extras.load(self.pipe, self.device, dtype)
            self._loras = LoraLibrary.for_pipeline(self.pipe, self.settings.lora, store.root, store.config)
            size = sum(p.stat().st_size for p in self.model.path.glob("*/*.flashpack"))
            phase.rate(size, f"to {self.device}, checksums verified (import torch {imported_torch:.2f} s)")
        compiled = compile_denoiser(self.pipe, self.settings, root=store.root, store_path=self.model.path,
                                    device=self.device)
        self._lock, self._in_flight, self._fetch = threading.Lock(), InFlight(), fetch_https
        self._preview, self._image_pipes = projection_for(self.pipe), build_image_pipelines(self.pipe)
        self._schedulers, self._prompts = Schedulers.for_pipeline(self.pipe), Prompts.for_pipeline(self.pipe)
        with phases("warmup") as phase:  # every served shape once (compiled, with [compile] on)
            phase.detail = warm_up(self.pipe, self.safety_checker, self.settings.serving, self._conditions)
        if compiled is not None:
            compiled.publish()  # inductor's cache back to the volume, if the warm-up compiled anything
        log.info("setup: ready in %.2f s (profile %s, model %s, device %s)", phases.done(), self.settings.profile,
                 self.source.display, self.device)

    def _entries(self) -> list[Any]:
        return [entry for entry in (self.model, self.checker, *self.extras.entries()) if entry]

    @fal.endpoint("/")
    async def text_to_image(self, input: TextToImageInput, request: Request) -> TextToImageOutput:
        """Generate ``num_images`` images for ``prompt`` (one pipeline call). A client that disconnects,
        or fal's ``POST /cancel``, stops the generation at its next denoising step."""
        self._check_readable(input, TEXT_TO_IMAGE)
        seed = input.seed if input.seed is not None else randbelow(MAX_SEED + 1)
        return await self._serve(request, input.loras, partial(self._text_to_image, input, seed))

    @fal.endpoint("/stream")
    async def stream(self, input: TextToImageInput, request: Request) -> StreamingResponse:
        """POST / with progress, as server-sent events: a ``progress`` event per denoising step (with a
        small preview of each image), then a ``result`` event with what POST / returns. A client that
        disconnects, or fal's ``POST /stream/cancel``, stops the generation at its next step."""
        self._check_readable(input, TEXT_TO_IMAGE)  # a 422 before any event
        seed = input.seed if input.seed is not None else randbelow(MAX_SEED + 1)
        width, height = requested_size(input.image_size, self.settings.serving)
        # LoRAs resolved and control and prompt images read before any event (a 422 is an answer, not an event)
        with self._in_flight.register(request_id_of(request.headers)) as (_, flag):
            async with cancel_on_disconnect(request, flag):
                try:
                    loras = await self._loras.resolve_async(input.loras, flag)
                    conditions = await anyio.to_thread.run_sync(self._read_conditions, TEXT_TO_IMAGE, input, width,
                                                                height, flag, abandon_on_cancel=True)
                except FetchCancelled as exc:
                    raise RequestCancelledException(str(exc)) from exc
        units = image_units(width, height) * input.num_images
        return event_stream(request, self._in_flight, partial(self._text_to_image, input, seed, loras,
                                                              conditions=conditions), self._preview, units)

    @fal.endpoint("/cancel")
    def cancel(self, request: Request) -> CancelOutput:
        """fal's cancellation of a POST / request (same ``x-fal-request-id``): it stops at its next step."""
        return cancel_request(self._in_flight, request)

    @fal.endpoint("/stream/cancel")
    def cancel_stream(self, request: Request) -> CancelOutput:
        """fal's cancellation of a POST /stream request (same ``x-fal-request-id``)."""
        return cancel_request(self._in_flight, request)

    @fal.endpoint("/image-to-image")
    async def image_to_image(self, input: ImageToImageInput, request: Request) -> ImageToImageOutput:
        """Change ``image_url`` toward ``prompt`` by ``strength`` (fal's image-to-image conventions); the
        same size, seed, batching, safety and output rules as POST /. A client that disconnects, or
        fal's ``POST /image-to-image/cancel``, stops the generation at its next step."""
        return await self._edit(IMAGE_TO_IMAGE, input, request)

    @fal.endpoint("/inpainting")
    async def inpainting(self, input: InpaintInput, request: Request) -> ImageToImageOutput:
        """Repaint the white part of ``mask_url`` in ``image_url`` toward ``prompt``; the black part comes
        back as sent. Otherwise as POST /image-to-image (fal's ``POST /inpainting/cancel`` stops it)."""
        return await self._edit(INPAINT, input, request)

    @fal.endpoint("/inpaint")
    async def inpaint(self, input: InpaintInput, request: Request) -> ImageToImageOutput:
        """Deprecated: the earlier name of POST /inpainting (fal's name), answering exactly as it does;
        ``POST /inpaint/cancel`` stops it. Call POST /inpainting."""
        return await self._edit(INPAINT, input, request)

    @fal.endpoint("/image-to-image/cancel")
    def cancel_image_to_image(self, request: Request) -> CancelOutput:
        """fal's cancellation of a POST /image-to-image request (same ``x-fal-request-id``)."""
        return cancel_request(self._in_flight, request)

    @fal.endpoint("/inpainting/cancel")
    def cancel_inpainting(self, request: Request) -> CancelOutput:
        """fal's cancellation of a POST /inpainting request (same ``x-fal-request-id``)."""
        return cancel_request(self._in_flight, request)

    @fal.endpoint("/inpaint/cancel")
    def cancel_inpaint(self, request: Request) -> CancelOutput:
        """Deprecated: fal's cancellation of a POST /inpaint request (the alias of /inpainting/cancel)."""
        return cancel_request(self._in_flight, request)

    @fal.endpoint(
        "/health",
        health_check=fal.HealthCheck(start_period_seconds=SETTINGS.deploy.startup_timeout, timeout_seconds=5,
                                     failure_threshold=3, call_regularly=True),
    )
    async def health(self) -> HealthOutput:
        """Readiness, setup timings and the runner's load (fal also serves this method on GET /health).
        Async, so it answers even when every worker thread is taken."""
        if getattr(self, "pipe", None) is None:
            raise RuntimeError("setup() has not finished: no pipeline is loaded")
        threads = anyio.to_thread.current_default_thread_limiter()
        return HealthOutput(status="ok", profile=self.settings.profile, model=self.source.display,
                            device=str(self.device), store=str(self.model.path),
                            safety_checker=str(self.checker.path) if self.checker else None,
                            setup_seconds=self.phase_seconds,
                            load=runner_load(self._loras.fetches_in_flight, self._loras.settings.max_fetches,
                                             int(threads.borrowed_tokens), int(threads.total_tokens)))

    def _text_to_image(self, input: Any, seed: int, loras: RequestLoras, request_id: str, flag: CancelFlag,
                       on_step: Callable[[Step], None] | None = None,
                       conditions: RequestConditions | None = None) -> TextToImageOutput:
        """What POST / returns (and POST /stream's last event): the control and prompt images read
        (unless given), then all images in one pipeline call, under the pipeline lock (with the request's
        LoRAs and conditions, removed after it), then encoded. Runs in a worker thread."""
        width, height = requested_size(input.image_size, self.settings.serving)
        reading = time.perf_counter()
        conditions = conditions or self._read_conditions(TEXT_TO_IMAGE, input, width, height, flag)
        read = time.perf_counter() - reading
        params = GenerationParams(input.prompt, input.negative_prompt, width, height, input.num_inference_steps,
                                  input.guidance_scale, seeds=tuple(image_seeds(seed, input.num_images)),
                                  scheduler=input.scheduler)
        pictures, timings = run_generation(self.pipe, self._lock, params, request=request_id, flag=flag,
                                           on_step=on_step, loras=loras, schedulers=self._schedulers,
                                           prompts=self._prompts, conditions=conditions)
        timings = {"read": read, **timings} if conditions else timings
        return TextToImageOutput(**self._answer(input, seed, pictures, timings))

    async def _edit(self, kind: str, input: Any, request: Request) -> ImageToImageOutput:
        """POST /image-to-image and /inpainting (/inpaint): :meth:`_edit_images`, served as POST / is."""
        pipe = self._image_pipes.get(kind)
        if pipe is None:
            endpoint = request.url.path.strip("/")
            raise HTTPException(501, f"{endpoint} is not available for this model ({type(self.pipe).__name__})")
        self._check_readable(input, kind)
        seed = input.seed if input.seed is not None else randbelow(MAX_SEED + 1)
        return await self._serve(request, input.loras, partial(self._edit_images, kind, pipe, input, seed))

    async def _serve(self, request: Request, loras: Any, work: Callable[[RequestLoras, str, CancelFlag], Any]) -> Any:
        """One request: its ``loras`` resolved (or a 422), then ``work(loras, request_id, flag)`` in a
        worker thread. A client that disconnects, or fal's cancellation call, stops it: a LoRA or image
        fetch at once (its child killed), a generation at its next denoising step."""
        with self._in_flight.register(request_id_of(request.headers)) as (request_id, flag):
            async with cancel_on_disconnect(request, flag):
                try:  # abandoned if this task is cancelled: the flag (below) stops the thread
                    resolved = await self._loras.resolve_async(loras, flag)
                    return await anyio.to_thread.run_sync(work, resolved, request_id, flag, abandon_on_cancel=True)
                except (GenerationCancelled, FetchCancelled) as exc:
                    raise RequestCancelledException(str(exc)) from exc
                finally:
                    flag.cancel(REQUEST_ENDED)  # a no-op once the work is over

    def _edit_images(self, kind: str, pipe: Any, input: Any, seed: int, loras: RequestLoras, request_id: str,
                     flag: CancelFlag) -> ImageToImageOutput:
        """Read and check the input images, control and prompt images included (a 422 naming the field,
        before the pipeline is touched), then all images in one call of ``pipe`` under the pipeline lock
        (with the request's LoRAs and conditions, removed after it), screened and encoded as POST /'s."""
        reading = time.perf_counter()
        source = read_sources(input, self.settings.serving, self._fetch, flag.is_set)
        conditions = self._read_conditions(kind, input, source.width, source.height, flag)
        read = time.perf_counter() - reading
        params = GenerationParams(input.prompt, input.negative_prompt, source.width, source.height,
                                  input.num_inference_steps, input.guidance_scale,
                                  seeds=tuple(image_seeds(seed, input.num_images)), image=source.image,
                                  mask_image=source.mask, strength=input.strength, scheduler=input.scheduler)
        pictures, timings = run_generation(pipe, self._lock, params, request=request_id, flag=flag, loras=loras,
                                           schedulers=self._schedulers, prompts=self._prompts, conditions=conditions)
        if source.mask is not None:
            pictures = [overlay(picture, source) for picture in pictures]
        return ImageToImageOutput(**self._answer(input, seed, pictures, {"read": read, **timings}))

    def _read_conditions(self, kind: str, input: Any, width: int, height: int,
                         flag: CancelFlag) -> RequestConditions | None:
        """The request's ``controlnets`` and ``ip_adapter`` images read and checked (serving.conditions)."""
        return self._conditions.read(kind, input, width, height, self.settings.serving, self._fetch, flag.is_set)

    def _check_readable(self, input: Any, kind: str) -> None:
        """A 422 naming the field, before the request is queued, for what this model cannot do as asked:
        a scheduler that does not apply to it (or more steps than that scheduler runs), a prompt longer
        than it reads, or controlnets on an endpoint without a ControlNet pipeline (serving.schedulers,
        serving.prompts, serving.conditions)."""
        self._conditions.check(kind, input)
        self._schedulers.check(input.scheduler, input.num_inference_steps)
        self._prompts.check("prompt", input.prompt)
        self._prompts.check("negative_prompt", input.negative_prompt)

    def _answer(self, input: Any, seed: int, pictures: list[Any], timings: dict[str, float]) -> dict[str, Any]:
        return screened_and_encoded(input, seed, pictures, timings, self.safety_checker, self._lock,
                                    self.settings.serving.output)
