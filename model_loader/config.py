"""The loader's settings: every ``MODEL_LOADER_*`` environment variable, read in this one place.

=============================  =========  ====================================================
variable                       default    meaning
=============================  =========  ====================================================
``MODEL_LOADER_THREADS``       automatic  reader threads per pack (an integer >= 1)
``MODEL_LOADER_CHUNK_MB``      32         MiB read per chunk and per pinned staging buffer
``MODEL_LOADER_DIRECT_IO``     auto       ``auto`` (O_DIRECT for chunks not in the page cache),
                                          ``1`` (always) or ``0`` (never)
``MODEL_LOADER_MAP``           always     on the CPU, when to map a pack instead of reading it:
                                          ``always`` (on FUSE a cold pack is first read into
                                          the page cache), ``hot`` (only when in the page
                                          cache), ``never``
``MODEL_LOADER_LAYOUT``        auto       how reader threads share a file: ``grid`` (chunks in
                                          file order from one descriptor), ``split`` (each
                                          thread its own descriptor and contiguous part);
                                          ``auto``: ``split`` on FUSE and network file systems
``MODEL_LOADER_HUGEPAGES``     0          ``1`` asks for transparent huge pages behind packs
                                          read into owned memory
``MODEL_LOADER_PINNED_MAX_MB`` 4096       MiB of pinned staging buffers kept for the process
=============================  =========  ====================================================

An unset or empty variable means its default; values are case-insensitive, and ``true`` /
``false`` are accepted for ``1`` / ``0``. A value outside these raises :class:`ConfigError`
naming the variable and what it accepts. Function arguments (``read_pack(threads=...)``) win over
the environment; ``auto`` settings are chosen per file by :mod:`model_loader.storage`. Huge pages
are opt-in: on the 2-core VM of docs/BENCHMARKS.md the hint helped or hurt depending on how
fragmented memory was.

Each load reads the environment anew: every public entry point (``read_pack``,
``load_state_dict``, ``read_file``, ``start_pack_reads``, ``load_pipeline``, ``load_model``)
takes ``config: LoaderConfig | None``; left None, it reads the environment once
(:meth:`LoaderConfig.from_env`), before the first byte is read, and passes that config down to
every read it starts (a bad value is refused at the call, not later in a background read). The
one exception is ``MODEL_LOADER_PINNED_MAX_MB``: it is read once, when the process-wide pool of
pinned staging buffers is made (:func:`model_loader.pinned.default_pool`, on the first CUDA load
or reservation), and holds for the process; a load given its own ``pool`` uses that pool's cap.
Torch-free and cheap: the first reads start before torch is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from .errors import ConfigError

MAP_MODES = ("always", "hot", "never")
LAYOUTS = ("grid", "split")
# What a yes/no variable accepts.
_SWITCH = {"1": True, "0": False, "true": True, "false": False}

_T = TypeVar("_T")


@dataclass(frozen=True)
class LoaderConfig:
    """The loader's settings, typed; :meth:`from_env` reads them from the environment."""

    threads: int | None = None  # MODEL_LOADER_THREADS; None: chosen per file by its page-cache residency
    chunk_bytes: int = 32 << 20  # MODEL_LOADER_CHUNK_MB, in bytes
    direct_io: bool | None = None  # MODEL_LOADER_DIRECT_IO; None: per chunk, O_DIRECT when not cached
    mapping: str = "always"  # MODEL_LOADER_MAP: one of MAP_MODES
    hugepages: bool = False  # MODEL_LOADER_HUGEPAGES
    pinned_max_bytes: int = 4096 << 20  # MODEL_LOADER_PINNED_MAX_MB, in bytes
    layout: str | None = None  # MODEL_LOADER_LAYOUT: one of LAYOUTS; None: by the file system

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LoaderConfig:
        """The settings in ``environ`` (``os.environ`` by default), each variable read once."""
        env = os.environ if environ is None else environ
        default = cls()
        chunk_mb = _integer(env, "MODEL_LOADER_CHUNK_MB", minimum=1)
        pinned_mb = _integer(env, "MODEL_LOADER_PINNED_MAX_MB", minimum=0)
        return cls(
            threads=_integer(env, "MODEL_LOADER_THREADS", minimum=1),
            chunk_bytes=default.chunk_bytes if chunk_mb is None else chunk_mb << 20,
            direct_io=_choice(env, "MODEL_LOADER_DIRECT_IO", {"auto": None, **_SWITCH}, default.direct_io),
            mapping=_choice(env, "MODEL_LOADER_MAP", {m: m for m in MAP_MODES}, default.mapping),
            layout=_choice(env, "MODEL_LOADER_LAYOUT", {"auto": None, **{m: m for m in LAYOUTS}}, default.layout),
            hugepages=_choice(env, "MODEL_LOADER_HUGEPAGES", _SWITCH, default.hugepages),
            pinned_max_bytes=default.pinned_max_bytes if pinned_mb is None else pinned_mb << 20,
        )


def _value(env: Mapping[str, str], name: str) -> tuple[str, str]:
    """The value as set and its normalised form (stripped, lower case; empty when unset)."""
    raw = env.get(name, "")
    return raw, raw.strip().lower()


def _integer(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    """The integer in ``name`` (None when unset), at least ``minimum``."""
    raw, value = _value(env, name)
    if not value:
        return None
    try:
        number: int | None = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ConfigError(f"{name}={raw!r}: expected an integer >= {minimum}, or unset for the default")
    return number


def _choice(env: Mapping[str, str], name: str, allowed: Mapping[str, _T], default: _T) -> _T:
    """The value ``allowed`` gives the word in ``name`` (``default`` when unset)."""
    raw, value = _value(env, name)
    if not value:
        return default
    if value not in allowed:
        raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
    return allowed[value]
