"""The CUDA path's read half on the host: model_loader's staged pipeline with a host copy in place
of the host-to-device copy, so the storage leg of a GPU start is measured without a GPU.

``read_pack(path, engine=HostCopyEngine(), pool=host_pool())`` runs what a CUDA load runs (grid
chunks read into staging buffers leased from a pool, each queued for an asynchronous copy on its
thread's stream, a buffer refilled only once its copy has landed), with a thread per stream doing
``dst.copy_(src)`` into host memory where the GPU's copy engine would DMA into device memory. The
difference: a host copy costs CPU the DMA would not (about 10 GB/s of memcpy per core).
"""

from __future__ import annotations

import queue
import threading

import torch


class HostCopyEngine:
    """A :class:`model_loader.reader.StagingEngine` whose device is host memory: every stream is a
    thread running its queued copies in order, every event a :class:`threading.Event`."""

    def __init__(self) -> None:
        self._streams: list[queue.SimpleQueue] = []
        self._lock = threading.Lock()

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype)

    def begin(self) -> None:
        pass

    def start_thread(self) -> None:
        pass

    def new_stream(self) -> queue.SimpleQueue:
        q: queue.SimpleQueue = queue.SimpleQueue()

        def run() -> None:
            while (job := q.get()) is not None:
                job()

        threading.Thread(target=run, name="host-copy-stream", daemon=True).start()
        with self._lock:
            self._streams.append(q)
        return q

    def new_event(self) -> threading.Event:
        event = threading.Event()
        event.set()
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: queue.SimpleQueue, event: threading.Event) -> None:
        event.clear()

        def job() -> None:
            dst.copy_(src)
            event.set()

        stream.put(job)

    def is_done(self, event: threading.Event) -> bool:
        return event.is_set()

    def wait(self, event: threading.Event) -> None:
        event.wait()

    def finish(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for q in streams:
            done = threading.Event()
            q.put(done.set)
            done.wait()

    def close(self) -> None:
        """Stop the stream threads (after :meth:`finish`)."""
        with self._lock:
            streams, self._streams = self._streams, []
        for q in streams:
            q.put(None)


def host_pool():
    """A staging pool of plain (unpinned) host buffers: pinning needs CUDA."""
    from model_loader.pinned import PinnedPool

    return PinnedPool(allocate=lambda n: torch.empty(n, dtype=torch.uint8), release_freed=lambda: None)


def read_pack_staged(path: str, **options):
    """``model_loader.read_pack`` through the staged pipeline on the host; returns its PackData."""
    from model_loader import read_pack

    engine = HostCopyEngine()
    try:
        return read_pack(path, "cpu", engine=engine, pool=host_pool(), **options)
    finally:
        engine.finish()
        engine.close()
