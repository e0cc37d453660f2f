"""One start of the demo app with [compile] on, in a process of its own (a runner's start), for
tests/test_compile_inductor.py.

    python tests/compile_start.py SETTINGS_TOML REPORT_JSON [--eager]

Runs setup() (store -> load -> compile -> warm-up -> publish) on $APP_DATA_ROOT, then one image at
the warm-up's shape, and writes a JSON report: inductor's and AOTAutograd's cache counters, the
local cache directory's files at the end, and the setup's phase times. With
``--eager`` it also loads the same store entry again, uncompiled, and reports the largest
difference between the two images' pixels.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT, SEED, STEPS = "a cat on a horse", 7, 2


def image(pipe, width: int, height: int, guidance_scale: float):
    """The pixels (floats in [0, 1]) of one image from a fixed prompt and seed."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(SEED)
    return pipe(prompt=PROMPT, width=width, height=height, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                generator=generator, output_type="np").images[0]


def main() -> None:
    settings_path, report_path = Path(sys.argv[1]), Path(sys.argv[2])
    import torch

    torch.set_num_threads(1)  # 2 shared cores: one thread per op is the fastest and steadiest here
    from torch._dynamo.utils import counters

    import app
    from serving.compile import listing
    from serving.schema import preset_size
    from serving.settings import load_settings

    instance = app.TextToImageApp(_allow_init=True)
    instance.settings = load_settings(settings_path, profile="demo")
    assert instance.settings.compile.enabled, "the test's settings must turn [compile] on"
    instance.setup()
    directory = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    warm = {name: dict(counters[name]) for name in ("inductor", "aot_autograd")}

    serving = instance.settings.serving
    width, height = preset_size(serving.warmup_sizes[0], serving)
    compiled = image(instance.pipe, width, height, serving.default_guidance_scale)
    report = {
        "counters": warm,
        "counters_after_request": {name: dict(counters[name]) for name in ("inductor", "aot_autograd")},
        "cache_files": sorted(listing(directory)),
        "phase_seconds": instance.phase_seconds,
    }
    if "--eager" in sys.argv:
        from model_loader import load_pipeline

        eager_pipe = load_pipeline(instance.model.path, device="cpu", torch_dtype=torch.float32)
        eager_pipe.set_progress_bar_config(disable=True)
        eager = image(eager_pipe, width, height, serving.default_guidance_scale)
        report["max_abs_difference"] = float(abs(compiled.astype("float64") - eager.astype("float64")).max())
        report["pixels_compared"] = int(compiled.size)
    report_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
