"""Broken symlinks in a source directory: skipped, with one warning per link and process."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("conversion.sources")

_warned_links: set[str] = set()


def warn_broken_symlink(path: str | os.PathLike[str]) -> None:
    """Log once per process that the broken symlink ``path`` of a local source is skipped."""
    key = os.fspath(path)
    if key not in _warned_links:
        _warned_links.add(key)
        try:
            target = os.readlink(key)
        except OSError:
            target = "?"
        log.warning("source: skipping the broken symlink %s (to %s)", key, target)
