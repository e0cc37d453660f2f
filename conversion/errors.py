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


class CallerUrlError(SourceError):
    """A caller's URL (a request's LoRA or input image) could not be fetched; ``kind`` says why
    (``private_host``, ``status``, ``deadline``, ``too_large``, ...), the message in words, no URL."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class FetchCancelled(ConversionError):
    """The request a fetch was for was cancelled, or its client went away."""


SHOWN_CHARS = 100  # how much of a caller's text a message echoes (a request's fields can be megabytes)


def shown(text: str) -> str:
    """``text`` as a message echoes caller input: the repr of its first :data:`SHOWN_CHARS`
    characters, with ``...`` after it when it was cut."""
    return repr(text[:SHOWN_CHARS]) + ("..." if len(text) > SHOWN_CHARS else "")
