"""Start reading packs into the page cache before the modules are built (stub, owned by loader)."""

from __future__ import annotations

import os
from collections.abc import Iterable


class Prefetch:
    """Handle on background reads; ``wait()`` blocks until they finish."""

    def wait(self) -> None:
        return None


def prefetch(paths: Iterable[str | os.PathLike[str]]) -> Prefetch:
    """Stub: does nothing yet."""
    return Prefetch()
