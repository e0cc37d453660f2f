"""A request's images from one pipeline call, stoppable at every denoising step.

**Batched.** All ``num_images`` images go through the pipeline together (``num_images_per_prompt``)
with one CPU ``torch.Generator`` per image, image i seeded ``seed + i`` (``serving.schema.image_seeds``).
diffusers draws each image's initial noise from its own generator, so image i starts from exactly
the noise a single-image request with that seed starts from. What may differ is the arithmetic of
the batched UNet and VAE kernels (another blocking or reduction order), in the last bits of a float:
README, "Calling the deployed endpoint", gives the tolerance and tests/test_app.py checks it.

**With LoRAs.** :func:`run_generation` applies a request's LoRAs (serving.lora.RequestLoras, loaded
and removed by serving.lora_adapters) around the pipeline call, under the lock, and removes them
before releasing it.

**With a scheduler.** A request's ``scheduler`` (serving.schedulers) is borrowed for the call and
run through a shallow view of the pipeline: the loaded pipeline keeps its own scheduler, which a
request without one runs, as before.

**Prompts.** serving.prompts gives the pipeline the prompts as text when they fit the text
encoder's window, else their embeddings, every token read (under the lock, LoRAs applied).

**Stoppable.** diffusers calls ``callback_on_step_end`` after every denoising step; ours reports the
step (for POST /stream's progress events) and raises :class:`GenerationCancelled` once the request's
:class:`~serving.cancel.CancelFlag` is set. Raising rather than setting ``pipe._interrupt``: an
interrupted diffusers pipeline skips the remaining steps but still decodes the VAE and returns a
half-denoised image; an exception stops at once, and the next call starts from fresh per-call state
(``set_timesteps`` resets the scheduler's step index).

torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serving.cancel import CancelFlag, acquire_unless_cancelled

if TYPE_CHECKING:
    from serving.conditions import RequestConditions
    from serving.lora import RequestLoras
    from serving.prompts import Prompts
    from serving.schedulers import Schedulers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationParams:
    """What one pipeline call is asked for; ``seeds`` has one seed per image. Image-to-image also
    gives the input ``image`` (at width x height) and ``strength``; inpainting also ``mask_image``.
    ``scheduler``: one of serving.schedulers' names, or None for the model's own."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    image: Any = None
    mask_image: Any = None
    strength: float | None = None
    scheduler: str | None = None

    def inputs(self) -> dict[str, Any]:
        """The pipeline arguments of the input images (none for text-to-image). The image and mask go
        once per image of the batch: diffusers' inpainting pipelines encode an image batch of one with
        the first generator only, so image i would not start from the draws of a request for seed + i
        alone; with one copy per image, generator i encodes copy i, as a single request's does."""
        copies = len(self.seeds)
        given = {"image": [self.image] * copies if self.image is not None else None,
                 "mask_image": [self.mask_image] * copies if self.mask_image is not None else None,
                 "strength": self.strength}
        return {name: value for name, value in given.items() if value is not None}


@dataclass(frozen=True)
class Step:
    """One finished denoising step: ``done`` of ``total``, and the latents after it
    (a tensor ``(num_images, channels, height / f, width / f)``, f the VAE's scale factor)."""

    done: int
    total: int
    latents: Any


class GenerationCancelled(Exception):
    """The generation stopped at a step boundary because its request was cancelled."""

    def __init__(self, steps_done: int, total_steps: int, reason: str) -> None:
        self.steps_done, self.total_steps, self.reason = steps_done, total_steps, reason
        super().__init__(f"cancelled after {steps_done} of {total_steps} steps ({reason})")


