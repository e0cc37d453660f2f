"""flashpack-t2i: a fal text-to-image app that starts cold in seconds.

This file is the ``fal.App`` and what its setup() needs from the store and the loader:
  - settings   fal.toml is loaded once here (``SETTINGS``), one profile chosen by APP_PROFILE
               (``demo`` = offline): fal builds the class from it (machine, scaling, requirements,
               the endpoint's request model). The models and loading live in serving.settings.
  - the app    setup(): lookup (+ start reading) -> store (acquire + convert once) -> load -> warm up,
               for the pipeline and the safety checker ([safety_checker], serving.safety) alike;
               POST / generates images (one pipeline call for all of them; flagged ones blacked out),
               POST /stream the same with server-sent progress events and previews, POST /image-to-image
               and /inpaint start from an input image (pipelines built with diffusers' from_pipe, sharing
               the loaded modules), POST <endpoint>/cancel are fal's cancellation calls; GET|POST /health
               reports readiness and setup timings.
  - helpers    of setup() and the endpoint: reads, devices, encoding.
The public request/response models are serving.schema's (built from [serving]), the 413 body
limit and short 422 answers serving.http's; generating is serving.generate's, stopping a request
serving.cancel's, the event stream and its previews serving.stream's and serving.preview's, input
images serving.images' and image-to-image / inpainting serving.img2img's, a request's `loras`
(and [[model.loras]], fused before packing) serving.lora's.

Run it: ``make serve`` (demo, offline), ``fal run flashpack-t2i`` (a fal runner),
``fal deploy flashpack-t2i``. Heavy libraries (torch, diffusers, most of conversion, model_loader)
are imported inside setup(): importing this file stays cheap, and the pack reads start before them.
At the top only serving is imported (pydantic, fal.toolkit, and the stdlib-only conversion.sources,
which serving.settings uses to check [model] when the settings load, and conversion.durable, which
serving.compile writes inductor's cache with).
"""

import glob
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
from fal.toolkit import Image
from fastapi import FastAPI, HTTPException, Request
from starlette.responses import StreamingResponse

from conversion.errors import FetchCancelled
from serving.billing import BillableUnits, image_units
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
from serving.generate import GenerationCancelled, GenerationParams, Step, generate, run_generation
from serving.http import RequestBodyLimit, shorten_validation_answers
from serving.images import fetch_https
from serving.img2img import IMAGE_TO_IMAGE, INPAINT, ImagePipelines, build_image_pipelines, overlay, read_sources
from serving.lora import LoraLibrary, RequestLoras, fuse_model_loras
from serving.ports import check_ports_free, serve_ports
from serving.preview import projection_for
from serving.safety import checker_source, load_safety_checker, screen
from serving.schema import (
    MAX_SEED,
    HealthOutput,
    ImageToImageOutput,
    TextToImageOutput,
    image_seeds,
    preset_size,
    request_models,
    requested_size,
    runner_load,
)
from serving.settings import SettingsError, load_settings, model_source, read_requirements
from serving.stream import document_stream, event_stream

log = logging.getLogger("app")

APP_NAME = "flashpack-t2i"
HERE = Path(__file__).resolve().parent
SETTINGS_FILE = HERE / "fal.toml"
REQUIREMENTS_FILE = HERE / "requirements.txt"
# Local packages that travel with the deployment (uploaded as app files, importable on the runner).
LOCAL_PACKAGES = ["model_loader", "conversion", "serving"]

# The one settings read at import: fal builds the class from it. The endpoint's request model
# carries [serving]'s bounds, so it is built here too.
SETTINGS = load_settings(SETTINGS_FILE)
_MODELS = request_models(SETTINGS.serving, SETTINGS.safety_checker.enabled, SETTINGS.lora)
TextToImageInput = _MODELS.TextToImageInput
ImageToImageInput = _MODELS.ImageToImageInput
InpaintInput = _MODELS.InpaintInput


# --------------------------------------------------------------------------------------------------
# The app


