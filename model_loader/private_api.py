"""Every use of a private or internal API of torch, transformers and diffusers by ``model_loader``,
``conversion/convert.py`` and ``conversion/lora.py``, each behind one small function, so a version bump is checked here
and nowhere else. accelerate, huggingface_hub and safetensors are used through public APIs only.

One more private hook lives outside this package because it is the app's: ``app.py`` overrides
fal's ``App._add_extra_middlewares`` / ``_add_extra_routes`` (fal 1.83.0, the pin of
``requirements-test.txt``), the only places fal lets an app add ASGI middleware and wrap its 422
handler; ``tests/test_app_schema.py`` fails if they stop being called.

Each hook below: what it does; the private API it uses; why there is no public way. Checked
against the versions in :data:`CHECKED_VERSIONS`, the pins of ``requirements.txt``
(``tests/test_private_api.py`` fails when a pin moves, so the hooks get checked again).

torch 2.15.0

- ``empty_host_cache``: unpin freed pinned blocks. Uses ``torch._C._accelerator_emptyHostCache``
  (``_host_emptyCache`` in older torch). torch's caching host allocator keeps freed blocks pinned
  for the process's life and has no public call to release them.
- ``module_tensors``: a module's own parameters and buffers, with their persistence. Uses
  ``Module._parameters``, ``_buffers``, ``_non_persistent_buffers_set``. ``named_buffers`` does
  not say which buffers are non-persistent; ``named_parameters`` drops aliases (tied weights).
- ``set_module_tensor``: swap a registered tensor (meta) for a view of a loaded block. Writes
  ``Module._parameters[name]`` / ``_buffers[name]``. ``setattr`` / ``register_*`` run type checks
  and global registration hooks meant for new tensors.

transformers 5.25.0

- ``build_transformers_model``: build a model as ``from_pretrained`` does, without random init.
  Uses ``transformers.initialization.no_init_weights`` and ``PreTrainedModel._from_config``
  (which sets the dtype and attention implementation; ``cls(config)`` does neither).
- ``transformers_fp32_patterns``: which weights ``from_pretrained(dtype=...)`` keeps in float32.
  Uses ``PreTrainedModel._get_dtype_plan``.
- ``keys_ignored_on_load``: checkpoint keys ``from_pretrained`` drops silently (transformers and
  diffusers). Uses ``_keys_to_ignore_on_load_unexpected``.
- ``transformers_key_renames``: the key renames ``from_pretrained`` applies to a checkpoint. Uses
  ``transformers.conversion_mapping`` and ``transformers.core_model_loading``.

diffusers 0.42.1

- ``diffusers_fp32_modules``: which submodules ``from_pretrained(torch_dtype=...)`` keeps in
  float32. Uses ``ModelMixin._keep_in_fp32_modules``.
- ``diffusers_key_renames``: the renames of deprecated attention keys on load. Uses
  ``ModelMixin._fix_state_dict_keys_on_load``.
- ``pipeline_init_keys`` / ``optional_components``: what a pipeline's ``__init__`` takes and may
  get as None. Use ``DiffusionPipeline._get_signature_keys`` / ``_optional_components``.
- ``remap_legacy_model_class``: the class a legacy config really asks for (PixArt's
  ``Transformer2DModel``). Uses ``diffusers.models.modeling_utils.LegacyModelMixin`` and
  ``diffusers.models.model_loading_utils._fetch_remapped_cls_from_config``.
- ``remap_transformers_class``: transformers classes diffusers renames in ``model_index.json``.
  Uses ``diffusers.pipelines.pipeline_loading_utils._maybe_remap_transformers_class``.
- ``set_diffusers_name_or_path``: record where a model or pipeline was loaded from. Uses
  ``register_to_config(_name_or_path=...)``, as ``from_pretrained`` does.
- ``lora_loadable_components``: the components ``load_lora_weights`` puts LoRA layers into
  (``unet``, ``text_encoder``, ...). Uses the LoRA loader mixins' ``_lora_loadable_modules``, the
  list ``load_lora_weights``, ``fuse_lora`` and ``unload_lora_weights`` walk; no public accessor.
- ``lora_metadata_for_dicts``: let ``load_lora_weights`` use a LoRA file's adapter metadata for
  its state dict in memory. Shadows the pipeline's ``lora_state_dict`` (which ``load_lora_weights``
  calls with ``return_lora_metadata=True`` in every LoRA loader mixin) on the instance for one
  call. diffusers reads ``lora_adapter_metadata`` (``LoraConfig``'s ``r``, ``lora_alpha``, ...)
  only from a file: a state dict passed in memory loses it, and a LoRA whose ``lora_alpha`` is not
  its rank would be applied at the wrong strength.

Nothing here imports torch or the model libraries at module level; each hook imports what it uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

CHECKED_VERSIONS = {"torch": "2.15.0", "transformers": "5.25.0", "diffusers": "0.42.1"}


# ----------------------------------------------------------------------------------------------
# torch


def empty_host_cache() -> None:
    """Unpin the freed blocks torch's caching host allocator keeps pinned for the process's life
    (``torch.cuda.empty_cache`` frees device memory only). A no-op where neither hook exists."""
    import torch

    empty = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
    if empty is not None:
        empty()


def module_tensors(module: nn.Module) -> Iterator[tuple[str, str, torch.Tensor, bool]]:
    """``(kind, attr, tensor, persistent)`` for each parameter (``kind`` ``"parameter"``) and
    buffer (``"buffer"``) registered on ``module`` itself, not its children; unset ones skipped.

    ``named_parameters``/``named_buffers`` drop aliases and do not say which buffers are
    non-persistent (left out of state dicts, computed by ``__init__``).
    """
    for attr, tensor in module._parameters.items():
        if tensor is not None:
            yield "parameter", attr, tensor, True
    for attr, tensor in module._buffers.items():
        if tensor is not None:
            yield "buffer", attr, tensor, attr not in module._non_persistent_buffers_set


def set_module_tensor(module: nn.Module, kind: str, attr: str, value: torch.Tensor) -> None:
    """Replace the registered parameter or buffer ``attr`` of ``module`` by ``value`` in place.

    ``setattr``/``register_*`` would run ``Module.__setattr__``'s type checks and the global
    registration hooks for a tensor that is only being swapped (meta -> a view of a loaded block).
    """
    if kind == "parameter":
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


# ----------------------------------------------------------------------------------------------
# transformers


def build_transformers_model(cls: type, config: Any, dtype: torch.dtype | None) -> nn.Module:
    """``cls`` from ``config`` the way ``from_pretrained`` builds it (``_from_config`` sets the
    dtype and attention implementation), without the random initialisation of ``post_init``:
    the weights come from a pack."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)


