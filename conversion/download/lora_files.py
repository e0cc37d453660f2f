"""Fetched LoRA files on the volume, within a byte budget shared by every runner of the account.

Layout, under ``<root>/.cache/loras/``: one directory per LoRA, named for the sha256 of its key
(``url:<sha256 of the URL>``, ``hub:org/name@rev/file``), holding ``lora.safetensors`` and
``identity`` (what it was fetched as). A directory is built under a temporary name
(``conversion.durable.temp_path``) and renamed into place complete, so a reader sees a whole entry
or none; the runner that loses a race to publish keeps the winner's.

The budget: after each publication the entries are summed and the least recently used (the
directory's mtime, set on every use) are evicted until the total is within the budget. Eviction
renames an entry aside before deleting it, so it disappears at once; a runner reading the file
keeps its open file (POSIX and JuiceFS keep an unlinked file's bytes while it is open), and one
that finds the entry gone fetches it again. What may exceed the budget for a moment: the fetches
in flight (at most ``[lora] max_fetches`` files per runner) and what another runner publishes
between two evictions. Temporary directories of dead fetchers are swept with each eviction.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..durable import parse_temp_name, publish_dir, remove_tree, temp_path, write_atomic
from ..errors import ConversionError

log = logging.getLogger("conversion.download")

LORA_FILE = "lora.safetensors"
IDENTITY_FILE = "identity"
# A temporary directory of another host untouched this long is a dead fetcher's (a live one ends
# within its deadline, at most an hour).
STALE_S = 2 * 3600.0
# A use touches an entry's mtime at most this often (one metadata write per LoRA per minute).
TOUCH_EVERY_S = 60.0


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file on the volume and what it was fetched as."""

    path: Path
    identity: str


class LoraFiles:
    """The fetched LoRA files under ``<root>/.cache/loras``, kept within ``budget_bytes``."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.dir = Path(root) / ".cache" / "loras"
        self.budget_bytes = budget_bytes

    def entry(self, key: str) -> Path:
        return self.dir / hashlib.sha256(key.encode()).hexdigest()

    def lookup(self, key: str) -> LoraFile | None:
        """The entry of ``key`` when it is complete, marked as used now; None otherwise."""
        entry = self.entry(key)
        try:
            identity = (entry / IDENTITY_FILE).read_text().strip()
            path = entry / LORA_FILE
            if not path.is_file() or not identity:
                return None
            self.touch(entry)
        except OSError:  # not there, or evicted meanwhile
            return None
        return LoraFile(path, identity)

    def touch(self, entry: Path) -> None:
        """Mark ``entry`` as used now (least-recently-used order across runners)."""
        with contextlib.suppress(OSError):
            if time.time() - entry.stat().st_mtime > TOUCH_EVERY_S:
                os.utime(entry)

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[Path]:
        """A fresh temporary directory beside ``key``'s entry, deleted when the block fails."""
        self.dir.mkdir(parents=True, exist_ok=True)
        partial = temp_path(self.entry(key))
        partial.mkdir()
        try:
            yield partial
        except BaseException:
            remove_tree(partial)
            raise

    def publish(self, partial: Path, key: str, identity: str) -> LoraFile:
        """Put the fetched ``partial/lora.safetensors`` in place as ``key``'s entry, then keep the
        budget (evicting others, never this one). A runner that published first wins."""
        write_atomic(partial / IDENTITY_FILE, identity + "\n")
        entry = self.entry(key)
        try:
            publish_dir(partial, entry)
        except ConversionError:  # another runner published it meanwhile: keep theirs
            remove_tree(partial)
        else:
            log.info("lora files: %s kept on the volume (%.1f MiB)", identity,
                     _size(entry / LORA_FILE) / 1024**2)
        self.evict(keep=entry)
        found = self.lookup(key)
        if found is None:
            raise ConversionError(f"the LoRA file of {identity} vanished from {entry} right after it was stored")
        return found

    def discard(self, key: str) -> None:
        """Delete ``key``'s entry (a file that was refused is not kept)."""
        _remove_entry(self.entry(key))

    def usage(self) -> tuple[int, int]:
        """(bytes, entries) of the complete entries."""
        entries = self._entries()
        return sum(size for _, _, size in entries), len(entries)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete the least recently used entries (never ``keep``) until the total is within the
        budget, and sweep dead fetchers' temporary directories; the entries deleted."""
        self._sweep()
        entries = sorted(self._entries(), key=lambda e: e[1])
        total = sum(size for _, _, size in entries)
        evicted = []
        for path, _, size in entries:
            if total <= self.budget_bytes:
                break
            if path == keep:
                continue
            if _remove_entry(path):
                evicted.append(path)
                log.info("lora files: evicted %s (%.1f MiB), least recently used", path.name[:16], size / 1024**2)
            total -= size
        return evicted

    def _entries(self) -> list[tuple[Path, float, int]]:
        """(directory, last use, size of its file) of each complete entry."""
        found = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        for name in names:
            if name.startswith("."):
                continue
            path = self.dir / name
            with contextlib.suppress(OSError):
                found.append((path, path.stat().st_mtime, (path / LORA_FILE).stat().st_size))
        return found

    def _sweep(self) -> None:
        try:
            names = [n for n in os.listdir(self.dir) if n.startswith(".")]
        except FileNotFoundError:
            return
        now = time.time()
        for name in names:
            temp = parse_temp_name(name)
            if temp is None:
                continue
            path = self.dir / name
            with contextlib.suppress(OSError):
                if temp.purpose == "trash" or temp.owner_dead() or now - path.stat().st_mtime > STALE_S:
                    remove_tree(path)


def _remove_entry(entry: Path) -> bool:
    """Rename ``entry`` aside (it disappears at once), then delete it; False when it was gone."""
    trash = temp_path(entry, "trash")
    try:
        os.rename(entry, trash)
    except OSError:
        return False
    remove_tree(trash)
    return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
