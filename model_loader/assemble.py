"""Build torch modules without weights and fill them with views of loaded pack blocks.

A module is constructed with its parameters on the meta device (no memory, no random init) and its
buffers real, so non-persistent buffers (position ids, rotary frequencies) get the values the
module's own ``__init__`` computes. Loaded tensors then become the parameters and persistent
buffers as *views* of the flat per-dtype blocks: no copy. Loading is strict by default, like
``load_state_dict(strict=True)``; ``strict=False`` keeps the module's own tensors for names the
pack lacks, as ``load_state_dict(strict=False)`` does. Tied weights stay tied.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import private_api
from .errors import StateDictMismatchError
from .format import PackLayout
from .reader import PackData

# Shown per kind of problem in a mismatch error; the rest is counted.
_MAX_NAMES_SHOWN = 20


@dataclass
class _Slot:
    """One distinct parameter or persistent buffer, under every name it is reachable by."""

    kind: str  # "parameter" | "buffer"
    tensor: torch.Tensor
    names: list[str] = field(default_factory=list)
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)


def _walk(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, str, torch.Tensor, bool]]:
    """``(kind, owner, attr, full name, tensor, persistent)`` for every name, duplicates included."""
    for prefix, mod in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for kind, attr, tensor, persistent in private_api.module_tensors(mod):
            yield kind, mod, attr, dot + attr, tensor, persistent


# A non-persistent buffer: (owner, attribute, full name, tensor).
_NonPersistent = tuple[nn.Module, str, str, torch.Tensor]


def _slots(module: nn.Module) -> tuple[list[_Slot], list[_NonPersistent]]:
    """The persistent tensors grouped by identity (aliases share a slot), and non-persistent buffers."""
    by_id: dict[int, _Slot] = {}
    non_persistent: list[_NonPersistent] = []
    for kind, owner, attr, name, tensor, persistent in _walk(module):
        if not persistent:
            non_persistent.append((owner, attr, name, tensor))
            continue
        slot = by_id.setdefault(id(tensor), _Slot(kind, tensor))
        slot.names.append(name)
        slot.owners.append((owner, attr))
    return list(by_id.values()), non_persistent


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """Names of the buffers ``__init__`` computes and state dicts leave out (position ids, ...)."""
    return {name for _, _, name, _ in _slots(module)[1]}


def _dtype_fits(expected: torch.dtype, stored: torch.dtype) -> bool:
    # A floating-point tensor may be stored at any floating precision; others must match exactly.
    return stored == expected or (expected.is_floating_point and stored.is_floating_point)


_Shapes = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def check_tensors(module: nn.Module, shapes: _Shapes, where: str, strict: bool = True) -> dict[str, str]:
    """Check that ``shapes`` (name -> (shape, dtype)) fills ``module`` exactly; raise otherwise.

    Returns, for each name in ``shapes`` that the module has, the name it is loaded from: itself,
    or for a second name of a tied tensor, the first name of that tensor present in ``shapes``
    (which wins). ``strict=False`` allows names the module lacks (left out of the result) and
    tensors ``shapes`` lacks, unless the module's own tensor is on the meta device (no value to
    keep); shape and dtype mismatches are errors either way.
    """
    return _check(_slots(module)[0], module, shapes, where, strict)


def _check(
    slots: list[_Slot], module: nn.Module, shapes: _Shapes, where: str, strict: bool = True
) -> dict[str, str]:
    owner = {name: slot for slot in slots for name in slot.names}
    unexpected = [n for n in shapes if n not in owner] if strict else []
    missing: list[str] = []
    mismatched: list[str] = []
    chosen: dict[str, str] = {}
    for slot in slots:
        present = [n for n in slot.names if n in shapes]
        if not present:
            if strict or slot.tensor.is_meta:
                missing.append(" = ".join(slot.names))
            continue
        want_shape, want_dtype = tuple(slot.tensor.shape), slot.tensor.dtype
        for n in present:
            shape, dtype = shapes[n]
            if tuple(shape) != want_shape or not _dtype_fits(want_dtype, dtype):
                mismatched.append(
                    f"{n}: stored {list(shape)} {_short(dtype)}, module wants {list(want_shape)} "
                    f"{_short(want_dtype)}"
                )
            chosen[n] = present[0]
    if unexpected or missing or mismatched:
        missing_label = "missing" if strict else "missing, and on the meta device (no value to keep)"
        raise StateDictMismatchError(
            _mismatch_message(module, where, {missing_label: missing, "unexpected": unexpected,
                                              "shape/dtype mismatch": mismatched})
        )
    return chosen


def load_tensors(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    device: torch.device | str,
    where: str,
    strict: bool = True,
) -> None:
    """Make ``tensors`` (views, not copies) the parameters and persistent buffers of ``module``.

    Strict: a missing, unexpected or ill-shaped name raises :class:`StateDictMismatchError` naming
    it before anything is assigned. ``strict=False`` (see :func:`check_tensors`) ignores unexpected
    names and keeps the module's own tensor for a missing one, moved to ``device``. Tied names get
    one shared ``Parameter``. Non-persistent buffers (built real by ``__init__``) are moved to
    ``device``.
    """
    device = torch.device(device)
    slots, non_persistent = _slots(module)
    _check(slots, module, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, where, strict)
    for slot in slots:
        name = next((n for n in slot.names if n in tensors), None)
        if name is None:  # strict=False and not in the pack: the module's own (real) tensor stays
            _keep_on_device(slot, device)
            continue
        source = tensors[name]
        if slot.kind == "parameter":
            wants_grad = slot.tensor.requires_grad and (source.is_floating_point() or source.is_complex())
            value: torch.Tensor = nn.Parameter(source, requires_grad=wants_grad)
        else:
            value = source
        for owner, attr in slot.owners:
            private_api.set_module_tensor(owner, slot.kind, attr, value)
    moved: dict[int, torch.Tensor] = {}
    for owner, attr, name, buffer in non_persistent:
        if buffer.is_meta:
            raise StateDictMismatchError(
                f"{where}: non-persistent buffer {name!r} of {type(module).__name__} is on the meta "
                "device after construction and not in the pack; cannot materialize it"
            )
        private_api.set_module_tensor(owner, "buffer", attr, moved.setdefault(id(buffer), buffer.to(device)))


def _keep_on_device(slot: _Slot, device: torch.device) -> None:
    """Move a tensor the pack does not replace to ``device`` (itself when it is already there)."""
    tensor = slot.tensor
    if tensor.device == device:
        return
    moved = tensor.detach().to(device)
    value = nn.Parameter(moved, requires_grad=tensor.requires_grad) if slot.kind == "parameter" else moved
    for owner, attr in slot.owners:
        private_api.set_module_tensor(owner, slot.kind, attr, value)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None or dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Every parameter registered while this runs lands on the meta device; buffers stay real.

    accelerate's ``init_empty_weights(include_buffers=False)``, except that ties made in
    ``__init__`` survive: a parameter already on the meta device (``self.head.weight =
    self.embed.weight``) is registered as itself, and a real one registered under several names
    becomes one meta parameter (accelerate wraps each registration in a new ``Parameter``).
    """
    register = nn.Module.register_parameter
    on_meta: dict[int, nn.Parameter] = {}  # a real parameter, while it lives -> its meta twin

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            meta = on_meta.get(id(param))
            if meta is None:
                meta = _meta_twin(param)
                on_meta[id(param)] = meta
                weakref.finalize(param, on_meta.pop, id(param), None)
            param = meta
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _meta_twin(param: nn.Parameter) -> nn.Parameter:
    data = param.detach().to("meta")
    if type(param) is nn.Parameter:
        twin = nn.Parameter(data, requires_grad=param.requires_grad)
        twin.__dict__.update(param.__dict__)
        return twin
    # A Parameter subclass takes its attributes as constructor arguments, as accelerate passes them.
    return type(param)(data, requires_grad=param.requires_grad, **param.__dict__)


