"""Model sources: each kind (Hub repo, single-file URL, single file in a Hub repo, local directory,
the demo, the safety checker's Hub, local and demo kinds, and a model folder's: a ControlNet, an image encoder) is one small strategy object that
knows its identity, its offline lookup, its slug and how to fetch it. ``fused.py`` wraps any of
them with LoRAs fused before packing; ``lora.py`` names where a LoRA comes from (``parse_lora_path``).

A new source kind: a module here with a ``Source`` subclass, and a line in ``parse.py``.
"""

from .base import Prepared, Source, Workspace
from .demo import DEMO_SOURCE, RANDOM_DEMO_SOURCE, TRAINED_DIR, DemoSource, RandomDemoSource
from .fused import FusedSource, with_fused_loras
from .hub import HubSource, is_commit
from .hub_file import HubFileSource
from .local import LocalSource, directory_fingerprint, require_pipeline_dir, warn_broken_symlink
from .lora import HubLora, LoraPathError, LoraRef, UrlLora, parse_lora_path
from .model_folder import HubModelFolderSource, LocalModelFolderSource, parse_model_folder_source
from .parse import parse_checker_source, parse_source
from .safety_checker import (
    DEMO_CHECKER_SOURCE,
    DemoCheckerSource,
    HubCheckerSource,
    LocalCheckerSource,
    present_safety_checker,
)
from .single_file import HubConfigSource, SingleFileSource
from .url import UrlSource, redact_url, url_hash

__all__ = [
    "DEFAULT_PIPELINE_CLASS", "DEMO_CHECKER_SOURCE", "DEMO_SOURCE", "DemoCheckerSource", "DemoSource", "RANDOM_DEMO_SOURCE",
    "RandomDemoSource", "TRAINED_DIR",
    "FusedSource", "HubCheckerSource", "HubConfigSource", "HubFileSource", "HubLora", "HubSource",
    "HubModelFolderSource", "LocalCheckerSource", "LocalModelFolderSource", "LocalSource", "LoraPathError", "LoraRef", "Prepared", "SingleFileSource", "Source",
    "UrlLora", "UrlSource", "Workspace", "directory_fingerprint", "is_commit", "parse_checker_source",
    "parse_lora_path", "parse_model_folder_source", "parse_source", "present_safety_checker", "redact_url", "require_pipeline_dir",
    "url_hash", "warn_broken_symlink", "with_fused_loras",
]
