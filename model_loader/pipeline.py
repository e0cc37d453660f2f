"""Assemble diffusers pipelines and models from a converted directory (stub, owned by pipeline)."""

from __future__ import annotations

import os

import torch


def load_model(component_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.nn.Module:
    raise NotImplementedError


def load_pipeline(path: str | os.PathLike[str], device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None):
    raise NotImplementedError