class TextToImageApp(fal.App, name=APP_NAME):
    """Text-to-image on a FlashPack-converted diffusers pipeline."""

    machine_type = SETTINGS.deploy.machine_type
    keep_alive = SETTINGS.deploy.keep_alive
    min_concurrency = SETTINGS.deploy.min_concurrency
    max_concurrency = SETTINGS.deploy.max_concurrency
    max_multiplexing = SETTINGS.deploy.max_multiplexing
    request_timeout = SETTINGS.deploy.request_timeout
    startup_timeout = SETTINGS.deploy.startup_timeout
    app_auth = SETTINGS.deploy.auth
    requirements = read_requirements(REQUIREMENTS_FILE)
    app_files = LOCAL_PACKAGES
    secrets = ["HF_TOKEN"]  # what the app reads (gated Hub repos); only the secrets listed reach the runner
    settings = SETTINGS

    async def serve(self, **kwargs: Any) -> None:
        """fal's server, once its two ports are known to be free: fal binds them only after setup()."""
        check_ports_free(serve_ports(super().serve, kwargs))
        await super().serve(**kwargs)

    def _add_extra_middlewares(self, app: FastAPI) -> None:
        super()._add_extra_middlewares(app)
        app.add_middleware(RequestBodyLimit, max_bytes=self.settings.serving.max_request_bytes)
        app.add_middleware(BillableUnits)  # outermost: it sees every answer, the body limit's 413 too

    def _add_extra_routes(self, app: FastAPI) -> None:
        super()._add_extra_routes(app)
        # The last hook of fal's _build_app, after it registered its 422 handler: wrap that handler
        # so it keeps fal's format and headers but echoes only short inputs.
        shorten_validation_answers(app)
        document_stream(app, "/stream", TextToImageOutput)

    def setup(self) -> None:
        _configure_logging()
        started = time.perf_counter()
        self.phase_seconds: dict[str, float] = {}
        model = self.settings.model
        from conversion.store import Store, resolve_root, verify_mode  # torch-free, like all of "lookup"

        root = resolve_root()
        store = Store(root)

        # 1. lookup: a warm store entry, checked offline (sizes, small files' sha256), and the
        #    reads of its packs started at once: they are the load's first leg and run while
        #    torch, diffusers and transformers import. No network, no torch.
        reads = None
        with self._phase("lookup") as phase:
            # [[model.loras]]: fused before packing, so they are part of the store key
            self.source = fuse_model_loras(model_source(model), model)
            self.store_path = store.warm(self.source, model.dtype, verify_mode())
            device = early_device(model.device) if self.store_path is not None else None
            if device is not None:
                reads = start_reads(self.store_path, device)
            phase.detail = (f"{self.store_path}; {len(reads.names)} pack(s) reading in the background" if reads
                            else str(self.store_path) if self.store_path else "no store entry yet")
            checker_reads = self._look_up_safety_checker(store)  # the same, for the checker's entry

        # 2-3. store: acquire + convert once; a warm start has nothing to do here.
        with self._phase("store") as phase:
            if self.store_path is None:
                from conversion.store import ensure_converted

                self.store_path = Path(ensure_converted(self.source, root=root, dtype=model.dtype))
                phase.detail = str(self.store_path)
            else:
                phase.detail = "warm: found in lookup"
            if self.checker_source is not None and self.checker_path is None:
                from conversion.store import ensure_converted

                self.checker_path = Path(ensure_converted(self.checker_source, root=root, dtype=model.dtype))
                phase.detail += f"; safety checker {self.checker_path}"

        # 4. load: finish the reads (each pack's checksum checked as its bytes pass) while the
        #    modules are built on the meta device; parameters become views of the packs' blocks.
        with self._phase("load") as phase:
            import torch

            from model_loader import ChecksumMismatchError

            imported_torch = time.perf_counter() - phase.started

            self.device = resolve_device(model.device)
            if reads is None:
                reads = start_reads(self.store_path, self.device)
            if checker_reads is None and self.checker_path is not None:
                checker_reads = start_reads(self.checker_path, self.device)
            from model_loader import load_pipeline

            torch_dtype = getattr(torch, model.dtype)
            try:
                self.pipe = load_pipeline(self.store_path, device=self.device, torch_dtype=torch_dtype, reads=reads)
            except Exception as exc:  # a damaged entry is rebuilt on this start; anything else is raised
                reads.cancel()
                problem = str(exc) if isinstance(exc, ChecksumMismatchError) else store_problem(self.store_path)
                if problem is None:
                    raise
                self.store_path = self._rebuild(store, root, problem)
                self.pipe = load_pipeline(self.store_path, device=self.device, torch_dtype=torch_dtype,
                                          reads=start_reads(self.store_path, self.device))
            finally:
                reads = None  # the pipeline holds the blocks it uses; nothing else keeps them
            self.pipe.set_progress_bar_config(disable=True)
            self._loras = LoraLibrary.for_pipeline(self.pipe, self.settings.lora, root)  # a request's `loras`
            self.safety_checker = self._load_safety_checker(store, root, torch_dtype, checker_reads)
            size = sum(p.stat().st_size for p in self.store_path.glob("*/*.flashpack"))
            phase.rate(size, f"to {self.device}, checksums verified (import torch {imported_torch:.2f} s)")

        # 5. warm up: run every served shape once, so no request pays first-call costs. With [compile]
        #    on, this compiles the denoiser for those shapes, or finds them in inductor's cache.
        compiled = compile_denoiser(self.pipe, self.settings, root=root, store_path=self.store_path, device=self.device)
        self._lock = threading.Lock()
        self._in_flight = InFlight()
        self._preview = projection_for(self.pipe)
        self._image_pipes: ImagePipelines = build_image_pipelines(self.pipe)  # from_pipe: the same modules
        self._fetch = fetch_https  # how an https image_url / mask_url is read
        serving = self.settings.serving
        with self._phase("warmup") as phase:
            shapes = list(dict.fromkeys(serving.warmup_sizes))
            for name in shapes:
                width, height = preset_size(name, serving)
                pictures = generate(self.pipe, GenerationParams("warm-up", "", width, height, serving.warmup_steps,
                                                                serving.default_guidance_scale, seeds=(0,)))
                screen(pictures, self.safety_checker, enabled=True)  # the checker's first call too
            phase.detail = f"{len(shapes)} shape(s) x {serving.warmup_steps} step(s): {', '.join(shapes) or 'none'}"
        if compiled is not None:
            compiled.publish()  # inductor's cache back to the volume, if the warm-up compiled anything

        self.phase_seconds["total"] = round(time.perf_counter() - started, 3)
        log.info("setup: ready in %.2f s (profile %s, model %s, device %s)", self.phase_seconds["total"],
                 self.settings.profile, self.source.display, self.device)

    def _rebuild(self, store: Any, root: Path, problem: str, source: Any = None, damaged: Path | None = None) -> Path:
        """Move the damaged entry (the pipeline's unless ``damaged``, of ``source``) aside and build
        it again from the source, on this start."""
        from conversion.errors import ConversionError, StoreError
        from conversion.store import ensure_converted

        source = source or self.source
        damaged = damaged or self.store_path
        log.error("load: the store entry %s is damaged (%s); moving it aside and rebuilding it from the source",
                  damaged, problem)
        store.quarantine(damaged, problem)
        try:
            return Path(ensure_converted(source, root=root, dtype=self.settings.model.dtype))
        except ConversionError as exc:
            raise StoreError(
                f"the store entry {damaged} was damaged ({problem}) and has been moved aside, but rebuilding it "
                f"failed: {exc}. Make the source ({source.display}) reachable; the next start rebuilds it"
            ) from exc

    def _look_up_safety_checker(self, store: Any) -> Any:
        """Lookup for the checker (``[safety_checker]``): its warm entry, found offline and checked,
        and its pack reads started when the device is known; None when no reads started."""
        model = self.settings.model
        self.checker_source, self.checker_path = checker_source(self.settings.safety_checker), None
        if self.checker_source is None:
            log.warning('safety checker: none ([safety_checker] source = "none"); images are served unchecked')
            return None
        from conversion.store import verify_mode

        self.checker_path = store.warm(self.checker_source, model.dtype, verify_mode())
        device = early_device(model.device) if self.checker_path is not None else None
        reads = start_reads(self.checker_path, device) if device is not None else None
        log.info("lookup: safety checker %s%s", self.checker_path or "has no store entry yet",
                 "; its pack reading in the background" if reads else "")
        return reads

    def _load_safety_checker(self, store: Any, root: Path, torch_dtype: Any, reads: Any) -> Any:
        """The checker from its store entry (None without one); a damaged entry is rebuilt on this
        start, as the pipeline's is."""
        from model_loader import ChecksumMismatchError

        if self.checker_source is None:
            return None
        try:
            return load_safety_checker(self.checker_path, self.device, torch_dtype, reads)
        except Exception as exc:  # a damaged entry is rebuilt on this start; anything else is raised
            reads.cancel()
            problem = str(exc) if isinstance(exc, ChecksumMismatchError) else store_problem(self.checker_path)
            if problem is None:
                raise
            self.checker_path = self._rebuild(store, root, problem, self.checker_source, self.checker_path)
            return load_safety_checker(self.checker_path, self.device, torch_dtype,
                                       start_reads(self.checker_path, self.device))

    @fal.endpoint("/")
    async def text_to_image(self, input: TextToImageInput, request: Request) -> TextToImageOutput:
        """Generate ``num_images`` images for ``prompt`` (one pipeline call). A client that disconnects,
        or fal's ``POST /cancel``, stops the generation at its next denoising step."""
        seed = input.seed if input.seed is not None else randbelow(MAX_SEED + 1)
        return await self._serve(request, input.loras, partial(self._text_to_image, input, seed))

    @fal.endpoint("/stream")
    async def stream(self, input: TextToImageInput, request: Request) -> StreamingResponse:
        """POST / with progress, as server-sent events: a ``progress`` event per denoising step (with a
        small preview of each image), then a ``result`` event with what POST / returns. A client that
        disconnects, or fal's ``POST /stream/cancel``, stops the generation at its next step."""
        seed = input.seed if input.seed is not None else randbelow(MAX_SEED + 1)
        with self._in_flight.register(request_id_of(request.headers)) as (_, flag):  # a 422 before any event
            async with cancel_on_disconnect(request, flag):
                try:
                    loras = await self._loras.resolve_async(input.loras, flag)
                except FetchCancelled as exc:
                    raise RequestCancelledException(str(exc)) from exc
        width, height = requested_size(input.image_size, self.settings.serving)
        units = image_units(width, height) * input.num_images
        return event_stream(request, self._in_flight, partial(self._text_to_image, input, seed, loras), self._preview,
                            units)

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

    @fal.endpoint("/inpaint")
    async def inpaint(self, input: InpaintInput, request: Request) -> ImageToImageOutput:
        """Repaint the white part of ``mask_url`` in ``image_url`` toward ``prompt``; the black part comes
        back as sent. Otherwise as POST /image-to-image (fal's ``POST /inpaint/cancel`` stops it)."""
        return await self._edit(INPAINT, input, request)

    @fal.endpoint("/image-to-image/cancel")
    def cancel_image_to_image(self, request: Request) -> CancelOutput:
        """fal's cancellation of a POST /image-to-image request (same ``x-fal-request-id``)."""
        return cancel_request(self._in_flight, request)

    @fal.endpoint("/inpaint/cancel")
    def cancel_inpaint(self, request: Request) -> CancelOutput:
        """fal's cancellation of a POST /inpaint request (same ``x-fal-request-id``)."""
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
                            device=str(self.device), store=str(self.store_path),
                            safety_checker=str(self.checker_path) if self.checker_path else None,
                            setup_seconds=self.phase_seconds,
                            load=runner_load(self._loras.fetches_in_flight, self._loras.settings.max_fetches,
                                             int(threads.borrowed_tokens), int(threads.total_tokens)))

    def _text_to_image(self, input: Any, seed: int, loras: RequestLoras, request_id: str, flag: CancelFlag,
                       on_step: Callable[[Step], None] | None = None) -> TextToImageOutput:
        """What POST / returns (and POST /stream's last event): all images in one pipeline call, under
        the pipeline lock (with the request's LoRAs, removed after it), then encoded. Runs in a worker thread."""
        width, height = requested_size(input.image_size, self.settings.serving)
        params = GenerationParams(input.prompt, input.negative_prompt, width, height, input.num_inference_steps,
                                  input.guidance_scale, seeds=tuple(image_seeds(seed, input.num_images)))
        pictures, timings = run_generation(self.pipe, self._lock, params, request=request_id, flag=flag,
                                           on_step=on_step, loras=loras)
        return TextToImageOutput(**self._screened_and_encoded(input, seed, pictures, timings))

    async def _edit(self, kind: str, input: Any, request: Request) -> ImageToImageOutput:
        """POST /image-to-image and /inpaint: :meth:`_edit_images`, served as POST / is."""
        pipe = self._image_pipes.get(kind)
        if pipe is None:
            raise HTTPException(501, f"{kind} is not available for this model ({type(self.pipe).__name__})")
        seed = input.seed if input.seed is not None else randbelow(MAX_SEED + 1)
        return await self._serve(request, input.loras, partial(self._edit_images, pipe, input, seed))

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

    def _edit_images(self, pipe: Any, input: Any, seed: int, loras: RequestLoras, request_id: str,
                     flag: CancelFlag) -> ImageToImageOutput:
        """Read and check the input images (a 422 naming the field, before the pipeline is touched), then
        all images in one call of ``pipe`` under the pipeline lock (with the request's LoRAs, removed after
        it), screened and encoded as POST /'s."""
        reading = time.perf_counter()
        source = read_sources(input, self.settings.serving, self._fetch, flag.is_set)
        read = time.perf_counter() - reading
        params = GenerationParams(input.prompt, input.negative_prompt, source.width, source.height,
                                  input.num_inference_steps, input.guidance_scale,
                                  seeds=tuple(image_seeds(seed, input.num_images)), image=source.image,
                                  mask_image=source.mask, strength=input.strength)
        pictures, timings = run_generation(pipe, self._lock, params, request=request_id, flag=flag, loras=loras)
        if source.mask is not None:
            pictures = [overlay(picture, source) for picture in pictures]
        return ImageToImageOutput(**self._screened_and_encoded(input, seed, pictures, {"read": read, **timings}))

    def _screened_and_encoded(self, input: Any, seed: int, pictures: list[Any], timings: dict[str, float]) -> dict:
        """The fields of a generating endpoint's answer: ``pictures`` through the safety checker (under
        the pipeline lock: it runs on the pipeline's device, one model call at a time), then encoded."""
        checking = time.perf_counter()
        with self._lock:
            pictures, has_nsfw_concepts = screen(pictures, self.safety_checker, input.enable_safety_checker)
        timings["safety"] = time.perf_counter() - checking
        encoding = time.perf_counter()
        inline = input.sync_mode or self.settings.serving.output == "data_uri"
        images = [encode_image(picture, input.output_format, inline) for picture in pictures]
        timings["encode"] = time.perf_counter() - encoding
        return {"images": images, "seed": seed, "prompt": input.prompt, "has_nsfw_concepts": has_nsfw_concepts,
                "timings": {k: round(v, 4) for k, v in timings.items()}}

    def _phase(self, name: str) -> "_Phase":
        return _Phase(name, self.phase_seconds)


