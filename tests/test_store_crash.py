"""A runner killed with SIGKILL at random moments (downloading, converting, verifying,
renaming) never leaves an entry a reader could load half of, and the next run always ends
with a verified entry."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conversion.config import ConversionConfig
from conversion.download import hub_cache_dir
from conversion.manifest import VerificationError, verify_converted
from conversion.store import STORE_DIRNAME, ensure_converted
from tests.hub_server import HubRepo, HubServer, use_hub
from tests.tiny_models import make_tiny_sd

FORK = multiprocessing.get_context("fork")
SOURCE = "org/tiny-sd"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


def _convert(root: str) -> None:
    torch.set_num_threads(1)  # no OpenMP pool inherited across fork
    ensure_converted(SOURCE, root=root)


class Reader(threading.Thread):
    """Loads the published entry over and over, the way a starting runner would check it."""

    def __init__(self, entry: Path) -> None:
        super().__init__(daemon=True)
        self.entry = entry
        self.gate = threading.Lock()  # held by the test while it deletes the entry on purpose
        self.stop = threading.Event()
        self.checks = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            with self.gate:
                if self.entry.exists():
                    try:
                        verify_converted(self.entry, full=True)
                        self.checks += 1
                    except VerificationError as exc:
                        self.failures.append(str(exc))
            time.sleep(0.05)


@pytest.mark.timeout(600)  # a dozen fsync-heavy conversions: slow when the disk is busy
def test_sigkill_at_random_moments_never_publishes_a_partial_entry(tiny_sd, tmp_path, monkeypatch):
    root = tmp_path / "volume"
    rng = random.Random(20240611)
    with HubServer([HubRepo.from_dir(SOURCE, tiny_sd)]) as hub:
        use_hub(monkeypatch, hub, tmp_path / "hf-home")
        t0 = time.monotonic()
        entry = ensure_converted(SOURCE, root=root)
        download_and_convert_s = time.monotonic() - t0
        shutil.rmtree(entry)
        t0 = time.monotonic()
        ensure_converted(SOURCE, root=root)
        convert_s = time.monotonic() - t0
        reader = Reader(entry)
        reader.start()
        kills = 0
        deadline = time.monotonic() + 20
        try:
            while kills < 12 and (kills < 8 or time.monotonic() < deadline):
                with reader.gate:  # start every round with something left to do
                    shutil.rmtree(entry, ignore_errors=True)
                    download = kills % 3 == 0
                    if download:
                        shutil.rmtree(hub_cache_dir(root, ConversionConfig.from_env()), ignore_errors=True)
                proc = FORK.Process(target=_convert, args=(str(root),))
                proc.start()
                time.sleep(rng.uniform(0.0, download_and_convert_s if download else convert_s))
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)
                kills += 1
                path = ensure_converted(SOURCE, root=root)  # the next runner
                assert path == entry
                verify_converted(path, full=True)
                leftovers = [p.name for p in (root / STORE_DIRNAME).iterdir() if p.name.startswith((".tmp-", ".work-", ".trash-"))]
                assert leftovers == [], f"after kill {kills}: {leftovers}"
                seen = reader.checks
                until = time.monotonic() + 2
                while reader.checks == seen and time.monotonic() < until:  # let it load this one too
                    time.sleep(0.02)
        finally:
            reader.stop.set()
            reader.join(10)
    assert reader.failures == []
    assert reader.checks >= kills
