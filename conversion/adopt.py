"""A directory that already carries our manifest (a conversion pushed to the Hub and pulled back,
or a ``python -m conversion convert`` output) becomes a store entry without converting anything:
its files are linked (or copied) into the entry being built, checked in full against the manifest
(every sha256 and every pack's load-time checksum, one read), and the manifest is written again for
this store (what the entry is now, and what it was built from). A directory packed in another dtype
than the store asks for is converted from its packs instead (conversion.convert casts them).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from model_loader.rates import rate_text

from .errors import ConversionError
from .manifest import MANIFEST_NAME, VerificationError, read_manifest, verify_digests, write_manifest

log = logging.getLogger("conversion.adopt")

# Where a hard link is impossible (another file system, or one without links): the file is copied.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP}


def carries_manifest(path: Path) -> bool:
    """Whether ``path`` is a converted directory of ours (it holds our manifest)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def packed_dtype(path: Path) -> str | None:
    """The dtype the directory's manifest says its packs were written in (None: as the source's)."""
    source = read_manifest(path).get("source")
    value = source.get("dtype") if isinstance(source, dict) else None
    return value if isinstance(value, str) else None


def adopt_converted(src: Path, dst: Path, source_info: dict[str, Any]) -> Path:
    """Make ``dst`` (absent or empty) the converted directory ``src`` holds: files linked or copied,
    all checked against ``src``'s manifest, and a manifest recording ``source_info`` (this store's
    view of it) and ``converted_from`` (the manifest's own source). Raises ConversionError naming
    the file that does not match."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    try:
        manifest = read_manifest(src)
    except VerificationError as exc:
        raise ConversionError(f"{src} carries a manifest this app cannot use: {exc}") from None
    dst.mkdir(parents=True, exist_ok=True)
    linked = 0
    for rel in manifest["files"]:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            linked += _link_or_copy((src / rel).resolve(), target)
        except FileNotFoundError:
            raise ConversionError(f"{src} does not hold what its manifest says: {src / rel}: listed in the "
                                  "manifest but missing") from None
    shutil.copyfile(src / MANIFEST_NAME, dst / MANIFEST_NAME)  # for the check; replaced below
    try:
        digests = verify_digests(dst)
    except VerificationError as exc:
        raise ConversionError(f"{src} does not hold what its manifest says: {exc}") from None
    known = {dst / rel: (sha, checksum) for rel, (sha, checksum) in digests.items() if checksum is not None}
    write_manifest(dst, {**source_info, "converted_from": manifest.get("source")}, known)
    nbytes = sum(entry["size"] for entry in manifest["files"].values())
    log.info("adopt: %s %s -> %s, nothing converted (%d of %d file(s) linked, the rest copied; every sha256 and "
             "checksum verified)", rate_text(nbytes, time.perf_counter() - start), src, dst, linked,
             len(manifest["files"]))
    return dst


def _link_or_copy(src: Path, dst: Path) -> int:
    """Hard-link ``src`` at ``dst`` (1), or copy it where links cannot be made (0)."""
    try:
        os.link(src, dst)
        return 1
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    shutil.copyfile(src, dst)
    return 0
