"""bench/batch.py's summary: medians per image of each way, their spread, and batching's speed-up."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _batch_module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_batch", REPO / "bench" / "batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_summary_gives_median_seconds_per_image_their_range_and_the_speedup(monkeypatch):
    batch = _batch_module(monkeypatch)
    old, batched = batch.WAYS
    runs = [{"num_images": n, "way": way, "seconds": seconds * n}
            for n in batch.COUNTS
            for way, per_image in ((old, (1.0, 1.2, 5.0)), (batched, (0.5, 0.6, 0.4)))
            for seconds in per_image]
    rows = batch.summarize(runs)
    assert [row["num_images"] for row in rows] == [1, 2, 4]
    for row in rows:
        assert row[f"per_image_s[{old}]"] == 1.2 and row[f"range_s[{old}]"] == [1.0, 5.0]
        assert row[f"per_image_s[{batched}]"] == 0.5 and row[f"range_s[{batched}]"] == [0.4, 0.6]
        assert row["speedup"] == 2.4
    assert batch.markdown(rows).splitlines()[2] == "| 1 | 1.200 (1.000-5.000) | 0.500 (0.400-0.600) | 2.40x |"
