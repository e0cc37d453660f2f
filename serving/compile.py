"""torch.compile of the denoiser, with inductor's cache kept on the persistent volume across starts.

Opt-in: ``[compile] enabled = true`` in fal.toml. :func:`compile_denoiser` opens the cache and
compiles the pipeline's unet or transformer in place (torch.compile is lazy: nothing compiles yet);
the warm-up that follows runs every served shape, which is where inductor compiles them, or finds
them in its FX graph cache; :meth:`InductorCache.publish` then saves what the warm-up wrote. On the
next start dynamo still traces the graph (seconds), but inductor and the C++/Triton compilers have
nothing left to do.

The idea is fal's ``fal.toolkit.synchronized_inductor_cache``: point ``TORCHINDUCTOR_CACHE_DIR``
at a local directory, unpack into it a zip an earlier start left on the volume, and zip the
directory back when the warm-up changed it. fal's helper is hard-wired to ``/data`` and
``/tmp/inductor-cache``, tells machines apart only by the GPU name nvidia-smi prints (every CPU is
"UNKNOWN"), detects changes by file names only, and raises when ``/data`` cannot be created (``fal
run --local`` as a user). Here the archive lives under ``$APP_DATA_ROOT/inductor-caches/`` and is
named by a digest of everything the compiled code depends on (:class:`CacheKey`: the device, torch,
Python, the store entry, the warm-up's shapes, the compile mode), so another GPU or CPU, torch
build, model, shape set or mode never unpacks a cache that is not its own. Inductor keys each graph
again (graph, inputs, torch, device), so even a foreign archive could not yield wrong kernels; the
key keeps archives small and apart.

Nothing heavy at import: torch is imported by the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from conversion.durable import atomic_path, parse_temp_name, remove_tree, temp_path
from conversion.errors import ConversionError
from serving.schema import preset_size
from serving.settings import AppSettings

log = logging.getLogger("serving.compile")

# Archives live in <data root>/<CACHE_DIR>/<device>/<store entry>-<digest>.zip.
CACHE_DIR = "inductor-caches"
# Bumped when what an archive holds, or how it is keyed, changes: older archives are then ignored.
CACHE_FORMAT = 1
# The variable inductor reads (at each use) for its cache directory.
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# The local directories inductor writes to: <system temp>/<LOCAL_DIR>/.<archive stem>.<host>.<pid>.<rand>.work
LOCAL_DIR = "flashpack-inductor"
# The pipeline attributes that hold the denoiser, in the order they are looked for.
DENOISERS = ("transformer", "unet")
# Compilers inductor needs: C++ for CPU kernels; a C compiler for Triton's launchers on CUDA.
_COMPILERS = {"cpu": ("g++", "c++", "clang++"), "cuda": ("gcc", "cc", "clang")}


class CompileError(RuntimeError):
    """[compile] is on but cannot work on this machine (no denoiser, no compiler)."""


@dataclass(frozen=True)
class CacheKey:
    """What the compiled code of one start depends on; equal keys may share inductor's cache."""

    device: str  # e.g. "cuda NVIDIA H100 80GB HBM3 sm_90 CUDA 12.8", "cpu x86_64 AMD EPYC 7B13 AVX2"
    torch: str  # torch.__version__ (its build tag names CPU or CUDA), and Triton's version on CUDA
    python: str
    entry: str  # the store entry's name: source, revision, variant, dtype and format in one
    shapes: tuple[tuple[int, int], ...]  # (width, height) of each warm-up size, sorted
    guided: bool  # classifier-free guidance at warm-up (it doubles the denoiser's batch)
    mode: str
    dynamic: bool

    def digest(self) -> str:
        """16 hex digits of sha256 over every field and :data:`CACHE_FORMAT`."""
        fields = {**asdict(self), "format": CACHE_FORMAT}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def archive(self, root: str | os.PathLike[str]) -> Path:
        """Where this key's archive lives under the data root."""
        device = re.sub(r"[^A-Za-z0-9.]+", "-", self.device).strip("-")[:80] or "device"
        return Path(root) / CACHE_DIR / device / f"{self.entry}-{self.digest()}.zip"


def cache_key(settings: AppSettings, *, store_path: str | os.PathLike[str], device: str) -> CacheKey:
    """The key of a start that serves ``store_path`` on ``device`` with ``settings``."""
    serving = settings.serving
    return CacheKey(
        device=device_identity(device),
        torch=torch_identity(device),
        python=platform.python_version(),
        entry=Path(store_path).name,
        shapes=tuple(sorted({preset_size(name, serving) for name in serving.warmup_sizes})),
        guided=serving.default_guidance_scale > 1,
        mode=settings.compile.mode,
        dynamic=settings.compile.dynamic,
    )


def device_identity(device: str) -> str:
    """The hardware compiled code is specific to: the GPU model and its compute capability, or the
    CPU model and the vector instructions torch uses on it."""
    import torch

    if device.startswith("cuda"):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda {torch.cuda.get_device_name(index)} sm_{major}{minor} CUDA {torch.version.cuda}"
    if device == "cpu":
        return f"cpu {platform.machine()} {cpu_model()} {torch.backends.cpu.get_cpu_capability()}"
    return device


