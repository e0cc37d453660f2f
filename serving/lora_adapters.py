"""A request's LoRAs on the served pipeline: loaded as PEFT adapters for one generation, weighted by
their scales, and removed after it, so the next request meets the base model again.

This is what runs per request, under the pipeline lock (``serving.lora.RequestLoras.applied``,
called by ``serving.generate.run_generation``). What runs before it, outside the lock, is in
``serving.lora`` (fetching, reading, checking, the cache); loading one LoRA file as one adapter
(``conversion.lora.load_adapter``: its adapter metadata, diffusers' warnings turned into a
:class:`~conversion.errors.LoraError`) is shared with fusing LoRAs at conversion, so it stays there.

Removing is ``unload_lora_weights``: PEFT's LoRA layers wrap the base modules and never copy or
write their weights, so every base module is put back as it was and the loader's views into its
flat blocks stay as they are. torch is imported by what this calls, not here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from conversion.lora import LoraWeights, load_adapter


@contextlib.contextmanager
def adapters(pipe: Any, loras: Sequence[tuple[LoraWeights, float]], prefix: str = "lora") -> Iterator[list[str]]:
    """``loras`` (weights, scale) active in ``pipe`` while open, removed however it closes (done,
    failed, cancelled, or a LoRA that does not load half way through). Yields the adapter names."""
    names = [f"{prefix}_{i}" for i in range(len(loras))]
    if not loras:
        yield names
        return
    try:
        for (lora, _), name in zip(loras, names, strict=True):
            load_adapter(pipe, lora, name)
        pipe.set_adapters(names, adapter_weights=[float(scale) for _, scale in loras])
        yield names
    finally:
        remove_adapters(pipe)


def remove_adapters(pipe: Any) -> None:
    """Remove every LoRA layer from ``pipe`` (``unload_lora_weights``): each base module is put
    back as it was."""
    pipe.unload_lora_weights()
