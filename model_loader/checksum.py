"""Per-segment checksums of a pack file, recorded at conversion and checked while the loader
reads the file, so a warm start verifies every byte without a second pass over the data.

A file is cut into segments of ``segment_bytes`` (the last one shorter); each segment's
``xxh3_64`` is recorded. xxh3 runs at memory speed (about 30 GB/s on one core of the benchmark
VM, against 1-2 GB/s for sha256; see docs/BENCHMARKS.md) and releases the GIL, so reader threads
hash their chunks as they land. sha256 stays the digest of ``verify`` and of publication.

Torch-free: the app starts the first reads before torch is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from .errors import ChecksumMismatchError

ALGORITHM = "xxh3_64"
SEGMENT_BYTES = 8 << 20


def digest(data: Any) -> int:
    """xxh3_64 of a bytes-like object (the GIL is released while it runs)."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Checksum:
    """The expected size of a file and the xxh3_64 of each of its segments."""

    size: int
    segment_bytes: int
    segments: tuple[int, ...]

    def span(self, index: int) -> tuple[int, int]:
        """Bytes ``[start, end)`` of segment ``index``."""
        start = index * self.segment_bytes
        return start, min(self.size, start + self.segment_bytes)

    def check_size(self, size: int, path: str) -> None:
        """Raise ChecksumMismatchError unless the file at ``path`` has the recorded size."""
        if size != self.size:
            raise ChecksumMismatchError(
                f"{path}: {size} bytes, the checksum recorded at conversion covers {self.size} "
                "(truncated or replaced since conversion)"
            )

    def check(self, index: int, data: Any, path: str) -> None:
        """Raise ChecksumMismatchError unless ``data`` (the bytes of segment ``index``) matches."""
        if digest(data) != self.segments[index]:
            start, end = self.span(index)
            raise ChecksumMismatchError(
                f"{path}: bytes {start}-{end} do not match the {ALGORITHM} checksum recorded at "
                "conversion (the file is corrupt)"
            )

    def to_json(self) -> dict[str, Any]:
        """The record the manifest stores (digests as 16 hex characters)."""
        return {
            "algorithm": ALGORITHM,
            "segment_bytes": self.segment_bytes,
            "segments": [f"{s:016x}" for s in self.segments],
        }

    @classmethod
    def from_json(cls, data: Any, size: int) -> Checksum:
        """Parse the manifest's record for a file of ``size`` bytes; ValueError when malformed."""
        if not isinstance(data, dict) or data.get("algorithm") != ALGORITHM:
            raise ValueError(f"expected an {ALGORITHM} checksum record")
        segment_bytes = data.get("segment_bytes")
        segments = data.get("segments")
        if not isinstance(segment_bytes, int) or isinstance(segment_bytes, bool) or segment_bytes < 4096:
            raise ValueError("segment_bytes must be an integer >= 4096")
        if segment_bytes % 4096:
            raise ValueError("segment_bytes must be a multiple of 4096")
        if not isinstance(segments, list) or len(segments) != max(1, -(-size // segment_bytes)):
            raise ValueError(f"expected {max(1, -(-size // segment_bytes))} segment digests for {size} bytes")
        try:
            values = tuple(int(s, 16) for s in segments if isinstance(s, str) and len(s) == 16)
        except ValueError:
            values = ()
        if len(values) != len(segments):
            raise ValueError("segment digests must be 16 hex characters each")
        return cls(size, segment_bytes, values)


class SegmentHasher:
    """Feeds a file's bytes in order and yields its :class:`Checksum` (used by the writer side)."""

    def __init__(self, segment_bytes: int = SEGMENT_BYTES):
        self.segment_bytes = segment_bytes
        self._segments: list[int] = []
        self._current = xxhash.xxh3_64()
        self._filled = 0
        self._size = 0

    def update(self, data: Sequence[int] | memoryview | bytes) -> None:
        """Hash the next bytes of the file."""
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.segment_bytes - self._filled)
            self._current.update(view[:take])
            self._filled += take
            self._size += take
            view = view[take:]
            if self._filled == self.segment_bytes:
                self._segments.append(self._current.intdigest())
                self._current = xxhash.xxh3_64()
                self._filled = 0

    def result(self) -> Checksum:
        """The checksum of every byte fed so far."""
        segments = list(self._segments)
        if self._filled or not segments:
            segments.append(self._current.intdigest())
        return Checksum(self._size, self.segment_bytes, tuple(segments))


def file_checksum(path: str, segment_bytes: int = SEGMENT_BYTES) -> Checksum:
    """The checksum of the file at ``path`` (reads it once)."""
    hasher = SegmentHasher(segment_bytes)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(segment_bytes):
            hasher.update(chunk)
    return hasher.result()
