"""What a diffusers pipeline directory looks like, in one place: ``model_index.json``, its
components, their weight files and variants, and the files of a converted directory.

Both sides use it: conversion (which Hub files to fetch, which files of a component to pack)
and the loader (which components to build). Torch-free and offline.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bounded_json import load_file_bounded
from .errors import DiffusersLayoutError

MODEL_INDEX_NAME = "model_index.json"
CONFIG_NAME = "config.json"
# A torch component's FlashPack weights, beside its config.json: ``model.flashpack`` in a converted
# directory and as diffusers' ``save_pretrained(use_flashpack=True)`` writes it (with ``variant=``
# diffusers writes ``model.<variant>.flashpack``). Never sharded.
PACK_STEM = "model"
PACK_EXT = "flashpack"
PACK_NAME = f"{PACK_STEM}.{PACK_EXT}"
# A model_index.json names a few components (~1 KB); far larger is not one.
MAX_MODEL_INDEX_BYTES = 1 << 20
# A config.json or a shard index is kilobytes (a large transformer's index ~100 KB).
MAX_CONFIG_BYTES = 16 << 20

# The weight files diffusers and transformers load: <stem>[.<variant>][-0000k-of-0000n].<ext>
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_EXTS = (PACK_EXT, "safetensors", "bin")  # in order of preference
_VARIANT = re.compile(r"^[A-Za-z0-9_]+$")
_SHARD = re.compile(r"-\d{5}-of-\d{5}")
_INDEX = re.compile(r"^(?P<stem>[^.]+)\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$")
# Files that hold weights in some format; never copied into a converted directory as side files.
_ANY_WEIGHT_SUFFIX = (".safetensors", ".bin", ".msgpack", ".onnx", ".onnx_data", ".pb", ".ckpt", ".pt", ".pth",
                      ".h5", ".gguf", ".flashpack")
# Per-component files a pipeline needs besides weights: configs, tokenizers, schedulers.
_SIDE_FILE = re.compile(r"\.(json|txt|model|tiktoken)$")


def is_variant_name(name: str) -> bool:
    """A weight variant name such as ``fp16`` (letters, digits, underscores)."""
    return bool(_VARIANT.match(name))


def read_model_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``model_index.json`` at ``path`` (a file, or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_INDEX_NAME
    try:
        data = load_file_bounded(path, max_bytes=MAX_MODEL_INDEX_BYTES)
    except FileNotFoundError:
        raise DiffusersLayoutError(f"{path}: missing; not a diffusers pipeline directory") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 JSON, too large or too deep
        raise DiffusersLayoutError(f"{path}: not a readable model_index.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise DiffusersLayoutError(f"{path}: expected a JSON object with a string '_class_name'")
    return data


def components(index: Mapping[str, Any]) -> dict[str, tuple[str, str] | None]:
    """The components a ``model_index.json`` lists: name -> ``(library, class)``, or None for a
    component saved as ``[null, null]`` (the pipeline gets None). Other keys are settings."""
    found: dict[str, tuple[str, str] | None] = {}
    for name, value in sorted(index.items()):
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2):
            continue
        library, class_name = value
        if isinstance(library, str) and isinstance(class_name, str):
            found[name] = (library, class_name)
        elif library is None or class_name is None:
            found[name] = None
        else:
            raise DiffusersLayoutError(f"{MODEL_INDEX_NAME}: component {name!r} must be [library, class], got {value!r}")
    return found


@dataclass(frozen=True)
class WeightName:
    """A parsed weight file name: ``diffusion_pytorch_model.fp16-00001-of-00002.safetensors``."""

    stem: str
    variant: str | None
    ext: str
    sharded: bool


def parse_weight_name(name: str) -> WeightName | None:
    """Split a weight file name into stem, variant and extension; None for anything else."""
    base, dot, ext = name.rpartition(".")
    if not dot or ext not in WEIGHT_EXTS or not base:
        return None
    sharded = bool(_SHARD.search(base))
    base = _SHARD.sub("", base)
    stem, _, variant = base.partition(".")
    if not stem or (variant and not _VARIANT.match(variant)):
        return None
    return WeightName(stem, variant or None, ext, sharded)


@dataclass(frozen=True)
class Weights:
    """The weight files chosen for one component: ``files`` (all shards, plus the shard index
    when there is one), the variant they are (None: default weights) and their extension."""

    files: list[str]
    variant: str | None
    ext: str

    @property
    def shard_index(self) -> str | None:
        return next((f for f in self.files if _INDEX.match(f)), None)

    @property
    def is_pack(self) -> bool:
        """A FlashPack pack (one file), taken as it is rather than converted."""
        return self.ext == PACK_EXT


def choose_weights(names: Iterable[str], variant: str | None, component: str) -> Weights | None:
    """The weight files to take from one component directory's file ``names``.

    The requested variant where the component has it, else its default weights (as diffusers
    does); within those, a FlashPack pack (``model.flashpack``, as diffusers'
    ``save_pretrained(use_flashpack=True)`` writes it; ``model.<variant>.flashpack`` with
    ``variant=``) over safetensors over ``.bin``; never onnx/flax/msgpack. So with
    ``variant="fp16"`` a component's ``*.fp16.safetensors`` win over its (default) ``model.flashpack``,
    and a component without fp16 weights takes its pack. None when the component has no weight
    files at all; DiffusersLayoutError when it has only other variants.
    """
    names = list(names)
    parsed = {n: w for n in names if (w := parse_weight_name(n)) is not None and _loadable(w)}
    if not parsed:
        return None

    def pick(v: str | None) -> list[str]:
        cands = [n for n, w in parsed.items() if w.variant == v]
        for ext in WEIGHT_EXTS:
            of_ext = sorted(n for n in cands if parsed[n].ext == ext)
            if of_ext:
                return of_ext
        return []

    used = variant
    picked = pick(variant) if variant else []
    if not picked:
        used, picked = None, pick(None)
    if not picked:
        found = sorted({w.variant for w in parsed.values() if w.variant})
        wanted = f"variant {variant!r}" if variant else "default (non-variant) weights"
        raise DiffusersLayoutError(
            f"component {component!r} has no {wanted}; it has variants {found}: set variant to one of them"
        )
    ext = parsed[picked[0]].ext
    indexes = [n for n in names if (m := _INDEX.match(n)) and m["ext"] == ext and (m["variant"] or None) == used
               and m["stem"] in WEIGHT_STEMS]
    return Weights(picked + sorted(indexes), used, ext)


def _loadable(w: WeightName) -> bool:
    """A weight file diffusers or transformers loads: one of their stems; a pack is ``model[.<variant>].flashpack``."""
    if w.ext == PACK_EXT:
        return w.stem == PACK_STEM and not w.sharded
    return w.stem in WEIGHT_STEMS


def variants_present(names: Iterable[str]) -> list[str]:
    """The variants (``fp16``, ...) among weight file names, for error hints."""
    return sorted({w.variant for n in names if (w := parse_weight_name(n)) is not None and w.variant})


def is_weight_file(name: str) -> bool:
    """Whether a file holds weights in any format (or indexes them): never a side file."""
    return name.endswith(_ANY_WEIGHT_SUFFIX) or bool(_INDEX.match(name))


def side_files(names: Iterable[str]) -> list[str]:
    """The configs, tokenizer and scheduler files among a component directory's file names."""
    return [n for n in names if _SIDE_FILE.search(n) and not is_weight_file(n)]


