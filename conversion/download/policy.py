"""How downloads run; hf_xet's tuning for the child's environment; secrets kept out of messages.
(Where the caches live on the volume is conversion.cache_layout's.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConversionConfig

_HIGH_PERFORMANCE_MIN_RAM = 64 * 1024**3


@dataclass(frozen=True)
class DownloadPolicy:
    """How downloads are run and restarted (``from_config`` takes them from ConversionConfig)."""

    stall_timeout_s: float = 180.0  # no new bytes for this long -> restart
    attempts: int = 3  # tries before giving up
    max_workers: int = 32  # parallel file downloads, as fal's docs suggest
    poll_s: float = 0.5  # how often progress is sampled
    preread_workers: int = 16  # threads for the parallel pre-read

    @classmethod
    def from_config(cls, config: ConversionConfig) -> DownloadPolicy:
        return cls(stall_timeout_s=config.stall_timeout_s, attempts=config.download_attempts,
                   max_workers=config.download_workers, preread_workers=config.preread_workers)


def xet_environment(env: dict[str, str], total_ram: int | None = None) -> dict[str, str]:
    """Set fal's hf_xet tuning in ``env`` (a child's environment: hf_xet reads it at start).

    Explicit user settings win. ``HF_XET_HIGH_PERFORMANCE`` only where the host has >= 64 GB of
    RAM (it raises xet's buffers toward 64 GB). With hf_xet 1.8, ``HF_XET_CHUNK_CACHE_SIZE_BYTES``
    sizes a chunk cache that downloads no longer read by default, and
    ``HF_XET_NUM_CONCURRENT_RANGE_GETS`` is no longer read at all (adaptive concurrency replaced
    it in hf_xet 1.3); both are set because fal's docs recommend them and they are harmless.
    """
    ram = total_ram if total_ram is not None else usable_memory_bytes()
    if ram >= _HIGH_PERFORMANCE_MIN_RAM:
        env.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
    env.setdefault("HF_XET_CHUNK_CACHE_SIZE_BYTES", "1000000000000")
    env.setdefault("HF_XET_NUM_CONCURRENT_RANGE_GETS", "32")
    return env


def usable_memory_bytes() -> int:
    """Physical RAM, capped by the cgroup (container) limit when there is one."""
    import os

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            ram = min(ram, int(raw)) if ram else int(raw)
    return ram


def redact_secrets(text: str, config: ConversionConfig) -> str:
    """``text`` with the Hugging Face token of ``config`` (if any) replaced by ``***``."""
    token = config.hf_token or ""
    if len(token) >= 4:
        text = text.replace(token, "***")
    return text
