"""A ControlNet and an IP-Adapter's image encoder ready in a fresh process: the store and this
project's loader (what setup() runs for ``[[model.controlnets]]`` and ``[[model.ip_adapters]]``)
against the recipe a diffusers user would otherwise pick, ``ControlNetModel.from_pretrained`` and
``CLIPVisionModelWithProjection.from_pretrained`` on the downloaded folders.

The models have the real sizes and random float16 weights: an SD 1.5 ControlNet (diffusers'
``ControlNetModel`` defaults, 361 M parameters, 0.72 GB) and the ViT-H/14 image encoder of
``h94/IP-Adapter``'s ``models/image_encoder`` (632 M parameters, 1.26 GB). Each is written once as
``save_pretrained`` writes it and converted once into a store (untimed). Every run starts a fresh
Python process per peer, with the files in the page cache (``hot``) or evicted first (``cold``),
peers and caches interleaved; a run ends when every weight has been touched (one byte per page).
``ready`` is from the worker's first line to that point, imports included (ours starts its pack
reads before importing torch and diffusers, as setup() does); ``load`` is the part after the
imports. One untimed run of each peer first; medians over ``--runs``; raw runs go to bench/results/conditions-*.json.

    python bench/conditions.py                 # real sizes, 3 runs, hot and cold (about 10 minutes on 2 cores)
    python bench/conditions.py --small --runs 1   # tiny models: a smoke test of the script

On fal's storage: ``--volume juicefs --tiers hot,node,object`` writes the source folders onto a real
JuiceFS volume over a shaped object store (bench/volume.py), converts them into a store there, and
runs both peers on each tier (the files put in the tier just before each run) instead of hot/cold.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):  # bench/ for on_volume and volume, imported as bench/loader.py does
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench import on_volume  # noqa: E402
from bench.common import evict, machine_info, machine_slug, median, warm  # noqa: E402

PEERS = ("diffusers", "ours")
RESULTS = Path(__file__).resolve().parent / "results"


def _configs(small: bool) -> tuple[dict, dict]:
    """The ControlNet's and the image encoder's configs: the real ones, or tiny ones of the same kinds."""
    if small:
        return ({"block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "cross_attention_dim": 32, "attention_head_dim": 4, "layers_per_block": 1, "norm_num_groups": 8,
                 "conditioning_embedding_out_channels": (8, 16)},
                {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                 "image_size": 32, "patch_size": 4, "projection_dim": 16})
    # h94/IP-Adapter models/image_encoder/config.json (OpenCLIP ViT-H/14)
    return {}, {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
                "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu"}


def write_sources(workdir: Path, small: bool) -> Path:
    """Both models as save_pretrained writes them, under ``workdir/source`` (written once)."""
    import torch
    from diffusers import ControlNetModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    net_config, encoder_config = _configs(small)
    src = workdir / "source"
    if not (src / "image_encoder" / "config.json").is_file():
        torch.manual_seed(0)
        ControlNetModel(**net_config).to(torch.float16).save_pretrained(src / "controlnet")
        CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder_config)).to(torch.float16).save_pretrained(
            src / "image_encoder")
    return src


def convert(src: Path, store_root: Path) -> dict:
    """Both model folders of ``src`` converted into a store at ``store_root`` (once)."""
    from conversion.config import ConversionConfig
    from conversion.sources import LocalModelFolderSource
    from conversion.store import Store

    store = Store(store_root, ConversionConfig())
    source = {name: str(src / name) for name in ("controlnet", "image_encoder")}
    entries = {name: str(store.ensure(LocalModelFolderSource(path, component=name), "float16"))
               for name, path in source.items()}
    return {"source": source, "entries": entries}


def _files(layout: dict, peer: str) -> list[str]:
    roots = layout["source"] if peer == "diffusers" else layout["entries"]
    return [str(p) for root in roots.values() for p in Path(root).rglob("*") if p.is_file()]


def _pack_bytes(layout: dict) -> int:
    return sum(os.path.getsize(f) for f in _files(layout, "ours") if f.endswith(".flashpack"))


def worker(peer: str, layout: dict) -> dict:
    """One peer in this (fresh) process: both models ready on the CPU, every weight touched."""
    started = time.perf_counter()
    if peer == "ours":
        from conversion.config import ConversionConfig
        from conversion.entry import lookup
        from conversion.sources import LocalModelFolderSource
        from conversion.store import Store

        store = Store(Path(layout["entries"]["controlnet"]).parent, ConversionConfig())
        entries = {name: lookup(store, LocalModelFolderSource(path, component=name), "float16", "cpu", name)
                   for name, path in layout["source"].items()}  # pack reads start here, before torch
    import diffusers  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from bench.common import touch

    imported = time.perf_counter()
    if peer == "diffusers":
        from diffusers import ControlNetModel
        from transformers import CLIPVisionModelWithProjection

        models = [ControlNetModel.from_pretrained(layout["source"]["controlnet"], torch_dtype=torch.float16),
                  CLIPVisionModelWithProjection.from_pretrained(layout["source"]["image_encoder"],
                                                                dtype=torch.float16)]
    else:
        from model_loader import load_model

        models = [entry.load(lambda path, reads, name=name: load_model(path / name, "cpu", torch_dtype=torch.float16,
                                                                        reads=reads), "cpu")
                  for name, entry in entries.items()]
    touch([p for model in models for p in model.parameters()])
    done = time.perf_counter()
    return {"ready_s": round(done - started, 3), "load_s": round(done - imported, 3),
            "parameters": sum(p.numel() for model in models for p in model.parameters())}


def run_once(peer: str, cache: str, layout: dict, tiers: on_volume.Tiers | None = None) -> dict:
    """One fresh worker process for ``peer``, its files put in ``cache`` first (hot/cold on the local
    disk, a tier on the volume)."""
    files = _files(layout, peer)
    if tiers is not None:
        tiers.set(cache, files)
    else:
        (warm if cache == "hot" else evict)(files)
    begun = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--worker", peer, json.dumps(layout)], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    wall = time.perf_counter() - begun
    if out.returncode != 0:
        raise RuntimeError(f"{peer} ({cache}) failed:\n{out.stderr[-3000:]}")
    return {"peer": peer, "cache": cache, "process_s": round(wall, 3), **json.loads(out.stdout.strip().splitlines()[-1])}


def run_all(layout: dict, caches: list[str], runs: int, tiers: on_volume.Tiers | None = None) -> list[dict]:
    """One untimed run of each peer (the first run after the conversion was the slowest of every
    series, 2-3x, for ours), then ``runs`` rounds of every cache x peer, interleaved."""
    for peer in PEERS:
        run_once(peer, caches[0], layout, tiers)
    return [run_once(peer, cache, layout, tiers) for _ in range(runs) for cache in caches for peer in PEERS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny models (a smoke test of the script)")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out" / "conditions")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    on_volume.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
        return 0
    workdir = args.workdir / ("small" if args.small else "real")
    src = write_sources(workdir, args.small)
    volume = None
    if args.volume:
        caches = on_volume.parse_tiers(args.tiers)
        with on_volume.open_volume(args) as vol:
            root = vol.mount("a") / "conditions"
            on_volume.copy_in(src, root / "source")
            layout = convert(root / "source", root / "volume")
            nbytes = _pack_bytes(layout)
            runs = run_all(layout, caches, args.runs, on_volume.Tiers(vol))
            volume = vol.describe()
    else:
        caches = ["hot", "cold"]
        layout = convert(src, workdir / "volume")
        nbytes = _pack_bytes(layout)
        runs = run_all(layout, caches, args.runs)
    info = machine_info(workdir)
    summary = {f"{peer}/{cache}": {key: median([r[key] for r in runs if r["peer"] == peer and r["cache"] == cache])
                                   for key in ("ready_s", "load_s", "process_s")}
               for cache in caches for peer in PEERS}
    report = {"benchmark": "conditions", "small": args.small, "runs": args.runs, "machine": info, "volume": volume,
              "bytes": nbytes,
              "summary": summary, "raw": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.results / f"conditions-{machine_slug(info)}-{stamp}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'peer/cache':<16} {'ready s':>8} {'load s':>8} {'process s':>10}   (medians of {args.runs})")
    for key, row in summary.items():
        print(f"{key:<16} {row['ready_s']:>8.2f} {row['load_s']:>8.2f} {row['process_s']:>10.2f}")
    print(f"raw runs: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
