"""What every source kind is to the store: an identity known offline, a slug, and a way to fetch.

The store never asks what kind a source is; it asks the source. A new source kind is one new
module here with one ``Source`` subclass, plus a line in ``parse.py``.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from ..config import ConversionConfig
    from ..download import DownloadPolicy


class Workspace(Protocol):
    """What a source may use of the store while it is looked up or fetched."""

    root: Path
    config: ConversionConfig

    def read_ref(self, source: Source) -> str | None: ...

    def write_ref(self, source: Source, identity: str) -> None: ...

    def private_dir(self, name: str) -> Path: ...


def in_scratch(workspace: Workspace, slug: str, make: Callable[[Path], Path]) -> Path:
    """``make(work)`` run in the source's private scratch directory ``work`` (named ``slug``): what
    it returns (something inside ``work``), or the scratch removed and the error raised."""
    work = workspace.private_dir(slug)
    try:
        return make(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@dataclass
class Prepared:
    """A local diffusers directory ready to convert, and the scratch to remove afterwards."""

    path: Path
    identity: str
    scratch: list[Path]


class Source(ABC):
    """Where a pipeline comes from. Subclasses are frozen dataclasses (equal when their fields are)."""

    kind: ClassVar[str]
    _ref_field: ClassVar[str]  # the field that names it: repo, url, path
    # The fields of the store key every kind fills (None where a kind has no such thing).
    _KEY_FIELDS: ClassVar[tuple[str, ...]] = ("variant", "subfolder", "pipeline_class", "config")

    @property
    def ref(self) -> str:
        """The repo id, the URL or the directory: what the source names."""
        return getattr(self, self._ref_field)

    @property
    def display(self) -> str:
        """A short name for logs and errors (no secrets)."""
        return self.ref

    @property
    def revision(self) -> str | None:
        """A Hub branch, tag or commit; None for every other kind."""
        return None

    def key_ref(self) -> str:
        """What the store key records of ``ref`` (a URL is hashed: signed URLs carry secrets)."""
        return self.ref

    def key_fields(self) -> dict[str, Any]:
        """The source's part of its store key (the identity and dtype are added by the store)."""
        own = asdict(self)  # type: ignore[call-overload]
        return {"kind": self.kind, "ref": self.key_ref(), **{f: own.get(f) for f in self._KEY_FIELDS}}

    def describe(self) -> dict[str, Any]:
        """The source as recorded in a manifest: no secrets."""
        own = asdict(self)  # type: ignore[call-overload]
        return {"kind": self.kind, "ref": self.ref,
                **{k: v for k, v in own.items() if v is not None and k != self._ref_field}}

    @abstractmethod
    def slug(self) -> str:
        """A readable name for its store directory (sanitised by the store)."""

    def records_ref(self) -> bool:
        """Whether its identity is recorded in a ref file (it can change while the source keeps its name)."""
        return True

    @abstractmethod
    def offline_identity(self, workspace: Workspace) -> str | None:
        """Its identity (a commit, a URL hash, a fingerprint) when known without the network, else None."""

    @abstractmethod
    def prepare(self, workspace: Workspace, policy: DownloadPolicy, refresh: bool) -> Prepared:
        """Fetch it as a local directory to convert (downloaded and pre-read as needed)."""

    def convert(self, prepared: Prepared, dst: Path, dtype: Any, info: dict[str, Any], config: ConversionConfig) -> Path:
        """Write the converted directory ``dst`` from what :meth:`prepare` fetched: a diffusers
        pipeline here (a directory that already carries our manifest, in the dtype asked for, is
        adopted as it is: conversion.adopt); a kind whose files are something else converts them
        itself. ``config``: the store's (its progress setting)."""
        from ..adopt import adopt_converted, carries_manifest, packed_dtype

        if carries_manifest(prepared.path) and info.get("dtype") in ("source", packed_dtype(prepared.path)):
            return adopt_converted(prepared.path, dst, info)
        from ..convert import convert_pipeline

        return convert_pipeline(prepared.path, dst, dtype=dtype, source=info, variant=self.key_fields().get("variant"),
                                show_progress=config.show_progress)
