"""A single-file checkpoint in a Hugging Face Hub repo (``org/name/path/file.safetensors``, or its
``https://huggingface.co/org/name/blob/<revision>/<path>`` page): keyed by commit like a Hub repo,
fetched into the Hub cache (offline first, in the watched child) and turned into a diffusers
directory by ``from_single_file`` (``single_file.py``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..cache_layout import is_commit
from .base import Workspace
from .single_file import SingleFileSource

if TYPE_CHECKING:
    from ..download import DownloadPolicy
    from ..download.hub import HubFiles

# What a Hub file source must end with (diffusers' single-file formats).
CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt")


@dataclass(frozen=True)
class HubFileSource(SingleFileSource):
    repo: str
    filename: str  # its path in the repo
    revision: str | None = None  # type: ignore[assignment]  # branch, tag or commit (None = "main")
    pipeline_class: str | None = None  # the diffusers pipeline class; None: detected from the checkpoint
    config: str | None = None  # a local diffusers directory or Hub repo id with the configs

    kind = "hub-file"
    _ref_field = "repo"

    @property
    def ref(self) -> str:
        return f"{self.repo}/{self.filename}"

    @property
    def display(self) -> str:
        return self.ref + (f"@{self.revision}" if self.revision else "")

    def slug(self) -> str:
        return f"{self.repo.replace('/', '--')}--{PurePosixPath(self.filename).stem}"

    def records_ref(self) -> bool:
        return not is_commit(self.revision)

    def offline_identity(self, workspace: Workspace) -> str | None:
        return self.revision if is_commit(self.revision) else workspace.read_ref(self)

    def scratch_name(self) -> str:
        return f"hub-file--{hashlib.sha256(self.ref.encode()).hexdigest()[:16]}"

    def hub_files(self) -> HubFiles:
        """What to fetch of the repo, in the plain values conversion.download takes: the one file."""
        from ..download.hub import HubFiles

        return HubFiles(self.repo, self.revision, self.display, "file", filename=self.filename)

    def fetch_checkpoint(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> tuple[Path, str]:
        from ..download import fetch_hub

        commit = None if refresh else self.offline_identity(workspace)
        snap = fetch_hub(self.hub_files(), workspace.root, commit, policy, workspace.config, refresh=refresh)
        workspace.write_ref(self, snap.identity)  # a crash from here on resumes offline
        return snap.root / self.filename, snap.identity