def transformers_fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Name patterns (``*`` wildcards) of the weights ``from_pretrained(dtype=dtype)`` keeps in
    float32 (``_keep_in_fp32_modules`` and ``_keep_in_fp32_modules_strict``)."""
    return list(model._get_dtype_plan(dtype)) if hasattr(model, "_get_dtype_plan") else []


def keys_ignored_on_load(model: nn.Module) -> list[str]:
    """Regexes of checkpoint keys ``from_pretrained`` drops without complaint (transformers and
    diffusers models both declare ``_keys_to_ignore_on_load_unexpected``)."""
    return list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])


def transformers_key_renames(model: nn.Module, keys: list[str]) -> dict[str, str] | None:
    """Checkpoint key -> the model's name for it after transformers' key renamings and base-model
    prefix; None when a key needs a weight *converter* (fused or split tensors). Keys stay as they
    are where this transformers version lacks the modules."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        return {k: k for k in keys}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    prefix = model.base_model_prefix
    out: dict[str, str] = {}
    for key in sorted(keys, key=dot_natural_key):  # the order transformers renames in
        new, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if new not in meta and key in meta:
            new, pattern = rename_source_key(key, [], [], prefix, meta)
        if pattern is not None:
            return None
        out[key] = new
    return out


# ----------------------------------------------------------------------------------------------
# diffusers


