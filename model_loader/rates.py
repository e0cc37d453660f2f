"""The one way the project reports moving bytes: ``1.23 GB in 0.45 s (2.73 GB/s)``.

Every phase that reads, writes, downloads or verifies weights logs this text (bench/startup.py
parses it out of the app's log), so it lives here, below everything that logs it. Torch-free.
"""

from __future__ import annotations


def rate_text(nbytes: int, seconds: float) -> str:
    """``"<GB> GB in <s> s (<GB/s> GB/s)"`` for ``nbytes`` moved in ``seconds`` (0 GB/s for no time)."""
    gbps = nbytes / 1e9 / seconds if seconds > 0 else 0.0
    return f"{nbytes / 1e9:.2f} GB in {seconds:.2f} s ({gbps:.2f} GB/s)"
