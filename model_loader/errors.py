"""The loader's error types, importable without torch (the first reads start before torch loads)."""


class FlashPackFormatError(ValueError):
    """A file is not a valid FlashPack file; the message names the file and the problem."""


class ChecksumMismatchError(FlashPackFormatError):
    """A pack's bytes differ from the checksum recorded at conversion: the stored file is corrupt."""


class DiffusersLayoutError(ValueError):
    """A directory or listing is not a diffusers pipeline as ``model_index.json`` describes it."""
