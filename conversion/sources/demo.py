"""The embedded demo models, nothing fetched: ``demo`` (the drawing model this project trained, its
weights committed under conversion/demo/trained/) and ``demo-random`` (the same family with seeded
random weights, generated on the spot: fast, for tests)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SourceError
from .base import Prepared, Source, Workspace

if TYPE_CHECKING:
    from ..download import DownloadPolicy

DEMO_SOURCE = "demo"
RANDOM_DEMO_SOURCE = "demo-random"
# What `demo` serves, and where `python -m demo_training train` writes the pipeline by default.
TRAINED_DIR = Path(__file__).resolve().parents[1] / "demo" / "trained"
TRAINED_PIPELINE = TRAINED_DIR / "pipeline"
# The demo's ControlNet (demo_training/controlnet.py): it draws the caption's shape where the control
# image is white. Served as the model folder it is, under this name.
DEMO_CONTROLNET_SOURCE = "demo-controlnet"
TRAINED_CONTROLNET = TRAINED_DIR / "controlnet"
# Bump when conversion.demo makes different random files for the same seed: the store rebuilds its entry.
DEMO_VERSION = 1


@dataclass(frozen=True)
class DemoSource(Source):
    """The trained demo model, keyed by the contents of its committed files."""

    kind = "demo"

    @property
    def ref(self) -> str:
        return DEMO_SOURCE

    def slug(self) -> str:
        return "demo"

    def records_ref(self) -> bool:
        return False  # its identity is the committed files' digest

    def offline_identity(self, workspace: Workspace) -> str:
        return "demo-trained-" + trained_digest(TRAINED_PIPELINE)[:32]

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        return Prepared(TRAINED_PIPELINE, self.offline_identity(workspace), [])


@cache
def trained_digest(path: Path) -> str:
    """The SHA-256 of every file's relative path and bytes (6 MB: about 13 ms on the 2-core VM, once per process)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not any(p.name == "model_index.json" for p in files):
        raise SourceError(f"{path}: the demo model's committed weights are missing (this checkout lacks "
                          "conversion/demo/trained/; `python -m demo_training train` makes them again)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class RandomDemoSource(Source):
    """The demo family with weights drawn from ``seed``, generated in the store's scratch."""

    seed: int = 0

    kind = "demo-random"

    @property
    def ref(self) -> str:
        return RANDOM_DEMO_SOURCE

    def describe(self) -> dict:
        return {"kind": self.kind, "ref": RANDOM_DEMO_SOURCE, "seed": self.seed, "demo_version": DEMO_VERSION}

    def slug(self) -> str:
        return f"demo-random-seed{self.seed}"

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
