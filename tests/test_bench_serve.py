"""`premoe bench serve` end to end on a tiny model: the report's fields, no errors, every reply equal to alone.

Timings are not checked (they depend on the machine); the figures in docs/measurements.md come from the run on the
reference model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from premoe_service.bench.serve.report import table
from premoe_service.bench.serve.stall import pick_newcomers
from premoe_service.cli import main
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.profiler import Demo, Selection, profile_store
from premoe_service.store import Store, shard

TASKS = {
    "code": (
        ["def add(a, b):\n    return a + b\n", "for i in range(3):\n    print(i)\n", "import os\nprint(os.sep)\n"],
        [{"text": "def mul(a, b):\n    return a * b\n"}, {"text": "while True:\n    break\n"}],
    ),
    "sums": (
        ["add: 12+30=42", "add: 7+8=15", "add: 51+22=73"],
        [{"prompt": "add: 3+4=", "answer": "7"}, {"prompt": "add: 20+5=", "answer": "25"}],
    ),
    "prose": (
        ["The cat sat on the mat.", "A quiet river ran by the town.", "Rain fell all night long."],
        [{"text": "The old house stood on a hill."}, {"text": "Birds sang in the morning."}],
    ),
}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-serve")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    store = Store(root / "store")
    (root / "profiles").mkdir()
    for name, (demos, items) in TASKS.items():
        selection = Selection(policy="top_k", value=3, unit="experts")
        profile, _ = profile_store(store, name, [Demo(prompt=d) for d in demos], selection=selection)
        profile.save(root / "profiles" / f"{name}.safetensors")
        (root / "data" / name).mkdir(parents=True)
        (root / "data" / name / "eval.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    return {"root": root, "store": root / "store", "ckpt": root / "ckpt"}


def test_bench_serve_reports_every_figure_with_no_errors(tiny_setup: dict[str, Path]) -> None:
    root = tiny_setup["root"]
    out = root / "report.json"
    code = main(
        [
            "bench",
            "serve",
            "--store",
            str(tiny_setup["store"]),
            "--model",
            str(tiny_setup["ckpt"]),
            "--profiles",
            str(root / "profiles"),
            "--data",
            str(root / "data"),
            "--clients",
            "1,2",
            "--rounds",
            "1",
            "--max-new-tokens",
            "2-6",
            "--stall-tokens",
            "16",
            "--stall-newcomers",
            "2",
            "--stall-newcomer-tokens",
            "3",
            "--stall-rounds",
            "1",
            "--baseline-threads",
            "1,2",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    report = json.loads(out.read_text())
    assert code == 0
    assert {"platform", "cpu_count", "torch", "device"} <= set(report["machine"])
    assert len(report["requests"]) == 6 and {r["task"] for r in report["requests"]} == set(TASKS)
    assert report["errors"] == 0 and report["mismatches"] == 0
    assert report["lone_pass"]["errors"] == 0
    assert set(report["results"]) == {"1", "2"}
    for entry in report["results"].values():
        ours = entry["ours"]
        assert ours["errors"] == 0 and ours["mismatches"] == 0
        assert ours["route_p50_ms"] > 0  # the server's time to route each request, from its stats
        assert ours["tokens"] == report["real_tokens"] > 0
        for key in ("tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
            assert key in ours
        hf = entry["transformers"]
        assert hf["alone"]["tokens_per_s"] > 0 and hf["padded"]["tokens_per_s"] > 0
        assert "tokens_per_s" in hf["continuous"]  # None with its error listed when transformers' CB fails
        assert {"alone", "padded", "continuous"} == set(entry["ratios"])
    # Measured as a user would: the server, the transformers baseline and the clients each in a process of their own.
    procs = report["processes"]
    assert len({procs["bench"], procs["server"], procs["baseline"], *procs["clients"]}) == 3 + len(procs["clients"])
    assert procs["server_command"][:3] == ["-m", "premoe_service.cli", "serve"]
    for entry in report["results"].values():
        for kind in ("alone", "padded"):
            assert entry["transformers"][kind]["pids"] == [procs["baseline"]]  # every baseline run, in that process
            assert set(entry["transformers"][kind]["by_threads"]) == {"1", "2"}
            assert entry["transformers"][kind]["threads"] in (1, 2)
            runs = [run for rounds in entry["transformers"][kind]["rounds"].values() for run in rounds]
            assert {run["threads"] for run in runs} == {1, 2}  # the torch threads each run was measured at
        assert entry["ours"]["tokens_per_cpu_s"] > 0 and entry["transformers"]["padded"]["tokens_per_cpu_s"] > 0
        assert set(entry["cpu_ratios"]) == {"alone", "padded", "continuous"}
        # The clients' own CPU, read in their process: on a small machine it is part of what the server competes with.
        assert entry["ours"]["cpu_s"] > 0 and entry["ours"]["client_cpu_s"] > 0
        assert all(run["client_cpu_s"] > 0 for run in entry["ours"]["rounds"])
    assert "the clients' own process" in table(report)
    stall = report["stall"]
    assert "error" not in stall, stall.get("error")
    assert stall["errors"] == 0 and stall["stream_replies_equal"] and stall["patterns_equal_in_both_cases"]
    for case in ("cold", "warm"):
        assert {"itl_p50_ms", "itl_p99_ms", "newcomer_loaded_bytes"} <= set(stall[case])
    assert stall["warm"]["newcomer_loaded_experts"] == 0
    assert "p99_ratio" in stall and len(report["targets"]) == 3


def test_newcomers_fit_beside_the_stream_but_not_beside_each_other() -> None:
    stream = {0: {0, 1, 2}, 1: {0, 1, 2}}
    patterns = {
        "s": stream,
        "a": {0: {0, 1, 3}, 1: {0, 1, 4}},
        "b": {0: {0, 2, 5}, 1: {1, 2, 6}},
        "c": {0: {0}, 1: {1}},
    }
    tasks, slots, forced = pick_newcomers(patterns, "s", None)
    assert tasks == ["a", "b"] and slots == 4 and forced == 2  # S+A+B needs 5 per layer: one reload per layer
    assert pick_newcomers(patterns, "s", 3) == (["c"], 3, 0)  # only c fits beside s in 3 slots


def test_llama_baseline_needs_both_its_binary_and_its_gguf(tmp_path: Path) -> None:
    from premoe_service.bench.serve.benchmark import ServeBenchOptions, _llama_wanted
    from premoe_service.bench.serve.llama import llama_server
    from premoe_service.errors import InvalidArgument

    assert not _llama_wanted(ServeBenchOptions())
    with pytest.raises(InvalidArgument) as missing:
        _llama_wanted(ServeBenchOptions(llama_server="/usr/bin/true"))
    assert missing.value.field == "llama_gguf"
    with pytest.raises(InvalidArgument) as missing:
        _llama_wanted(ServeBenchOptions(llama_gguf="model.gguf"))
    assert missing.value.field == "llama_server"
    with (
        pytest.raises(InvalidArgument) as absent,
        llama_server(str(tmp_path / "nope"), "x.gguf", slots=1, context=8, threads=1),
    ):
        pass
    assert absent.value.field == "llama_server"


def test_llama_replies_compare_with_ours_apart_from_our_final_eos() -> None:
    from premoe_service.bench.serve.llama import compare

    run = {"replies": [[5, 6, 7], [5, 6], [9], None], "tokens_per_s": 10.0, "wall_s": 1.0, "tokens": 6}
    run |= {"errors": ["HTTPError: 500"], "pid": 1}
    ours = [[5, 6, 7], [5, 6, 2], [8], [1]]  # equal; equal but our EOS (2); different; failed
    summary = compare(run, ours)
    assert summary["same_tokens_as_ours"] == 2 and summary["errors"] == 1 and summary["requests"] == 4


def test_requests_are_routed_by_the_server_unless_they_name_their_task(
    tiny_setup: dict[str, Path], embedder: Any
) -> None:
    """The benchmark's clients send prompts as users do (the server embeds and routes each, retrieval's time
    included); `--name-tasks` names each request's task, and retrieval is skipped."""
    import grpc

    from premoe_service.bench.serve.clients import build_requests, stream_one
    from premoe_service.server import running_server
    from premoe_service.server.gen import premoe_pb2 as pb
    from premoe_service.server.gen import premoe_pb2_grpc as pb_grpc
    from premoe_service.serving import ServiceConfig

    root = tiny_setup["root"]
    config = ServiceConfig(store=tiny_setup["store"], profiles=root / "profiles", port=0, device="cpu")
    with running_server(config, embedder=embedder) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PreMoeStub(channel)
        decisions = {}
        for named in (False, True):
            requests = build_requests(root / "data", sorted(TASKS), 1, (2, 2), name_tasks=named)
            replies = [stream_one(stub, pb, r, timeout=60) for r in requests]
            assert all(r.error is None for r in replies)
            decisions[named] = {r.decision for r in replies}
    assert decisions[True] == {"override"}
    assert decisions[False] and "override" not in decisions[False]
