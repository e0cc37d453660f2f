"""An advisory lock file per store entry, and whether the owner of a leftover is still alive.

The lock only avoids duplicate work: ``flock`` is released by the kernel when its holder dies,
so a killed runner never blocks the next one, and the store stays correct where locks are not
honoured (each builder works in its own directory; publication is one atomic rename).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from .errors import StoreError

log = logging.getLogger("conversion.store")

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def host_tag() -> str:
    """This machine's name, safe inside a file name (no dots or separators)."""
    name = socket.gethostname() or "host"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """``with FileLock(path, what, timeout_s):`` holds an exclusive ``flock`` on ``path``.

    Waits (polling, so it can time out and say who it waits for) up to ``timeout_s`` seconds,
    then raises StoreError. On a filesystem without working locks it logs a warning and goes on.
    """

    def __init__(self, path: Path, what: str, timeout_s: float = 3 * 3600.0) -> None:
        self.path = Path(path)
        self.what = what
        self.timeout_s = timeout_s
        self._fd: int | None = None
        self.waited_s = 0.0

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        t0 = time.monotonic()
        delay, told = 0.05, False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno in _UNSUPPORTED:
                        log.warning("store: file locks do not work on %s (%s); going on without the lock",
                                    self.path.parent, exc.strerror)
                        break
                    raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
                waited = time.monotonic() - t0
                if not told:
                    log.info("store: waiting for another runner building %s (%s)", self.what, self._holder(fd))
                    told = True
                if waited > self.timeout_s:
                    raise StoreError(
                        f"gave up waiting {waited:.0f} s for the lock on {self.what} ({self._holder(fd)}); "
                        f"if no runner is building it, remove {self.path}"
                    )
                time.sleep(delay)
                delay = min(delay * 1.5, 1.0)
        except BaseException:
            os.close(fd)
            raise
        self.waited_s = time.monotonic() - t0
        self._fd = fd
        self._write_holder(fd)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _write_holder(fd: int) -> None:
        """Record who holds the lock, for the message of a runner that waits (best effort)."""
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{host_tag()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        except OSError:
            pass

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        return f"held by {text}" if text else "holder unknown"
