"""The embedded demo model (``source = "demo"``): generated offline from a seed, nothing fetched."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import Prepared, Source, Workspace

if TYPE_CHECKING:
    from ..download import DownloadPolicy

DEMO_SOURCE = "demo"
# Bump when conversion.demo makes different files for the same seed: the store rebuilds its entry.
DEMO_VERSION = 1


@dataclass(frozen=True)
class DemoSource(Source):
    seed: int = 0

    kind = "demo"

    @property
    def ref(self) -> str:
        return DEMO_SOURCE

    def describe(self) -> dict:
        return {"kind": self.kind, "ref": DEMO_SOURCE, "seed": self.seed, "demo_version": DEMO_VERSION}

    def slug(self) -> str:
        return f"demo-seed{self.seed}"

    def records_ref(self) -> bool:
        return False  # its identity is fixed by the seed and DEMO_VERSION

    def offline_identity(self, workspace: Workspace) -> str:
        return f"demo-v{DEMO_VERSION}-seed{self.seed}"

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..demo import make_demo_pipeline

        work = workspace.private_dir(self.slug())
        try:
            path = make_demo_pipeline(work / "pipeline", seed=self.seed)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return Prepared(path, self.offline_identity(workspace), [work])
