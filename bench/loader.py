"""Time to load *and touch* every weight of a 1-2 GB model: this project's loader against its peers.

One model (a Stable Diffusion 1.5 UNet, random fp16 weights, optionally scaled) is written once as
diffusers safetensors and converted to FlashPack. Each peer then loads it in a fresh subprocess, with
the page cache hot (files read just before) and cold (evicted with posix_fadvise before the run),
and every weight is touched (one byte per page, which forces lazy mmap views to be read). Load time
is measured inside the subprocess, after imports and CUDA context creation; the subprocess's whole
wall time is reported beside it. Medians over --runs runs; raw runs go to bench/results/*.json.

The first hot and the first cold run of each peer on each device compare every tensor with the
source, after the clock has stopped (column "verified", and "verified" per raw run). Ceilings: the
disk's O_DIRECT read rate, best over a grid of threads x chunk sizes; on CUDA also the pinned
host-to-device copy, the hot path page cache -> pinned -> device, and what page-locking 1 GiB costs
(torch's pinned allocation vs cudaHostRegister). On CUDA each worker also loads the pack a second
time (the app loads several packs in one process; the first pays the pinned pool's allocation).

    python bench/loader.py                      # SD1.5-size UNet (1.7 GB), 5 runs, hot + cold
    python bench/loader.py --size-gb 0.2 --runs 2 --peers ours,flashpack

On fal's storage: ``--volume juicefs --tiers hot,node,object`` copies the model's files to a real
JuiceFS volume over a shaped object store (bench/volume.py) and runs every peer on each tier
(``hot``: page cache; ``node``: JuiceFS's node cache; ``object``: every block from the object
store), its files put in the tier just before. The mount's ceilings (one thread sequential, a
threads x chunk grid, O_DIRECT) are measured on each tier in the same run; each row gives its
share of the best parallel ceiling and the CPU the mount and the object store used while it
loaded. Beside the loaders above: safetensors' ``backend="pread"``, fastsafetensors
(``nogds=True``), runai-model-streamer (``SafetensorsStreamer``), and ``ours-staged`` (our packs
through the CUDA path's staging pipeline, a host copy in place of the device copy: the storage leg
of a GPU start). fastsafetensors and runai-model-streamer are bench-only (bench/requirements.txt);
a peer whose package is missing is skipped, saying so.

    python bench/loader.py --volume juicefs --size-gb 0.2 --runs 1   # a few minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):  # bench/ for on_volume and volume, imported as bench/startup.py does
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench import on_volume  # noqa: E402
from bench.common import (  # noqa: E402
    DEFAULT_CEILING_CHUNKS_MIB,
    DEFAULT_CEILING_THREADS,
    evict,
    grid_text,
    hot_h2d_ceiling,
    machine_info,
    machine_slug,
    median,
    odirect_ceiling,
    pin_costs,
    pinned_h2d_gbps,
    resident_fraction,
    touch,
    warm,
)

# Stable Diffusion 1.5's UNet config; block_out_channels is scaled by --size-gb.
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
WEIGHTS_ST = "diffusion_pytorch_model.safetensors"
WEIGHTS_PACK = "model.flashpack"


@dataclass(frozen=True)
class Peer:
    name: str
    level: str  # "file": raw bytes, "state_dict": name -> tensor, "model": an nn.Module
    reads: str  # "pack" or "safetensors"
    what: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    env: dict[str, str] = field(default_factory=dict)
    requires: str | None = None  # a bench-only package (bench/requirements.txt): skipped when missing


PEERS = [
    Peer("ours", "state_dict", "pack", "model_loader.load_state_dict(pack, device)"),
    Peer("flashpack", "state_dict", "pack",
         "flashpack 0.4.5 read_flashpack_file + iterate_from_flash_tensor (CPU: lazy mmap views; CUDA: its parallel reader)"),
    Peer("flashpack-parallel", "state_dict", "pack",
         "flashpack 0.4.5 with FLASHPACK_CPU_PARALLEL_READ=1 (eager parallel read on CPU)",
         devices=("cpu",), env={"FLASHPACK_CPU_PARALLEL_READ": "1"}),
    Peer("ours-staged", "state_dict", "pack",
         "model_loader.read_pack(pack, engine=host copy): the CUDA path's staging pipeline, a host copy for the H2D copy",
         devices=("cpu",)),
    Peer("safetensors", "state_dict", "safetensors", "safetensors.torch.load_file(file, device) (mmap)"),
    Peer("safetensors-pread", "state_dict", "safetensors",
         'safetensors.torch.load_file(file, device, backend="pread") (safetensors 0.8)'),
    Peer("fastsafetensors", "state_dict", "safetensors",
         "fastsafetensors 0.5.0 SafeTensorsFileLoader(nogds=True).copy_files_to_device()", requires="fastsafetensors"),
    Peer("runai-streamer", "state_dict", "safetensors",
         "runai-model-streamer 0.17.0 SafetensorsStreamer().stream_file(file, device)", requires="runai_model_streamer"),
    Peer("read-ceiling", "file", "pack", "plain sequential read() of the whole pack into one buffer (a ceiling, not a loader)",
         devices=("cpu",)),
    Peer("ours-model", "model", "pack", "model_loader.load_model(component_dir, device)"),
    Peer("diffusers", "model", "safetensors", "UNet2DConditionModel.from_pretrained(safetensors dir[, device_map=cuda])"),
    Peer("diffusers-flashpack", "model", "pack",
         "UNet2DConditionModel.from_pretrained(converted dir, use_flashpack=True[, device_map=cuda])"),
]
PEERS_BY_NAME = {p.name: p for p in PEERS}
BASELINE = {"file": "ours", "state_dict": "ours", "model": "ours-model"}


# --- the model on disk ------------------------------------------------------------------------


def _unet_config(c: int) -> dict:
    return {**SD15_UNET, "block_out_channels": [c, 2 * c, 4 * c, 4 * c]}


def _param_count(c: int) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**_unet_config(c))
    return sum(t.numel() for t in model.state_dict().values())


def channels_for(size_gb: float | None, elem_size: int) -> int:
    """Base channel count (a multiple of 32) whose UNet is closest to ``size_gb``; 320 when None."""
    if size_gb is None:
        return 320
    import numpy as np

    xs = [64, 128, 256]
    coeffs = np.polyfit(xs, [_param_count(x) for x in xs], 2)  # parameters are quadratic in c
    roots = np.roots([coeffs[0], coeffs[1], coeffs[2] - size_gb * 1e9 / elem_size])
    c = max(float(r.real) for r in roots if abs(r.imag) < 1e-6)
    return max(32, int(round(c / 32)) * 32)


def prepare(workdir: Path, size_gb: float | None, dtype_name: str, seed: int) -> dict:
    """Write (once) the model as diffusers safetensors and as a converted FlashPack component."""
    import torch

    dtype = getattr(torch, dtype_name)
    c = channels_for(size_gb, torch.empty(0, dtype=dtype).element_size())
    root = workdir / f"unet-c{c}-{dtype_name}-seed{seed}"
    ready = root / "ready.json"
    if ready.exists():
        return json.loads(ready.read_text())

    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from conversion.writer import pack_safetensors

    src, conv = root / "source" / "unet", root / "converted" / "unet"
    src.mkdir(parents=True, exist_ok=True)
    conv.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = UNet2DConditionModel(**_unet_config(c))
    model.save_config(src)
    model.save_config(conv)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        state[name] = torch.empty(t.shape, dtype=dtype).uniform_(-0.05, 0.05, generator=gen)
    save_file(state, src / WEIGHTS_ST, metadata={"format": "pt"})
    payload = sum(t.numel() * t.element_size() for t in state.values())
    del state
    t1 = time.perf_counter()
    pack_safetensors([src / WEIGHTS_ST], conv / WEIGHTS_PACK)
    t2 = time.perf_counter()
    data = {
        "model": "UNet2DConditionModel (SD1.5 architecture)",
        "block_out_channels": [c, 2 * c, 4 * c, 4 * c],
        "dtype": dtype_name,
        "seed": seed,
        "tensors": len(model.state_dict()),
        "payload_bytes": payload,
        "source_dir": str(src),
        "converted_dir": str(conv),
        "safetensors": str(src / WEIGHTS_ST),
        "safetensors_bytes": (src / WEIGHTS_ST).stat().st_size,
        "pack": str(conv / WEIGHTS_PACK),
        "pack_bytes": (conv / WEIGHTS_PACK).stat().st_size,
        "generate_s": round(t1 - t0, 2),
        "convert_s": round(t2 - t1, 2),
    }
    ready.write_text(json.dumps(data, indent=2))
    return data


def data_files(data: dict) -> list[str]:
    return [data["safetensors"], data["pack"], str(Path(data["source_dir"]) / "config.json"),
            str(Path(data["converted_dir"]) / "config.json")]


def peer_files(peer: Peer, data: dict) -> list[str]:
    if peer.reads == "pack":
        return [data["pack"], str(Path(data["converted_dir"]) / "config.json")]
    return [data["safetensors"], str(Path(data["source_dir"]) / "config.json")]


# --- the worker (one run of one peer, in a fresh process) ---------------------------------------


_keep_alive: list = []  # what a loader's tensors need alive until the worker exits


def _make_loader(peer: str, spec: dict, device):
    """Import what ``peer`` needs and return a no-argument function that loads -> {name: tensor}."""
    import torch

    pack, st = spec["pack"], spec["safetensors"]
    dtype = getattr(torch, spec["dtype"])
    on_cuda = device.type == "cuda"

    if peer == "ours":
        from model_loader import load_state_dict

        return lambda: load_state_dict(pack, device)
    if peer in ("flashpack", "flashpack-parallel"):
        from flashpack.deserialization import iterate_from_flash_tensor, read_flashpack_file

        def load():
            storage, meta = read_flashpack_file(pack, device=device)
            return dict(iterate_from_flash_tensor(storage, meta))

        return load
    if peer == "ours-staged":
        from host_staging import read_pack_staged

        return lambda: read_pack_staged(pack).tensors()
    if peer in ("safetensors", "safetensors-pread"):
        from safetensors.torch import load_file

        backend = "pread" if peer == "safetensors-pread" else "mmap"
        return lambda: load_file(st, device=str(device), backend=backend)
    if peer == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader

        def load():
            loader = SafeTensorsFileLoader(None, str(device), nogds=True)
            loader.add_filenames({0: [st]})
            buffers = loader.copy_files_to_device()
            tensors = {k: buffers.get_tensor(k) for k in loader.get_keys()}
            _keep_alive.append((loader, buffers))  # the tensors live in its buffers
            return tensors

        return load
    if peer == "runai-streamer":
        from runai_model_streamer import SafetensorsStreamer

        def load():
            with SafetensorsStreamer() as streamer:
                streamer.stream_file(st, device=str(device))
                return dict(streamer.get_tensors())

        return load
    if peer == "read-ceiling":

        def load():
            size = os.path.getsize(pack)
            buf = torch.empty(size, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            done = 0
            with open(pack, "rb", buffering=0) as f:
                while done < size:
                    n = f.readinto(view[done : done + (64 << 20)])
                    if not n:
                        raise EOFError(pack)
                    done += n
            return {"<file>": buf}

        return load
    if peer == "ours-model":
        import diffusers

        from model_loader import load_model

        diffusers.UNet2DConditionModel  # noqa: B018 -- import the model class untimed, as the diffusers peers do

        return lambda: load_model(spec["converted_dir"], device).state_dict()
    if peer in ("diffusers", "diffusers-flashpack"):
        import diffusers

        cls = diffusers.UNet2DConditionModel
        kwargs = {"torch_dtype": dtype}
        if on_cuda:
            kwargs["device_map"] = str(device)
        if peer == "diffusers":
            return lambda: cls.from_pretrained(spec["source_dir"], **kwargs).state_dict()
        return lambda: cls.from_pretrained(spec["converted_dir"], use_flashpack=True, **kwargs).state_dict()
    raise ValueError(f"unknown peer {peer!r}")


def _verify(tensors: dict, safetensors_path: str) -> dict:
    """Compare every loaded tensor with the source safetensors file, value for value."""
    import torch
    from safetensors import safe_open

    missing, mismatched, reshaped = [], [], []
    with safe_open(safetensors_path, framework="pt") as f:
        keys = list(f.keys())
        for k in keys:
            if k not in tensors:
                missing.append(k)
                continue
            ref, got = f.get_tensor(k), tensors[k].detach().to("cpu")
            if tuple(got.shape) != tuple(ref.shape):
                reshaped.append(k)
            if got.dtype != ref.dtype or not torch.equal(got.reshape(-1), ref.reshape(-1)):
                mismatched.append(k)
    return {
        "ok": not missing and not mismatched,
        "tensors": len(keys),
        "missing": len(missing),
        "mismatched": len(mismatched),
        "shape_differs": len(reshaped),
        "examples": (missing + mismatched + reshaped)[:3],
    }


def _peak_rss_gb() -> float | None:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's, kept over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 3)
    return None


def worker(spec: dict) -> None:
    t_enter = time.perf_counter()
    import torch

    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    load = _make_loader(spec["peer"], spec, device)
    touch([torch.zeros(4 << 20, dtype=torch.uint8, device=device)], spec["touch"])  # first-call costs, not timed
    sync()
    t_ready = time.perf_counter()

    def timed_load() -> tuple[dict, dict]:
        w0 = time.time()
        t0 = time.perf_counter()
        tensors = load()
        sync()
        t1 = time.perf_counter()
        checksum = touch(tensors.values(), spec["touch"])
        sync()
        t2 = time.perf_counter()
        return tensors, {"load_s": round(t1 - t0, 4), "touch_s": round(t2 - t1, 4), "ready_s": round(t2 - t0, 4),
                         "touch_checksum": checksum, "window": [w0, time.time()]}

    tensors, first = timed_load()
    result = {"setup_s": round(t_ready - t_enter, 4), **first, "tensors": len(tensors)}
    second_tensors = None
    if spec.get("second_load"):
        # The app loads several packs in one process: the first load pays one-off costs (the pinned
        # staging pool, allocator growth) that the next ones do not. Load the same pack again, with
        # the first load's tensors still held (as the app holds its earlier packs) and the page
        # cache in the same state as for the first load.
        if spec.get("evict_before_second"):
            evict(spec["evict_before_second"])
        resident = resident_fraction(spec["peer_file"])  # pages still mapped by the first load stay cached
        second_tensors, second = timed_load()
        result["second"] = {**second, "resident_before": resident}
    result["peak_rss_gb"] = _peak_rss_gb()
    if device.type == "cuda":
        result["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    if spec.get("verify"):  # after every clock has stopped
        result["verify"] = _verify(tensors, spec["safetensors"])
        if second_tensors is not None:
            result["second"]["verify"] = _verify(second_tensors, spec["safetensors"])
    print("RESULT " + json.dumps(result), flush=True)


def cuda_skip_reason(cuda_available: bool, devices: list[str]) -> str | None:
    """Why the CUDA-only measurements do not run here (None: they run)."""
    if not cuda_available:
        return "no CUDA device (torch.cuda.is_available() is False)"
    if "cuda" not in devices:
        return "cuda is not in --devices"
    return None


def hardware_worker(spec: dict) -> None:
    """Raw ceilings of this machine: the O_DIRECT disk read over a grid of threads x chunk sizes;
    on CUDA also pinned host-to-device copies, the hot path page cache -> pinned -> device, and
    the cost of pinning (torch's pinned allocation vs cudaHostRegister)."""
    import torch

    if spec.get("volume"):
        out: dict = {"odirect_read": {"skipped": "on a volume: the mount's ceilings per tier are measured instead"}}
    else:
        out = {"odirect_read": odirect_ceiling(spec["pack"], spec["threads"], spec["chunks_mib"])}
    skip = cuda_skip_reason(torch.cuda.is_available(), spec["devices"])
    if skip is not None:
        out["cuda_skipped"] = skip
    else:
        torch.zeros(1, device="cuda")
        # Pinning first: the copies below leave pinned blocks in torch's caching host allocator.
        for key, measure in (("pin_costs", pin_costs), ("pinned_h2d", pinned_h2d_gbps),
                             ("hot_h2d", lambda: hot_h2d_ceiling(spec["pack"]))):
            try:
                out[key] = measure()
            except Exception as exc:  # noqa: BLE001 - recorded; the other ceilings still run
                out[key] = {"error": f"{type(exc).__name__}: {exc}"}
            torch.cuda.empty_cache()
    print("RESULT " + json.dumps(out), flush=True)


# --- the driver -------------------------------------------------------------------------------


def child_env(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """A worker's environment: the caller's (less any FLASHPACK_* setting, which only a peer's own
    ``env`` may set), with the repository prepended to PYTHONPATH (what the caller had stays after
    it), offline, quiet, then ``extra``."""
    env = {k: v for k, v in base.items() if not k.startswith("FLASHPACK_")}
    paths = [str(REPO)] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    env.update({"PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "PYTHONWARNINGS": "ignore"})
    env.update(extra)
    return env


def _spawn(kind: str, spec: dict, env_extra: dict[str, str], timeout: float) -> tuple[dict | None, float, str]:
    env = child_env(dict(os.environ), env_extra)
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{kind}", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), wall, ""
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return None, wall, f"exit {proc.returncode}: " + " | ".join(tail)


def run_verified(result: dict) -> bool | None:
    """A run's verdict: True when every load it verified (the first, and a second load if any)
    matched the source; False when one did not; None when it verified nothing."""
    verdicts = [v["ok"] for v in (result.get("verify"), (result.get("second") or {}).get("verify"))
                if isinstance(v, dict)]
    return all(verdicts) if verdicts else None


def verified_of(runs: list[dict]) -> bool | None:
    """A row's verdict from its runs' ``verified``: False if any run failed, True if some run
    verified and none failed, None if no run verified."""
    verdicts = [r.get("verified") for r in runs if r.get("verified") is not None]
    return all(verdicts) if verdicts else None


def should_verify(peer: Peer, device: str, cache: str, verified: set[tuple[str, str, str]], enabled: bool) -> bool:
    """Verify the first run of each peer on each device *in each cache state* (a cold run reads
    the bytes another way than a hot one); raw files (level ``file``) have no tensors to check."""
    return enabled and peer.level != "file" and (peer.name, device, cache) not in verified


def summarize(runs: list[dict], payload: int) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["device"], r["cache"], r["level"], r["peer"]), []).append(r)
    rows = []
    for (device, cache, level, peer), rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        row = {"device": device, "cache": cache, "level": level, "peer": peer, "runs": len(ok),
               "errors": [r["error"] for r in rs if not r.get("ok")][:1]}
        if ok:
            ready = median([r["ready_s"] for r in ok])
            row.update({
                "ready_s": ready,
                "gbps": payload / ready / 1e9 if ready > 0 else float("inf"),
                "load_s": median([r["load_s"] for r in ok]),
                "touch_s": median([r["touch_s"] for r in ok]),
                "process_s": median([r["process_s"] for r in ok]),
                "peak_rss_gb": median([r["peak_rss_gb"] for r in ok]),
                "verified": verified_of(ok),
                "verified_runs": sum(r.get("verified") is not None for r in ok),
            })
            second = [r["second"]["ready_s"] for r in ok if isinstance(r.get("second"), dict)]
            if second:
                row["second_ready_s"] = median(second)
                row["second_load_s"] = median([r["second"]["load_s"] for r in ok if isinstance(r.get("second"), dict)])
                cached = [r["second"].get("resident_before") for r in ok if isinstance(r.get("second"), dict)]
                cached = [c for c in cached if c is not None]
                row["second_resident_before"] = max(cached) if cached else None
        rows.append(row)
    by_key = {(r["device"], r["cache"], r["peer"]): r for r in rows}
    for r in rows:
        base = by_key.get((r["device"], r["cache"], BASELINE[r["level"]]))
        if base and base.get("ready_s") and r.get("ready_s"):
            r["ratio_vs_ours"] = r["ready_s"] / base["ready_s"]
    order = {p.name: i for i, p in enumerate(PEERS)}
    states = {c: i for i, c in enumerate(("hot", "cold", *on_volume.TIERS[1:]))}  # hot first, then colder
    rows.sort(key=lambda r: (r["device"], states.get(r["cache"], len(states)), order[r["peer"]]))
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| device | cache | level | peer | ready s (median) | GB/s | time vs ours | load s | touch s "
            "| process s | peak RSS GB | verified | runs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if not r.get("ready_s"):
            err = (r["errors"][0] if r["errors"] else "no runs")[:80].replace("|", "/")
            lines.append(f"| {r['device']} | {r['cache']} | {r['level']} | {r['peer']} | failed: {err} "
                         "| | | | | | | | 0 |")
            continue
        ratio = f"{r['ratio_vs_ours']:.2f}x" if "ratio_vs_ours" in r else "-"
        verified = {True: "yes", False: "NO", None: "-"}[r["verified"]]
        lines.append(
            f"| {r['device']} | {r['cache']} | {r['level']} | {r['peer']} | {r['ready_s']:.3f} | {r['gbps']:.2f} "
            f"| {ratio} | {r['load_s']:.3f} | {r['touch_s']:.3f} | {r['process_s']:.2f} | {r['peak_rss_gb']:.2f} "
            f"| {verified} | {r['runs']} |"
        )
    return "\n".join(lines)


def second_load_table(rows: list[dict]) -> str | None:
    """First vs second load of the same pack in one process (rows that have a second load)."""
    mine = [r for r in rows if r.get("second_ready_s") is not None and r.get("ready_s")]
    if not mine:
        return None
    lines = ["| device | cache | peer | first ready s | second ready s | second / first | second load s "
             "| cached before the second |", "|---|---|---|---|---|---|---|---|"]
    for r in mine:
        cached = r.get("second_resident_before")
        lines.append(f"| {r['device']} | {r['cache']} | {r['peer']} | {r['ready_s']:.3f} | {r['second_ready_s']:.3f} "
                     f"| {r['second_ready_s'] / r['ready_s']:.2f}x | {r['second_load_s']:.3f} "
                     f"| {'-' if cached is None else f'{cached:.0%}'} |")
    return "\n".join(lines)


def hardware_lines(hw: dict) -> list[str]:
    """The ceilings of a run, one markdown bullet each (also used by bench/device_check.py)."""
    lines = []
    od = hw.get("odirect_read", {})
    if "gbps" in od:
        lines.append(f"- disk O_DIRECT read, best of a threads x chunk grid: {od['gbps']:.2f} GB/s "
                     f"({od['threads']} threads x {od['chunk_mib']} MiB); grid GB/s: {grid_text(od.get('grid', []))}")
    elif "skipped" in od:
        lines.append(f"- disk O_DIRECT read: {od['skipped']}")
    else:
        lines.append(f"- disk O_DIRECT read: {od.get('error', hw.get('error', 'n/a'))}")
    if hw.get("cuda_skipped"):
        lines.append(f"- CUDA ceilings (pinned H2D, hot page cache -> pinned -> device, pinning cost): "
                     f"skipped: {hw['cuda_skipped']}")
        return lines
    h = hw.get("pinned_h2d", {})
    if "gbps_median" in h:
        lines.append(f"- pinned host-to-device copy (1 GiB): {h['gbps_median']:.1f} GB/s median ({h['gbps_best']:.1f} best); "
                     f"pinning its buffer took {h['pin_alloc_s']:.3f} s")
    elif h:
        lines.append(f"- pinned host-to-device copy: {h.get('error', 'n/a')}")
    hot = hw.get("hot_h2d", {})
    if "gbps" in hot:
        match = {True: "yes", False: "NO"}.get(hot.get("bytes_match"), "?")
        lines.append(f"- hot path ceiling, page cache -> pinned (2 buffers per thread) -> device: {hot['gbps']:.2f} GB/s "
                     f"({hot['threads']} threads x {hot['chunk_mib']} MiB); grid GB/s: {grid_text(hot.get('grid', []))}; "
                     f"device bytes match the file: {match}")
    elif hot:
        lines.append(f"- hot path ceiling: {hot.get('error', 'n/a')}")
    pc = hw.get("pin_costs", {})
    if "torch_pinned_s" in pc:
        gib = pc["bytes"] / (1 << 30)
        lines.append(f"- page-locking {gib:.0f} GiB (median of {pc['repeats']}): torch.empty(pin_memory=True) "
                     f"{pc['torch_pinned_s']:.3f} s; mmap + cudaHostRegister {pc['host_register_s']:.3f} s fresh, "
                     f"{pc['host_register_written_s']:.3f} s on written memory, cudaHostUnregister "
                     f"{pc['host_unregister_s']:.3f} s; H2D from registered memory "
                     f"{pc['host_register_copy_gbps']} GB/s; cheaper: {pc['faster']}")
    elif pc:
        lines.append(f"- pinning cost: {pc.get('error', 'n/a')}")
    return lines


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=None,
                    help="target model size; default: the real SD1.5 UNet (1.72 GB in fp16)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--runs", type=int, default=5, help="runs per peer, device and cache state (median reported)")
    ap.add_argument("--peers", default=",".join(p.name for p in PEERS), help="comma-separated subset of: "
                    + ", ".join(p.name for p in PEERS))
    ap.add_argument("--caches", default="hot,cold", help="comma-separated: hot, cold (default: both)")
    ap.add_argument("--devices", default=None, help="cpu and/or cuda; default: cpu, plus cuda when available")
    ap.add_argument("--workdir", default=str(REPO / "bench" / "out"), help="where the model files are written")
    ap.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--machine", default=None, help="name used in the results file name")
    ap.add_argument("--touch", default="page", choices=["page", "full"],
                    help="after loading read one byte per page of every tensor (default) or every byte")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ceiling-threads", type=_int_list, default=None,
                    help="thread counts of the read ceiling grid (default: 4,8,16 for the local disk's O_DIRECT "
                         "grid; on a volume bench/volume.py's 1,4,8,16)")
    ap.add_argument("--ceiling-chunks-mib", type=_int_list, default=None,
                    help="chunk sizes (MiB) of the read ceiling grid (default: 16,32,64 on the local disk; on a "
                         "volume 4,32)")
    ap.add_argument("--second-load", default="auto", choices=["auto", "on", "off"],
                    help="also time a second load of the same pack in each worker: auto = on CUDA only")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip comparing weights with the source (done once per peer, device and cache state)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hardware", help=argparse.SUPPRESS)
    on_volume.add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        args.tiers = on_volume.parse_tiers(args.tiers)
    except ValueError as exc:
        ap.error(str(exc))
    if args.volume:
        from volume import DEFAULT_GRID_CHUNKS_MIB, DEFAULT_GRID_THREADS

        threads, chunks = DEFAULT_GRID_THREADS, DEFAULT_GRID_CHUNKS_MIB
    else:
        threads, chunks = DEFAULT_CEILING_THREADS, DEFAULT_CEILING_CHUNKS_MIB
    args.ceiling_threads = args.ceiling_threads or list(threads)
    args.ceiling_chunks_mib = args.ceiling_chunks_mib or list(chunks)
    return args