class _Phase:
    """Times a setup phase into ``seconds[name]`` and logs one line for it (with ``detail``)."""

    def __init__(self, name: str, seconds: dict[str, float]):
        self.name, self.seconds, self.detail = name, seconds, ""
        self.nbytes: int | None = None

    def rate(self, nbytes: int, where: str) -> None:
        self.nbytes, self.detail = nbytes, where

    def __enter__(self) -> "_Phase":
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        elapsed = time.perf_counter() - self.started
        self.seconds[self.name] = round(elapsed, 3)
        if exc_info[0] is not None:
            log.error("%s: failed after %.2f s: %s", self.name, elapsed, exc_info[1])
            return
        if self.nbytes is not None:
            rate = self.nbytes / 1e9 / elapsed if elapsed > 0 else 0.0
            log.info("%s: %.2f GB in %.2f s (%.2f GB/s) %s", self.name, self.nbytes / 1e9, elapsed, rate, self.detail)
        else:
            log.info("%s: %.2f s%s", self.name, elapsed, f" ({self.detail})" if self.detail else "")


# --------------------------------------------------------------------------------------------------
# Helpers of setup() and the endpoint


def resolve_device(device: str) -> str:
    """fal.toml's ``model.device`` as a concrete device (``cuda`` gets the current device's index,
    so background reader threads target the same GPU as this thread)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"fal.toml: model.device is {device!r} but no CUDA device is visible (use 'auto' or 'cpu')")
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return device


def early_device(device: str) -> str | None:
    """The device known before torch is imported: ``cpu`` when fal.toml says so, or says ``auto``
    on a machine without NVIDIA device nodes; None when only torch can tell."""
    if device == "cpu" or (device == "auto" and not glob.glob("/dev/nvidia[0-9]*")):
        return "cpu"
    return None


def start_reads(store_path: Path, device: str) -> Any:
    """Start reading the packs of a converted directory for ``device``, with their checksums."""
    from conversion.manifest import packs_to_read
    from model_loader import start_pack_reads

    return start_pack_reads(packs_to_read(store_path), str(device))


def store_problem(store_path: Path) -> str | None:
    """What is wrong with a store entry that failed to load (its full sha256 check), or None
    when it matches its manifest (then the load error is not the store's)."""
    from conversion.manifest import VerificationError, verify_converted

    try:
        verify_converted(store_path, full=True)
    except VerificationError as exc:
        return str(exc)
    return None


def encode_image(picture: Any, output_format: str, inline: bool) -> Image:
    """A fal ``Image``: a data: URI when ``inline`` (offline, no credentials), else uploaded to fal's CDN."""
    if inline:
        return Image.from_pil(picture, format=output_format, repository="in_memory", fallback_repository=None)
    return Image.from_pil(picture, format=output_format)


def _configure_logging() -> None:
    """Show the INFO phase lines of app / conversion / model_loader / serving when nothing else configured logging."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("app", "conversion", "model_loader", "serving"):
        logging.getLogger(name).setLevel(logging.INFO)
