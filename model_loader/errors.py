"""Every error type the loader raises, importable without torch (the first reads start before
torch is imported). Each message names the file, variable or component and the problem."""

from __future__ import annotations


class ConfigError(ValueError):
    """A ``MODEL_LOADER_*`` environment variable has a value the loader does not accept."""


class FlashPackFormatError(ValueError):
    """A file is not a valid FlashPack file; the message names the file and the problem."""


class ChecksumMismatchError(FlashPackFormatError):
    """A pack's bytes differ from the checksum recorded at conversion: the stored file is corrupt."""


class PackReadError(OSError):
    """Reading a pack's bytes failed (I/O error); the message names the file and the offset."""


class StateDictMismatchError(ValueError):
    """The tensors of a pack do not fit the module: names missing/unexpected or shape/dtype wrong."""


class PipelineLoadError(ValueError):
    """A converted directory cannot be loaded; the message names the path and the problem."""


class JSONLimitError(ValueError):
    """JSON too large or nested too deeply to be parsed safely (see :mod:`model_loader.bounded_json`)."""


class DiffusersLayoutError(ValueError):
    """A directory or listing is not a diffusers pipeline as ``model_index.json`` describes it."""
