"""Errors a user can cause while acquiring or converting weights; each message says what to do."""

from __future__ import annotations


class ConversionError(RuntimeError):
    """Converting weights to FlashPack failed for a reason the message names."""


class DiskFullError(ConversionError):
    """The destination filesystem ran out of space (or hit a file-size limit) while writing."""


class SourceError(ConversionError):
    """A model source (Hub repo id, URL or local directory) is malformed, missing or unusable."""


class AuthError(SourceError):
    """The source needs a Hugging Face token that is missing or was refused (never shows the token)."""


class TooLargeError(SourceError):
    """A file to fetch is larger than the limit set for it (a LoRA over ``[lora] max_file_mb``)."""


class LoraError(SourceError):
    """A LoRA file is not one this model can take: not safetensors, not a LoRA, or made for another
    architecture (its layers name modules the model lacks, or do not fit their shapes)."""


class DownloadError(ConversionError):
    """Fetching weights failed (network, server or local cache problem); the message says which."""


class DownloadStalledError(DownloadError):
    """A download made no progress for the configured time on every allowed attempt."""


class StoreError(ConversionError):
    """The store on the persistent volume cannot be used (unwritable, busy too long, bad entry)."""