def missing_package(peer: Peer) -> str | None:
    """The bench-only package ``peer`` needs and this environment lacks, or None."""
    import importlib.util

    if peer.requires and importlib.util.find_spec(peer.requires) is None:
        return peer.requires
    return None


def on_mount(data: dict, mount_dir: Path) -> dict:
    """``data`` (from :func:`prepare`) with its model directory copied under ``mount_dir`` and every
    path in it pointing there."""
    root = Path(data["source_dir"]).parents[1]
    dst = mount_dir / root.name
    dst.mkdir(parents=True, exist_ok=True)
    for sub in ("source", "converted"):
        on_volume.copy_in(root / sub, dst / sub)
    return {k: str(dst / Path(v).relative_to(root)) if isinstance(v, str) and v.startswith(str(root) + os.sep) else v
            for k, v in data.items()}


def add_volume_figures(rows: list[dict], runs: list[dict], ceilings: dict[str, dict]) -> None:
    """Each row's median CPU share of the mount and the object store, and its GB/s as a percentage
    of the best parallel ceiling measured on its tier."""
    for row in rows:
        mine = [r for r in runs if r.get("ok") and (r["device"], r["cache"], r["peer"]) ==
                (row["device"], row["cache"], row["peer"])]
        shares = [r["cpu_share"] for r in mine if r.get("cpu_share")]
        if shares:
            row["cpu_share"] = {k: median([s.get(k) for s in shares]) for k in ("mount", "object_store")}
        row["pct_of_ceiling"] = on_volume.percent_of(row.get("gbps"), ceilings.get(row["cache"]))