def torch_identity(device: str) -> str:
    """torch's version (with its build tag), and Triton's when kernels are Triton's (CUDA)."""
    import torch

    if device.startswith("cuda"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"torch {torch.__version__} triton {version('triton')}"
        except PackageNotFoundError:
            pass
    return f"torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def denoiser(pipe: Any) -> tuple[str, Any]:
    """The name and module of the pipeline's denoiser (its transformer or unet)."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if module is not None:
            return name, module
    raise CompileError(f"[compile] is on, but the pipeline {type(pipe).__name__} has no {' or '.join(DENOISERS)} "
                       "to compile; set [compile] enabled = false")


def check_compiler(device: str) -> None:
    """Raise :class:`CompileError` unless a compiler inductor needs on ``device`` is on PATH."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind == "cpu" and device != "cpu":
        return  # mps and others: inductor brings what it needs, or fails in its own words
    names = _COMPILERS[kind]
    if not any(shutil.which(name) for name in names):
        raise CompileError(f"[compile] is on, but inductor needs a compiler on {device} and none of "
                           f"{', '.join(names)} is on PATH: install one (e.g. apt-get install g++) or set "
                           "[compile] enabled = false")


def compile_denoiser(pipe: Any, settings: AppSettings, *, root: str | os.PathLike[str],
                     store_path: str | os.PathLike[str], device: str) -> InductorCache | None:
    """Compile the denoiser in place inside this key's opened inductor cache (None when [compile]
    is off). The warm-up's calls compile each shape; call :meth:`InductorCache.publish` after it."""
    options = settings.compile
    if not options.enabled:
        return None
    name, module = denoiser(pipe)
    check_compiler(device)
    key = cache_key(settings, store_path=store_path, device=device)
    cache = InductorCache(key.archive(root)).open()
    module.compile(mode=options.mode, dynamic=options.dynamic)
    shapes = ", ".join(f"{w}x{h}" for w, h in key.shapes)
    log.info("compile: %s (mode %s, %s shapes: %s) on %s, %s; cache %s: %s", name, options.mode,
             "dynamic" if options.dynamic else "static", shapes, key.device, key.torch, cache.archive,
             f"{len(cache.found)} file(s) unpacked" if cache.found else "none yet, the warm-up compiles")
    return cache


class InductorCache:
    """Inductor's cache directory for one archive: a fresh local directory holding the archive's
    files while this process runs, saved back to the archive when the warm-up added to it."""

    def __init__(self, archive: str | os.PathLike[str], local_root: str | os.PathLike[str] | None = None) -> None:
        self.archive = Path(archive)
        self.local_root = Path(local_root) if local_root is not None else Path(tempfile.gettempdir()) / LOCAL_DIR
        self.directory: Path | None = None
        self.found: dict[str, int] = {}

    def open(self) -> InductorCache:
        """Unpack the archive (if any) into a new local directory and point inductor at it. A
        damaged archive is logged and ignored: this start compiles, and its publish() replaces it."""
        self.local_root.mkdir(parents=True, exist_ok=True)
        _remove_dead_directories(self.local_root)
        self.directory = temp_path(self.local_root / self.archive.stem, "work")
        self.directory.mkdir()
        if self.archive.is_file():
            try:
                with zipfile.ZipFile(self.archive) as archive:
                    archive.extractall(self.directory)  # names with .. or a leading / stay inside
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
                log.warning("compile: the cache %s cannot be read (%s): compiling from scratch; the warm-up's "
                            "cache replaces it", self.archive, exc)
                remove_tree(self.directory)
                self.directory.mkdir()
        self.found = listing(self.directory)
        os.environ[INDUCTOR_CACHE_ENV] = str(self.directory)
        return self

    def publish(self) -> int:
        """Save the directory to the archive (atomically) if the warm-up wrote new or changed files;
        their number. A failed save is logged, not raised: the app serves, the next start compiles."""
        if self.directory is None:
            raise RuntimeError("InductorCache.publish() before open()")
        now = listing(self.directory)
        changed = sorted(name for name, size in now.items() if self.found.get(name) != size)
        if not changed:
            log.info("compile: nothing compiled, every graph came from %s (%d file(s))", self.archive, len(now))
            return 0
        try:
            with atomic_path(self.archive) as tmp, zipfile.ZipFile(tmp, "x", zipfile.ZIP_DEFLATED) as archive:
                for name in sorted(now):
                    archive.write(self.directory / name, name)
        except (OSError, ConversionError) as exc:
            log.warning("compile: the cache could not be saved to %s (%s); the next start compiles again",
                        self.archive, exc)
            return len(changed)
        log.info("compile: %d new file(s) saved to %s (%d in all, %.1f MB)", len(changed), self.archive, len(now),
                 self.archive.stat().st_size / 1e6)
        self.found = now
        return len(changed)


def listing(directory: Path) -> dict[str, int]:
    """Each file under ``directory`` (relative POSIX path) and its size; inductor's lock files left out."""
    files = {}
    for path in directory.rglob("*"):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and not path.is_symlink() and not name.startswith("locks/") and not name.endswith(".lock"):
            files[name] = path.stat().st_size
    return files


def _remove_dead_directories(local_root: Path) -> None:
    """Remove the local cache directories of processes of this machine that have ended."""
    for path in local_root.iterdir():
        name = parse_temp_name(path.name)
        if name is not None and name.purpose == "work" and name.owner_dead():
            remove_tree(path)