def select_files(
    files: Iterable[str],
    index: Mapping[str, Any],
    variant: str | None = None,
    subfolder: str | None = None,
    weights: bool = True,
) -> list[str]:
    """The files of a repo listing a pipeline needs (for ``allow_patterns``): ``model_index.json``,
    every component's side files and, with ``weights``, the weights ``choose_weights`` picks: a
    component's ``model.flashpack`` instead of its safetensors where it has one (a repo saved
    with diffusers' ``save_pretrained(use_flashpack=True)``)."""
    prefix = f"{subfolder}/" if subfolder else ""
    by_dir: dict[str, list[str]] = {}
    for path in files:
        if not path.startswith(prefix):
            continue
        comp, sep, name = path[len(prefix):].partition("/")
        if sep and "/" not in name:
            by_dir.setdefault(comp, []).append(name)
    chosen = [f"{prefix}{MODEL_INDEX_NAME}"]
    for comp, spec in components(index).items():
        if spec is None:
            continue
        names = by_dir.get(comp, [])
        chosen += [f"{prefix}{comp}/{n}" for n in side_files(names)]
        picked = choose_weights(names, variant, comp) if weights else None
        if picked is not None:
            chosen += [f"{prefix}{comp}/{n}" for n in picked.files]
    return sorted(set(chosen))


# The safety checker of Stable Diffusion 1.x: a StableDiffusionSafetyChecker (a CLIP vision model
# with concept embeddings) and the CLIPImageProcessor that prepares its input. On the Hub it is a
# model repo of its own (config.json, weights and preprocessor_config.json side by side, as in
# CompVis/stable-diffusion-safety-checker) or two folders of an SD 1.x pipeline repo. Converted, it
# is a two-component directory in the pipeline layout, so the store and the loader take it as they
# take a pipeline: safety_checker/ (config.json + model.flashpack), feature_extractor/, and a
# model_index.json naming both classes as SD 1.x pipelines do.
SAFETY_CHECKER = "safety_checker"
FEATURE_EXTRACTOR = "feature_extractor"
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
SAFETY_CHECKER_CLASS = ["stable_diffusion", "StableDiffusionSafetyChecker"]
FEATURE_EXTRACTOR_CLASS = ["transformers", "CLIPImageProcessor"]


