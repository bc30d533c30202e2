"""`premoe bench step` end to end on a tiny model: every phase of the engine's step and transformers' own step, the
baseline in a process of its own. Timings are not checked (they depend on the machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from premoe_service.cli import main
from premoe_service.engine.stats import PHASES
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.store import shard


def test_bench_step_splits_the_step_and_times_the_baseline_apart(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    out = tmp_path / "step.json"
    args = ["--store", str(tmp_path / "store"), "--model", str(tmp_path / "ckpt"), "--rows", "1,3", "--kv-len", "5"]
    args += ["--steps", "3", "--rounds", "1", "--threads", "1", "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(["bench", "step", *args]) == 0
    report = json.loads(out.read_text())
    assert report["processes"]["engine"] == os.getpid() != report["processes"]["baseline"]
    assert [(r["threads"], r["rows"]) for r in report["results"]] == [(1, 1), (1, 3)]
    for row in report["results"]:
        assert set(row["phases_ms"]) == set(PHASES)
        assert row["phases_ms"]["forward"] > 0 and row["ours_step_ms"] > 0 and row["hf_step_ms"] > 0
        assert row["ratio"] == row["ours_step_ms"] / row["hf_step_ms"]
        assert row["ours_cpu_ms"] > 0 and row["hf_cpu_ms"] > 0
