"""The safety checker's sources: a Hub repo, a local directory or the embedded demo checker.

A checker is a ``StableDiffusionSafetyChecker`` with its ``CLIPImageProcessor``: on the Hub a model
repo of its own (``CompVis/stable-diffusion-safety-checker``: ``config.json``, weights and
``preprocessor_config.json`` side by side) or the ``safety_checker/`` + ``feature_extractor/``
folders of an SD 1.x pipeline repo (model_loader.diffusers_layout.select_safety_checker_files).
Each source presents it to the store as a two-component pipeline directory in its scratch space
(links to the fetched files and a written ``model_index.json``), so the store converts, verifies,
publishes and rebuilds it exactly as it does a pipeline, and the loader loads it as one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from model_loader.diffusers_layout import MODEL_INDEX_NAME, safety_checker_index, select_safety_checker_files
from model_loader.errors import DiffusersLayoutError

from ..errors import SourceError
from .base import Prepared, Source, Workspace, in_scratch
from .hub import HubSource
from .local import LocalSource, directory_fingerprint

if TYPE_CHECKING:
    from ..download import DownloadPolicy
    from ..download.hub import HubFiles

DEMO_CHECKER_SOURCE = "demo"
# Bump when conversion.demo makes a different demo checker: the store rebuilds its entry.
DEMO_CHECKER_VERSION = 2


def present_safety_checker(root: Path, parts: dict[str, list[str]], dst: Path) -> Path:
    """Lay out the checker files ``parts`` (component -> paths relative to ``root``) in the new
    directory ``dst`` as a pipeline directory: one folder of links per component, and its
    ``model_index.json``. Returns ``dst``."""
    for component, files in parts.items():
        folder = dst / component
        folder.mkdir(parents=True)
        for rel in files:
            os.symlink(os.path.abspath(root / rel), folder / PurePosixPath(rel).name)
    (dst / MODEL_INDEX_NAME).write_text(json.dumps(safety_checker_index(), indent=2) + "\n")
    return dst


@dataclass(frozen=True)
class HubCheckerSource(HubSource):
    """A safety checker on the Hub: a checker repo, or the checker folders of an SD 1.x pipeline repo."""

    kind = "hub-safety-checker"

    def slug(self) -> str:
        return "safety-checker--" + super().slug()

    def hub_files(self) -> HubFiles:
        """What to fetch of the repo: the checker's files (the repo's listing says where they are)."""
        from ..download.hub import HubFiles

        return HubFiles(self.repo, self.revision, self.display, "safety_checker", variant=self.variant,
                        subfolder=self.subfolder)

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..download import fetch_hub

        commit = None if refresh else self.offline_identity(workspace)
        snap = fetch_hub(self.hub_files(), workspace.root, commit, policy, workspace.config, refresh=refresh)
        workspace.write_ref(self, snap.identity)  # a crash from here on resumes offline
        parts = select_safety_checker_files(snap.files, self.variant, self.subfolder)
        path = in_scratch(workspace, self.slug(), lambda work: present_safety_checker(snap.root, parts, work / "checker"))
        return Prepared(path, snap.identity, [path.parent])


@dataclass(frozen=True)
class LocalCheckerSource(LocalSource):
    """A safety checker in a local directory, laid out as on the Hub; keyed by its fingerprint."""

    kind = "local-safety-checker"

    def slug(self) -> str:
        return "local-safety-checker--" + Path(self.path).name

    def pipeline_dir(self) -> Path:
        """The directory, checked to hold a safety checker before anything reads it."""
        path = Path(self.path) / self.subfolder if self.subfolder else Path(self.path)
        self.parts(path)
        return path

    def parts(self, path: Path) -> dict[str, list[str]]:
        """The checker's files in ``path``, per component (relative paths)."""
        names = [p.relative_to(path).as_posix() for p in path.glob("*") if p.is_file()]
        names += [p.relative_to(path).as_posix() for p in path.glob("*/*") if p.is_file()]
        try:
            return select_safety_checker_files(names)
        except DiffusersLayoutError as exc:
            raise SourceError(f"{path}: {exc}") from None

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..download import preread

        path = self.pipeline_dir()
        identity = directory_fingerprint(path)
        parts = self.parts(path)
        preread([path / rel for files in parts.values() for rel in files], policy.preread_workers, check_blobs=False)
        presented = in_scratch(workspace, self.slug(), lambda work: present_safety_checker(path, parts, work / "checker"))
        return Prepared(presented, identity, [presented.parent])


@dataclass(frozen=True)
class DemoCheckerSource(Source):
    """The embedded demo checker (``conversion.demo``): built offline, it flags near-white images."""

    kind = "demo-safety-checker"

    @property
    def ref(self) -> str:
        return DEMO_CHECKER_SOURCE

    def describe(self) -> dict:
        return {"kind": self.kind, "ref": DEMO_CHECKER_SOURCE, "demo_version": DEMO_CHECKER_VERSION}

    def slug(self) -> str:
        return "demo-safety-checker"

    def records_ref(self) -> bool:
        return False  # its identity is fixed by DEMO_CHECKER_VERSION

    def offline_identity(self, workspace: Workspace) -> str:
        return f"demo-safety-checker-v{DEMO_CHECKER_VERSION}"

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..demo import make_demo_safety_checker

        path = in_scratch(workspace, self.slug(), lambda work: make_demo_safety_checker(work / "checker"))
        return Prepared(path, self.offline_identity(workspace), [path.parent])
