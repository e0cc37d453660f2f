"""The store as runners on two machines see it: one real JuiceFS volume (bench/volume.py) mounted
twice, ``a`` and ``b``, as two fal hosts mount ``/data``.

Every runner is a process forked from the test (torch and diffusers come imported) into a UTS
namespace of its own named ``host-a`` or ``host-b``, so ``conversion.durable.host_tag()`` (the host
in lock notes and temporary names) differs between the mounts as it does between machines; the
process ids stay those of this machine, which a single host's own cleanup relies on. Both hosts use
the same store directory, each through its own mount, and build the same local source (a tiny
Stable Diffusion pipeline on this machine's disk). Conversions are counted by a wrapper around
``conversion.convert.convert_pipeline`` that appends one line per call to a file outside the volume.

Skipped, with the reason, where the machine cannot mount JuiceFS (no FUSE, not root, no nginx).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import multiprocessing
import os
import queue
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import conversion.convert
from conversion.config import ConversionConfig
from conversion.dtypes import dtype_key
from conversion.durable import host_tag, parse_temp_name
from conversion.manifest import VerificationError, verify_converted
from conversion.sources import parse_source
from conversion.store import STORE_DIRNAME, Store, ensure_converted

FORK = multiprocessing.get_context("fork")
CLONE_NEWUTS = 0x04000000
HOSTS = {"a": "host-a", "b": "host-b"}
RESULT_TIMEOUT_S = 90
ATTR_CACHE_S = 1.2  # JuiceFS keeps names and attributes 1 s (--attr-cache, --entry-cache)
IMAGE_CALL = dict(num_inference_steps=1, height=64, width=64, output_type="pt")


# ---------------------------------------------------------------------------------------------
# Hosts, runners, the shared store


def _become(host: str) -> None:
    """Give this (forked) process a UTS namespace of its own, named ``host``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUTS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUTS): {os.strerror(err)}")
    socket.sethostname(host)


def _run_on_host(host: str, results, log_path: str, target: Callable, args: tuple) -> None:
    try:
        _become(host)
        torch.set_num_threads(1)  # no OpenMP pool inherited across fork
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        for name in ("conversion", "model_loader"):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.INFO)
        results.put(("ok", target(*args)))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))


class Runner:
    """A process on host ``a`` or ``b`` running ``target(*args)``; its log says what the store did."""

    def __init__(self, mount: str, target: Callable, *args, logs: Path, name: str) -> None:
        logs.mkdir(exist_ok=True)
        self.name = name
        self.log_path = logs / f"{name}.log"
        self.queue = FORK.Queue()
        self.proc = FORK.Process(target=_run_on_host, args=(HOSTS[mount], self.queue, str(self.log_path), target, args))
        self.proc.start()

    def result(self, timeout: float = RESULT_TIMEOUT_S):
        """What ``target`` returned; fails the test, with the runner's log, if it raised or died."""
        deadline = time.monotonic() + timeout
        while True:
            alive = self.running()
            try:
                status, value = self.queue.get(timeout=0.2 if alive else 2)  # what it sent before it exited
                break
            except queue.Empty:
                assert alive, f"{self.name} died ({self.proc.exitcode}) without a result\n{self.log()}"
                assert time.monotonic() < deadline, f"{self.name}: no result in {timeout:g} s\n{self.log()}"
        self.proc.join(30)
        assert status == "ok", f"{self.name}: {value}\n{self.log()}"
        return value

    def wait_to_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.running() and time.monotonic() < deadline, f"{self.name} did not log {text!r}\n{self.log()}"
            time.sleep(0.02)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)

    def running(self) -> bool:
        return self.proc.is_alive()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.is_alive():
            self.kill()


@pytest.fixture
def runners(tmp_path):
    """``start(mount, target, *args)``: a Runner; every runner still alive at the end is killed."""
    started: list[Runner] = []

    def start(mount: str, target: Callable, *args) -> Runner:
        runner = Runner(mount, target, *args, logs=tmp_path / "logs", name=f"{len(started)}-{HOSTS[mount]}")
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.stop()


@pytest.fixture(scope="module")
def imported(juicefs_volume):
    """Import the loader and diffusers' pipeline once here (where the volume can be mounted), so the
    forked runners start with them."""
    from diffusers import StableDiffusionPipeline  # noqa: F401

    import model_loader.pipeline  # noqa: F401


@pytest.fixture
def roots(juicefs_volume, request) -> dict[str, Path]:
    """One data root on the volume for this test, as mount ``a`` and mount ``b`` see it."""
    name = request.node.name.replace("[", "-").replace("]", "")
    (juicefs_volume.mount("a") / name).mkdir()
    return {m: juicefs_volume.mount(m) / name for m in HOSTS}


