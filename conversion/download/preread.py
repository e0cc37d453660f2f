"""Read fetched files once, in parallel (fal's "sequential vs parallel reading": it fills the page
cache and pulls network-volume blocks concurrently), checking Hub blobs against their names."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from model_loader.rates import rate_text

from ..errors import DownloadError

log = logging.getLogger("conversion.download")

_READ_CHUNK = 8 << 20


def preread(paths: Sequence[Path], workers: int = 16, check_blobs: bool = True) -> list[Path]:
    """Read every file once on ``workers`` threads; return the Hub files whose contents do not
    match the checksum their cache blob is named after (sha256 for LFS files, git's sha1 else).
    """
    t0 = time.monotonic()
    sizes = []
    for p in paths:
        try:
            sizes.append(os.path.getsize(p))
        except OSError as exc:
            raise DownloadError(f"{p}: cannot read downloaded file ({exc.strerror or exc})") from exc
    order = sorted(range(len(paths)), key=lambda i: sizes[i], reverse=True)
    n = max(1, min(workers, len(paths)))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="preread") as pool:
        results = list(pool.map(lambda i: _read_one(paths[i], check_blobs), order))
    log.info("preread: %s (%d files, %d threads)", rate_text(sum(sizes), time.monotonic() - t0), len(paths), n)
    return [paths[i] for i, ok in zip(order, results, strict=True) if not ok]


def _read_one(path: Path, check_blobs: bool) -> bool:
    expected, hasher = None, None
    if check_blobs:
        blob = os.path.basename(os.path.realpath(path))
        if len(blob) == 64 and _is_hex(blob):
            expected, hasher = blob, hashlib.sha256()
        elif len(blob) == 40 and _is_hex(blob):
            expected, hasher = blob, hashlib.sha1()
            hasher.update(f"blob {os.path.getsize(path)}\0".encode())
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if hasher is not None:
                    hasher.update(view[:n])
    except OSError as exc:
        raise DownloadError(f"{path}: cannot read downloaded file ({exc.strerror or exc})") from exc
    return hasher is None or hasher.hexdigest() == expected


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
