"""Errors a user can cause while acquiring or converting weights; each message says what to do."""


class ConversionError(RuntimeError):
    """Converting weights to FlashPack failed for a reason the message names."""


class DiskFullError(ConversionError):
    """The destination filesystem ran out of space (or hit a file-size limit) while writing."""