def safety_checker_index() -> dict[str, Any]:
    """The ``model_index.json`` of a safety checker directory: its two components, as SD 1.x
    pipelines list them (``_class_name`` names the checker; it is no pipeline)."""
    return {"_class_name": SAFETY_CHECKER_CLASS[1], SAFETY_CHECKER: list(SAFETY_CHECKER_CLASS),
            FEATURE_EXTRACTOR: list(FEATURE_EXTRACTOR_CLASS)}


def select_safety_checker_files(
    files: Iterable[str], variant: str | None = None, subfolder: str | None = None, weights: bool = True
) -> dict[str, list[str]]:
    """The files of a repo listing (or a directory's relative paths) that make up a safety checker,
    per component of its converted directory: ``safety_checker`` (``config.json`` and the weights
    ``choose_weights`` picks) and ``feature_extractor`` (``preprocessor_config.json``).

    They lie side by side in the (sub)folder's root, or in its ``safety_checker/`` and
    ``feature_extractor/`` folders (an SD 1.x pipeline repo); DiffusersLayoutError when neither.
    """
    prefix = f"{subfolder}/" if subfolder else ""
    by_dir: dict[str, list[str]] = {}
    for path in files:
        if not path.startswith(prefix):
            continue
        folder, _, name = path[len(prefix):].rpartition("/")
        if "/" not in folder:
            by_dir.setdefault(folder, []).append(name)
    for model_dir, extractor_dir in (("", ""), (SAFETY_CHECKER, FEATURE_EXTRACTOR)):
        if CONFIG_NAME in by_dir.get(model_dir, []) and PREPROCESSOR_CONFIG_NAME in by_dir.get(extractor_dir, []):
            break
    else:
        where = subfolder or "the repo root"
        raise DiffusersLayoutError(
            f"{where} holds no safety checker: expected {CONFIG_NAME} + weights + {PREPROCESSOR_CONFIG_NAME} side "
            f"by side (as in CompVis/stable-diffusion-safety-checker) or {SAFETY_CHECKER}/ + {FEATURE_EXTRACTOR}/ "
            "(as in an SD 1.x pipeline repo)"
        )
    model = [CONFIG_NAME]
    if weights:
        picked = choose_weights(by_dir[model_dir], variant, SAFETY_CHECKER)
        if picked is None:
            raise DiffusersLayoutError(f"{(prefix + model_dir).rstrip('/') or 'the repo root'}: the safety checker has "
                                       "no weight files")
        model += picked.files

    def full(folder: str, name: str) -> str:
        return f"{prefix}{folder}/{name}" if folder else f"{prefix}{name}"

    return {SAFETY_CHECKER: [full(model_dir, n) for n in model],
            FEATURE_EXTRACTOR: [full(extractor_dir, PREPROCESSOR_CONFIG_NAME)]}


# One model in a folder of its own (a ControlNet, an IP-Adapter's CLIP image encoder): its
# config.json and weights side by side, as diffusers' and transformers' save_pretrained write them.
# Converted, it is a one-component directory in the pipeline layout (``<component>/`` and a
# model_index.json naming its class), so the store and the loader take it as they take a pipeline.


def select_model_folder_files(
    files: Iterable[str], variant: str | None = None, subfolder: str | None = None, weights: bool = True,
    where: str | None = None,
) -> list[str]:
    """The files of a repo listing (or a directory's relative paths) that make up the one model in
    ``subfolder`` (the root when None): its ``config.json`` and the weights ``choose_weights``
    picks, at that folder's top level. DiffusersLayoutError when it has no config or no weights,
    naming the folder as ``where`` (default: the subfolder, or the repo root)."""
    prefix = f"{subfolder}/" if subfolder else ""
    names = [path[len(prefix):] for path in files if path.startswith(prefix) and "/" not in path[len(prefix):]]
    where = where or subfolder or "the repo root"
    if CONFIG_NAME not in names:
        raise DiffusersLayoutError(f"{where} holds no model: no {CONFIG_NAME} (a model folder has {CONFIG_NAME} and "
                                   "its weights side by side, as save_pretrained writes them)")
    chosen = [CONFIG_NAME]
    if weights:
        picked = choose_weights(names, variant, subfolder or "model")
        if picked is None:
            raise DiffusersLayoutError(f"{where}: the model has no weight files beside its {CONFIG_NAME}")
        chosen += picked.files
    return [prefix + name for name in chosen]


def model_folder_index(component: str, config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``model_index.json`` of a one-model directory whose model is ``component``: its class
    from its ``config.json`` (diffusers' ``_class_name``, or transformers' ``architectures``)."""
    if isinstance(config.get("_class_name"), str):
        spec = ["diffusers", config["_class_name"]]
    elif isinstance(config.get("architectures"), list) and config["architectures"] \
            and isinstance(config["architectures"][0], str):
        spec = ["transformers", config["architectures"][0]]
    else:
        raise DiffusersLayoutError(f"{where}: names no model class (no '_class_name' or 'architectures')")
    return {"_class_name": spec[1], component: spec}