def volume_table(rows: list[dict]) -> str:
    """The rows of a run on a volume: per tier, each peer's time, GB/s, share of the best parallel
    ceiling of that tier, and the mount's and object store's CPU while it loaded."""
    head = ("| device | tier | level | peer | ready s (median) | GB/s | % of best parallel ceiling | time vs ours "
            "| load s | touch s | mount / object store CPU (cores) | peak RSS GB | verified | runs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if not r.get("ready_s"):
            err = (r["errors"][0] if r["errors"] else "no runs")[:80].replace("|", "/")
            lines.append(f"| {r['device']} | {r['cache']} | {r['level']} | {r['peer']} | failed: {err} "
                         "| | | | | | | | | 0 |")
            continue
        pct = r.get("pct_of_ceiling")
        ratio = f"{r['ratio_vs_ours']:.2f}x" if "ratio_vs_ours" in r else "-"
        verified = {True: "yes", False: "NO", None: "-"}[r["verified"]]
        lines.append(
            f"| {r['device']} | {r['cache']} | {r['level']} | {r['peer']} | {r['ready_s']:.3f} | {r['gbps']:.2f} "
            f"| {'-' if pct is None else f'{pct:.0f} %'} | {ratio} | {r['load_s']:.3f} | {r['touch_s']:.3f} "
            f"| {on_volume.cpu_text(r.get('cpu_share'))} | {r['peak_rss_gb']:.2f} | {verified} | {r['runs']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.hardware:
        hardware_worker(json.loads(args.hardware))
        return 0
    if args.volume:
        with on_volume.open_volume(args) as vol:
            print(f"volume: {vol.describe()['shaping_text']}; mounted at {vol.mount()}", file=sys.stderr, flush=True)
            return bench(args, vol)
    return bench(args, None)


def bench(args: argparse.Namespace, vol) -> int:
    """The benchmark on the local disk (``vol`` None: hot and cold page cache) or on a volume's tiers."""
    import torch

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    peers = [PEERS_BY_NAME[n.strip()] for n in args.peers.split(",") if n.strip()]
    notes_skipped = []
    for peer in list(peers):
        if (package := missing_package(peer)) is not None:
            notes_skipped.append(f"{peer.name}: skipped, its package {package} is not installed "
                                 "(pip install -r bench/requirements.txt)")
            log(notes_skipped[-1])
            peers.remove(peer)
    if vol is not None:
        caches = args.tiers
    else:
        caches = [c.strip() for c in args.caches.split(",") if c.strip()]
        if not caches or set(caches) - {"hot", "cold"}:
            raise SystemExit(f"loader.py: error: --caches: expected hot and/or cold, got {args.caches!r}")
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    log(f"preparing the model under {workdir} ...")
    data = prepare(workdir, args.size_gb, args.dtype, args.seed)
    payload = data["payload_bytes"]
    log(f"model: {data['tensors']} tensors, {payload / 1e9:.3f} GB payload, channels {data['block_out_channels']}")
    tiers = None
    ceilings: dict[str, dict] = {}
    if vol is not None:
        data = on_mount(data, vol.mount() / "loader")
        log(f"copied to the volume: {Path(data['source_dir']).parents[1]}")
        tiers = on_volume.Tiers(vol)
        from volume import ceilings as measure_ceilings

        for tier in caches:
            ceilings[tier] = measure_ceilings(vol, data["pack"], tier, threads=args.ceiling_threads,
                                              chunks_mib=args.ceiling_chunks_mib)
            summary = on_volume.ceiling_summary(ceilings[tier])
            log(f"ceilings, {tier}: one thread {summary['sequential_gb_s']:.2f} GB/s, best parallel "
                f"{summary['best']['gb_s']:.2f} GB/s ({json.dumps({k: v for k, v in summary['best'].items() if k != 'cpu_share'})})")
    info = machine_info(Path(data["pack"]).parent)
    hw_spec = {"pack": data["pack"], "threads": args.ceiling_threads, "chunks_mib": args.ceiling_chunks_mib,
               "devices": devices, "volume": vol is not None}
    hw, _, hw_err = _spawn("hardware", hw_spec, {}, args.timeout)
    hw = hw or {"error": hw_err}
    log(f"hardware: {json.dumps(hw)}")

    plan = [(i, cache, device, peer) for i in range(args.runs) for cache in caches for device in devices
            for peer in peers if device in peer.devices]
    runs: list[dict] = []
    broken: set[tuple[str, str]] = set()
    verified: set[tuple[str, str, str]] = set()
    eviction_failures = 0
    volume = vol.describe() if vol is not None else None

    created = dt.datetime.now()
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "loader-volume-" if vol is not None else ""
    out = out_dir / f"{prefix}{args.machine or machine_slug(info)}-{created:%Y%m%d-%H%M%S}.json"

    def save(done: bool) -> tuple[list[dict], list[str]]:
        """Write the results so far (after every run, so a benchmark stopped midway leaves them)."""
        rows = summarize(runs, payload)
        if vol is not None:
            add_volume_figures(rows, runs, ceilings)
        cold = [r["resident_before"] for r in runs if r["cache"] != "hot" and r["resident_before"] is not None]
        notes = list(notes_skipped)
        if cold:
            notes.append(f"{'/'.join(c for c in caches if c != 'hot')} runs: at most {max(cold):.1%} of the file "
                         "was in the page cache before a run")
        if eviction_failures:
            notes.append(f"WARNING: eviction did not take in {eviction_failures} run(s); those are not cold")
        if any(r["cache"] != "hot" for r in runs) and not cold:
            notes.append("WARNING: could not check eviction (mincore unavailable)")
        if args.second_load == "auto" and "cuda" not in devices:
            notes.append("second load (the same pack loaded twice in one process): skipped, it is measured on CUDA "
                         "only (--second-load on forces it)")
        if not done:
            notes.append(f"PARTIAL: {len(runs)} of {len(plan)} planned runs (stopped before the end, or still running)")
        saved = {
            "benchmark": "bench/loader.py",
            "created": created.isoformat(timespec="seconds"),
            "machine": info,
            "hardware": hw,
            "config": {k: v for k, v in vars(args).items() if k not in ("worker", "hardware")},
            "data": data,
            "peers": {p.name: {"level": p.level, "reads": p.reads, "what": p.what, "env": p.env} for p in peers},
            "notes": notes,
            "summary": rows,
            "runs": runs,
        }
        if volume is not None:
            saved.update(volume=volume, shaping=volume["shaping"], ceilings=list(ceilings.values()))
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        os.replace(tmp, out)
        return rows, notes
    all_files = data_files(data)
    for step, (i, cache, device, peer) in enumerate(plan, 1):
        if (peer.name, device) in broken:
            continue
        files = peer_files(peer, data)
        if tiers is not None:
            tiers.set(cache, files)
        elif cache == "cold":
            evict(all_files)
        else:
            warm(files)
        resident = resident_fraction(files[0])
        if cache != "hot" and resident is not None and resident > 0.02:
            eviction_failures += 1
        verify = should_verify(peer, device, cache, verified, not args.no_verify)
        second = args.second_load == "on" or (args.second_load == "auto" and device == "cuda")
        spec = {**data, "peer": peer.name, "device": device, "verify": verify, "touch": args.touch,
                "second_load": second, "evict_before_second": all_files if cache != "hot" else [],
                "peer_file": files[0]}
        if tiers is not None:
            with on_volume.CpuSampler(tiers.cpu) as sampler:
                res, wall, err = _spawn("worker", spec, peer.env, args.timeout)
        else:
            res, wall, err = _spawn("worker", spec, peer.env, args.timeout)
        rec = {"run": i, "cache": cache, "device": device, "peer": peer.name, "level": peer.level,
               "resident_before": resident, "process_s": round(wall, 3), "ok": res is not None}
        if res is None:
            rec["error"] = err
            broken.add((peer.name, device))
            log(f"[{step}/{len(plan)}] {cache:6} {device:4} {peer.name:20} FAILED ({err[:200]}); skipping its other runs")
        else:
            rec.update(res)
            rec["verified"] = run_verified(res)
            if verify:
                verified.add((peer.name, device, cache))
            cpu = ""
            if tiers is not None and res.get("window"):
                rec["cpu_share"] = sampler.share(*res["window"])
                cpu = f", CPU mount/store {on_volume.cpu_text(rec['cpu_share'])}"
            vtxt = {None: "", True: " verified"}.get(rec["verified"], " VERIFY FAILED "
                                                    + json.dumps([res.get("verify"), (res.get("second") or {}).get("verify")]))
            stxt = f", second load ready {res['second']['ready_s']:.3f} s" if "second" in res else ""
            log(f"[{step}/{len(plan)}] {cache:6} {device:4} {peer.name:20} ready {res['ready_s']:.3f} s "
                f"(load {res['load_s']:.3f} + touch {res['touch_s']:.3f}){stxt}, process {wall:.2f} s, "
                f"cached before {resident if resident is None else f'{resident:.0%}'}{cpu}{vtxt}")
        runs.append(rec)
        save(done=False)

    rows, notes = save(done=True)
    table = volume_table(rows) if vol is not None else markdown_table(rows)
    seconds = second_load_table(rows)

    gpu = info["gpu"]["name"] if info.get("gpu") else "no GPU"
    where = (f"{volume['filesystem']} over {volume['object_store']} ({volume['shaping_text']})" if volume
             else f"disk {info['disk'].get('fstype', '?')} on {info['disk'].get('source', '?')}")
    print(f"## loader benchmark: {payload / 1e9:.2f} GB {args.dtype} UNet, {info['cpu']} ({info['cores']} cores), "
          f"{info['ram_gb']} GB RAM, {gpu}, torch {info['torch']}, {where}, load at start {info['loadavg_at_start']}")
    print()
    print(table)
    print()
    if ceilings:
        print("The mount's read ceilings on each tier, measured in this run on the pack (GB/s; CPU in cores, "
              "mount / object store):")
        print()
        print(on_volume.ceilings_table(list(ceilings.values())))
        print()
    if seconds:
        print("Second load of the same pack in the same process (first load's tensors still held; a cold run "
              "evicts again before it, but pages the first load still maps stay cached):")
        print()
        print(seconds)
        print()
    for line in hardware_lines(hw):
        print(line)
    for n in notes:
        print(f"- {n}")
    print(f"- raw runs: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
