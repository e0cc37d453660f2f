"""What conditions a request's images besides its prompt: the ControlNets and IP-Adapters of
``[[model.controlnets]]`` and ``[[model.ip_adapters]]``, from store entry to pipeline call.

- :class:`ConditionEntries`: their store entries, looked up offline with the model's (their pack
  reads started at once), acquired and converted once, loaded by the project's loader and healed
  on damage by conversion.entry, like every served model. An image encoder that several adapters
  share is one entry, loaded once.
- :class:`Conditions`: what they became (serving.controlnets, serving.ip_adapters), and a
  request's ``controlnets`` and ``ip_adapter`` read into a :class:`RequestConditions`, which
  gives the pipeline call its view of the pipeline and its arguments.

None configured: no entry, no import of this module's heavy parts, and the request models have no
such fields (serving.schema).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fal.exceptions import FieldException

from .controlnets import TEXT_TO_IMAGE, ControlInput, ControlNet, ControlNets
from .images import Fetch, fetch_limits
from .ip_adapters import ImagePrompt, IPAdapters
from .settings import (
    CONTROLNET_COMPONENT,
    IMAGE_ENCODER_COMPONENT,
    ModelSettings,
    ServingSettings,
    controlnet_source,
    ip_adapter_encoder,
    ip_adapter_weights,
)

if TYPE_CHECKING:
    import torch

    from conversion.entry import ServedEntry
    from conversion.store import Store


@dataclass
class ConditionEntries:
    """The store entries of the configured ControlNets, IP-Adapters and their image encoders."""

    model: ModelSettings
    controlnets: dict[str, ServedEntry] = field(default_factory=dict)
    ip_adapters: dict[str, ServedEntry] = field(default_factory=dict)
    encoders: dict[str, ServedEntry] = field(default_factory=dict)  # by adapter path; shared entries are one object

    @classmethod
    def lookup(cls, store: Store, model: ModelSettings, device: str | None) -> ConditionEntries:
        """Each entry found offline (conversion.entry.lookup), its reads started for ``device``."""
        found = cls(model)
        if not (model.controlnets or model.ip_adapters):
            return found
        from conversion.entry import lookup

        for net in model.controlnets:
            found.controlnets[net.source] = lookup(store, controlnet_source(net), model.dtype, device, "controlnet")
        by_source: dict[Any, ServedEntry] = {}
        for adapter in model.ip_adapters:
            found.ip_adapters[adapter.source] = lookup(store, ip_adapter_weights(adapter), model.dtype, device,
                                                       "ip-adapter")
            encoder = ip_adapter_encoder(adapter)
            if encoder not in by_source:
                by_source[encoder] = lookup(store, encoder, model.dtype, device, "image encoder")
            found.encoders[adapter.source] = by_source[encoder]
        return found

    def entries(self) -> list[ServedEntry]:
        """Every entry once, in lookup order."""
        unique: dict[int, ServedEntry] = {}
        for entry in [*self.controlnets.values(), *self.ip_adapters.values(), *self.encoders.values()]:
            unique.setdefault(id(entry), entry)
        return list(unique.values())

    def load(self, pipe: Any, device: str, dtype: torch.dtype) -> Conditions:
        """Each entry loaded (conversion.entry heals a damaged one), then built for ``pipe``."""
        if not self.entries():
            return Conditions(None, None)
        from model_loader import load_model, read_module_tensors

        def model_in(component: str) -> Callable[[Any, Any], Any]:
            return lambda path, reads: load_model(path / component, device, torch_dtype=dtype, reads=reads)

        controlnets = None
        if self.controlnets:
            nets = [ControlNet(net.source, self.controlnets[net.source].load(model_in(CONTROLNET_COMPONENT), device),
                               net.preprocess) for net in self.model.controlnets]
            controlnets = ControlNets.build(pipe, nets)
        ip_adapters = None
        if self.ip_adapters:
            encoders: dict[int, Any] = {}
            loaded = []
            for adapter in self.model.ip_adapters:
                entry = self.encoders[adapter.source]
                if id(entry) not in encoders:
                    encoders[id(entry)] = entry.load(model_in(IMAGE_ENCODER_COMPONENT), device)
                tensors = self.ip_adapters[adapter.source].load(
                    lambda path, reads: read_module_tensors(path, device, reads=reads), device)
                loaded.append((adapter.source, {name: t.to(dtype) for name, t in tensors.items()}, encoders[id(entry)]))
            ip_adapters = IPAdapters.build(pipe, loaded)
        return Conditions(controlnets, ip_adapters)


@dataclass
class RequestConditions:
    """A request's conditions, read: its control inputs and image prompt on endpoint ``kind``."""

    kind: str
    controls: list[ControlInput]
    prompt: ImagePrompt | None
    conditions: Conditions

    def __bool__(self) -> bool:
        return bool(self.controls) or self.prompt is not None

    @contextlib.contextmanager
    def applied(self, pipe: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The pipeline to call instead of ``pipe`` and the call's extra arguments; under the
        pipeline lock (an image prompt attaches its adapter to the shared UNet until exit)."""
        call, kwargs = pipe, {}
        if self.controls:
            call, kwargs = self.conditions.controlnets.call(self.kind, self.controls)  # type: ignore[union-attr]
        if self.prompt is None:
            yield call, kwargs
            return
        with self.conditions.ip_adapters.applied(call, self.prompt) as (view, extra):  # type: ignore[union-attr]
            yield view, {**kwargs, **extra}


class Conditions:
    """The served ControlNets and IP-Adapters (None: none configured)."""

    def __init__(self, controlnets: ControlNets | None, ip_adapters: IPAdapters | None) -> None:
        self.controlnets, self.ip_adapters = controlnets, ip_adapters

    def sample(self, width: int, height: int) -> RequestConditions | None:
        """Every configured ControlNet on a black control image and the first IP-Adapter on a gray
        image prompt, for the warm-up (None when none is configured)."""
        from PIL import Image

        nets = self.controlnets.nets.values() if self.controlnets else []
        controls = [ControlInput(net, Image.new("RGB", (width, height)), 1.0, 0.0, 1.0) for net in nets]
        adapters = list(self.ip_adapters.adapters.values()) if self.ip_adapters else []
        prompt = ImagePrompt(adapters[0], Image.new("RGB", (width, height), (128, 128, 128)), 1.0) if adapters else None
        return RequestConditions(TEXT_TO_IMAGE, controls, prompt, self) if controls or prompt else None

    def check(self, kind: str, input: Any) -> None:
        """A 422 naming ``controlnets`` when the endpoint ``kind`` has no ControlNet pipeline for this
        model (or ``ip_adapter`` when none is loaded); before the request is queued."""
        if getattr(input, "controlnets", None) and (self.controlnets is None or not self.controlnets.supports(kind)):
            raise FieldException(field="controlnets", type="value_error",
                                 message=f"controlnets are not available on {kind} for this model (diffusers has no "
                                 f"{kind} ControlNet pipeline for it); send the request without controlnets")
        if getattr(input, "ip_adapter", None) and self.ip_adapters is None:
            raise FieldException(field="ip_adapter", type="value_error",
                                 message="this deployment serves no IP-Adapter; send the request without ip_adapter")

    def read(self, kind: str, input: Any, width: int, height: int, serving: ServingSettings, fetch: Fetch,
             cancelled: Callable[[], bool]) -> RequestConditions | None:
        """The request's ``controlnets`` and ``ip_adapter`` read (images fetched, decoded, checked:
        a 422 naming the field), at ``width`` x ``height``; None when it has neither. The request
        passed :meth:`check` before it was queued."""
        controls, prompts = getattr(input, "controlnets", None) or [], getattr(input, "ip_adapter", None) or []
        if not controls and not prompts:
            return None
        limits = fetch_limits(serving.image_fetch_timeout_s)
        read_controls = self.controlnets.read(controls, width, height, fetch, limits, serving.max_pixels,
                                              cancelled) if controls else []  # type: ignore[union-attr]
        read_prompts = self.ip_adapters.read(prompts, fetch, limits, serving.max_pixels,
                                             cancelled) if prompts else []  # type: ignore[union-attr]
        return RequestConditions(kind, read_controls, read_prompts[0] if read_prompts else None, self)


__all__ = ["TEXT_TO_IMAGE", "ConditionEntries", "Conditions", "RequestConditions"]
