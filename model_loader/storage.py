"""What kind of file system a pack is on, and how to read a pack from it (the read plan).

The plan is chosen from the file system (``statfs``) and how much of the file is in the page cache,
with the caller's settings winning. Measured on a real JuiceFS volume with ``bench/volume.py`` and
``bench/read_patterns.py`` (docs/BENCHMARKS.md; 1 GB pack, 2-core VM):

- **local disk**: the kernel's readahead serves any pattern; a private mapping walked by a few
  threads reads a cold pack fastest and costs concurrent imports the least. Threads share a grid
  of chunks from one descriptor.
- **FUSE** (fal's ``/data`` is JuiceFS): the mount's readahead follows each open file handle, so
  chunks interleaved on one shared descriptor, or page faults scattered over a mapping, look random
  to it: the local-disk plan read 0.49 GB/s from the node tier at 3.6 CPU-s per GB (ours and the
  mount's). Each thread opens its own descriptor and reads one contiguous part in order, a whole
  chunk (32 MiB) per read: 1.20 GB/s at 1.56 CPU-s per GB. 1 MiB reads were as fast alone but 1.7x
  slower beside a busy Python thread (the imports), each read taking the GIL back once more. A pack
  to be mapped is read that way into the page cache (hashed as it passes) and then mapped, so its
  memory stays the page cache's as on a local disk; a pack read into owned memory
  (``MODEL_LOADER_MAP=hot`` or ``never``) or into the CUDA staging buffers is read the same way
  with O_DIRECT, which measured the same rate and CPU.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

FUSE_SUPER_MAGIC = 0x65735546
# statfs magic numbers of network file systems, whose clients also read ahead per open file.
_NETWORK_MAGICS = {
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x00C36400: "ceph",
    0x6B414653: "afs",
}
# A file at least this resident is "in the page cache": mapped, and read with fewer threads.
HOT_FRACTION = 0.9


@dataclass(frozen=True)
class Storage:
    """The file system under a path: ``kind`` is ``local``, ``fuse`` or ``network``; ``name`` is
    its type as the kernel names it (``fuse.juicefs``, ``ext4``, ...), when known."""

    kind: str
    name: str = ""

    @property
    def reads_ahead_per_handle(self) -> bool:
        """Whether sequential reads need their own descriptor each to be seen as sequential."""
        return self.kind in ("fuse", "network")


class _Statfs(ctypes.Structure):
    # struct statfs on Linux (64-bit): f_type first; the rest is not read.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]


def _statfs_type(path: str) -> int | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = _Statfs()
        if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
            return None
        return buf.f_type & 0xFFFFFFFF
    except (OSError, AttributeError):
        return None


def _mount_type(path: str) -> str:
    """The file system type of the mount holding ``path`` from /proc/self/mountinfo ('' if unknown)."""
    try:
        real = os.path.realpath(path)
        best, best_type = "", ""
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mnt = fields[4].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, best_type = mnt, right.split()[0]
        return best_type
    except OSError:
        return ""


def storage_of(path: str | os.PathLike[str]) -> Storage:
    """The :class:`Storage` of ``path`` (``local`` when it cannot be told)."""
    path = os.fspath(path)
    magic = _statfs_type(path)
    if magic == FUSE_SUPER_MAGIC:
        return Storage("fuse", _mount_type(path) or "fuse")
    if magic in _NETWORK_MAGICS:
        return Storage("network", _NETWORK_MAGICS[magic])
    return Storage("local", _mount_type(path))


def cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 4


@dataclass(frozen=True)
class ReadPlan:
    """How one file is read: mapped or read into owned memory, by how many threads, in which
    layout (``grid``: chunks handed out in file order from one descriptor; ``split``: each thread
    its own descriptor and one contiguous part), and O_DIRECT (None: for chunks not cached)."""

    mapped: bool
    threads: int
    layout: str
    direct_io: bool | None
    storage: Storage
    prefetch: bool = False  # mapped, after the threads have read the file into the page cache


def default_threads(resident: float = 0.0, mapped: bool = False, storage: Storage | None = None) -> int:
    """Reader threads for a file of which ``resident`` (0..1) is in the page cache.

    Reading from a local disk wants I/O queue depth, so more threads than cores (at most 16); a
    file in the page cache is a memory copy, where threads beyond the cores only contend. A mapped
    file is read by the kernel's readahead and only hashed by the threads: one more thread than
    cores when cold, one fewer when hot. More only deepens the I/O queue and takes the CPU from the
    imports these reads overlap (on the 2-core VM of docs/BENCHMARKS.md, 8 threads made ``import
    torch`` 2-3x slower for 10 % more read rate). On FUSE each thread is one sequential stream for
    the mount to read ahead: 2 per core (4 at least, 16 at most).
    """
    n = cpus()
    hot = resident >= HOT_FRACTION
    if mapped:
        return max(1, n - 1) if hot else n + 1
    if hot:
        return min(16, max(2, n))
    if storage is not None and storage.reads_ahead_per_handle:
        return min(16, max(4, 2 * n))
    return min(16, max(8, 2 * n))


def plan_read(
    storage: Storage,
    resident: float,
    *,
    threads: int | None = None,
    mapping: str | None = None,
    layout: str | None = None,
    direct_io: bool | None = None,
    can_map: bool = True,
) -> ReadPlan:
    """The plan for a file on ``storage`` of which ``resident`` is in the page cache. Each setting
    given wins over what the storage suggests: ``mapping`` (``always``, ``hot``, ``never``; None
    means ``always``), ``layout``, ``threads``, ``direct_io``. ``can_map`` is False where the bytes must
    land elsewhere (the CUDA staging buffers).

    On FUSE a cold file that is to be mapped is first read into the page cache by the reader
    threads, each through its own descriptor (``prefetch``): walking a mapping of it would look
    random to the mount."""
    per_handle = storage.reads_ahead_per_handle
    hot = resident >= HOT_FRACTION
    if mapping is None:
        mapping = "always"
    if direct_io is True:
        mapping = "never"
    mapped = can_map and (mapping == "always" or (mapping == "hot" and hot))
    prefetch = mapped and per_handle and not hot
    if layout is None:
        layout = "split" if per_handle and (prefetch or not mapped) else "grid"
    if threads is None:
        threads = default_threads(resident, mapped and not prefetch, storage)
    return ReadPlan(mapped, threads, layout, direct_io, storage, prefetch)