class Conversions:
    """Counts calls of convert_pipeline in every runner: one ``<host> <pid> start|end <time>`` line each."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def note(self, what: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{host_tag()} {os.getpid()} {what} {time.time():.6f}\n")

    def lines(self, what: str = "start") -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split() for line in self.path.read_text().splitlines() if line.split()[2] == what]

    def hosts(self) -> list[str]:
        """The host of each conversion started, in order."""
        return [line[0] for line in self.lines("start")]

    def wait_for(self, n: int, what: str = "start", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines(what)) < n:
            assert time.monotonic() < deadline, f"{n} conversion(s) did not {what} within {timeout:g} s: {self.lines()}"
            time.sleep(0.02)


@pytest.fixture
def conversions(tmp_path, monkeypatch) -> Conversions:
    """convert_pipeline counted, in this process and in every runner forked after this fixture."""
    counter = Conversions(tmp_path / "conversions.log")
    real = conversion.convert.convert_pipeline
    counter.before = None  # a hook a test may set: runs in the runner before the real conversion

    def counted(*args, **kwargs):
        counter.note("start")
        if counter.before is not None:
            counter.before()
        out = real(*args, **kwargs)
        counter.note("end")
        return out

    monkeypatch.setattr(conversion.convert, "convert_pipeline", counted)
    return counter


def listing(root: Path) -> list[str]:
    """Names in the store directory other than its bookkeeping (.locks, .refs)."""
    return sorted(p.name for p in (root / STORE_DIRNAME).iterdir() if p.name not in (".locks", ".refs"))


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` by relative name: what a runner loading it reads."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def entry_path(src: Path, root: Path, dtype: str | None = None) -> Path:
    """Where the store under ``root`` publishes ``src`` converted to ``dtype``."""
    store, source = Store(root, ConversionConfig.from_env()), parse_source(str(src))
    return store.entry(source, source.offline_identity(store), dtype_key(dtype)[1]).path


def _ensure(src: str, root: Path, dtype: str | None = None) -> tuple[str, float, dict[str, str]]:
    """A runner's cold or warm start: the entry's name, when it was ready, its files."""
    path = ensure_converted(src, root=root, dtype=dtype)
    assert path.parent == root / STORE_DIRNAME
    return path.name, time.time(), file_hashes(path)


def _sleep(seconds: float) -> Callable[[], None]:
    return lambda: time.sleep(seconds)


# ---------------------------------------------------------------------------------------------
# 1. Cold starts on both hosts at once


def _cold_start(start, src: str, root: Path) -> tuple[str, dict[str, str], str]:
    """Wait for the signal, get the entry, load it with the project's loader and make one image."""
    from model_loader import load_pipeline

    assert start.wait(30)
    path = ensure_converted(src, root=root)
    files = file_hashes(path)
    image = load_pipeline(path)("a photo of a cat", generator=torch.Generator().manual_seed(0), **IMAGE_CALL).images
    return path.name, files, hashlib.sha256(image.numpy().tobytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_four_cold_starters_on_each_host_convert_once_and_all_serve_the_same_image(
    imported, tiny_sd_dir, roots, conversions, runners
):
    start = FORK.Event()
    group = [runners(m, _cold_start, start, str(tiny_sd_dir), roots[m]) for m in ("a", "b") for _ in range(4)]
    start.set()
    results = [r.result(timeout=150) for r in group]
    assert len(conversions.hosts()) == 1 and conversions.hosts()[0] in HOSTS.values()
    name = results[0][0]
    assert [r[0] for r in results] == [name] * 8  # the same entry, through either mount
    assert all(r[1] == results[0][1] for r in results)  # the same bytes
    assert len({r[2] for r in results}) == 1  # the same image, pixel for pixel
    verify_converted(roots["b"] / STORE_DIRNAME / name, full=True)
    assert listing(roots["a"]) == listing(roots["b"]) == [name]


# ---------------------------------------------------------------------------------------------
# 2. A builder killed mid-conversion on one host, finished by the other


class Reader:
    """A process on host ``mount`` that, until stopped, verifies (in full) each of ``paths`` every
    time it exists; returns, for each, how many times it verified it and when it first saw it,
    and every failure."""

    def __init__(self, runners, mount: str, paths: list[Path], interval_s: float) -> None:
        self.stop_event = FORK.Event()
        self.runner = runners(mount, _read_while_published, [str(p) for p in paths], self.stop_event, interval_s)

    def finish(self) -> tuple[dict[str, int], dict[str, float], list[str]]:
        self.stop_event.set()
        return self.runner.result()


def _read_while_published(paths: list[str], stop, interval_s: float):
    checks = dict.fromkeys(paths, 0)
    first_seen: dict[str, float] = {}
    failures: list[str] = []
    last = False
    while not last:
        last = stop.is_set()  # one more round after the stop: every entry once more, now published
        for path in paths:
            if os.path.exists(path):
                first_seen.setdefault(path, time.time())
                try:
                    verify_converted(path, full=True)
                    checks[path] += 1
                except (VerificationError, OSError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
        if interval_s:
            time.sleep(interval_s)
    return checks, first_seen, failures


@pytest.mark.slow
def test_builder_killed_mid_conversion_on_one_host_is_taken_over_by_the_other_without_a_partial_entry(
    imported, tiny_sd_dir, roots, conversions, runners, monkeypatch, tmp_path
):
    """a's builder stops after its first pack (a hook in the pack writer) and is SIGKILLed while b
    waits for its lock; readers on both hosts verify the entry every time it exists."""
    halfway = tmp_path / "halfway"
    real_write_pack = conversion.convert.write_pack

    def stall_after_first_pack_on_a(*args, **kwargs):
        out = real_write_pack(*args, **kwargs)
        if host_tag() == HOSTS["a"]:
            halfway.write_text(str(args[2]))
            time.sleep(300)  # until killed
        return out

    monkeypatch.setattr(conversion.convert, "write_pack", stall_after_first_pack_on_a)
    entry = {m: entry_path(tiny_sd_dir, roots[m]) for m in HOSTS}
    readers = [Reader(runners, m, [entry[m]], interval_s=0.01) for m in HOSTS]  # on both hosts
    a = runners("a", _ensure, str(tiny_sd_dir), roots["a"])
    deadline = time.monotonic() + 60
    while not halfway.exists():
        assert a.running() and time.monotonic() < deadline, a.log()
        time.sleep(0.02)
    b = runners("b", _ensure, str(tiny_sd_dir), roots["b"])
    b.wait_to_log(f"waiting for another runner building {tiny_sd_dir} (held by host-a pid {a.proc.pid} since")
    assert conversions.hosts() == ["host-a"]
    a.kill()
    name, _, files = b.result()
    seen = [reader.finish() for reader in readers]

    assert conversions.hosts() == ["host-a", "host-b"]
    for (checks, _, failures), m in zip(seen, HOSTS, strict=True):
        assert failures == [] and checks[str(entry[m])] >= 1
    assert name == entry["b"].name and files == file_hashes(entry["a"])
    verify_converted(entry["a"], full=True)
    # a's private build is left as it was killed: one pack written, no manifest. b keeps it, as it
    # keeps any builder's on another host until it has been silent for hours...
    leftover, published = listing(roots["b"])
    assert published == name
    temp = parse_temp_name(leftover)
    assert (temp.name, temp.host, temp.pid, temp.purpose) == (name, "host-a", a.proc.pid, "tmp")
    partial = roots["a"] / STORE_DIRNAME / leftover
    assert sorted(p.relative_to(partial) for p in partial.rglob("*.flashpack")) == [
        Path(halfway.read_text()).relative_to(partial)]
    assert not (partial / "flashpack_manifest.json").exists()
    # ...and host a's next cleanup removes it at once: its builder, a pid of host a, is dead.
    runners("a", Store(roots["a"], ConversionConfig.from_env()).cleanup_stale).result()
    assert listing(roots["b"]) == [name]


# ---------------------------------------------------------------------------------------------
# 3. The lock across mounts, and correctness without it


@pytest.mark.slow
def test_starter_on_one_host_waits_for_the_builder_holding_the_lock_on_the_other(
    imported, tiny_sd_dir, roots, conversions, runners
):
    conversions.before = _sleep(2.0)  # the builder holds the lock a while
    a = runners("a", _ensure, str(tiny_sd_dir), roots["a"])
    conversions.wait_for(1)
    b = runners("b", _ensure, str(tiny_sd_dir), roots["b"])
    name_a, _, files_a = a.result()
    name_b, ready_b, files_b = b.result()
    assert conversions.hosts() == ["host-a"]
    built_at = float(conversions.lines("end")[0][3])
    assert ready_b > built_at  # b had the entry only once a had built it
    assert (name_a, files_a) == (name_b, files_b)
    assert "waiting for another runner building" in b.log() and "(built by another runner; waited" in b.log()
    assert listing(roots["b"]) == [name_b]


def _flock_lies(fd, operation) -> None:
    """flock as a filesystem that ignores locks does it: every runner gets the lock at once."""


def _flock_fails(fd, operation) -> None:
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


def _ensure_with_flock(flock: Callable, src: str, root: Path):
    fcntl.flock = flock  # this runner only (a forked process)
    return _ensure(src, root)


def _both_started(counter: Conversions) -> Callable[[], None]:
    """A hook that holds each builder until two have started converting."""
    return lambda: counter.wait_for(2, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("flock", [_flock_lies, _flock_fails], ids=["lock-lies", "lock-fails"])
def test_without_a_working_lock_two_hosts_both_build_and_leave_one_verified_entry(
    imported, tiny_sd_dir, roots, conversions, runners, flock
):
    """flock that grants every runner the lock (a filesystem that lies), or fails (the store warns
    and goes on without it); a hook holds each builder until both are converting."""
    conversions.before = _both_started(conversions)
    a = runners("a", _ensure_with_flock, flock, str(tiny_sd_dir), roots["a"])
    b = runners("b", _ensure_with_flock, flock, str(tiny_sd_dir), roots["b"])
    name_a, _, files_a = a.result()
    name_b, _, files_b = b.result()
    assert sorted(conversions.hosts()) == ["host-a", "host-b"]  # both converted, concurrently
    assert (name_a, files_a) == (name_b, files_b)  # and both serve the one entry that was published
    verify_converted(roots["a"] / STORE_DIRNAME / name_a, full=True)
    assert listing(roots["a"]) == [name_a]  # the loser's copy is gone
    published_by = [r for r in (a, b) if "publish: " in r.log() and "by another runner first" not in r.log()]
    lost = [r for r in (a, b) if "was published by another runner first; using it" in r.log()]
    assert len(published_by) == 1 and len(lost) == 1, a.log() + b.log()
    if flock is _flock_fails:
        assert all("going on without the lock" in r.log() for r in (a, b))


# ---------------------------------------------------------------------------------------------
# 4. A reader on the other host, within JuiceFS's 1 s caches


@pytest.mark.slow
def test_reader_on_one_host_never_sees_half_an_entry_published_on_the_other(
    imported, tiny_sd_dir, roots, conversions, runners
):
    dtypes = ["float32", "float16", "bfloat16"]  # three entries, three publications
    paths = [entry_path(tiny_sd_dir, roots["b"], d) for d in dtypes]
    reader = Reader(runners, "b", paths, interval_s=0)  # as fast as it can
    ready = [runners("a", _ensure, str(tiny_sd_dir), roots["a"], dtype).result()[1] for dtype in dtypes]
    checks, first_seen, failures = reader.finish()
    assert failures == []
    assert all(checks[str(p)] >= 1 for p in paths), checks
    # b saw each entry within JuiceFS's cache time of its publication (it polled through all of it)
    assert all(first_seen[str(p)] - t < ATTR_CACHE_S for p, t in zip(paths, ready, strict=True)), (first_seen, ready)
    assert conversions.hosts() == ["host-a"] * 3


# ---------------------------------------------------------------------------------------------
# 5. A damaged entry seen from both hosts


@pytest.mark.slow
def test_damaged_entry_seen_by_starters_on_both_hosts_is_rebuilt_once(
    imported, tiny_sd_dir, roots, conversions, runners
):
    """Three rounds. The tiny model is rebuilt in well under JuiceFS's 1 s caches, so the starter
    that waited for the lock looks at the entry again while its host may still resolve the name to
    the damaged directory that the builder moved aside: it must judge the new one (and not move it
    aside and build a third time)."""
    name, _, good = runners("a", _ensure, str(tiny_sd_dir), roots["a"]).result()
    for _ in range(3):
        pack = roots["a"] / STORE_DIRNAME / name / "unet" / "model.flashpack"
        os.truncate(pack, pack.stat().st_size - 10)
        time.sleep(ATTR_CACHE_S)  # until host b sees the damage too
        built = len(conversions.hosts())
        start = FORK.Event()
        both = [runners(m, _when_started, start, str(tiny_sd_dir), roots[m]) for m in HOSTS]
        start.set()
        (name_a, inode_a, files_a), (name_b, inode_b, files_b) = (r.result() for r in both)
        assert len(conversions.hosts()) == built + 1  # one rebuild
        assert name_a == name_b == name and files_a == files_b
        assert files_a == {**good, "flashpack_manifest.json": files_a["flashpack_manifest.json"]}  # the same packs
        # Both were given the entry that is still published: neither was moved aside after it was returned.
        assert inode_a == inode_b == (roots["b"] / STORE_DIRNAME / name).stat().st_ino
        verify_converted(roots["b"] / STORE_DIRNAME / name, full=True)
        assert listing(roots["a"]) == [name]  # the damaged copy is gone


def _when_started(start, src: str, root: Path) -> tuple[str, int, dict[str, str]]:
    assert start.wait(30)
    path = ensure_converted(src, root=root)
    return path.name, path.stat().st_ino, file_hashes(path)
