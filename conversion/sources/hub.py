"""A Hugging Face Hub repo (``org/name[@revision]``): keyed by commit, fetched into the Hub cache."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model_loader.diffusers_layout import MODEL_INDEX_NAME, select_files

from .base import Prepared, Source, Workspace

if TYPE_CHECKING:
    from ..download import DownloadPolicy

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_commit(revision: str | None) -> bool:
    """A full 40-hex commit hash (immutable: its store key is known without asking the Hub)."""
    return bool(revision and _COMMIT.match(revision))


@dataclass(frozen=True)
class HubSource(Source):
    repo: str
    revision: str | None = None  # type: ignore[assignment]  # branch, tag or commit (None = "main")
    variant: str | None = None  # weight variant such as "fp16"
    subfolder: str | None = None  # the pipeline lives in this folder of the repo

    kind = "hub"
    _ref_field = "repo"

    @property
    def display(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f" ({self.subfolder}/)" if self.subfolder else ""
        return f"{self.repo}{rev}{sub}"

    def slug(self) -> str:
        return self.repo.replace("/", "--")

    def records_ref(self) -> bool:
        return not is_commit(self.revision)

    def offline_identity(self, workspace: Workspace) -> str | None:
        return self.revision if is_commit(self.revision) else workspace.read_ref(self)

    def index_file(self) -> str | None:
        """The repo file whose contents decide which files to fetch (``model_index.json``); None
        when the repo's file listing alone decides."""
        return f"{self.subfolder}/{MODEL_INDEX_NAME}" if self.subfolder else MODEL_INDEX_NAME

    def select(self, repo_files: list[str], index: dict[str, Any] | None, weights: bool) -> list[str]:
        """The repo files to fetch (``index`` is :meth:`index_file` parsed): the pipeline's side
        files and, with ``weights``, one set of weights per component."""
        return select_files(repo_files, index or {}, self.variant, self.subfolder, weights)

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..download import fetch_hub

        commit = None if refresh else self.offline_identity(workspace)
        snap = fetch_hub(self, workspace.root, commit, policy, refresh=refresh, config=workspace.config)
        workspace.write_ref(self, snap.identity)  # a crash from here on resumes offline
        return Prepared(snap.path, snap.identity, [])
