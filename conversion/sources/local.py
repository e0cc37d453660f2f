"""A local diffusers pipeline directory: keyed by a cheap fingerprint of its files."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model_loader.diffusers_layout import MODEL_INDEX_NAME

from ..errors import SourceError
from ..symlinks import warn_broken_symlink
from .base import Prepared, Source, Workspace

if TYPE_CHECKING:
    from ..download import DownloadPolicy

log = logging.getLogger("conversion.sources")


@dataclass(frozen=True)
class LocalSource(Source):
    path: str  # absolute
    subfolder: str | None = None

    kind = "local"
    _ref_field = "path"

    def slug(self) -> str:
        return "local--" + Path(self.path).name

    def pipeline_dir(self) -> Path:
        """The directory, checked to be a pipeline before anything reads it (``/etc`` is told just that)."""
        path = Path(self.path) / self.subfolder if self.subfolder else Path(self.path)
        return require_pipeline_dir(path)

    def offline_identity(self, workspace: Workspace) -> str | None:
        if Path(self.path).is_dir():
            return directory_fingerprint(self.pipeline_dir())
        identity = workspace.read_ref(self)
        if identity is not None:
            log.warning("store: local source %s is gone; serving its last conversion", self.path)
        return identity

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..download import preread

        path = self.pipeline_dir()
        identity = directory_fingerprint(path)
        preread([p for p in path.rglob("*") if p.is_file()], policy.preread_workers, check_blobs=False)
        return Prepared(path, identity, [])


def require_pipeline_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` when it holds a ``model_index.json``, else a SourceError saying it does not."""
    path = Path(path)
    if not (path / MODEL_INDEX_NAME).is_file():
        raise SourceError(f"{path}: no model_index.json; a local source must be a diffusers pipeline directory")
    return path


def directory_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a directory's contents: every file's path, size and mtime.

    Only ``stat`` calls, so a warm start stays fast; editing, adding or removing a file changes it.
    A broken symlink has no contents: it is left out (with one warning per link and process); if
    the pipeline needed it, the conversion names the missing file.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError as exc:
                if not os.path.islink(full):
                    raise SourceError(f"{full}: cannot read ({exc.strerror or exc})") from exc
                warn_broken_symlink(full)
                continue
            rel = os.path.relpath(full, root)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
