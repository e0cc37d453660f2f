"""``python -m demo_training train``: retrain the demo model (see demo_training.train);
``python -m demo_training controlnet``: train its ControlNet (see demo_training.controlnet);
``python -m demo_training images``: ask a running demo server (``make serve``) for the README's pictures."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conversion.durable import write_atomic

README_IMAGES_DIR = Path(__file__).resolve().parents[1] / "docs" / "demo"
# (prompt, seed, file name): what the README shows.
README_IMAGES = (
    ("a red circle on a blue background", 1, "red-circle-on-blue.png"),
    ("a yellow star on a purple background", 2, "yellow-star-on-purple.png"),
    ("a white triangle on a green background", 3, "white-triangle-on-green.png"),
)


def request_images(url: str, out: Path) -> list[Path]:
    """POST each README prompt to the demo server at ``url`` and save the PNG it answers with."""
    written = []
    for prompt, seed, name in README_IMAGES:
        body = json.dumps({"prompt": prompt, "seed": seed, "output_format": "png"}).encode()
        request = urllib.request.Request(url.rstrip("/") + "/", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{url} answered {exc.code} to {prompt!r}: {exc.read()[:300].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SystemExit(f"cannot reach the demo server at {url} ({exc}): is `make serve` running there?") from None
        except ValueError as exc:
            raise SystemExit(f"{url} did not answer JSON ({exc}): is it this app?") from None
        header, _, data = answer["images"][0]["url"].partition(",")
        if header != "data:image/png;base64":
            raise SystemExit(f"{url} answered {header[:40]!r}, not an inline PNG: is it the demo profile (make serve)?")
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / name, base64.b64decode(data))
        written.append(out / name)
        print(f"{out / name}: {prompt!r}, seed {seed}")
    return written


def _config_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """One ``--field-name`` option per field of the dataclass ``config``, its default the field's."""
    for field in dataclasses.fields(config):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                            help=f"default {field.default}")


def _config_of(args: argparse.Namespace, config: type) -> Any:
    """The dataclass ``config`` built from the options :func:`_config_arguments` added."""
    return config(**{field.name: getattr(args, field.name) for field in dataclasses.fields(config)})


def main(argv: list[str] | None = None) -> int:
    from conversion.sources.demo import TRAINED_PIPELINE

    from .controlnet import CONTROLNET_DIR, ControlNetConfig
    from .controlnet import train as train_controlnet
    from .train import REPORT_DIR, TrainConfig, train

    parser = argparse.ArgumentParser(prog="python -m demo_training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="train the demo model and write its pipeline, report and plots")
    run.add_argument("--out", type=Path, default=None,
                     help=f"write the pipeline to OUT/pipeline and the report and plots to OUT (default: the "
                          f"pipeline to {TRAINED_PIPELINE}, what `demo` serves, the report to {REPORT_DIR})")
    _config_arguments(run, TrainConfig)
    control = commands.add_parser("controlnet", help="train the demo model's ControlNet (a silhouette says where "
                                                     "the shape goes) and write it, its report and plots")
    control.add_argument("--out", type=Path, default=None,
                         help=f"write the ControlNet to OUT/controlnet and the report and plots to OUT (default: "
                              f"the ControlNet to {CONTROLNET_DIR}, the report to {REPORT_DIR})")
    _config_arguments(control, ControlNetConfig)
    images = commands.add_parser("images", help="save the README's demo pictures from a running `make serve`")
    images.add_argument("--url", default="http://localhost:8080", help="the demo server (default %(default)s)")
    images.add_argument("--out", type=Path, default=README_IMAGES_DIR, help="default %(default)s")
    args = parser.parse_args(argv)
    if args.command == "images":
        request_images(args.url, args.out)
        return 0
    if args.command == "controlnet":
        net_config = _config_of(args, ControlNetConfig)
        if args.out is None:
            train_controlnet(net_config)
        else:
            train_controlnet(net_config, controlnet_dir=args.out / "controlnet", report_dir=args.out)
        return 0
    config = _config_of(args, TrainConfig)
    if args.out is None:
        train(config)
    else:
        train(config, pipeline_dir=args.out / "pipeline", report_dir=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
