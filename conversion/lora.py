"""LoRA files: read into memory (safetensors only), checked against a pipeline, loaded into one as
adapters through diffusers' PEFT integration, or fused into a pipeline before it is packed. What
both a request (``serving.lora_adapters``, which applies a request's LoRAs for one generation and
removes them) and ``[[model.loras]]`` (:func:`fuse_loras`, once at conversion) need lives here.

- :func:`read_lora` reads a fetched file (:func:`read_lora_bytes` one held in memory): its tensors
  on the CPU and diffusers' adapter metadata. Anything but safetensors is refused (pickled weights
  run code when loaded), and so are values that would wreck the image (NaN, infinity, absurd
  weights or alphas).
- :class:`LoraTargets` is what LoRAs can attach to in one pipeline, taken once from the loaded
  pipeline: its LoRA-loadable components and the in/out sizes of their Linear, Conv and Embedding
  modules. :meth:`LoraTargets.check` refuses a LoRA whose layers name modules the pipeline lacks or
  do not fit their shapes (a LoRA made for another architecture), with the first few named: what
  diffusers' ``load_lora_weights`` would raise for some (size mismatches) and only warn about for
  others (unexpected keys). It works from that snapshot, so it runs outside the pipeline lock.
- :func:`load_adapter`: ``load_lora_weights`` for weights in memory (with the file's metadata),
  one LoRA as one named adapter. ``unload_lora_weights`` removes them all again and puts every base
  module back: the LoRA layers wrap the base modules and never copy or modify their weights, so the
  loader's views into its flat blocks stay as they were.
- :func:`fuse_loras`: a pipeline directory with LoRAs fused into its weights (``fuse_lora``), for
  ``[[model.loras]]``: the store converts that directory, so the entry carries the LoRAs.

torch and diffusers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_loader import private_api
from model_loader.bounded_json import loads_bounded

from .checkpoint import HeaderError, safetensors_header, safetensors_header_of_bytes, safetensors_size_problem
from .errors import SHOWN_CHARS, ConversionError, LoraError, shown

if TYPE_CHECKING:
    import torch

log = logging.getLogger("conversion.lora")

# A LoRA layer's tensors, as PEFT names them once diffusers has converted a file's keys.
_LAYER_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_]+)?\.(?P<param>weight|bias)$"
)
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+?)\.lora_magnitude_vector(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")
_SHOWN = 3  # examples named in an error
_MAX_METADATA_BYTES = 1 << 20
# The largest absolute value a LoRA weight or alpha may have: trained ones are orders of magnitude
# smaller, and larger ones overflow half precision into an all-black image (which is billed).
MAX_ABS_VALUE = 1e4


@dataclass
class LoraWeights:
    """One LoRA file in memory: its tensors (CPU) and diffusers' ``lora_adapter_metadata`` (None
    when the file has none); ``name`` is for messages, ``identity`` what it was fetched as."""

    name: str
    identity: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None
    nbytes: int


def read_lora(path: str | os.PathLike[str], name: str, identity: str) -> LoraWeights:
    """The LoRA file at ``path``; :class:`LoraError` when it is not a complete safetensors file, or
    when its values would wreck an image (NaN, infinity, weights or alphas above
    :data:`MAX_ABS_VALUE`)."""
    import safetensors.torch

    return _read_checked(name, identity, lambda: safetensors_header(path), os.path.getsize(path),
                         lambda: safetensors.torch.load_file(os.fspath(path), device="cpu"))


def read_lora_bytes(data: bytes, name: str, identity: str) -> LoraWeights:
    """:func:`read_lora` of a LoRA file held in memory (a ``data:`` URI's payload): the same
    checks, errors and result."""
    import safetensors.torch

    return _read_checked(name, identity, lambda: safetensors_header_of_bytes(data), len(data),
                         lambda: safetensors.torch.load(data))


def _read_checked(name: str, identity: str, header_of: Callable[[], tuple[int, dict[str, Any]] | None], size: int,
                  load: Callable[[], dict[str, torch.Tensor]]) -> LoraWeights:
    """What :func:`read_lora` and :func:`read_lora_bytes` share, for a file of ``size`` bytes:
    its header checked (``header_of``), then its tensors read (``load``) and checked."""
    try:
        parsed = header_of()
    except HeaderError as exc:
        raise LoraError(f"{name}: not a readable safetensors file ({exc})") from None
    if parsed is None:
        raise LoraError(f"{name}: not a safetensors file (LoRAs are read from .safetensors only: pickled "
                        ".bin/.ckpt weights can run code when loaded)")
    problem = safetensors_size_problem(*parsed, size)
    if problem is not None:
        raise LoraError(f"{name}: damaged safetensors file ({problem})")
    metadata = _adapter_metadata(parsed[1], name)
    _check_metadata_alphas(metadata, name)
    try:
        state_dict = load()
    except Exception as exc:  # safetensors' SafetensorError, or a dtype it cannot map
        raise LoraError(f"{name}: cannot read its tensors: {exc}") from None
    if not state_dict:
        raise LoraError(f"{name}: the safetensors file holds no tensors")
    _check_values(state_dict, name)
    return LoraWeights(name, identity, state_dict, metadata,
                       sum(t.numel() * t.element_size() for t in state_dict.values()))


def _check_values(state_dict: dict[str, torch.Tensor], name: str) -> None:
    """:class:`LoraError` naming the first tensor holding NaN or infinity, or a value above
    :data:`MAX_ABS_VALUE` in absolute value (kohya's ``.alpha`` tensors included). One pass and
    no copy per tensor (``aminmax`` propagates NaN); a tensor of a type it does not take (float8,
    uint16 to uint64) is copied to float32, one at a time."""
    import torch

    native = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
              torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    for key, tensor in state_dict.items():
        if tensor.numel() == 0 or tensor.dtype == torch.bool or tensor.is_complex():
            continue
        low, high = (float(v) for v in torch.aminmax(tensor if tensor.dtype in native else tensor.float()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise LoraError(f"{name}: tensor {shown(key)} holds NaN or infinite values")
        largest = max(-low, high)
        if largest > MAX_ABS_VALUE:
            raise LoraError(f"{name}: tensor {shown(key)} holds values up to {largest:g} in absolute value, more "
                            f"than {MAX_ABS_VALUE:g} (no real LoRA's weights or alphas are that large)")


def _check_metadata_alphas(metadata: dict[str, Any] | None, name: str) -> None:
    """:class:`LoraError` for an alpha in diffusers' ``lora_adapter_metadata`` (``lora_alpha``,
    ``alpha_pattern``'s values; per component, ``unet.lora_alpha``) that is not a finite number
    of at most :data:`MAX_ABS_VALUE` in absolute value: PEFT scales the weights by it."""
    for field_name, value in (metadata or {}).items():
        if field_name == "lora_alpha" or field_name.endswith(".lora_alpha"):
            alphas = [(shown(field_name), value)]
        elif (field_name == "alpha_pattern" or field_name.endswith(".alpha_pattern")) and isinstance(value, dict):
            alphas = [(f"{shown(field_name)} [{shown(k)}]", v) for k, v in value.items()]
        else:
            continue
        for where, alpha in alphas:
            # abs(nan) <= bound is False and inf is above it; a bool is no alpha
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not abs(alpha) <= MAX_ABS_VALUE:
                text = repr(alpha)
                text = text[:SHOWN_CHARS] + ("..." if len(text) > SHOWN_CHARS else "")
                raise LoraError(f"{name}: lora_adapter_metadata {where} is {text}: an alpha must be a finite number "
                                f"of at most {MAX_ABS_VALUE:g} in absolute value")


def _adapter_metadata(header: dict[str, Any], name: str) -> dict[str, Any] | None:
    raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        value = loads_bounded(raw, max_bytes=_MAX_METADATA_BYTES)
    except (ValueError, TypeError) as exc:
        raise LoraError(f"{name}: its lora_adapter_metadata is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise LoraError(f"{name}: its lora_adapter_metadata is not a JSON object")
    return value


# -- what a pipeline takes ----------------------------------------------------------------------

# (kind, inputs, outputs) of a module a LoRA layer can wrap.
_Module = tuple[str, int, int]


@dataclass(frozen=True)
class LoraTargets:
    """What LoRAs can attach to in one pipeline (a snapshot taken by :meth:`of`)."""

    pipeline: str  # its class name, for messages
    pipeline_cls: type
    modules: dict[str, dict[str, _Module]]  # component -> module name -> (kind, in, out)
    text_encoders: frozenset[str]  # components loaded the way diffusers loads text encoders
    flat_text_models: frozenset[str] = field(default_factory=frozenset)  # text encoders without .text_model
    unet_config: Any = None

    @classmethod
    def of(cls, pipe: Any) -> LoraTargets | None:
        """The targets of ``pipe``; None when its class takes no LoRAs."""
        from torch import nn

        from model_loader.assemble import is_transformers_model

        names = private_api.lora_loadable_components(pipe)
        if not names:
            return None
        modules: dict[str, dict[str, _Module]] = {}
        text_encoders, flat = set(), set()
        for name in names:
            component = getattr(pipe, name)
            if is_transformers_model(type(component)):
                text_encoders.add(name)
                if not hasattr(component, "text_model"):
                    flat.add(name)
            found: dict[str, _Module] = {}
            for module_name, module in component.named_modules():
                if isinstance(module, nn.Linear):
                    found[module_name] = ("linear", module.in_features, module.out_features)
                elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                    found[module_name] = ("conv", module.in_channels, module.out_channels)  # PEFT's lora_A: groups=1
                elif isinstance(module, nn.Embedding):
                    found[module_name] = ("embedding", module.num_embeddings, module.embedding_dim)
            modules[name] = found
        unet = getattr(pipe, "unet", None)
        return cls(type(pipe).__name__, type(pipe), modules, frozenset(text_encoders), frozenset(flat),
                   getattr(unet, "config", None))

    def check(self, lora: LoraWeights) -> dict[str, int]:
        """The LoRA layers ``lora`` puts into each component; :class:`LoraError` naming what does
        not fit when it is not a LoRA, or not one for this pipeline's architecture."""
        converted = self._converted(lora)
        not_lora = [k for k in converted if "lora" not in k]
        if not_lora:
            if len(not_lora) == len(converted):
                raise LoraError(f"{lora.name}: not a LoRA: none of its {len(converted)} tensors is a LoRA weight "
                                f"(e.g. {_names(not_lora)})")
            raise LoraError(f"{lora.name}: not a LoRA: {len(not_lora)} of its {len(converted)} tensors are not LoRA "
                            f"weights (e.g. {_names(not_lora)})")
        by_component: dict[str, dict[str, Any]] = {}
        foreign: dict[str, int] = {}
        for key, tensor in converted.items():
            component, _, rest = key.partition(".")
            if component in self.modules:
                by_component.setdefault(component, {})[rest] = tensor
            else:
                foreign[component] = foreign.get(component, 0) + 1
        if foreign:
            raise LoraError(
                f"{lora.name}: not a LoRA for this model: it has weights for {_names(sorted(foreign))}, which "
                f"{self.pipeline} has no LoRA-loadable component of (it takes {', '.join(self.modules)})")
        layers: dict[str, int] = {}
        missing: list[str] = []
        misfit: list[str] = []
        total = 0
        for component, tensors in by_component.items():
            found, absent, wrong = self._check_component(component, tensors)
            layers[component] = found
            total += found + len(absent) + len(wrong)
            missing += [f"{component} {m}" for m in absent]
            misfit += wrong
        if missing or misfit:
            problems = []
            if missing:
                problems.append(f"{len(missing)} of its {total} LoRA layers name modules {self.pipeline} does not "
                                f"have (e.g. {_names(missing)})")
            if misfit:
                count = f"{len(misfit)}" if missing else f"{len(misfit)} of its {total} LoRA layers"
                problems.append(f"{count} do not fit their module's shape (e.g. {'; '.join(misfit[:_SHOWN])})")
            raise LoraError(f"{lora.name}: not a LoRA for this model's architecture: " + ", and ".join(problems))
        if not layers:
            raise LoraError(f"{lora.name}: not a LoRA: it holds no LoRA layers")
        return layers

    def _converted(self, lora: LoraWeights) -> dict[str, Any]:
        """The file's keys as diffusers' ``lora_state_dict`` turns them (kohya, A1111 and older
        diffusers formats into diffusers'), before they are split among the components."""
        kwargs: dict[str, Any] = {"unet_config": self.unet_config} if self.unet_config is not None else {}
        try:
            with _quiet_diffusers():
                out = self.pipeline_cls.lora_state_dict(dict(lora.state_dict), **kwargs)
        except Exception as exc:  # diffusers raises ValueError, KeyError, ... for what it cannot convert
            raise LoraError(f"{lora.name}: not a LoRA diffusers can read for {self.pipeline}: "
                            f"{type(exc).__name__}: {_first_line(exc)}") from None
        state_dict = out[0] if isinstance(out, tuple) else out
        if not isinstance(state_dict, dict):
            raise LoraError(f"{lora.name}: not a LoRA diffusers can read for {self.pipeline}")
        return state_dict

    def _check_component(self, component: str, tensors: dict[str, Any]) -> tuple[int, list[str], list[str]]:
        """(layers that fit, modules it names that the component lacks, layers that do not fit)."""
        from diffusers.utils import (
            convert_state_dict_to_diffusers,
            convert_state_dict_to_peft,
            convert_unet_state_dict_to_peft,
        )

        if component in self.text_encoders:  # as diffusers' _load_lora_into_text_encoder converts them
            tensors = convert_state_dict_to_peft(convert_state_dict_to_diffusers(tensors))
            if component in self.flat_text_models:
                tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        elif tensors and "lora_A" not in next(iter(tensors)):  # as diffusers' load_lora_adapter does
            tensors = convert_unet_state_dict_to_peft(tensors)
        modules = self.modules[component]
        layers: dict[str, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            match = _LAYER_KEY.match(key)
            part = f"{match['part']}.{match['param']}" if match else None
            if match is None:
                match = _MAGNITUDE_KEY.match(key)
                part = "magnitude"
            if match is None:
                layers.setdefault(key, {})["?"] = tensor  # an adapter key PEFT's LoRA does not have
                continue
            layers.setdefault(match["module"], {})[part] = tensor
        absent, wrong, fit = [], [], 0
        for name, parts in layers.items():
            if name not in modules:
                absent.append(name)
                continue
            problem = _misfit(modules[name], parts)
            if problem:
                wrong.append(f"{component} {name}: {problem}")
            else:
                fit += 1
        return fit, absent, wrong


def _misfit(module: _Module, parts: dict[str, Any]) -> str | None:
    """Why a LoRA layer's tensors do not fit the module they wrap (None if they do)."""
    kind, inputs, outputs = module
    if "?" in parts:
        return "not a LoRA layer PEFT knows"
    a = parts.get("lora_A.weight", parts.get("lora_embedding_A.weight"))
    b = parts.get("lora_B.weight", parts.get("lora_embedding_B.weight"))
    if a is None or b is None:
        return "lora_A or lora_B is missing"
    if a.ndim < 2 or b.ndim < 2:
        return f"lora_A is {list(a.shape)} and lora_B {list(b.shape)}: not matrices"
    if kind == "embedding":
        if tuple(a.shape) != (a.shape[0], inputs) or b.shape[0] != outputs or b.shape[1] != a.shape[0]:
            return f"lora_A is {list(a.shape)}, lora_B {list(b.shape)}; the embedding is {inputs} x {outputs}"
        return None
    if a.shape[1] != inputs:
        return f"lora_A takes {a.shape[1]} inputs, the {kind} module has {inputs}"
    if b.shape[0] != outputs:
        return f"lora_B gives {b.shape[0]} outputs, the {kind} module has {outputs}"
    if b.shape[1] != a.shape[0]:
        return f"lora_A has rank {a.shape[0]}, lora_B {b.shape[1]}"
    for extra in ("lora_B.bias", "magnitude"):
        if extra in parts and tuple(parts[extra].shape) != (outputs,):
            return f"{extra} is {list(parts[extra].shape)}, the module has {outputs} outputs"
    return None


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]


# -- loading as adapters ------------------------------------------------------------------------


class _UnhandledKeys(logging.Handler):
    """Catches diffusers' warning that a LoRA's keys did not all load (it does not raise for them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "unexpected keys" in message or "missing keys" in message:
            self.messages.append(message)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[_UnhandledKeys]:
    """The chatter of loading an adapter kept out of the app's log: diffusers' LoRA loggers (e.g.
    "No LoRA keys associated to CLIPTextModel found"), transformers' load report of a text encoder's
    adapter (it lists the base weights an adapter state dict does not hold as "MISSING") and its
    "Loading weights" bar. diffusers' unhandled-keys warning is recorded."""
    from transformers.utils import logging as transformers_logging

    catcher = _UnhandledKeys()
    loggers = [logging.getLogger(name) for name in ("diffusers.utils.peft_utils", "diffusers.loaders.peft",
                                                    "diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline",
                                                    "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(catcher)
        lg.setLevel(logging.ERROR if lg.name != "diffusers.utils.peft_utils" else logging.WARNING)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield catcher
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(catcher)
            lg.setLevel(level)


def load_adapter(pipe: Any, lora: LoraWeights, adapter_name: str) -> None:
    """Load ``lora`` into ``pipe`` as the adapter ``adapter_name`` (``load_lora_weights``, with the
    file's adapter metadata); :class:`LoraError` when diffusers cannot load all of it. The caller
    removes it again (``pipe.unload_lora_weights()``), also when this raises: a request's adapters
    after its generation (``serving.lora_adapters.adapters``), fused ones once fused."""
    with _quiet_diffusers() as unhandled:
        try:
            with private_api.lora_metadata_for_dicts(pipe, lora.metadata):
                pipe.load_lora_weights(dict(lora.state_dict), adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise LoraError(f"{lora.name}: diffusers cannot load it into {type(pipe).__name__}: "
                            f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if unhandled.messages:
        raise LoraError(f"{lora.name}: not all of it loads into {type(pipe).__name__}: {unhandled.messages[0][:300]}")


# -- fused before packing -----------------------------------------------------------------------


def fuse_loras(src: Path, loras: Sequence[tuple[LoraWeights, float]], dst: Path, variant: str | None = None) -> Path:
    """Write to ``dst`` the diffusers pipeline at ``src`` with ``loras`` (weights, scale) fused
    into its weights, as ``load_lora_weights`` + ``set_adapters`` + ``fuse_lora`` make them. The
    components the LoRAs change are saved (in float32, their precision while fusing); the rest of
    ``src`` is linked. Returns ``dst``."""
    import torch
    from diffusers import DiffusionPipeline

    t0 = time.monotonic()
    kwargs: dict[str, Any] = {"variant": variant} if variant else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(src), dtype=torch.float32, local_files_only=True, **kwargs)
    except Exception as exc:  # OSError, ValueError, ... from from_pretrained
        raise ConversionError(f"{src}: cannot load the pipeline to fuse LoRAs into it: {exc}") from exc
    targets = LoraTargets.of(pipe)
    if targets is None:
        raise LoraError(f"{type(pipe).__name__} takes no LoRAs: remove [[model.loras]]")
    touched: set[str] = set()
    for lora, _ in loras:
        touched |= set(targets.check(lora))
    names = [f"fused_{i}" for i in range(len(loras))]
    for (lora, _), name in zip(loras, names, strict=True):
        load_adapter(pipe, lora, name)
    pipe.set_adapters(names, adapter_weights=[float(scale) for _, scale in loras])
    pipe.fuse_lora(components=sorted(touched), lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()  # the LoRA layers go, their products stay in the base weights
    dst.mkdir(parents=True)
    for entry in sorted(src.iterdir()):
        if entry.name in touched:
            getattr(pipe, entry.name).save_pretrained(dst / entry.name, safe_serialization=True)
        else:
            os.symlink(os.path.realpath(entry), dst / entry.name)
    log.info("fuse: %d LoRA(s) into %s of %s in %.2f s", len(loras), ", ".join(sorted(touched)), src,
             time.monotonic() - t0)
    return dst

