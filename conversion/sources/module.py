"""A torch module's weights, converted into one pack (``[model]`` of a module app, see
serving.settings.ModuleSettings). The weights are safetensors: a local file or directory of shards
(keyed by a fingerprint of their files), an ``https://`` or ``data:`` URL, a file in a Hub repo, or
a Hub repo's (sub)folder of shards (keyed by commit). :class:`ModuleSource` wraps the source that
fetches them and converts what it fetched with conversion.convert_module instead of as a pipeline;
the module's class is the app's (its factory), checked against the pack when it is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from model_loader.module import MODULE_WEIGHT_SUFFIXES

from ..errors import SourceError
from .base import Prepared, Source, Workspace
from .demo import TRAINED_PIPELINE, trained_digest
from .hub import HubSource
from .hub_file import HubFileSource
from .local import directory_fingerprint
from .single_file import SingleFileSource
from .url import UrlSource, redact_url

if TYPE_CHECKING:
    from ..config import ConversionConfig
    from ..download import DownloadPolicy
    from ..download.hub import HubFiles

log = logging.getLogger("conversion.sources")

DEMO_DECODER_SOURCE = "demo-vae-decoder"


@dataclass(frozen=True)
class LocalWeightsSource(Source):
    """A local safetensors file or directory of shards, keyed by its files' paths, sizes and mtimes."""

    path: str  # absolute

    kind = "local-weights"
    _ref_field = "path"

    def slug(self) -> str:
        return "local--" + Path(self.path).name.split(".")[0]

    def offline_identity(self, workspace: Workspace) -> str | None:
        if os.path.exists(self.path):
            return _fingerprint(Path(self.path))
        identity = workspace.read_ref(self)
        if identity is not None:
            log.warning("store: module weights %s are gone; serving their last conversion", self.path)
        return identity

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        path = Path(self.path)
        if not path.exists():
            raise SourceError(f"{self.path}: no such file or directory of module weights")
        return Prepared(path, _fingerprint(path), [])


@dataclass(frozen=True)
class HubWeightsSource(HubSource):
    """A Hub repo's safetensors weights of one module: every ``.safetensors`` file (and its shard
    index) at the repo's root or in ``subfolder``."""

    kind = "hub-weights"

    def hub_files(self) -> HubFiles:
        from ..download.hub import HubFiles

        return HubFiles(self.repo, self.revision, self.display, "module_weights", subfolder=self.subfolder)


