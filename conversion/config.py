"""Every environment variable the conversion package reads, declared once, typed, documented.

``ConversionConfig.from_env()`` reads them all in one place and names the variable in the error
when a value is malformed. It is called once, at an entry point (the CLI, ``ensure_converted`` and
``convert_source``, ``conversion.entry.open_store``, a ``Store`` made without a config, the
download child's main), never at import; everything beneath takes the config (or the value it
needs) as an argument. The README's environment table is checked against ``ENV_VARS`` by a test.
Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConversionError


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: the config field it sets, how it is parsed, what it means."""

    name: str
    field: str
    parse: Callable[[str], Any]
    doc: str


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _verify(raw: str) -> str:
    if raw not in ("cheap", "full"):
        raise ValueError("must be 'cheap' or 'full'")
    return raw


def _switch(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return raw == "1"


def _present(raw: str) -> bool:
    """A variable whose presence is its meaning (any non-empty value: set)."""
    return True


# How the app tells it runs on a fal runner, as fal's own code does: runners are Nomad allocations
# (fal.App's default host_kwargs name the "nomad" scheduler) whose isolate agent gets its port as
# NOMAD_ALLOC_PORT_grpc, and fal.App's log-context middleware reads it to tell it is "running in the
# expected environment" (fal 1.83, fal/app.py, with IS_ISOLATE_AGENT). IS_ISOLATE_AGENT alone does
# not tell: `fal run --local` sets it too (fal/api/api.py, IsolatedFunction._run_local).
FAL_RUNNER_ENV = "NOMAD_ALLOC_PORT_grpc"
# Where fal mounts the persistent volume on its runners.
FAL_DATA_ROOT = Path("/data")


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("APP_DATA_ROOT", "data_root", Path,
           "root of the persistent volume (store, Hub cache, URL downloads); default `/data` when writable, "
           "else `./.data` off fal (on a fal runner: an error)"),
    EnvVar("APP_STORE_VERIFY", "store_verify", _verify,
           "how an existing entry is checked before use: `cheap` (sizes, the small files' sha256; the packs are "
           "checked by the loader's checksums as it reads them) or `full` (every file's sha256 first)"),
    EnvVar("APP_STORE_LOCK_TIMEOUT_S", "lock_timeout_s", _positive_float,
           "how long a runner waits for another one converting the same model"),
    EnvVar("APP_STORE_STALE_AFTER_S", "stale_after_s", _positive_float,
           "age after which a builder's leftovers from another host are removed"),
    EnvVar("APP_DOWNLOAD_STALL_TIMEOUT_S", "stall_timeout_s", _positive_float,
           "a download whose bytes on disk stop growing this long is restarted"),
    EnvVar("APP_DOWNLOAD_ATTEMPTS", "download_attempts", _positive_int,
           "download tries (stalls and network errors) before giving up"),
    EnvVar("APP_DOWNLOAD_WORKERS", "download_workers", _positive_int, "parallel file downloads from the Hub"),
    EnvVar("APP_PREREAD_WORKERS", "preread_workers", _positive_int,
           "threads that read fetched files once (checksums, page cache)"),
    EnvVar("APP_PROGRESS", "progress", _switch, "`0` hides the download and conversion progress bars"),
    EnvVar("HF_HUB_DISABLE_PROGRESS_BARS", "hf_bars_disabled", _switch,
           "Hugging Face's own switch: `1` hides the progress bars too"),
    EnvVar("HF_TOKEN", "hf_token", str, "Hugging Face token for gated or private repos (never logged)"),
    EnvVar("HF_HUB_CACHE", "hub_cache", Path,
           "the Hugging Face cache; default `<data root>/.cache/huggingface/hub`"),
    EnvVar(FAL_RUNNER_ENV, "on_fal_runner", _present,
           "set by fal on its runners (the port of the runner's isolate agent), never by hand: there, without "
           "`APP_DATA_ROOT`, a missing or read-only `/data` is an error instead of the fallback to `./.data`"),
)


@dataclass(frozen=True)
class ConversionConfig:
    """The conversion package's settings; ``from_env()`` fills them from ``ENV_VARS``."""

    data_root: Path | None = None
    store_verify: str = "cheap"
    lock_timeout_s: float = 3 * 3600.0
    stale_after_s: float = 2 * 3600.0
    stall_timeout_s: float = 180.0
    download_attempts: int = 3
    download_workers: int = 32  # as fal's docs suggest for snapshot_download
    preread_workers: int = 16
    progress: bool = True
    hf_bars_disabled: bool = False
    hf_token: str | None = None
    hub_cache: Path | None = None
    on_fal_runner: bool = False
    # Not an environment variable: where fal mounts the volume (a field so tests can point it elsewhere).
    fal_data_root: Path = FAL_DATA_ROOT

    @property
    def show_progress(self) -> bool:
        """Whether download and conversion progress bars are drawn."""
        return self.progress and not self.hf_bars_disabled

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ConversionConfig:
        """The config from ``environ`` (default ``os.environ``); empty variables count as unset,
        ``overrides`` (not None) win. A malformed value is a ConversionError naming the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for var in ENV_VARS:
            raw = env.get(var.name, "").strip()
            if not raw:
                continue
            try:
                values[var.field] = var.parse(raw)
            except ValueError as exc:
                shown = "***" if var.field == "hf_token" else repr(raw)
                raise ConversionError(f"environment variable {var.name}={shown} is invalid ({exc}): {var.doc}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown config fields: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
