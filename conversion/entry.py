"""A served model's store entry, from lookup to loaded, in two calls.

Every model an app serves (a pipeline, the safety checker, a user's own module) goes through the
same lifecycle, and this module is the one place it is written:

- :func:`lookup` (torch-free, no network): the entry found offline and checked (``Store.warm``),
  and the reads of its packs started at once when the device is known, so they run while torch
  and the model libraries import;
- :meth:`ServedEntry.ensure`: acquire and convert once, when the lookup found nothing;
- :meth:`ServedEntry.load`: the entry loaded by the function the caller gives (``loader(path,
  reads)``); when that fails and the entry is damaged (a pack's checksum, or a full sha256 check
  of the entry), it is moved aside, rebuilt from its source and loaded again, once, on this start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .config import ConversionConfig
from .errors import ConversionError, StoreError
from .sources import Source
from .store import Store, resolve_root

if TYPE_CHECKING:
    from model_loader import PackReads

log = logging.getLogger("conversion.entry")

T = TypeVar("T")
# What loads an entry: its converted directory and the pack reads running for it -> the model.
Loader = Callable[[Path, "PackReads"], T]


def open_store(root: str | Path | None = None) -> Store:
    """The store on the persistent volume, configured from the environment (read here, once); on a
    fal runner without its volume, a StoreError (see conversion.store.resolve_root)."""
    config = ConversionConfig.from_env()
    return Store(resolve_root(root, config), config)


def lookup(store: Store, source: Source, dtype: str, device: str | None, what: str = "model") -> ServedEntry:
    """``source``'s entry when the store has it (found offline, checked as the store's config
    says), with its pack reads started for ``device`` (None: not known yet, started by load).
    Torch-free; ``what`` names it in log lines."""
    entry = ServedEntry(store, source, dtype, what)
    entry.path = store.warm(source, dtype, store.config.store_verify)
    if entry.path is not None and device is not None:
        entry.reads = start_reads(entry.path, device)
    log.info("lookup: %s %s", what, entry.describe())
    return entry


class ServedEntry:
    """One served model's store entry: where it is (once known) and the reads running for it."""

    def __init__(self, store: Store, source: Source, dtype: str, what: str) -> None:
        self.store, self.source, self.dtype, self.what = store, source, dtype, what
        self.path: Path | None = None
        self.reads: PackReads | None = None
        self.origin = "not in the store yet"  # then "found in lookup" or "converted on this start"

    def describe(self) -> str:
        """Where the entry stands, for a log line."""
        if self.path is None:
            return "has no store entry yet"
        if self.reads is not None:
            return f"{self.path}; {len(self.reads.names)} pack(s) reading in the background"
        return str(self.path)

    def ensure(self) -> Path:
        """The entry's directory: the one the lookup found, else acquired and converted once now."""
        if self.path is None:
            self.path = self._convert()
            self.origin = "converted on this start"
        elif self.origin != "converted on this start":
            self.origin = "found in lookup"
        return self.path

    def load(self, loader: Loader[T], device: str) -> T:
        """``loader(path, reads)`` on the entry (converted first when needed); a damaged entry is
        moved aside, rebuilt and loaded again, once. Any other failure is raised as it is."""
        from model_loader import ChecksumMismatchError

        path = self.ensure()
        reads = self.reads if self.reads is not None else start_reads(path, device)
        self.reads = None  # the loaded model holds the blocks it uses; nothing else keeps them
        try:
            return loader(path, reads)
        except Exception as exc:
            reads.cancel()
            problem = str(exc) if isinstance(exc, ChecksumMismatchError) else store_problem(path)
            if problem is None:
                raise
        del reads  # the failed load's blocks are freed before the rebuilt entry is read
        self.path = self._rebuild(path, problem)
        return loader(self.path, start_reads(self.path, device))

    def _convert(self) -> Path:
        return self.store.ensure(self.source, self.dtype, verify=self.store.config.store_verify)

    def _rebuild(self, damaged: Path, problem: str) -> Path:
        log.error("load: the store entry %s is damaged (%s); moving it aside and rebuilding it from the source",
                  damaged, problem)
        self.store.quarantine(damaged, problem)
        try:
            return self._convert()
        except ConversionError as exc:
            raise StoreError(
                f"the store entry {damaged} was damaged ({problem}) and has been moved aside, but rebuilding it "
                f"failed: {exc}. Make the source ({self.source.display}) reachable; the next start rebuilds it"
            ) from exc


def start_reads(path: Path, device: str) -> PackReads:
    """Start reading the packs of the converted directory ``path`` for ``device``, each checked
    against its checksum as its bytes pass."""
    from model_loader import start_pack_reads

    from .manifest import packs_to_read

    return start_pack_reads(packs_to_read(path), str(device))


def store_problem(path: Path) -> str | None:
    """What is wrong with an entry that failed to load (its full sha256 check), or None when it
    matches its manifest (then the load error is not the store's)."""
    from .manifest import VerificationError, verify_converted

    try:
        verify_converted(path, full=True)
    except VerificationError as exc:
        return str(exc)
    return None