def generate(pipe: Any, params: GenerationParams, *, flag: CancelFlag | None = None,
             on_step: Callable[[Step], None] | None = None, scheduler: Any = None,
             prompts: Prompts | None = None, extra: dict[str, Any] | None = None) -> list[Any]:
    """The PIL images of ``params``, one pipeline call for all of them; raises
    :class:`GenerationCancelled` at the first step boundary after ``flag`` is set. ``scheduler``:
    run instead of ``pipe``'s own, through a view of ``pipe`` (``pipe`` is left as it is).
    ``prompts``: how the model reads long prompts (None: diffusers' own encoding, up to one window).
    ``extra``: more arguments of the call (a request's ControlNet and IP-Adapter inputs)."""
    import torch

    if flag is not None and flag.is_set():
        raise GenerationCancelled(0, params.steps, flag.reason or "cancelled")
    if scheduler is not None:
        from serving.schedulers import with_scheduler

        pipe = with_scheduler(pipe, scheduler)
    if prompts is not None:
        text = prompts.inputs(pipe, params.prompt, params.negative_prompt)
    else:
        text = {"prompt": params.prompt, "negative_prompt": params.negative_prompt or None}
    # CPU generators: the same seed gives the same noise on every device.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in params.seeds]

    def step_end(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = getattr(pipeline, "num_timesteps", None) or params.steps
        if flag is not None and flag.is_set():
            raise GenerationCancelled(index + 1, total, flag.reason or "cancelled")
        if on_step is not None:
            on_step(Step(done=index + 1, total=total, latents=tensors["latents"]))
        return {}

    # SD's and SDXL's image-to-image pipelines take no width/height (their **kwargs swallow them): the
    # input image is already at that size.
    result = pipe(
        **text,
        width=params.width,
        height=params.height,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        generator=generators,
        num_images_per_prompt=len(params.seeds),
        output_type="pil",
        callback_on_step_end=step_end,
        callback_on_step_end_tensor_inputs=["latents"],
        **params.inputs(),
        **(extra or {}),
    )
    return list(result.images)


def run_generation(pipe: Any, lock: threading.Lock, params: GenerationParams, *, request: str,
                   flag: CancelFlag | None = None, on_step: Callable[[Step], None] | None = None,
                   loras: RequestLoras | None = None, schedulers: Schedulers | None = None,
                   prompts: Prompts | None = None,
                   conditions: RequestConditions | None = None) -> tuple[list[Any], dict[str, float]]:
    """:func:`generate` for one request under the pipeline ``lock`` (one call at a time: diffusers
    pipelines keep per-call state), with one log line when it starts and one when it ends. The
    request's ``loras`` are active for this call only (loaded after the lock is taken, removed
    before it is released); ``params.scheduler`` is borrowed from ``schedulers`` (the model's
    :class:`~serving.schedulers.Schedulers`; built for ``pipe`` when not given) for this call only.

    Returns the images and the seconds spent waiting for the lock (``queue``) and generating
    (``inference``). The lock is released however the call ends (done, cancelled, failed).
    """
    queued = time.perf_counter()
    shape = f"{params.steps} step(s) x {len(params.seeds)} image(s) at {params.width}x{params.height}"
    if params.strength is not None:
        shape += f", {'inpaint' if params.mask_image is not None else 'image-to-image'} at strength {params.strength}"
    if loras:
        shape += f" with {len(loras)} LoRA(s)"
    if conditions and conditions.controls:
        shape += f" with {len(conditions.controls)} ControlNet(s)"
    if conditions and conditions.prompt is not None:
        shape += " with an IP-Adapter image"
    if params.scheduler is not None:
        shape += f", scheduler {params.scheduler}"
    if not acquire_unless_cancelled(lock, flag):
        reason = flag.reason if flag is not None and flag.reason else "cancelled"
        log.info("generate[%s]: cancelled after 0 of %d steps, while waiting for the pipeline (%s)",
                 request, params.steps, reason)
        raise GenerationCancelled(0, params.steps, reason)
    try:
        started = time.perf_counter()
        log.info("generate[%s]: started, %s (waited %.2f s for the pipeline)", request, shape, started - queued)
        try:
            with (loras.applied(pipe) if loras else contextlib.nullcontext(),
                  conditions.applied(pipe) if conditions else contextlib.nullcontext((pipe, {})) as (call, extra),
                  _borrowed(schedulers, pipe, params.scheduler) as scheduler):
                pictures = generate(call, params, flag=flag, on_step=on_step, scheduler=scheduler, prompts=prompts,
                                    extra=extra)
        except GenerationCancelled as exc:
            log.info("generate[%s]: %s, in %.2f s", request, exc, time.perf_counter() - started)
            raise
        except Exception as exc:
            log.error("generate[%s]: failed after %.2f s: %s: %s", request, time.perf_counter() - started,
                      type(exc).__name__, exc)
            raise
        finished = time.perf_counter()
        log.info("generate[%s]: done, %s in %.2f s", request, shape, finished - started)
    finally:
        lock.release()
    return pictures, {"queue": started - queued, "inference": finished - started}


def _borrowed(schedulers: Schedulers | None, pipe: Any, name: str | None) -> contextlib.AbstractContextManager[Any]:
    """The scheduler ``name`` for one call (None: the pipeline's own)."""
    if name is None:
        return contextlib.nullcontext()
    if schedulers is None:
        from serving.schedulers import Schedulers

        schedulers = Schedulers.for_pipeline(pipe)
    return schedulers.borrowed(name)
