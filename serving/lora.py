"""A request's ``loras``: fetched once onto the volume, read and checked once, kept in a bounded
in-memory cache, applied for one generation under the pipeline lock and removed afterwards.

fal's convention (its ``LoraWeight``: ``path``, "URL or the path to the LoRA weights", and
``scale``, default 1, at least 0, at most ``[lora] max_scale``, default 1 as in fal's own
text-to-image app; ``loras`` defaults to ``[]``): see ``serving.schema``. How a path is fetched:
``conversion.sources.lora`` (what it names) and ``conversion.download.lora`` (fal's
``download_model_weights`` layout for URLs, the Hub cache for repo files; offline first, the
network in the watched child, the size bounded by ``[lora] max_file_mb``).

Two steps, so that every endpoint can take LoRAs with two lines:

1. :meth:`LoraLibrary.resolve`, before the request waits for the pipeline (in a worker thread):
   each LoRA from the cache, or fetched, read (``conversion.lora.read_lora``) and checked against
   the served pipeline (``LoraTargets.check``, from a snapshot taken at setup, so no lock is
   needed). Any problem is a :class:`LoraRequestError`: a 422 whose ``detail`` is shaped like a
   validation error's, its ``loc`` naming ``["body", "loras", i, "path"]``.
2. :meth:`RequestLoras.applied`, around the pipeline call under the pipeline lock
   (``serving.generate.run_generation(..., loras=...)``): the adapters are loaded and weighted by
   their scales when it opens and every LoRA layer is removed when it closes, however the
   generation ends (done, failed, cancelled), so the next request meets the base model again.

The cache holds read LoRAs (CPU tensors) up to ``[lora] cache_mb``, least recently used evicted
first; a LoRA larger than the whole cache is used and not kept. torch is imported lazily.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException

from conversion.sources import LoraRef, parse_lora_path, with_fused_loras

from .settings import LoraSettings, ModelSettings

if TYPE_CHECKING:
    from conversion.lora import LoraTargets, LoraWeights
    from conversion.sources import Source

log = logging.getLogger("serving.lora")
MB = 1024 * 1024


class LoraRequestError(HTTPException):
    """A request's ``loras[index]`` cannot be used: 422, shaped like a validation error."""

    def __init__(self, index: int, message: str, kind: str = "lora_unusable", field: str = "path") -> None:
        self.index, self.message = index, message
        super().__init__(status_code=422, detail=[{"loc": ["body", "loras", index, field], "msg": message,
                                                   "type": kind}])


def fused_loras(model: ModelSettings) -> list[tuple[LoraRef, float]]:
    """``[[model.loras]]``: the LoRAs to fuse into the model before packing, with their scales."""
    return [(parse_lora_path(lora.path), lora.scale) for lora in model.loras]


def fuse_model_loras(source: Source, model: ModelSettings) -> Source:
    """The model's source with ``[[model.loras]]`` fused before packing (itself without any)."""
    return with_fused_loras(source, fused_loras(model))


@dataclass(frozen=True)
class RequestLoras:
    """The LoRAs of one request, read and checked: (index in the request, weights, scale)."""

    loras: tuple[tuple[int, LoraWeights, float], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.loras)

    def __len__(self) -> int:
        return len(self.loras)

    @contextlib.contextmanager
    def applied(self, pipe: Any) -> Iterator[None]:
        """These LoRAs active in ``pipe`` while open (hold the pipeline lock), removed on close."""
        from conversion.errors import LoraError
        from conversion.lora import adapters

        if not self.loras:
            yield
            return
        loading = True
        try:
            with adapters(pipe, [(weights, scale) for _, weights, scale in self.loras]):
                loading = False
                yield
        except LoraError as exc:
            if not loading:
                raise
            index = next((i for i, weights, _ in self.loras if str(exc).startswith(weights.name)), self.loras[0][0])
            raise LoraRequestError(index, str(exc), "lora_mismatch") from exc


NO_LORAS = RequestLoras()


