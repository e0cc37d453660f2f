"""One model in a folder of its own, as ``save_pretrained`` writes it (``config.json`` and its
weights side by side): a ControlNet (diffusers' ``ControlNetModel``) or an IP-Adapter's CLIP image
encoder (transformers' ``CLIPVisionModelWithProjection``), on the Hub (a repo, or a folder of one)
or in a local directory.

Each source presents the model to the store as a one-component pipeline directory in its scratch
space (``<component>/`` with links to the files, and a written ``model_index.json`` naming its
class), so the store converts, verifies, publishes and rebuilds it exactly as it does a pipeline,
and the loader loads ``<entry>/<component>`` with ``model_loader.load_model``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from model_loader.bounded_json import load_file_bounded
from model_loader.diffusers_layout import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    MODEL_INDEX_NAME,
    is_variant_name,
    model_folder_index,
    select_model_folder_files,
)
from model_loader.errors import DiffusersLayoutError

from ..errors import SourceError
from .base import Prepared, Workspace, in_scratch
from .demo import DEMO_CONTROLNET_SOURCE, TRAINED_CONTROLNET
from .hub import HubSource
from .hub_file import HubFileSource
from .local import LocalSource, directory_fingerprint
from .url import redact_url

if TYPE_CHECKING:
    from ..download import DownloadPolicy
    from ..download.hub import HubFiles


def present_model_folder(root: Path, files: list[str], component: str, dst: Path) -> Path:
    """Lay out the model files ``files`` (paths relative to ``root``: its config.json and weights)
    in the new directory ``dst`` as a one-component pipeline directory ``dst/<component>/`` with
    its ``model_index.json``. Returns ``dst``."""
    folder = dst / component
    folder.mkdir(parents=True)
    for rel in files:
        os.symlink(os.path.abspath(root / rel), folder / PurePosixPath(rel).name)
    config_path = folder / CONFIG_NAME
    try:
        config = load_file_bounded(config_path, max_bytes=MAX_CONFIG_BYTES)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{config_path}: cannot be read as JSON ({exc})") from None
    try:
        index = model_folder_index(component, config if isinstance(config, dict) else {}, str(config_path))
    except DiffusersLayoutError as exc:
        raise SourceError(str(exc)) from None
    (dst / MODEL_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return dst


@dataclass(frozen=True)
class HubModelFolderSource(HubSource):
    """A model folder on the Hub: its config.json and weights at the repo's root or in ``subfolder``,
    converted into ``<component>/`` of its entry."""

    component: str = "model"

    kind = "hub-model-folder"

    def slug(self) -> str:
        return f"{self.component}--{super().slug()}"

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "component": self.component}

    def hub_files(self) -> HubFiles:
        from ..download.hub import HubFiles

        return HubFiles(self.repo, self.revision, self.display, "model_folder", variant=self.variant,
                        subfolder=self.subfolder)

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..download import fetch_hub

        commit = None if refresh else self.offline_identity(workspace)
        snap = fetch_hub(self.hub_files(), workspace.root, commit, policy, workspace.config, refresh=refresh)
        workspace.write_ref(self, snap.identity)  # a crash from here on resumes offline
        files = select_model_folder_files(snap.files, self.variant, self.subfolder)
        path = in_scratch(workspace, self.slug(),
                          lambda work: present_model_folder(snap.root, files, self.component, work / "model"))
        return Prepared(path, snap.identity, [path.parent])


@dataclass(frozen=True)
class LocalModelFolderSource(LocalSource):
    """A model folder in a local directory (config.json and weights); keyed by its fingerprint."""

    variant: str | None = None
    component: str = "model"

    kind = "local-model-folder"

    def slug(self) -> str:
        return f"local-{self.component}--{Path(self.path).name}"

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "component": self.component}

    def pipeline_dir(self) -> Path:
        """The directory, checked to hold a model before anything reads it."""
        path = Path(self.path) / self.subfolder if self.subfolder else Path(self.path)
        self.files(path)
        return path

    def files(self, path: Path) -> list[str]:
        """The model's files in ``path`` (names relative to it)."""
        names = [p.name for p in path.glob("*") if p.is_file()]
        try:
            return select_model_folder_files(names, self.variant, where=str(path))
        except DiffusersLayoutError as exc:
            raise SourceError(str(exc)) from None

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..download import preread

        path = self.pipeline_dir()
        identity = directory_fingerprint(path)
        files = self.files(path)
        preread([path / name for name in files], policy.preread_workers, check_blobs=False)
        presented = in_scratch(workspace, self.slug(),
                               lambda work: present_model_folder(path, files, self.component, work / "model"))
        return Prepared(presented, identity, [presented.parent])


def parse_model_folder_source(text: str, component: str, what: str, revision: str | None = None,
                              variant: str | None = None, subfolder: str | None = None) -> HubModelFolderSource | LocalModelFolderSource:
    """The model folder ``text`` names, to be converted into ``<component>/``: a Hub repo
    (``org/name[@revision]``, the model at its root or in ``subfolder``), an existing local
    directory (anything starting with ``/``, ``.`` or ``~``), checked here, or ``demo-controlnet``
    (the demo model's ControlNet, committed with it). ``what`` names the model
    in errors, with its article ("a ControlNet"). URLs and single files are refused: the model's class is in its
    config.json, which a single file lacks."""
    from .parse import parse_source

    if not isinstance(text, str) or not text.strip():
        raise SourceError(f"the source of {what} is empty: give a Hub repo id (org/name) or a local directory")
    text = text.strip()
    if text == DEMO_CONTROLNET_SOURCE:
        if component != "controlnet" or revision or variant or subfolder:
            raise SourceError(f"{text} is the demo model's ControlNet: it takes no revision, variant or subfolder, "
                              "and is no other kind of model")
        return LocalModelFolderSource(str(TRAINED_CONTROLNET), component=component)
    if urlsplit(text).scheme:
        raise SourceError(f"{redact_url(text)}: {what} is a model folder (config.json + weights): a Hub repo or a "
                          "local directory, not a URL")
    if variant is not None and not is_variant_name(variant):
        raise SourceError(f"variant {variant!r} is not a weight variant name such as 'fp16'")
    source = parse_source(text, revision=revision, subfolder=subfolder)
    if isinstance(source, HubFileSource):
        raise SourceError(f"{text}: {what} is a model folder (config.json + weights): a Hub repo (with subfolder "
                          "for a folder of it) or a local directory, not a single file")
    if isinstance(source, LocalSource):
        folder = LocalModelFolderSource(source.path, subfolder=source.subfolder, variant=variant, component=component)
        folder.pipeline_dir()  # a directory without a model is refused now, not at the first start
        return folder
    if not isinstance(source, HubSource):
        raise SourceError(f"{text}: {what} is a Hub repo or a local directory")
    return HubModelFolderSource(source.repo, revision=source.revision, variant=variant,
                                subfolder=source.subfolder, component=component)
