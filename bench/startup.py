"""The warm start end to end, as a user meets it: ``fal run --local`` until ``GET /health`` answers
200, then the first image (1 step, 64x64), against the recipes a user would otherwise pick.

    make bench-startup                              # SDXL-shaped fp16 pipeline (6.9 GB), 3 rounds
    python bench/startup.py --size small --rounds 2 # quicker (about 0.8 GB)
    python bench/startup.py --help

Peers (each a fresh ``fal run --local`` process per run, the store already converted):
- ``ours``: this app (a copy of app.py, model_loader/, conversion/, serving/ with a fal.toml profile that
  serves the benchmark model from a local source; no warm-up shapes, so /health is setup alone);
- ``ours-odirect``: the same with ``MODEL_LOADER_MAP=hot`` (a pack not in the page cache is read
  with O_DIRECT into owned memory instead of mapped; on FUSE too, where a cold pack is otherwise
  read into the page cache by the reader threads and then mapped);
- ``stock``: a fal.App whose setup() calls ``DiffusionPipeline.from_pretrained(dir, torch_dtype=fp16)``;
- ``fal-preread``: fal's documented recipe ("parallel file loading"): setup() pre-reads every file of
  the model directory with ``find DIR -type f | xargs -P 32 -I{} cat {} > /dev/null``, then
  ``DiffusionPipeline.from_pretrained``;
- ``flashpack``: flashpack 0.4.5's recipe: modules built empty, ``assign_from_file`` per component;
- ``imports-only``: the floor of any recipe: setup() imports torch, diffusers' SDXL classes and
  transformers' CLIP encoders and loads nothing (no first image).

Each round runs every peer with the page cache hot (its files read just before) and cold (its
files fsynced and evicted with POSIX_FADV_DONTNEED, checked with mincore), interleaved. Reported:
median seconds to /health 200 and to the first image, peak RSS of the app process, and our phase
breakdown from the app's log.

On fal's storage: ``--volume juicefs --tiers hot,node,object`` runs the same peers on a real JuiceFS
volume over a shaped object store (bench/volume.py): the model's source and the store (our
APP_DATA_ROOT) on the mount, the store converted there once before the rounds, each run's files
(ours and flashpack: the store entry; stock and fal-preread: the source) put in its tier just
before it starts. Each run also reports the CPU (in cores) the mount and the object store used
from the process start to the first image; the volume's shaping goes into the results JSON.

    python bench/startup.py --volume juicefs --size small --rounds 1   # a few minutes

Raw runs go to bench/results/startup-<machine>-<date>.json, rewritten after every run (with a
``partial`` key until the last), so a bench stopped midway leaves them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import on_volume  # noqa: E402
from common import evict, machine_info, machine_slug, median, resident_fraction, warm  # noqa: E402

PEERS = ("ours", "ours-odirect", "stock", "fal-preread", "flashpack", "imports-only")
CACHES = ("hot", "cold")  # on the local disk; on a volume, its tiers (on_volume.TIERS)
# The first image: as small as SDXL allows, one step (on a CPU an fp16 SDXL image takes minutes at 1024).
SIDE = 64
REQUEST = {"prompt": "a lighthouse on a cliff", "width": SIDE, "height": SIDE, "num_inference_steps": 1,
           "guidance_scale": 1.0, "seed": 0}

# --------------------------------------------------------------------------------------------------
# The model: SDXL base 1.0's published configs (or smaller versions of them), random fp16 weights


def sdxl_configs(size: str) -> dict:
    """Configs of the four torch components of an SDXL-shaped pipeline (``sdxl`` = the real ones)."""
    k, tlayers, te_layers, te2_layers = {"sdxl": (5, (1, 2, 10), 12, 32), "small": (2, (1, 2, 2), 4, 6),
                                         "tiny": (1, (1, 1, 1), 1, 1)}[size]
    unet = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[64 * k, 128 * k, 256 * k], attention_head_dim=[k, 2 * k, 4 * k],
        transformer_layers_per_block=list(tlayers), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
        block_out_channels=[128, 256, 512, 512] if size != "tiny" else [32, 32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        scaling_factor=0.13025, force_upcast=True, norm_num_groups=32,
    )
    te = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=te_layers, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
    te2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=te2_layers, num_attention_heads=20,
               max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")
    return {"unet": unet, "vae": vae, "text_encoder": te, "text_encoder_2": te2}


def _random_fp16(model, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            out[name] = (torch.randn(t.shape, generator=g) * 0.02).half()
        else:
            out[name] = torch.zeros(t.shape, dtype=t.dtype)
    return out


def write_source(dst: Path, size: str, seed: int = 0) -> None:
    """A diffusers StableDiffusionXLPipeline directory with random fp16 weights (one component at a
    time, built on the meta device, so memory stays at the largest component)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conversion.demo import make_clip_tokenizer

    cfg = sdxl_configs(size)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (name, cls) in enumerate([("unet", UNet2DConditionModel), ("vae", AutoencoderKL)]):
        with init_empty_weights():
            model = cls.from_config(cfg[name])
        (tmp / name).mkdir(parents=True)
        model.save_config(tmp / name)
        save_file(_random_fp16(model, seed + i), str(tmp / name / "diffusion_pytorch_model.safetensors"))
        del model
    for i, (name, cls) in enumerate([("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)]):
        config = CLIPTextConfig(**cfg[name], architectures=[cls.__name__], dtype="float16")
        with init_empty_weights():
            model = cls(config)
        (tmp / name).mkdir(parents=True)
        config.save_pretrained(tmp / name)
        save_file(_random_fp16(model, seed + 10 + i), str(tmp / name / "model.safetensors"))
        del model
    tokenizer = make_clip_tokenizer()
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(tmp / name)
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_config(tmp / "scheduler")
    tok_cls = type(tokenizer).__name__
    index = {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", tok_cls],
        "tokenizer_2": ["transformers", tok_cls], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    os.rename(tmp, dst)


def local_source(workdir: Path, size: str) -> Path:
    """The benchmark model's source directory on the local disk, written once per size."""
    source = workdir / size / "source"
    if not (source / "model_index.json").is_file():
        log(f"writing an SDXL-shaped ({size}) random fp16 pipeline to {source} ...")
        source.parent.mkdir(parents=True, exist_ok=True)
        write_source(source, size)
    return source


def prepare(workdir: Path, size: str, volume_dir: Path | None = None) -> dict:
    """The source directory, its conversion in a store, and our app's copy; built once per size.

    With ``volume_dir`` (a directory on a mounted volume) the source is copied there and the store
    is built there (as on fal: APP_DATA_ROOT on the volume); the app's code stays on the local disk.
    """
    base = workdir / size
    source = local_source(workdir, size)
    data_root = base / "data"
    setup_s = {}
    if volume_dir is not None:
        on_mount = volume_dir / size / "source"
        log(f"copying the source to the volume: {on_mount} ...")
        setup_s["copy_source_s"] = round(on_volume.copy_in(source, on_mount), 2)
        source, data_root = on_mount, volume_dir / size / "data"
    from conversion.store import ensure_converted

    log(f"finding (or, the first time, converting) {source} in the store under {data_root} ...")
    t0 = time.perf_counter()
    store = Path(ensure_converted(str(source), root=data_root, dtype="float16"))
    setup_s["store_s"] = round(time.perf_counter() - t0, 2)
    app_dir = base / ("app-ours-volume" if volume_dir is not None else "app-ours")
    write_app_copy(app_dir, source)
    files = {
        "ours": on_volume.files_under(store),
        "stock": on_volume.files_under(source),
    }
    files["flashpack"] = files["ours-odirect"] = files["ours"]
    files["fal-preread"] = files["stock"]
    files["imports-only"] = []
    payload = sum(p.stat().st_size for p in store.glob("*/model.flashpack"))
    return {"size": size, "source": str(source), "store": str(store), "data_root": str(data_root),
            "app_dir": str(app_dir), "files": files, "payload_bytes": payload, "prepare": setup_s}


def write_app_copy(app_dir: Path, source: Path) -> None:
    """This app as a user's project would hold it, with a ``bench`` profile serving ``source``."""
    shutil.rmtree(app_dir, ignore_errors=True)
    app_dir.mkdir(parents=True)
    for name in ("app.py", "requirements.txt", "pyproject.toml"):
        shutil.copy2(REPO / name, app_dir / name)
    for name in ("model_loader", "conversion", "serving"):
        shutil.copytree(REPO / name, app_dir / name, ignore=shutil.ignore_patterns("__pycache__"))
    profile = f"""

# Added by bench/startup.py: serve the benchmark model, no warm-up (so /health is setup alone), no
# safety checker (the peers load none, and the benchmark machine is offline).
[profiles.bench.model]
source = "{source}"
dtype = "float16"
device = "auto"

[profiles.bench.safety_checker]
source = "none"

[profiles.bench.serving]
output = "data_uri"
warmup_sizes = []
min_side = {SIDE}
"""
    (app_dir / "fal.toml").write_text((REPO / "fal.toml").read_text() + profile)


# --------------------------------------------------------------------------------------------------
# One run


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(peer: str, data: dict, port: int, metrics: int) -> tuple[list[str], str, dict]:
    fal_cli = str(Path(sys.executable).with_name("fal"))
    ports = ["--exposed-port", str(port), "--exposed-metrics-port", str(metrics)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
           "PYTHONUNBUFFERED": "1"}
    if peer.startswith("ours"):
        env.update(APP_PROFILE="bench", APP_DATA_ROOT=data["data_root"])
        if peer == "ours-odirect":
            env["MODEL_LOADER_MAP"] = "hot"
        return [fal_cli, "run", "--local", *ports, "flashpack-t2i"], data["app_dir"], env
    env.update(BENCH_SOURCE_DIR=data["source"], BENCH_STORE_DIR=data["store"])
    cls = {"stock": "StockApp", "fal-preread": "FalPrereadApp", "flashpack": "FlashpackApp",
           "imports-only": "ImportsOnlyApp"}[peer]
    return [fal_cli, "run", "--local", *ports, f"{REPO / 'bench' / 'apps' / 'recipes.py'}::{cls}"], str(REPO), env


def _request(url: str, body: dict | None, timeout: float) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _peak_rss_gb(pid: int) -> float | None:
    """The largest VmHWM among ``pid`` and its descendants (the one holding the model)."""
    best = None
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    value = int(line.split()[1]) * 1024 / 1e9
                    best = value if best is None else max(best, value)
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            pending.extend(int(c) for c in children)
        except (OSError, ValueError):
            continue
    return round(best, 3) if best is not None else None


def _our_phases(output: str) -> dict:
    """The phase breakdown of our app from its log lines."""
    phases = {}
    for name in ("lookup", "store", "warmup"):
        if m := re.search(rf"app INFO {name}: (\d+\.\d+) s", output):
            phases[name] = float(m[1])
    if m := re.search(r"app INFO load: [\d.]+ GB in (\d+\.\d+) s .*import torch (\d+\.\d+) s", output):
        phases["load"], phases["import_torch"] = float(m[1]), float(m[2])
    if m := re.search(r"imports (\d+\.\d+) s, build (\d+\.\d+) s, waiting for reads (\d+\.\d+) s, "
                      r"assemble (\d+\.\d+) s; reads took (\d+\.\d+) s", output):
        keys = ("import_diffusers", "build", "wait_reads", "assemble", "reads")
        phases.update(dict(zip(keys, map(float, m.groups()), strict=True)))
    if m := re.search(r"setup: ready in (\d+\.\d+) s", output):
        phases["setup"] = float(m[1])
    return phases


def _recipe_phases(output: str) -> dict:
    """The phases a recipe logs (fal-preread: its pre-read; every recipe: its setup)."""
    phases = {}
    if m := re.search(r"recipe: pre-read (\d+\.\d+) s", output):
        phases["preread"] = float(m[1])
    if m := re.search(r"recipe: setup done in (\d+\.\d+) s", output):
        phases["setup"] = float(m[1])
    return phases


class LocalCaches:
    """The local disk's two states: ``hot`` (files read just before) and ``cold`` (evicted)."""

    def set(self, cache: str, files: list[str]) -> None:
        if cache == "hot":
            warm(files)
        else:
            evict(files)

    def cpu(self) -> dict[str, float]:
        return {}


def run_once(peer: str, cache: str, data: dict, timeout: float, first_image: bool, tiers=None) -> dict:
    """One run of ``peer``, its files first put in ``cache`` by ``tiers`` (:class:`LocalCaches`, or an
    :class:`on_volume.Tiers`, whose mount and object store CPU over the run is recorded)."""
    files = data["files"][peer]
    tiers = tiers or LocalCaches()
    tiers.set(cache, files)
    resident = [resident_fraction(f) or 0.0 for f in files]
    sizes = [os.path.getsize(f) for f in files]
    resident_before = sum(r * s for r, s in zip(resident, sizes, strict=True)) / max(1, sum(sizes))
    port, metrics = _free_port(), _free_port()
    cmd, cwd, env = _command(peer, data, port, metrics)
    out_path = Path(data["app_dir"]).parent / f"run-{peer}-{cache}.log"
    record = {"peer": peer, "cache": cache, "resident_before": round(resident_before, 4)}
    with open(out_path, "w") as out:
        cpu0 = tiers.cpu()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{peer} exited with {proc.returncode} before /health answered")
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"{peer}: no /health 200 within {timeout} s")
                try:
                    status, _ = _request(f"http://127.0.0.1:{port}/health", None, 5)
                    if status == 200:
                        break
                except (OSError, urllib.error.URLError):
                    pass
                time.sleep(0.05)
            record["health_s"] = round(time.perf_counter() - t0, 3)
            if peer != "imports-only" and first_image:
                _first_image(peer, port, timeout, record)
            cpu1, wall = tiers.cpu(), time.perf_counter() - t0
            if share := on_volume.cpu_share(cpu0, cpu1, wall):
                record["cpu_share"] = share  # cores, on average from the process start to the first image
                record["cpu_s"] = {k: round(v, 3) for k, v in on_volume.cpu_used(cpu0, cpu1).items()}
            record["peak_rss_gb"] = _peak_rss_gb(proc.pid)
        except Exception as exc:  # noqa: BLE001 - recorded, the bench goes on
            record["error"] = str(exc)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = out_path.read_text(errors="replace")
    record["phases"] = _our_phases(output) if peer.startswith("ours") else _recipe_phases(output)
    if "error" in record:
        record["output_tail"] = output[-3000:]
    return record


def _first_image(peer: str, port: int, timeout: float, record: dict) -> None:
    """POST the first image request; its seconds go into ``record``."""
    body = dict(REQUEST)
    if peer.startswith("ours"):
        body = {"prompt": REQUEST["prompt"], "image_size": {"width": SIDE, "height": SIDE},
                "num_inference_steps": 1, "guidance_scale": 1.0, "seed": 0, "sync_mode": True}
    t1 = time.perf_counter()
    status, reply = _request(f"http://127.0.0.1:{port}/", body, timeout)
    record["first_image_s"] = round(time.perf_counter() - t1, 3)
    if status != 200:
        raise RuntimeError(f"{peer}: first image answered {status}: {reply[:300]!r}")


# --------------------------------------------------------------------------------------------------
# Checksum rates (why the loader hashes with xxh3)


def hash_rates(nbytes: int = 512 << 20, repeats: int = 3) -> dict[str, float]:
    """Single-thread GB/s of the candidate checksums over ``nbytes`` in memory (best of ``repeats``)."""
    import hashlib
    import zlib

    import xxhash

    data = memoryview(os.urandom(1 << 20) * (nbytes >> 20))
    candidates = {
        "xxh3_64 (xxhash)": xxhash.xxh3_64_intdigest,
        "crc32 (zlib)": zlib.crc32,
        "blake2b (hashlib)": lambda d: hashlib.blake2b(d).digest(),
        "sha256 (hashlib)": lambda d: hashlib.sha256(d).digest(),
    }
    rates = {}
    for name, fn in candidates.items():
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn(data)
            best = min(best, time.perf_counter() - t)
        rates[name] = round(nbytes / best / 1e9, 2)
    return rates


# --------------------------------------------------------------------------------------------------
# Summary


def states_of(runs: list[dict]) -> list[str]:
    """The cache states or tiers of ``runs``, in the order they first ran."""
    return list(dict.fromkeys(r["cache"] for r in runs))


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for cache in states_of(runs):
        def ok(peer: str) -> list[dict]:
            return [r for r in runs if r["peer"] == peer and r["cache"] == cache]  # noqa: B023

        def ready(rs: list[dict]) -> float:
            return median([r["health_s"] + r["first_image_s"] for r in rs
                           if r.get("health_s") is not None and r.get("first_image_s") is not None])

        ours = median([r.get("health_s") for r in ok("ours")])
        ours_ready = ready(ok("ours"))
        floor = median([r.get("health_s") for r in ok("imports-only")])
        for peer in PEERS:
            mine = ok(peer)
            if not mine:
                continue
            health = median([r.get("health_s") for r in mine])
            total = ready(mine)
            row = {
                "cache": cache, "peer": peer, "health_s": health,
                "first_image_s": median([r.get("first_image_s") for r in mine]),
                "ready_s": total,
                "load_s": round(health - floor, 2) if floor == floor and health == health else None,
                "vs_ours": round(health / ours, 2) if ours == ours and ours > 0 and health == health else None,
                "ready_vs_ours": round(total / ours_ready, 2) if ours_ready == ours_ready and ours_ready > 0
                and total == total else None,
                "peak_rss_gb": median([r.get("peak_rss_gb") for r in mine]),
                "runs": f"{sum('error' not in r for r in mine)}/{len(mine)}",
                "all_health_s": [r.get("health_s") for r in mine],
            }
            shares = [r["cpu_share"] for r in mine if r.get("cpu_share")]
            if shares:
                row["cpu_share"] = {k: median([s.get(k) for s in shares]) for k in ("mount", "object_store")}
            rows.append(row)
    return rows


PHASE_KEYS = ("lookup", "import_torch", "import_diffusers", "build", "reads", "wait_reads", "assemble", "load",
              "warmup", "setup")


def phase_table(runs: list[dict]) -> str:
    lines = ["| peer | cache | " + " | ".join(PHASE_KEYS) + " |", "|---" * (len(PHASE_KEYS) + 2) + "|"]
    for peer in ("ours", "ours-odirect"):
        for cache in states_of(runs):
            mine = [r.get("phases", {}) for r in runs if r["peer"] == peer and r["cache"] == cache]
            if mine:
                cells = " | ".join(_num(median([p.get(k) for p in mine])) for k in PHASE_KEYS)
                lines.append(f"| {peer} | {cache} | {cells} |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value}x"


def markdown(rows: list[dict]) -> str:
    """The table of medians; on a volume (rows with a CPU share) also the CPU the mount and the object
    store used from the process start to the first image, in cores."""
    cpu = any("cpu_share" in r for r in rows)
    state = "tier" if cpu else "cache"
    head = (f"| {state} | peer | /health 200 s (median) | above the floor s | first image s | /health + first image s "
            "| sum vs ours | /health vs ours |" + (" mount / object store CPU (cores) |" if cpu else "")
            + " peak RSS GB | runs | all /health s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["cache"], r["peer"], _num(r["health_s"]), "-" if r["load_s"] is None else f"{r['load_s']}",
                 _num(r["first_image_s"]), _num(r["ready_s"]), _ratio(r.get("ready_vs_ours")), _ratio(r["vs_ours"])]
        if cpu:
            cells.append(on_volume.cpu_text(r.get("cpu_share")))
        cells += [f"{r['peak_rss_gb']}", r["runs"], ", ".join(f"{v:.2f}" if v else "-" for v in r["all_health_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("sdxl", "small", "tiny"), default="sdxl",
                    help="sdxl: SDXL base 1.0's shapes (6.9 GB fp16); small (~0.8 GB); tiny (for smoke tests)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every peer and cache)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    ap.add_argument("--caches", default=",".join(CACHES), help="on the local disk: comma-separated subset of hot,cold")
    ap.add_argument("--first-image-rounds", type=int, default=None,
                    help="rounds that also time the first image (default: all)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "startup")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a run may take to /health and to its image")
    ap.add_argument("--machine", default=None, help="a name for the results file (default: from the CPU/GPU)")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--report", type=Path, default=None, help="print the tables of a results JSON and exit")
    on_volume.add_arguments(ap)
    args = ap.parse_args(argv)
    args.peers = [p for p in args.peers.split(",") if p]
    args.caches = [c for c in args.caches.split(",") if c]
    for name, values, allowed in (("--peers", args.peers, PEERS), ("--caches", args.caches, CACHES)):
        unknown = sorted(set(values) - set(allowed))
        if unknown or not values:
            ap.error(f"{name}: unknown or empty {unknown or values} (choose from {', '.join(allowed)})")
    try:
        args.tiers = on_volume.parse_tiers(args.tiers)
    except ValueError as exc:
        ap.error(str(exc))
    # What each round runs through: the local disk's cache states, or the volume's tiers.
    args.states = args.tiers if args.volume else args.caches
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.first_image_rounds is None:
        args.first_image_rounds = args.rounds
    return args


def headline(saved: dict) -> str:
    info = saved["hardware"]
    where = "local disk"
    if saved.get("volume"):
        v = saved["volume"]
        where = f"{v['filesystem']} over {v['object_store']} ({v['shaping_text']})"
    return (f"Model: SDXL-shaped ({saved['config']['size']}), {saved['payload_bytes'] / 1e9:.2f} GB fp16 packs; "
            f"{saved['config']['rounds']} rounds; on the {where}; {info['cpu']}, {info['cores']} cores, "
            f"{info['ram_gb']} GB RAM, torch {info['torch']}\n")


def tables(saved: dict) -> str:
    runs = saved["runs"]
    text = headline(saved) + "\n" + markdown(summarize(runs)) + "\n\nOur phases (medians, seconds):\n\n" + phase_table(runs)
    preread = {c: median([r.get("phases", {}).get("preread") for r in runs if r["peer"] == "fal-preread"
                          and r["cache"] == c]) for c in states_of(runs)}
    if any(v == v for v in preread.values()):
        text += "\n\nfal-preread's pre-read (xargs -P 32 cat), median s: " + ", ".join(
            f"{c} {_num(v)}" for c, v in preread.items())
    if "hash_rates_gbps" in saved:
        text += "\n\nChecksum rates, one thread, GB/s: " + ", ".join(f"{k} {v}" for k, v in saved["hash_rates_gbps"].items())
    return text


def report(path: Path) -> None:
    """The tables of an earlier run, from its raw JSON."""
    print(tables(json.loads(path.read_text())))


def _terminate(signum, frame) -> None:
    """SIGTERM (e.g. from ``timeout`` in bench/device_check.sh) unwinds like Ctrl-C, so the app
    process of the run in progress (its own session) is stopped instead of left serving."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.report is not None:
        report(args.report)
        return 0
    if args.volume:
        with on_volume.open_volume(args) as vol:
            log(f"volume: {vol.describe()['shaping_text']}; mounted at {vol.mount()}")
            return bench(args, vol)
    return bench(args, None)


def bench(args: argparse.Namespace, vol) -> int:
    data = prepare(args.workdir, args.size, vol.mount() / "startup" if vol else None)
    tiers = on_volume.Tiers(vol) if vol else LocalCaches()
    info = machine_info(data["data_root"])
    log(f"model: {args.size}, {data['payload_bytes'] / 1e9:.2f} GB of packs; machine: {info['cpu']}, {info['cores']} cores")
    runs = []
    args.results.mkdir(parents=True, exist_ok=True)
    name = args.machine or machine_slug(info)
    kind = "startup-volume" if vol else "startup"
    out = args.results / f"{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    planned = args.rounds * len(args.states) * len(args.peers)
    volume = vol.describe() if vol else None

    def save(rates: dict | None) -> dict:
        """Write the results so far (after every run, so a bench stopped midway leaves them)."""
        saved = {"machine": name, "hardware": info, "config": vars(args) | {
            "workdir": str(args.workdir), "results": str(args.results)}, "request": REQUEST,
            "payload_bytes": data["payload_bytes"], "prepare": data["prepare"], "summary": summarize(runs),
            "runs": runs}
        if volume:
            saved["volume"] = volume
            saved["shaping"] = volume["shaping"]
        if rates is None:
            saved["partial"] = f"{len(runs)} of {planned} planned runs (stopped before the end, or still running)"
        else:
            saved["hash_rates_gbps"] = rates
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(saved, indent=2, default=str) + "\n")
        os.replace(tmp, out)
        return saved

    for round_ in range(args.rounds):
        for cache in args.states:
            for peer in args.peers:
                record = run_once(peer, cache, data, args.timeout, round_ < args.first_image_rounds, tiers)
                record["round"] = round_
                runs.append(record)
                save(None)
                cpu = f", CPU mount/store {on_volume.cpu_text(record['cpu_share'])}" if "cpu_share" in record else ""
                pre = f", pre-read {record['phases']['preread']} s" if "preread" in record.get("phases", {}) else ""
                log(f"round {round_ + 1}/{args.rounds} {cache:6} {peer:12} /health {record.get('health_s', '-')} s, "
                    f"first image {record.get('first_image_s', '-')} s, peak RSS {record.get('peak_rss_gb', '-')} GB"
                    + pre + cpu + (f"  ERROR {record['error']}" if "error" in record else ""))
                if cache != "hot" and record["resident_before"] > 0.02:
                    log(f"  warning: {record['resident_before']:.0%} of the files were still cached at the start")
    saved = save(hash_rates())
    print(tables(saved))
    log(f"raw runs: {out}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