class LoraLibrary:
    """Resolves a request's ``loras`` against one served pipeline, with a bounded cache of read LoRAs."""

    def __init__(self, settings: LoraSettings, root: Path, targets: LoraTargets | None) -> None:
        self.settings, self.root, self.targets = settings, Path(root), targets
        self._cache: OrderedDict[str, LoraWeights] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}

    @classmethod
    def for_pipeline(cls, pipe: Any, settings: LoraSettings, root: Path) -> LoraLibrary:
        """The library of ``pipe`` (its LoRA targets taken now, before any request runs)."""
        from conversion.lora import LoraTargets

        return cls(settings, root, LoraTargets.of(pipe))

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def cached(self) -> list[str]:
        """The cache's keys, least recently used first."""
        with self._lock:
            return list(self._cache)

    def resolve(self, loras: Sequence[Any]) -> RequestLoras:
        """A request's ``loras`` (items with ``path`` and ``scale``) read and checked; a
        :class:`LoraRequestError` for the first one that cannot be used."""
        if not loras:
            return NO_LORAS
        if len(loras) > self.settings.max_loras:  # the schema says so too; this guards other callers
            raise HTTPException(422, detail=[{"loc": ["body", "loras"], "type": "too_long",
                                              "msg": f"at most {self.settings.max_loras} LoRAs per request"}])
        return RequestLoras(tuple((i, self._weights(i, item.path), float(item.scale)) for i, item in enumerate(loras)))

    def _weights(self, index: int, path: str) -> LoraWeights:
        from conversion.errors import ConversionError, DiskFullError, LoraError, SourceError

        try:
            ref = parse_lora_path(path)
        except SourceError as exc:
            raise LoraRequestError(index, str(exc), "lora_path") from None
        if self.targets is None:
            raise LoraRequestError(index, "this model's pipeline takes no LoRAs", "lora_unsupported")
        key = ref.key_text()
        with self._lock:
            fetching = self._fetching.setdefault(key, threading.Lock())
        try:
            with fetching:  # one fetch per LoRA at a time: a second request for it waits and finds it cached
                hit = self._lookup(key)
                if hit is not None:
                    return hit
                started = time.perf_counter()
                try:
                    weights = self._fetch_and_check(ref)
                except DiskFullError:
                    raise
                except LoraError as exc:
                    raise LoraRequestError(index, str(exc), "lora_mismatch") from None
                except ConversionError as exc:  # not found, refused, too large, unreachable: the path's problem
                    raise LoraRequestError(index, f"{ref.display}: cannot be fetched: {exc}", "lora_fetch") from None
                log.info("lora: %s ready in %.2f s (%.1f MiB); in memory: %s", ref.display,
                         time.perf_counter() - started, weights.nbytes / MB, self._remember(key, weights))
                return weights
        finally:
            with self._lock:  # no lock kept per LoRA ever asked for (at worst, a late waiter fetches again)
                if self._fetching.get(key) is fetching and not fetching.locked():
                    del self._fetching[key]

    def _fetch_and_check(self, ref: LoraRef) -> LoraWeights:
        from conversion.download.lora import fetch_lora
        from conversion.lora import read_lora

        assert self.targets is not None
        fetched = fetch_lora(ref, self.root, max_mb=self.settings.max_file_mb)
        weights = read_lora(fetched.path, ref.display, fetched.identity)
        self.targets.check(weights)
        return weights

    def _lookup(self, key: str) -> LoraWeights | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def _remember(self, key: str, weights: LoraWeights) -> str:
        """Keep ``weights`` in the cache, evicting the least recently used beyond ``cache_mb``."""
        limit = self.settings.cache_mb * MB
        with self._lock:
            if weights.nbytes > limit:
                return f"not kept ({weights.nbytes / MB:.1f} MiB is more than [lora] cache_mb = {self.settings.cache_mb})"
            self._cache[key] = weights
            self._cached_bytes += weights.nbytes
            while self._cached_bytes > limit:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes
            return f"{len(self._cache)} LoRA(s), {self._cached_bytes / MB:.1f} of {self.settings.cache_mb} MiB"
