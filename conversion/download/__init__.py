"""Weights onto the persistent volume: Hub snapshots and single-file URLs, restarted when stalled.

- ``hub.py``: a Hub repo's files (a pipeline's, a safety checker's, a single file's configs, or one
  file) into the Hub cache (offline first, the Hub only when needed)
- ``url.py``: a single-file checkpoint through fal's ``download_model_weights`` layout
- ``watch.py`` + ``child.py``: network downloads run in a watched child process (the parent's side
  and the child's), killed and restarted when
  their bytes on disk stop growing (the only way to stop a download stuck in a socket read or
  in hf_xet, xet-core #850; it also lets hf_xet's settings be set before hf_xet starts)
- ``preread.py``: every fetched file read once in parallel, Hub blobs checked against their names
- ``policy.py``: how downloads are run (from ConversionConfig), hf_xet tuning, secrets redacted
- ``lora.py``: a LoRA file (a URL or a Hub file) fetched once, for a request or to fuse at setup

Download code takes plain values (a repo and revision with :class:`HubFiles` saying which files, a
URL, the cache directories, the config) and never imports ``conversion.sources``: each source
calls it with its own values. Where the caches are on the volume is ``conversion.cache_layout``'s
(re-exported here), so that a warm start finds them without importing this package.
"""

from ..cache_layout import fal_weights_dir, hub_cache_dir
from .hub import HubFiles, Snapshot, fetch_hub, hub_snapshot, select_hub_files
from .policy import DownloadPolicy, redact_secrets, usable_memory_bytes, xet_environment
from .preread import preread
from .url import checkpoint_problem, fetch_url

__all__ = [
    "DownloadPolicy", "HubFiles", "Snapshot", "checkpoint_problem", "fal_weights_dir", "fetch_hub", "fetch_url",
    "hub_cache_dir", "hub_snapshot", "preread", "redact_secrets", "select_hub_files", "usable_memory_bytes",
    "xet_environment",
]
