"""`premoe bench step` end to end on a tiny model: every phase of the engine's step and transformers' own step, the
baseline in a process of its own; then a round of `bench serve`'s request list at once through the engine against
transformers' padded batch of it. Timings are not checked (they depend on the machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from premoe_service.bench.serve.clients import build_requests
from premoe_service.cli import main
from premoe_service.engine.stats import PHASES
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.store import shard


def test_bench_step_splits_the_step_and_times_the_baseline_apart(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    out = tmp_path / "step.json"
    args = ["--store", str(tmp_path / "store"), "--model", str(tmp_path / "ckpt"), "--rows", "1,3", "--kv-len", "5"]
    args += ["--steps", "3", "--rounds", "2", "--threads", "1", "--device", "cpu", "--out", str(out), "--quiet"]
    data = tasks(tmp_path / "data")
    args += ["--round-data", str(data), "--round-max-new-tokens", "2-6", "--round-seed", "3"]
    assert main(["bench", "step", *args]) == 0
    report = json.loads(out.read_text())
    assert report["processes"]["engine"] == os.getpid() != report["processes"]["baseline"]
    assert [(r["threads"], r["rows"]) for r in report["results"]] == [(1, 1), (1, 3)]
    for row in report["results"]:
        assert set(row["phases_ms"]) == set(PHASES)
        assert row["phases_ms"]["forward"] > 0 and row["ours_step_ms"] > 0 and row["hf_step_ms"] > 0
        assert row["ratio"] == row["ours_step_ms"] / row["hf_step_ms"]
        assert row["ours_cpu_ms"] > 0 and row["hf_cpu_ms"] > 0

    # The round: bench serve's list from the same folder, seed and range, every request generating its length.
    requests = build_requests(data, ["alpha", "beta"], 2, (2, 6), seed=3)
    lengths = [r.max_new_tokens for r in requests]
    assert len(set(lengths)) > 1  # rows leave the engine's batch at different steps
    rounds = report["round"]
    served = rounds["lengths"]  # each request's max_new_tokens, or fewer where it met EOS
    assert rounds["requests"] == len(served) == 4 and rounds["tokens"] == sum(served)
    assert all(1 <= n <= most for n, most in zip(served, lengths, strict=True))
    assert rounds["baseline_pid"] not in (os.getpid(), report["processes"]["baseline"])
    [row] = rounds["results"]
    assert row["threads"] == 1 and row["generated"] == [sum(served)] * 2
    assert row["ours_ms"] > 0 and row["hf_padded_ms"] > 0
    assert row["ratio"] == pytest.approx(row["hf_padded_ms"] / row["ours_ms"])
    assert row["ours_tokens_per_s"] == pytest.approx(sum(served) / row["ours_ms"] * 1e3)


def tasks(root: Path) -> Path:
    """Two text tasks of two prompts each, as `<task>/eval.jsonl`."""
    for name, texts in {"alpha": ["one two three", "four five"], "beta": ["red green blue", "cyan"]}.items():
        (root / name).mkdir(parents=True)
        (root / name / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def test_a_round_folder_without_tasks_is_refused_naming_its_flag(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["bench", "step", "--round-data", str(tmp_path / "empty"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "'--round-data'" in err and "eval.jsonl" in err and "Traceback" not in err
