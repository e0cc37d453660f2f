"""A Hugging Face Hub repo (``org/name[@revision]``): keyed by commit, fetched into the Hub cache."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..cache_layout import is_commit
from ..errors import SourceError
from .base import Prepared, Source, Workspace

if TYPE_CHECKING:
    from ..download import DownloadPolicy
    from ..download.hub import HubFiles

__all__ = ["HubSource", "is_commit", "repo_and_revision"]


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def repo_and_revision(text: str, revision: str | None) -> tuple[str, str | None]:
    """(repo id, revision) of ``org/name[@revision]`` (``revision`` given apart must agree), or a SourceError."""
    repo, _, inline_rev = text.partition("@")
    if not _REPO_ID.match(repo) or ".." in repo:
        raise SourceError(
            f"{text!r} is neither a Hub repo id (org/name), an https:// URL nor an existing directory"
        )
    if inline_rev and revision and inline_rev != revision:
        raise SourceError(f"{text}: revision given twice ({inline_rev!r} and {revision!r})")
    return repo, revision or inline_rev or None


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

    def hub_files(self) -> HubFiles:
        """What to fetch of the repo, in the plain values conversion.download takes: the pipeline's
        side files and one set of weights per component (``model_index.json`` decides)."""
        from ..download.hub import HubFiles

        return HubFiles(self.repo, self.revision, self.display, "pipeline", variant=self.variant,
                        subfolder=self.subfolder)

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..download import fetch_hub

        commit = None if refresh else self.offline_identity(workspace)
        snap = fetch_hub(self.hub_files(), workspace.root, commit, policy, workspace.config, refresh=refresh)
        workspace.write_ref(self, snap.identity)  # a crash from here on resumes offline
        return Prepared(snap.path, snap.identity, [])
