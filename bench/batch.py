"""Per-image generation time for num_images 1, 2 and 4: one pipeline call per image (how POST /
generated before) against one batched call for all of them (serving.generate, how it generates now).

    python bench/batch.py                                  # the random demo model (demo-random), 256x256, 8 steps, 5 rounds
    python bench/batch.py --side 128 --steps 4 --rounds 3  # quicker
    python bench/batch.py --size small --device cuda --side 1024 --steps 30   # SDXL-shaped, on a GPU
    python bench/batch.py --help

Both ways go through ``serving.generate.generate`` with the same seeds (image i: seed + i), the
"old" way once per seed, the batched way once with all seeds. Every (num_images, way) pair runs once
untimed first (first-call costs), then each round times every pair in an order that alternates from
round to round, so machine drift spreads over all of them. Reported: the median over the rounds of
the seconds per image, and the speed-up of batching. Raw runs go to
bench/results/batch-<machine>-<date>.json.

Models: ``demo`` is the random demo model (``demo-random``: conversion.demo.make_demo_pipeline, float32); ``tiny``,
``small`` and ``sdxl`` are bench/startup.py's SDXL-shaped random pipelines (written once under
bench/out/startup/), float16 on CUDA and float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import machine_info, machine_slug, median  # noqa: E402

COUNTS = (1, 2, 4)
WAYS = ("one call per image", "batched")
SEED = 1234


def load(size: str, device: str, workdir: Path):
    """The pipeline to measure: the demo model, or an SDXL-shaped one of ``size``."""
    import torch
    from diffusers import DiffusionPipeline

    if size == "demo":
        from conversion.demo import make_demo_pipeline

        source = workdir / "demo" / "source"
        if not (source / "model_index.json").is_file():
            make_demo_pipeline(source)
        dtype = torch.float32
    else:
        from startup import write_source

        source = REPO / "bench" / "out" / "startup" / size / "source"
        if not (source / "model_index.json").is_file():
            source.parent.mkdir(parents=True, exist_ok=True)
            write_source(source, size)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = DiffusionPipeline.from_pretrained(str(source), torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(pipe, way: str, count: int, side: int, steps: int, guidance: float, device: str) -> float:
    """Seconds to generate ``count`` images ``way``."""
    import torch

    from serving.generate import GenerationParams, generate

    seeds = tuple(SEED + i for i in range(count))
    calls = [seeds] if way == "batched" else [(seed,) for seed in seeds]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    started = time.perf_counter()
    for call in calls:
        generate(pipe, GenerationParams("a lighthouse on a cliff at sunset", "", side, side, steps, guidance, call))
    sync()
    return time.perf_counter() - started


def summarize(runs: list[dict]) -> list[dict]:
    """Median seconds per image of each (num_images, way), and batching's speed-up per num_images."""
    rows = []
    for count in COUNTS:
        row: dict = {"num_images": count}
        for way in WAYS:
            values = [r["seconds"] / count for r in runs if r["num_images"] == count and r["way"] == way]
            row[f"per_image_s[{way}]"] = round(median(values), 4)
            row[f"range_s[{way}]"] = [round(min(values), 4), round(max(values), 4)]
        row["speedup"] = round(row[f"per_image_s[{WAYS[0]}]"] / row[f"per_image_s[{WAYS[1]}]"], 2)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The summary as a table: per image, median (fastest-slowest round), and batching's speed-up."""
    def cell(row: dict, way: str) -> str:
        low, high = row[f"range_s[{way}]"]
        return f"{row[f'per_image_s[{way}]']:.3f} ({low:.3f}-{high:.3f})"

    lines = [f"| num_images | {WAYS[0]}: s/image | {WAYS[1]}: s/image | batching |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['num_images']} | {cell(row, WAYS[0])} | {cell(row, WAYS[1])} | {row['speedup']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("demo", "tiny", "small", "sdxl"), default="demo", help="the model (default: demo)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ap.add_argument("--side", type=int, default=256, help="image width and height in pixels (default: 256)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps (default: 8, the random demo's former default)")
    ap.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: 5.0: CFG on, 2x batch)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--machine", default=None, help="a name for the machine in the results file")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "batch")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.workdir)
    pipe = load(args.size, args.device, args.workdir)
    pairs = [(count, way) for count in COUNTS for way in WAYS]
    shape = (args.side, args.steps, args.guidance, args.device)
    for count, way in pairs:  # untimed: first-call costs (allocations, kernel selection)
        timed(pipe, way, count, *shape)
    runs = []
    for round_index in range(args.rounds):
        order = pairs if round_index % 2 == 0 else pairs[::-1]
        for count, way in order:
            seconds = timed(pipe, way, count, *shape)
            runs.append({"round": round_index, "num_images": count, "way": way, "seconds": round(seconds, 4)})
            print(f"round {round_index + 1}/{args.rounds}: num_images {count}, {way}: {seconds:.3f} s", flush=True)
    rows = summarize(runs)
    print(f"\n{args.size} model, {args.side}x{args.side}, {args.steps} steps, guidance {args.guidance}, "
          f"{args.device}, torch threads {torch.get_num_threads()}, medians of {args.rounds} rounds:\n")
    print(markdown(rows))
    args.results.mkdir(parents=True, exist_ok=True)
    name = args.machine or machine_slug(info)
    path = args.results / f"batch-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"machine": info, "settings": settings, "torch_threads": torch.get_num_threads(),
                                "runs": runs, "summary": rows}, indent=2))
    print(f"\nraw runs: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
