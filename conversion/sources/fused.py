"""A pipeline with LoRAs fused into its weights before it is packed (fal.toml's ``[[model.loras]]``).

:class:`FusedSource` wraps the model's source: it fetches the base as that source does, fetches
each LoRA once (conversion.download.lora), fuses them into a scratch copy of the pipeline
(conversion.lora.fuse_loras) and hands that to the store, which converts it like any pipeline. Its
store key is the base's plus each LoRA's key text and scale, so another LoRA or scale is another
entry; its identity joins the base's and the LoRAs' resolved identities, all known offline once
fetched (a URL's hash, a Hub file's commit from the Hub cache), so a warm start finds the entry
without touching the network or the LoRA files. Serving the entry costs nothing extra: the LoRAs
are in the packs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import Prepared, Source, Workspace
from .lora import LoraRef, lora_key

if TYPE_CHECKING:
    from ..download import DownloadPolicy


@dataclass(frozen=True)
class FusedSource(Source):
    base: Source
    loras: tuple[tuple[LoraRef, float], ...]

    kind = "fused-lora"

    @property
    def ref(self) -> str:
        return self.base.ref

    @property
    def revision(self) -> str | None:
        return self.base.revision

    @property
    def display(self) -> str:
        fused = ", ".join(f"{ref.display} x {scale:g}" for ref, scale in self.loras)
        return f"{self.base.display} + LoRA {fused}"

    def key_ref(self) -> str:
        return self.base.key_ref()

    def key_fields(self) -> dict[str, Any]:
        return {**self.base.key_fields(), "fused_loras": lora_key(list(self.loras))}

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(),
                "fused_loras": [{"path": ref.display, "scale": scale} for ref, scale in self.loras]}

    def slug(self) -> str:
        return self.base.slug() + "--lora"

    def records_ref(self) -> bool:
        return False  # its identity is derived from the base's and the LoRAs', each known offline

    def offline_identity(self, workspace: Workspace) -> str | None:
        from ..cache_layout import hub_cache_dir

        base = self.base.offline_identity(workspace)
        if base is None:
            return None
        cache = hub_cache_dir(workspace.root, workspace.config)
        loras = [ref.offline_identity(workspace.root, cache) for ref, _ in self.loras]
        if any(identity is None for identity in loras):
            return None
        return _identity(base, loras)  # type: ignore[arg-type]

    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        from ..download.lora import fetch_lora
        from ..lora import fuse_loras, read_lora

        fetched = [fetch_lora(ref.location(), workspace.root, policy=policy, config=workspace.config)
                   for ref, _ in self.loras]
        base = self.base.prepare(workspace, policy, refresh)
        work = workspace.private_dir(self.slug())
        try:
            weights = [(read_lora(f.path, ref.display, f.identity), scale)
                       for f, (ref, scale) in zip(fetched, self.loras, strict=True)]
            path = fuse_loras(base.path, weights, work / "pipeline", variant=self.base.key_fields().get("variant"))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            for scratch in base.scratch:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        return Prepared(path, _identity(base.identity, [f.identity for f in fetched]), [*base.scratch, work])


def _identity(base: str, loras: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(loras).encode()).hexdigest()[:16]
    return f"{base}+lora-{digest}"


def with_fused_loras(source: Source, loras: list[tuple[LoraRef, float]]) -> Source:
    """``source`` with ``loras`` fused before packing; ``source`` itself when there are none."""
    return FusedSource(source, tuple(loras)) if loras else source