def is_transformers_model(cls: type) -> bool:
    """Whether ``cls`` is a transformers ``PreTrainedModel``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return issubclass(cls, PreTrainedModel)


def is_diffusers_model(cls: type) -> bool:
    """Whether ``cls`` is a diffusers ``ModelMixin``."""
    from diffusers import ModelMixin

    return issubclass(cls, ModelMixin)


def build_empty_model(cls: type, config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """Construct ``cls`` from ``config`` with parameters on the meta device and real buffers.

    ``config`` is a diffusers config dict or a transformers ``PretrainedConfig``. Floating-point
    buffers are created in ``dtype`` (the default dtype while ``__init__`` runs), as
    ``from_pretrained(torch_dtype=dtype)`` does. Transformers models get their weights tied.
    """
    from accelerate import init_empty_weights

    with _default_dtype(dtype), init_empty_weights(include_buffers=False):
        if is_diffusers_model(cls):
            model = cls.from_config(config)
        elif is_transformers_model(cls):
            model = private_api.build_transformers_model(cls, config, dtype)
        else:
            raise TypeError(f"{cls.__module__}.{cls.__name__} is neither a diffusers nor a transformers model")
    if is_transformers_model(cls):
        model.tie_weights()
    return model


def keep_in_fp32_rule(model: nn.Module, dtype: torch.dtype | None) -> Callable[[str], bool]:
    """Which tensor names ``from_pretrained(torch_dtype=dtype)`` keeps in float32 for this model."""
    if dtype is None or dtype == torch.float32:
        return lambda name: False
    if is_transformers_model(type(model)):
        patterns = private_api.transformers_fp32_patterns(model, dtype)
        if not patterns:
            return lambda name: False
        regex = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
        return lambda name: regex.search(name) is not None
    modules = private_api.diffusers_fp32_modules(model)
    if not modules:
        return lambda name: False
    wanted = set(modules)
    return lambda name: not wanted.isdisjoint(name.split("."))


def cast_tensors(
    pack: PackData, dtype: torch.dtype | None, keep_fp32: Callable[[str], bool] = lambda name: False
) -> dict[str, torch.Tensor]:
    """The pack's tensors with floating-point ones in ``dtype`` (``keep_fp32`` names in float32).

    Each floating block is cast whole, so the result is still one flat block per dtype; without
    ``dtype`` these are plain views of the loaded blocks. Casting replaces the pack's blocks (the
    caller's views of the uncast blocks stay valid but the pack no longer holds them).
    """
    if dtype is None:
        return pack.tensors()
    # The float32 copies first (small): a view would keep the whole uncast block alive.
    kept = {
        name: tensor.float() if tensor.dtype != torch.float32 else tensor.clone()
        for name, tensor in pack.tensors().items()
        if tensor.is_floating_point() and keep_fp32(name)
    }
    # One block at a time, each replacing its original in the pack, so at most one block exists
    # twice at any moment (not the whole pack).
    for i, meta in enumerate(pack.layout.blocks):
        if meta.dtype.is_floating_point and meta.dtype != dtype:
            pack.blocks[i] = pack.blocks[i].to(dtype)
    out = PackData(pack.layout, pack.blocks).tensors()
    out.update(kept)
    return out


def construction_dtype(layout: PackLayout, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """``torch_dtype``, else the floating dtype holding most of the pack's elements."""
    if torch_dtype is not None:
        return torch_dtype
    floating = [b for b in layout.blocks if b.dtype.is_floating_point]
    return max(floating, key=lambda b: b.length_elems).dtype if floating else None


