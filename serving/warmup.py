"""The warm-up at the end of setup(): every served shape run once, so no request pays first-call
costs (with ``[compile]`` on, this is when the denoiser compiles or is found in inductor's cache)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .generate import GenerationParams, generate
from .safety import SafetyChecker, screen
from .schema import preset_size
from .settings import ServingSettings

if TYPE_CHECKING:
    from .conditions import Conditions


def warm_up(pipe: Any, checker: SafetyChecker | None, serving: ServingSettings,
            conditions: Conditions | None = None) -> str:
    """Run ``[serving] warmup_sizes`` x ``warmup_steps`` once each (and the checker's first call),
    then, when ``conditions`` has any, one call at the first size with every ControlNet and the
    first IP-Adapter (their first calls); returns what ran, for the phase's log line."""
    shapes = list(dict.fromkeys(serving.warmup_sizes))
    for name in shapes:
        width, height = preset_size(name, serving)
        pictures = generate(pipe, GenerationParams("warm-up", "", width, height, serving.warmup_steps,
                                                   serving.default_guidance_scale, seeds=(0,)))
        screen(pictures, checker, enabled=True)
    ran = f"{len(shapes)} shape(s) x {serving.warmup_steps} step(s): {', '.join(shapes) or 'none'}"
    if conditions is None or not shapes:
        return ran
    width, height = preset_size(shapes[0], serving)
    sample = conditions.sample(width, height)
    if sample:
        with sample.applied(pipe) as (call, extra):
            generate(call, GenerationParams("warm-up", "", width, height, serving.warmup_steps,
                                            serving.default_guidance_scale, seeds=(0,)), extra=extra)
        ran += f"; {len(sample.controls)} ControlNet(s) and {'an' if sample.prompt else 'no'} IP-Adapter once"
    return ran
