"""Errors a user can cause while acquiring or converting weights; each message says what to do."""

from __future__ import annotations

import errno
import os
import re

# A full disk, an exceeded quota, a file-size limit (RLIMIT_FSIZE).
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# safetensors raises SafetensorError("Error while serializing: I/O error: ... (os error 28)").
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


class ConversionError(RuntimeError):
    """Converting weights to FlashPack failed for a reason the message names."""


class DiskFullError(ConversionError):
    """The destination filesystem ran out of space (or hit a file-size limit) while writing."""


class SourceError(ConversionError):
    """A model source (Hub repo id, URL or local directory) is malformed, missing or unusable."""


class AuthError(SourceError):
    """The source needs a Hugging Face token that is missing or was refused (never shows the token)."""


class DownloadError(ConversionError):
    """Fetching weights failed (network, server or local cache problem); the message says which."""


class DownloadStalledError(DownloadError):
    """A download made no progress for the configured time on every allowed attempt."""


class StoreError(ConversionError):
    """The store on the persistent volume cannot be used (unwritable, busy too long, bad entry)."""


def os_error_code(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one safetensors puts in its message."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError" and (match := _OS_ERROR_CODE.search(str(exc))):
        return int(match.group(1))
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError or a SafetensorError) reports a full disk, quota or file-size limit."""
    return os_error_code(exc) in NO_SPACE_ERRNOS


def write_error(exc: BaseException, path: str | os.PathLike[str]) -> ConversionError | None:
    """The project's error for a failed write of ``path``, or None when ``exc`` is no OS write error.

    A full disk becomes DiskFullError; anything else (permission denied, read-only filesystem)
    a ConversionError "cannot write <path>: <reason>".
    """
    code = os_error_code(exc)
    if code is None:
        return None
    reason = os.strerror(code)
    if code in NO_SPACE_ERRNOS:
        return DiskFullError(f"no space left writing {path} ({reason}); free space there and retry")
    return ConversionError(f"cannot write {path}: {reason.lower()}")