def fill_model(
    model: nn.Module,
    pack: PackData,
    device: torch.device | str = "cpu",
    torch_dtype: torch.dtype | None = None,
    where: str = "<pack>",
    strict: bool = True,
) -> nn.Module:
    """Load ``pack`` (already on ``device``) into an empty ``model`` and put it in eval mode.

    Without ``torch_dtype`` every tensor keeps its stored dtype; with it, floating-point tensors
    are cast (a copy) except those the model class keeps in float32. ``strict``: see
    :func:`load_tensors`.
    """
    tensors = cast_tensors(pack, torch_dtype, keep_in_fp32_rule(model, torch_dtype))
    load_tensors(model, tensors, device, where, strict)
    model.eval()
    return model


def assemble_model(
    cls: type,
    config: Any,
    pack: PackData,
    device: torch.device | str = "cpu",
    torch_dtype: torch.dtype | None = None,
    where: str = "<pack>",
) -> nn.Module:
    """Build ``cls`` from ``config`` on the meta device and fill it from ``pack`` (see fill_model)."""
    model = build_empty_model(cls, config, construction_dtype(pack.layout, torch_dtype))
    return fill_model(model, pack, device, torch_dtype, where)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mismatch_message(module: nn.Module, where: str, problems: Mapping[str, list[str]]) -> str:
    parts = [f"{where}: tensors do not match {type(module).__name__}"]
    for label, names in problems.items():
        if names:
            shown = ", ".join(names[:_MAX_NAMES_SHOWN])
            more = f" (+{len(names) - _MAX_NAMES_SHOWN} more)" if len(names) > _MAX_NAMES_SHOWN else ""
            parts.append(f"{label} ({len(names)}): {shown}{more}")
    return "; ".join(parts)
