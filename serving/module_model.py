"""A torch module to serve (any ``nn.Module``, see module_app.py): how it is built (``factory``,
``package.module:function``), where its safetensors weights come from (``source``, converted once
into the store like every source) and how it is loaded. Checked when it is made, so a typo stops the
app at import with a message naming the key."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from conversion.errors import SourceError
from conversion.sources.module import ModuleSource, parse_module_source

from .settings import SettingsError

_FACTORY = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


class ModuleSettings(BaseModel):
    """The module an app serves. ``source``: a safetensors file or directory of shards, a Hub repo
    (``org/name[@revision]``, with ``subfolder``), a Hub file (``org/name/file.safetensors``), an
    https:// URL, or ``demo-vae-decoder``; ``strict``: every tensor of the module must be in the
    pack and every tensor of the pack in the module (names and shapes)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    factory: str = Field(pattern=_FACTORY)
    source: str = Field(min_length=1)
    revision: str | None = Field(default=None, min_length=1)
    subfolder: str | None = Field(default=None, min_length=1)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    strict: bool = True

    @model_validator(mode="after")
    def _source_parses(self) -> ModuleSettings:
        try:
            module_source(self)
        except SourceError as exc:
            raise ValueError(f"source: {exc}") from None
        return self


def module_source(settings: ModuleSettings) -> ModuleSource:
    """The store source of the module's weights."""
    return parse_module_source(settings.source, revision=settings.revision, subfolder=settings.subfolder)


def module_factory(settings: ModuleSettings) -> Callable[[], Any]:
    """The function ``factory`` names, imported (the module's own code: imported in setup(), not
    at the app's import)."""
    module_name, _, name = settings.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except ImportError as exc:
        raise SettingsError(f"factory {settings.factory!r}: cannot import {module_name} ({exc})") from exc
    except AttributeError:
        raise SettingsError(f"factory {settings.factory!r}: {module_name} has no {name!r}") from None
    if not callable(factory):
        raise SettingsError(f"factory {settings.factory!r} is not callable")
    return factory
