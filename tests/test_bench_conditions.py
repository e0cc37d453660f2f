"""bench/conditions.py end to end on tiny models: both peers load the same ControlNet and image
encoder (the same parameter count) in fresh processes, hot and cold, and the report has every row."""

from __future__ import annotations

import json

from bench import conditions


def test_the_conditions_benchmark_runs_both_peers_and_writes_its_report(tmp_path):
    assert conditions.main(["--small", "--runs", "1", "--workdir", str(tmp_path / "work"),
                            "--results", str(tmp_path / "results")]) == 0
    [path] = (tmp_path / "results").glob("conditions-*.json")
    report = json.loads(path.read_text())
    assert set(report["summary"]) == {"diffusers/hot", "ours/hot", "diffusers/cold", "ours/cold"}
    assert [(r["peer"], r["cache"]) for r in report["raw"]] == [
        ("diffusers", "hot"), ("ours", "hot"), ("diffusers", "cold"), ("ours", "cold")]
    counts = {r["parameters"] for r in report["raw"]}
    assert len(counts) == 1 and counts.pop() > 0  # both peers loaded the very same models
    assert all(0 < r["load_s"] <= r["ready_s"] <= r["process_s"] for r in report["raw"])