@dataclass(frozen=True)
class DemoDecoderWeights(Source):
    """The decoder's tensors of the trained demo VAE (conversion.demo.latent_decoder), written to
    scratch as one safetensors file; keyed by the demo model's committed files."""

    kind = "demo-vae-decoder"

    @property
    def ref(self) -> str:
        return DEMO_DECODER_SOURCE

    def slug(self) -> str:
        return DEMO_DECODER_SOURCE

    def records_ref(self) -> bool:
        return False  # its identity is the committed files' digest

    def offline_identity(self, workspace: Workspace) -> str:
        return "demo-vae-decoder-" + trained_digest(TRAINED_PIPELINE)[:32]

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from safetensors import safe_open
        from safetensors.torch import save_file

        from ..demo.latent_decoder import DECODER_PREFIXES

        work = workspace.private_dir(self.slug())
        try:
            work.mkdir(parents=True)
            with safe_open(str(TRAINED_PIPELINE / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as vae:
                tensors = {name: vae.get_tensor(name) for name in vae.keys() if name.startswith(DECODER_PREFIXES)}  # noqa: SIM118
            save_file(tensors, str(work / "decoder.safetensors"))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return Prepared(work / "decoder.safetensors", self.offline_identity(workspace), [work])


@dataclass(frozen=True)
class ModuleSource(Source):
    """Module weights from ``weights`` (a LocalWeightsSource, UrlSource, HubFileSource or
    HubWeightsSource), converted into ``module/model.flashpack``."""

    weights: Source

    kind = "module"

    @property
    def ref(self) -> str:
        return self.weights.ref

    @property
    def revision(self) -> str | None:
        return self.weights.revision

    @property
    def display(self) -> str:
        return self.weights.display

    def key_ref(self) -> str:
        return self.weights.key_ref()

    def key_fields(self) -> dict[str, Any]:
        return {**self.weights.key_fields(), "kind": self.kind, "weights_kind": self.weights.kind}

    def describe(self) -> dict[str, Any]:
        return {**self.weights.describe(), "kind": self.kind, "weights_kind": self.weights.kind}

    def slug(self) -> str:
        return "module--" + self.weights.slug()

    def records_ref(self) -> bool:
        return False  # the weights' own source records theirs

    def offline_identity(self, workspace: Workspace) -> str | None:
        return self.weights.offline_identity(workspace)

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        weights = self.weights
        if isinstance(weights, SingleFileSource):  # a URL or a Hub file: fetched, not turned into a pipeline
            path, identity = weights.fetch_checkpoint(workspace, policy, refresh)
            return Prepared(path, identity, [])
        prepared = weights.prepare(workspace, policy, refresh)
        return Prepared(prepared.path, prepared.identity, prepared.scratch)

    def convert(self, prepared: Prepared, dst: Path, dtype: Any, info: dict[str, Any], config: ConversionConfig) -> Path:
        from ..convert_module import convert_module

        return convert_module(prepared.path, dst, dtype, info)


def parse_module_source(text: str, revision: str | None = None, subfolder: str | None = None) -> ModuleSource:
    """The module weights ``text`` names: an ``https://`` (or ``data:``) URL of a safetensors file,
    a Hub file (``org/name/path/file.safetensors``), a Hub repo (``org/name[@revision]``, its
    safetensors at the root or in ``subfolder``), or an existing local file or directory (anything
    starting with ``/``, ``.`` or ``~``)."""
    from .parse import parse_source

    if not isinstance(text, str) or not text.strip():
        raise SourceError("module weights source is empty: give a safetensors file or directory, a Hub repo "
                          "(org/name), a Hub file (org/name/file.safetensors) or an https:// URL")
    text = text.strip()
    if text == DEMO_DECODER_SOURCE:
        if revision or subfolder:
            raise SourceError(f"the {text} source takes no revision or subfolder")
        return ModuleSource(DemoDecoderWeights())
    scheme = urlsplit(text).scheme.lower()
    path = Path(text).expanduser()
    if not scheme and (path.exists() or text.startswith(("/", ".", "~"))):
        if not path.exists():
            raise SourceError(f"{text}: no such file or directory (module weights: a safetensors file or a "
                              "directory of shards)")
        if revision:
            raise SourceError(f"{text}: revision applies to Hub repos, not local files")
        if subfolder:
            path = path / subfolder
        if path.is_file() and not path.name.lower().endswith(MODULE_WEIGHT_SUFFIXES):
            raise SourceError(f"{text}: module weights must be a .safetensors file (or a directory of them)")
        return ModuleSource(LocalWeightsSource(str(path.resolve())))
    if scheme in ("https", "data") or text.lower().endswith(MODULE_WEIGHT_SUFFIXES):
        weights = parse_source(text, revision=revision, subfolder=subfolder)
        if isinstance(weights, UrlSource | HubFileSource):
            name = urlsplit(weights.url).path if isinstance(weights, UrlSource) else weights.filename
            if scheme != "data" and not name.lower().endswith(MODULE_WEIGHT_SUFFIXES):
                raise SourceError(f"{redact_url(text)}: module weights must be a .safetensors file")
            return ModuleSource(weights)
    hub = parse_source(text, revision=revision, subfolder=subfolder)
    if not isinstance(hub, HubSource) or type(hub) is not HubSource or hub.variant:
        raise SourceError(f"{redact_url(text)}: not module weights (a safetensors file or directory, a Hub repo, a "
                          "Hub file or an https:// URL)")
    return ModuleSource(HubWeightsSource(hub.repo, revision=hub.revision, subfolder=hub.subfolder))


def _fingerprint(path: Path) -> str:
    """A file's name, size and mtime, or a directory's :func:`directory_fingerprint` (``stat`` calls only)."""
    if path.is_dir():
        return directory_fingerprint(path)
    st = path.stat()
    return hashlib.sha256(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()).hexdigest()