def diffusers_fp32_modules(model: nn.Module) -> list[str]:
    """Submodule names whose weights diffusers' ``from_pretrained(torch_dtype=...)`` keeps in
    float32."""
    modules = getattr(model, "_keep_in_fp32_modules", None) or []
    return [modules] if isinstance(modules, str) else list(modules)


def diffusers_key_renames(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> the model's name for it after diffusers' renames of deprecated attention
    keys (``query`` -> ``to_q``, ...)."""
    moved = {k: k for k in keys}
    model._fix_state_dict_keys_on_load(moved)  # renames keys in place, values ride along
    return {old: new for new, old in moved.items()}


def pipeline_init_keys(pipeline_cls: type) -> tuple[list[str], list[str]]:
    """``(components, optional keyword arguments)`` a diffusers pipeline's ``__init__`` takes."""
    expected, optional_kwargs = pipeline_cls._get_signature_keys(pipeline_cls)
    return list(expected), list(optional_kwargs)


def optional_components(pipeline_cls: type) -> list[str]:
    """The components a diffusers pipeline accepts as None."""
    return list(pipeline_cls._optional_components)


def remap_legacy_model_class(cls: type, config: dict[str, Any]) -> type:
    """The class diffusers really builds for ``config`` when ``cls`` is a legacy class
    (``Transformer2DModel`` in older PixArt repos becomes ``PixArtTransformer2DModel``)."""
    from diffusers.models.modeling_utils import LegacyModelMixin

    if not issubclass(cls, LegacyModelMixin):
        return cls
    from diffusers.models.model_loading_utils import _fetch_remapped_cls_from_config

    return _fetch_remapped_cls_from_config(config, cls)


def remap_transformers_class(name: str) -> str:
    """The transformers class diffusers loads for ``name`` in a ``model_index.json`` (renamed
    classes across transformers versions); ``name`` itself where there is nothing to remap."""
    try:
        from diffusers.pipelines.pipeline_loading_utils import _maybe_remap_transformers_class
    except ImportError:
        return name
    return _maybe_remap_transformers_class(name) or name


def set_diffusers_name_or_path(obj: Any, path: str) -> None:
    """Record ``path`` as where a diffusers model or pipeline was loaded from
    (``obj.config._name_or_path``, ``pipe.name_or_path``), as ``from_pretrained`` does."""
    obj.register_to_config(_name_or_path=path)


def lora_loadable_components(pipe: Any) -> list[str]:
    """The components of ``pipe`` its ``load_lora_weights`` loads LoRA layers into (``unet``,
    ``text_encoder``, ``transformer``, ...), those present as modules; [] for a pipeline that takes
    no LoRAs."""
    from torch import nn

    if not callable(getattr(pipe, "load_lora_weights", None)):
        return []
    names = getattr(pipe, "_lora_loadable_modules", None) or []
    return [name for name in names if isinstance(getattr(pipe, name, None), nn.Module)]


@contextlib.contextmanager
def lora_metadata_for_dicts(pipe: Any, metadata: dict[str, Any] | None) -> Iterator[None]:
    """While open, ``pipe.load_lora_weights(state_dict)`` applies ``metadata`` (a file's
    ``lora_adapter_metadata``) as if the state dict had been read from that file."""
    if metadata is None:
        yield
        return
    read = pipe.lora_state_dict  # the bound classmethod

    def with_metadata(*args: Any, **kwargs: Any) -> Any:
        out = read(*args, **kwargs)
        if kwargs.get("return_lora_metadata") and isinstance(out, tuple) and out and out[-1] is None:
            return (*out[:-1], metadata)
        return out

    pipe.__dict__["lora_state_dict"] = with_metadata  # past DiffusionPipeline.__setattr__'s config bookkeeping
    try:
        yield
    finally:
        pipe.__dict__.pop("lora_state_dict", None)
