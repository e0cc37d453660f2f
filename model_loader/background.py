"""Reads of packs in the background: the load's first leg, started before the heavy imports.

The app calls :func:`start_pack_reads` as soon as it knows which packs it will load, before
torch, diffusers and transformers are imported and while the modules are built on the meta
device; :func:`model_loader.load_pipeline` then takes each pack's result from the returned
:class:`PackReads`. For the CPU a pack lands in host memory
(:func:`model_loader.host_read.read_file`, torch-free); for another device it goes straight there
through :func:`model_loader.reader.read_pack`, which is imported only then (it needs torch).

Torch-free: importing this module, and reading packs for the CPU, never imports torch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from .checksum import Checksum
from .config import LoaderConfig
from .host_read import read_file


class PackReads:
    """Jobs that read packs, run one after another in a background thread, in the order given
    (each job uses the reader's own threads). ``result(name)`` waits for one and returns its
    value or raises its error; ``cancel()`` drops the jobs not started yet."""

    def __init__(self, jobs: Iterable[tuple[str, Callable[[], Any]]]):
        self._jobs = list(jobs)
        self._futures: dict[str, Future] = {name: Future() for name, _ in self._jobs}
        self.started = time.perf_counter()
        self.finished: float | None = None  # when the last job ended
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model_loader-pack-reads", daemon=True)
        self._thread.start()

    def __contains__(self, name: object) -> bool:
        return name in self._futures

    @property
    def names(self) -> list[str]:
        """The jobs' names, in the order they run."""
        return list(self._futures)

    def _run(self) -> None:
        for name, job in self._jobs:
            future = self._futures[name]
            if self._cancelled.is_set() or not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - raised again by result()
                future.set_exception(exc)
        self.finished = time.perf_counter()

    def result(self, name: str) -> Any:
        """Wait for job ``name``; its value, or its error raised here."""
        return self._futures[name].result()

    def cancel(self) -> None:
        """Stop after the job in progress; results already read are dropped with this object."""
        self._cancelled.set()
        for future in self._futures.values():
            future.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every job has ended (or was cancelled); False if ``timeout`` passed first."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def start_pack_reads(
    packs: Iterable[tuple[str, str | os.PathLike[str], Checksum | None]],
    device: str = "cpu",
    config: LoaderConfig | None = None,
) -> PackReads:
    """Start reading ``(name, path, checksum)`` packs for ``device`` in the background, in order.

    For the CPU each result is a :class:`~model_loader.host_read.HostFile` (torch is not needed
    until it is consumed); for other devices a ``reader.PackData`` already on the device. For CUDA
    the pinned staging buffers are reserved first (pinned in the background, see
    :func:`reader.reserve_staging`). ``config`` (by default the environment, read once here)
    applies to every read started.
    """
    if config is None:
        config = LoaderConfig.from_env()
    packs = list(packs)
    if device.startswith("cuda"):
        from .reader import reserve_staging  # torch: only for a GPU

        reserve_staging([os.path.getsize(path) for _, path, _ in packs], config)
    return PackReads((name, _job(path, checksum, device, config)) for name, path, checksum in packs)


def _job(path: str | os.PathLike[str], checksum: Checksum | None, device: str, config: LoaderConfig
         ) -> Callable[[], Any]:
    """The read of one pack: into host memory for the CPU, else onto ``device``."""
    if device == "cpu":
        return lambda: read_file(path, checksum, config=config)

    def to_device() -> Any:
        from .reader import read_pack  # torch, imported by the background thread

        return read_pack(path, device, checksum, config=config)

    return to_device
