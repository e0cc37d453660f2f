"""A request's ``loras``: fetched once onto the volume, read and checked once, kept in a bounded
in-memory cache, applied for one generation under the pipeline lock and removed afterwards.

fal's convention (its ``LoraWeight``: ``path``, "URL or the path to the LoRA weights", and
``scale``, default 1, at least 0, at most ``[lora] max_scale``, default 1 as in fal's own
text-to-image app; ``loras`` defaults to ``[]``): see ``serving.schema``. What a path names:
``conversion.sources.lora``. A ``data:`` URI is read from the request, never stored; an https URL
or a Hub file comes from the volume's byte-budgeted LoRA files (``conversion.download.lora_files``)
or is fetched into them (``conversion.download.lora.fetch_request_lora``: under ``[lora]
fetch_timeout_s``, never retried, stopped when the request's flag is set), at most ``[lora]
max_fetches`` at once on this runner (one more: 503). A file that is refused is deleted.

Two steps, so that every endpoint can take LoRAs with two lines:

1. :meth:`LoraLibrary.resolve_async`, before the request waits for the pipeline (in a worker
   thread of the library's own limiter, so requests without LoRAs never wait on a fetch):
   each LoRA from the cache, or fetched, read (``conversion.lora.read_lora``) and checked against
   the served pipeline (``LoraTargets.check``, from a snapshot taken at setup, so no lock is
   needed). Any problem is a :class:`LoraRequestError`: a 422 whose ``detail`` is shaped like a
   validation error's, its ``loc`` naming ``["body", "loras", i, "path"]``.
2. :meth:`RequestLoras.applied`, around the pipeline call under the pipeline lock
   (``serving.generate.run_generation(..., loras=...)``): the adapters are loaded and weighted by
   their scales when it opens and every LoRA layer is removed when it closes, however the
   generation ends (done, failed, cancelled), so the next request meets the base model again
   (``serving.lora_adapters``).

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

from conversion.errors import FetchCancelled
from conversion.sources import LoraRef, parse_lora_path, with_fused_loras
from conversion.sources.lora import UrlLora

from .cancel import CancelFlag, acquire_unless_cancelled
from .settings import LoraSettings, ModelSettings

if TYPE_CHECKING:
    from conversion.config import ConversionConfig
    from conversion.download.lora_files import LoraFile
    from conversion.lora import LoraTargets, LoraWeights
    from conversion.sources import Source

log = logging.getLogger("serving.lora")
MB = 1024 * 1024
# Seconds a 503 for busy fetch slots asks the caller to wait.
RETRY_AFTER_S = 5
# Threads of resolve_async beyond the fetch slots: requests whose LoRAs are in memory or on the
# volume, or that wait for another request's fetch of the same LoRA.
RESOLVERS_BESIDE_FETCHES = 8


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

        from .lora_adapters import adapters

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


class LoraBusyError(HTTPException):
    """Every LoRA fetch slot of this runner is taken: 503 with Retry-After."""

    def __init__(self, limit: int) -> None:
        super().__init__(503, f"this runner is already fetching {limit} LoRA(s) ([lora] max_fetches); retry shortly",
                         headers={"Retry-After": str(RETRY_AFTER_S)})


class LoraLibrary:
    """Resolves a request's ``loras`` against one served pipeline: from a bounded memory cache,
    the volume's byte-budgeted files (:class:`conversion.download.lora_files.LoraFiles`), or
    fetched under a deadline, at most ``[lora] max_fetches`` at once."""

    def __init__(self, settings: LoraSettings, root: Path, targets: LoraTargets | None,
                 config: ConversionConfig) -> None:
        from conversion.download.lora_files import LoraFiles

        self.settings, self.root, self.targets = settings, Path(root), targets
        self.config = config  # for fetching: the Hub cache, the token, download settings
        self.files = LoraFiles(self.root, settings.volume_mb * MB)
        self._cache: OrderedDict[str, LoraWeights] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._fetch_slots = threading.BoundedSemaphore(settings.max_fetches)
        self._fetches_in_flight = 0
        self.limiter: Any = None  # the anyio CapacityLimiter of resolve_async, made in its event loop

    @classmethod
    def for_pipeline(cls, pipe: Any, settings: LoraSettings, root: Path, config: ConversionConfig) -> LoraLibrary:
        """The library of ``pipe`` (its LoRA targets taken now, before any request runs), fetching
        onto the volume at ``root`` with ``config``."""
        from conversion.lora import LoraTargets

        return cls(settings, root, LoraTargets.of(pipe), config)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    @property
    def fetches_in_flight(self) -> int:
        return self._fetches_in_flight

    def cached(self) -> list[str]:
        """The cache's keys, least recently used first."""
        with self._lock:
            return list(self._cache)

    async def resolve_async(self, loras: Sequence[Any], flag: CancelFlag | None = None) -> RequestLoras:
        """:meth:`resolve` from an endpoint: nothing to do without LoRAs; otherwise in a worker
        thread of this library's own limiter, so requests without LoRAs never wait on a fetch."""
        import anyio

        if not loras:
            return NO_LORAS
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(self.settings.max_fetches + RESOLVERS_BESIDE_FETCHES)
        return await anyio.to_thread.run_sync(self.resolve, loras, flag, abandon_on_cancel=True, limiter=self.limiter)

    def resolve(self, loras: Sequence[Any], flag: CancelFlag | None = None) -> RequestLoras:
        """A request's ``loras`` (items with ``path`` and ``scale``) read and checked; a
        :class:`LoraRequestError` for the first one that cannot be used (503 when every fetch slot
        is taken, 507 when the volume is full). ``flag``: the request's; once set, a fetch stops."""
        if not loras:
            return NO_LORAS
        if len(loras) > self.settings.max_loras:  # the schema says so too; this guards other callers
            raise HTTPException(422, detail=[{"loc": ["body", "loras"], "type": "too_long",
                                              "msg": f"at most {self.settings.max_loras} LoRAs per request"}])
        return RequestLoras(tuple((i, self._weights(i, item.path, flag), float(item.scale))
                                  for i, item in enumerate(loras)))

    def _weights(self, index: int, path: str, flag: CancelFlag | None) -> LoraWeights:
        from conversion.errors import SourceError

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
            # one fetch per LoRA at a time: a second request for it waits (or leaves when cancelled)
            if not acquire_unless_cancelled(fetching, flag):
                raise FetchCancelled(f"cancelled while loras[{index}] was being fetched for another request")
            try:
                hit = self._lookup(key, on_volume=not (isinstance(ref, UrlLora) and ref.is_data_uri))
                if hit is not None:
                    return hit
                started = time.perf_counter()
                weights = self._read_and_check(index, ref, flag)
                log.info("lora: %s ready in %.2f s (%.1f MiB); in memory: %s", ref.display,
                         time.perf_counter() - started, weights.nbytes / MB, self._remember(key, weights))
                return weights
            finally:
                fetching.release()
        finally:
            with self._lock:  # no lock kept per LoRA ever asked for (at worst, a late waiter fetches again)
                if self._fetching.get(key) is fetching and not fetching.locked():
                    del self._fetching[key]

    def _read_and_check(self, index: int, ref: LoraRef, flag: CancelFlag | None) -> LoraWeights:
        """``ref``'s weights read and checked against the pipeline; a file that is refused is deleted."""
        from conversion.errors import LoraError
        from conversion.lora import read_lora, read_lora_bytes

        assert self.targets is not None
        if isinstance(ref, UrlLora) and ref.is_data_uri:
            try:
                weights = read_lora_bytes(self._data_uri(index, ref), ref.display, ref.key_text())
                self.targets.check(weights)
            except LoraError as exc:
                raise LoraRequestError(index, str(exc), "lora_mismatch") from None
            return weights
        for attempt in (1, 2):
            fetched = self._fetch(index, ref, flag)
            try:
                weights = read_lora(fetched.path, ref.display, fetched.identity)
                self.targets.check(weights)
            except (LoraError, FileNotFoundError) as exc:
                if not fetched.path.exists() and attempt == 1:
                    continue  # evicted by another runner between lookup and read: fetch it again
                self.files.discard(ref.key_text())
                raise LoraRequestError(index, str(exc), "lora_mismatch") from None
            return weights
        raise AssertionError("unreachable")

    def _data_uri(self, index: int, ref: UrlLora) -> bytes:
        from conversion.download.caller_url import data_uri_payload
        from conversion.errors import CallerUrlError

        try:
            payload = data_uri_payload(ref.url)
        except CallerUrlError as exc:
            raise LoraRequestError(index, f"{ref.display}: {exc}", "lora_fetch") from None
        if len(payload) > self.settings.max_file_mb * MB:
            raise LoraRequestError(index, f"{ref.display} is {len(payload) / MB:.1f} MiB, more than the limit of "
                                   f"{self.settings.max_file_mb} MiB for a LoRA file ([lora] max_file_mb)", "lora_fetch")
        return payload

    def _fetch(self, index: int, ref: LoraRef, flag: CancelFlag | None) -> LoraFile:
        """``ref``'s file on the volume, fetched in one of this runner's fetch slots when missing."""
        from conversion.download.lora import fetch_request_lora
        from conversion.errors import ConversionError, DiskFullError

        found = self.files.lookup(ref.key_text())
        if found is not None:
            return found
        if not self._fetch_slots.acquire(blocking=False):
            raise LoraBusyError(self.settings.max_fetches)
        with self._lock:
            self._fetches_in_flight += 1
        try:
            return fetch_request_lora(ref.location(), self.files, max_mb=self.settings.max_file_mb,
                                      deadline_s=self.settings.fetch_timeout_s,
                                      cancelled=flag.is_set if flag is not None else lambda: False,
                                      config=self.config)
        except FetchCancelled:
            raise
        except DiskFullError as exc:
            log.error("lora: %s: %s", ref.display, exc)
            raise HTTPException(507, f"loras[{index}]: {ref.display} could not be stored: {exc}") from None
        except ConversionError as exc:  # refused, not found, too large, unreachable, too slow: the path's problem
            raise LoraRequestError(index, f"{ref.display}: cannot be fetched: {exc}", "lora_fetch") from None
        finally:
            with self._lock:
                self._fetches_in_flight -= 1
            self._fetch_slots.release()

    def _lookup(self, key: str, on_volume: bool) -> LoraWeights | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is not None and on_volume:
            self.files.touch(self.files.entry(key))  # the volume's least-recently-used order, across runners
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
