"""The loader's error types, importable without torch (the prefetch starts before torch loads)."""


class FlashPackFormatError(ValueError):
    """A file is not a valid FlashPack file; the message names the file and the problem."""
