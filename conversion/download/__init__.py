"""Weights onto the persistent volume: Hub snapshots and single-file URLs, restarted when stalled.

- ``hub.py``: a Hub repo's pipeline (or safety checker) files into the Hub cache (offline first, the
  Hub only when needed)
- ``url.py``: a single-file checkpoint through fal's ``download_model_weights`` layout
- ``child.py``: network downloads run in a watched child process, killed and restarted when
  their bytes on disk stop growing (the only way to stop a download stuck in a socket read or
  in hf_xet, xet-core #850; it also lets hf_xet's settings be set before hf_xet starts)
- ``preread.py``: every fetched file read once in parallel, Hub blobs checked against their names
- ``policy.py``: how downloads are run (from ConversionConfig), hf_xet tuning, where caches live
"""

from .hub import Snapshot, fetch_hub, hub_snapshot
from .policy import DownloadPolicy, fal_weights_dir, hub_cache_dir, redact_secrets, usable_memory_bytes, xet_environment
from .preread import preread
from .url import checkpoint_problem, fetch_url

__all__ = [
    "DownloadPolicy", "Snapshot", "checkpoint_problem", "fal_weights_dir", "fetch_hub", "fetch_url", "hub_cache_dir",
    "hub_snapshot", "preread", "redact_secrets", "usable_memory_bytes", "xet_environment",
]
