"""File-system durability, in one place: temporary names, atomic writes, fsync, a full disk.

- Every temporary file or directory is named ``.<name>.<host>.<pid>.<rand>.<purpose>`` beside
  its final place (``purpose``: ``tmp`` for what is being written, ``work`` for scratch,
  ``trash`` for what was moved aside), so one function recognises all of them and knows
  whether their owner still lives.
- A file becomes visible only complete: written under a temporary name, fsynced, renamed, and
  the directory fsynced.
- A write that fails for lack of space (or quota, or a file-size limit) is a DiskFullError.

Stdlib only: the warm-start path uses it before torch is imported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from .errors import ConversionError, DiskFullError

Purpose = Literal["tmp", "work", "trash"]
_PURPOSES = ("tmp", "work", "trash")
# A full disk, an exceeded quota, a file-size limit (RLIMIT_FSIZE).
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# safetensors raises SafetensorError("Error while serializing: I/O error: ... (os error 28)").
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]{8})\.(?P<purpose>tmp|work|trash)$")


# ---------------------------------------------------------------------------------------------
# Temporary names


def host_tag() -> str:
    """This machine's name, safe inside a file name (no dots or separators)."""
    name = os.uname().nodename or "host"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]


def temp_path(path: str | os.PathLike[str], purpose: Purpose = "tmp") -> Path:
    """A fresh temporary name beside ``path``, private to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_tag()}.{os.getpid()}.{secrets.token_hex(4)}.{purpose}")


@dataclass(frozen=True)
class TempName:
    """What a temporary name says: the final name, its owner (host, pid) and its purpose."""

    name: str
    host: str
    pid: int
    purpose: Purpose

    def owner_dead(self) -> bool:
        """Whether the owner is a process of this machine that no longer exists."""
        return self.host == host_tag() and not pid_alive(self.pid)


def parse_temp_name(name: str) -> TempName | None:
    """The parts of a name made by ``temp_path``, or None for any other name."""
    m = _TEMP_NAME.match(name)
    if m is None:
        return None
    return TempName(m["name"], m["host"], int(m["pid"]), m["purpose"])  # type: ignore[arg-type]


def is_temp_name(name: str) -> bool:
    """A temporary file of ours, or of flashpack's writer (``.packtmp_*``)."""
    return parse_temp_name(name) is not None or name.startswith(".packtmp_")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# fsync


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make a file's contents durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``path`` (before the rename that publishes it)."""
    for dirpath, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


# ---------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: <write tmp>``: ``p`` appears complete (fsynced, renamed,
    directory fsynced) when the block ends, or not at all. A failed write raises the project's
    error for it (DiskFullError for a full disk); the temporary file never stays behind."""
    path = Path(path)
    tmp = temp_path(path)
    with write_errors(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.chmod(tmp, 0o644)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """``with write_errors(p): <write p>``: an OS write failure in the block (an OSError, or the
    errno in safetensors' SafetensorError) becomes the project's error for it (:func:`write_error`)."""
    try:
        yield
    except Exception as exc:
        error = write_error(exc, path)
        if error is None:
            raise
        raise error from exc


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: Literal["wb", "w"] = "wb") -> Iterator[IO]:
    """``with atomic_file(p) as f: f.write(...)``: the open-file form of ``atomic_path``."""
    with atomic_path(path) as tmp, open(tmp, "x" + mode[1:], **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically and durably (see ``atomic_file``)."""
    with atomic_file(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename the finished directory ``tmp`` to ``target`` (which must not exist) and make it
    durable; ``ConversionError`` when someone else created ``target`` meanwhile."""
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ConversionError(f"{target}: created by someone else meanwhile") from exc
        raise
    fsync_dir(target.parent)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a directory tree, or a file or symlink itself (never what a symlink points to)."""
    with contextlib.suppress(OSError):  # gone already, or not ours to remove: best effort
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


# ---------------------------------------------------------------------------------------------
# A full disk


def os_error_code(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one safetensors puts in its message."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError" and (match := _OS_ERROR_CODE.search(str(exc))):
        return int(match.group(1))
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError or a SafetensorError) reports a full disk, quota or file-size limit."""
    return os_error_code(exc) in NO_SPACE_ERRNOS


def disk_full_error(exc: BaseException, what: str, where: str | os.PathLike[str]) -> DiskFullError | None:
    """``DiskFullError("no space left <what> (<reason>); free space on <where> and retry")`` when
    ``exc`` reports a full disk, else None."""
    if not is_disk_full(exc):
        return None
    return DiskFullError(f"no space left {what} ({os.strerror(os_error_code(exc) or 0)}); free space on {where} and retry")


def write_error(exc: BaseException, path: str | os.PathLike[str]) -> ConversionError | None:
    """The project's error for a failed write of ``path``, or None when ``exc`` is no OS write error
    (or is one of ours already): a full disk is DiskFullError, anything else (permission denied,
    read-only filesystem) "cannot write <path>: <reason>"."""
    if isinstance(exc, ConversionError):
        return None
    code = os_error_code(exc)
    if code is None:
        return None
    if code in NO_SPACE_ERRNOS:
        return DiskFullError(f"no space left writing {path} ({os.strerror(code)}); free space there and retry")
    return ConversionError(f"cannot write {path}: {os.strerror(code).lower()}")
