"""A request's ``scheduler``: fal's names for diffusers' schedulers, built from the served model's own.

**The names** are those of fal's own Stable Diffusion app (``fal-ai/lora`` and its image-to-image
and inpainting endpoints, field ``scheduler``): :data:`SCHEDULER_NAMES`. Each is a diffusers
scheduler class and the few settings its name fixes (Karras sigmas or not, the SDE variant,
trailing timesteps); everything else comes from the loaded scheduler's config, so what the model
was trained with (betas, prediction type, timestep spacing and offset) carries over:
``SchedulerClass.from_config(pipe.scheduler.config, **overrides)``. A request without one (null
or absent) runs the model's own scheduler, as it always did.

**Which apply.** All of them to a model trained on a discrete noise schedule (SD 1.x, SDXL: a
scheduler config with ``beta_schedule``); only ``"Euler"`` to a flow-matching model (Flux: its own
``FlowMatchEulerDiscreteScheduler``). Another name, or a step count the scheduler cannot run (LCM
and TCD take at most ``original_inference_steps``, 50), is a 422 naming the field.

**Never shared.** A scheduler keeps per-call state (its timesteps, step index, a multistep
solver's history), so one object must never serve two generations at once. :class:`Schedulers`
keeps idle instances per name: :meth:`Schedulers.borrowed` hands one out for a generation and takes
it back after (building another when every instance of that name is in use), and
:func:`with_scheduler` gives the call a shallow view of the pipeline holding it: the loaded
pipeline, its ``scheduler`` and its config are never touched, and the view's per-call state
(guidance scale, timestep count, ...) is its own. The modules are the same objects: no weight is
copied.

diffusers is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from fal.exceptions import FieldException


@dataclass(frozen=True)
class SchedulerChoice:
    """A diffusers scheduler class (by name) and the config keys a scheduler name fixes."""

    cls: str
    overrides: dict[str, Any] = field(default_factory=dict)
    # The config key bounding num_inference_steps (LCM, TCD), if any.
    max_steps_key: str | None = None


_NOT_KARRAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
               "use_lu_lambdas": False}
_KARRAS = {**_NOT_KARRAS, "use_karras_sigmas": True}
_DPM = "DPMSolverMultistepScheduler"

# fal's names (fal-ai/lora's SchedulerEnum, in its order) for a model on a discrete noise schedule.
SchedulerName = Literal["DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "Euler", "Euler A",
                        "Euler (trailing timesteps)", "LCM", "LCM (trailing timesteps)", "DDIM", "TCD"]
SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)
DISCRETE: dict[str, SchedulerChoice] = {
    "DPM++ 2M": SchedulerChoice(_DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2, **_NOT_KARRAS}),
    "DPM++ 2M Karras": SchedulerChoice(_DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2, **_KARRAS}),
    "DPM++ 2M SDE": SchedulerChoice(_DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_NOT_KARRAS}),
    "DPM++ 2M SDE Karras": SchedulerChoice(_DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                  **_KARRAS}),
    "Euler": SchedulerChoice("EulerDiscreteScheduler", _NOT_KARRAS),
    "Euler A": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "Euler (trailing timesteps)": SchedulerChoice("EulerDiscreteScheduler", {"timestep_spacing": "trailing",
                                                                             **_NOT_KARRAS}),
    "LCM": SchedulerChoice("LCMScheduler", max_steps_key="original_inference_steps"),
    "LCM (trailing timesteps)": SchedulerChoice("LCMScheduler", {"timestep_spacing": "trailing"},
                                                max_steps_key="original_inference_steps"),
    "DDIM": SchedulerChoice("DDIMScheduler"),
    "TCD": SchedulerChoice("TCDScheduler", max_steps_key="original_inference_steps"),
}
# For a flow-matching model (Flux): Euler is its own scheduler class.
FLOW: dict[str, SchedulerChoice] = {"Euler": SchedulerChoice("FlowMatchEulerDiscreteScheduler")}
assert set(DISCRETE) == set(SCHEDULER_NAMES) and set(FLOW) <= set(SCHEDULER_NAMES)


def choices_for(scheduler: Any) -> dict[str, SchedulerChoice]:
    """The names that apply to a model whose loaded scheduler is ``scheduler`` (none: no choice)."""
    if scheduler is None:
        return {}
    if type(scheduler).__name__.startswith("FlowMatch"):
        return FLOW
    if "beta_schedule" in getattr(scheduler, "config", {}):
        return DISCRETE
    return {}


class Schedulers:
    """The request schedulers of one loaded model: built from its scheduler's config, once per name
    and then reused, never by two generations at once."""

    def __init__(self, base: Any) -> None:
        self.base = base  # the model's own scheduler, never changed here
        self.model = type(base).__name__ if base is not None else "none"
        self.choices = choices_for(base)
        self._idle: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_pipeline(cls, pipe: Any) -> Schedulers:
        return cls(getattr(pipe, "scheduler", None))

    def check(self, name: str | None, steps: int) -> None:
        """Refuse (422 naming the field) a request for scheduler ``name`` over ``steps`` steps that this
        model cannot run: a name that does not apply to it, or more steps than that scheduler takes."""
        if name is None:
            return
        choice = self.choices.get(name)
        if choice is None:
            offered = ", ".join(f'"{n}"' for n in self.choices) or "none"
            raise FieldException(field="scheduler", type="scheduler_not_applicable",
                                 message=f'scheduler "{name}" does not apply to this model (its own scheduler is '
                                 f"{self.model}); those that do: {offered}, or null for the model's own")
        if choice.max_steps_key is not None:
            with self.borrowed(name) as scheduler:  # built here once, then reused by the generation
                limit = scheduler.config.get(choice.max_steps_key)
            if limit is not None and steps > limit:
                raise FieldException(field="num_inference_steps", type="scheduler_steps",
                                     message=f'num_inference_steps: the "{name}" scheduler runs at most {limit} '
                                     f"steps (its {choice.max_steps_key})")

    def build(self, name: str) -> Any:
        """A new scheduler for ``name``, from the model's scheduler config and the name's overrides."""
        import diffusers

        choice = self.choices[name]
        scheduler_class = getattr(diffusers, choice.cls)
        accepted = inspect.signature(scheduler_class.__init__).parameters
        overrides = {key: value for key, value in choice.overrides.items() if key in accepted}
        return scheduler_class.from_config(self.base.config, **overrides)

    @contextlib.contextmanager
    def borrowed(self, name: str) -> Iterator[Any]:
        """A scheduler for ``name`` that no one else holds until this closes: an idle one, or a new one."""
        with self._lock:
            idle = self._idle.setdefault(name, [])
            scheduler = idle.pop() if idle else None
        if scheduler is None:
            scheduler = self.build(name)
        try:
            yield scheduler
        finally:
            with self._lock:
                self._idle[name].append(scheduler)


def with_scheduler(pipe: Any, scheduler: Any) -> Any:
    """A shallow view of ``pipe`` that runs ``scheduler``: the same modules, its own attributes
    (``pipe`` keeps its scheduler and config; diffusers' setter updates the view's config only)."""
    view = copy.copy(pipe)
    view.scheduler = scheduler
    return view
