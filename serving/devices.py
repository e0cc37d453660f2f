"""The device a model is served on, from the settings' ``device`` (``auto``, ``cpu``, ``cuda``,
``cuda:N``, ``mps``): known early without torch where possible, so pack reads start first."""

from __future__ import annotations

import glob

from .settings import SettingsError


def early_device(device: str) -> str | None:
    """The device known before torch is imported: ``cpu`` when the settings say so, or say
    ``auto`` on a machine without NVIDIA device nodes; None when only torch can tell."""
    if device == "cpu" or (device == "auto" and not glob.glob("/dev/nvidia[0-9]*")):
        return "cpu"
    return None


def resolve_device(device: str) -> str:
    """``device`` as a concrete device (``cuda`` gets the current device's index, so background
    reader threads target the same GPU as this thread)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"model.device is {device!r} but no CUDA device is visible (use 'auto' or 'cpu')")
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return device
