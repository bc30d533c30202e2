"""The serving domain without gRPC: coverage guardrail, fallback patterns, shared residency between requests."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.profiler import Demo, Selection
from premoe_service.serving import GenerationResult, PreMoeService, SamplingParams, ServiceConfig
from premoe_service.store import shard

CODE = [Demo("def add(a, b):\n    return a + b\n"), Demo("for i in range(3):\n    print(i)\n")]
MATH = [Demo("12+30=42"), Demo("7+8=15"), Demo("100+23=123")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    return root / "store"


def run(service: PreMoeService, prompt: str, **kwargs) -> GenerationResult:
    *pieces, result = service.generate(prompt, SamplingParams(max_new_tokens=4), **kwargs)
    assert isinstance(result, GenerationResult) and all(isinstance(p, str) for p in pieces)
    return result


def test_low_coverage_widens_the_pattern_with_the_prompts_experts(store: Path, embedder) -> None:
    service = PreMoeService(ServiceConfig(store=store, device="cpu", coverage_floor=0.95), embedder=embedder)
    service.register_task("code", CODE, selection=Selection("tcess", "top_k", 2, "experts"))
    result = run(service, "def add(a, b):", task="code")
    assert result.widened
    assert result.plan.pattern.size > 6  # more than 2 experts in each of the 3 layers
    assert result.coverage > 0.5

    relaxed = PreMoeService(ServiceConfig(store=store, device="cpu", coverage_floor=0.0), embedder=embedder)
    relaxed.register_task("code", CODE, selection=Selection("tcess", "top_k", 2, "experts"))
    kept = run(relaxed, "def add(a, b):", task="code")
    assert not kept.widened and kept.plan.pattern.size == 6 and kept.coverage < result.coverage


def test_no_match_falls_back_to_the_union_of_the_nearest_tasks(store: Path, embedder) -> None:
    service = PreMoeService(ServiceConfig(store=store, device="cpu", route_threshold=0.99), embedder=embedder)
    code = service.register_task("code", CODE, selection=Selection("tcess", "top_k", 3, "experts"))
    math = service.register_task("math", MATH, selection=Selection("tcess", "top_k", 3, "experts"))
    plan = service.plan("def sub(a, b): return a - b")
    assert plan.decision == "fallback" and plan.fallback_tasks
    union = code.pattern.union(math.pattern) if len(plan.fallback_tasks) == 2 else None
    expected = union or (code.pattern if plan.fallback_tasks == ["code"] else math.pattern)
    assert plan.pattern == expected


def test_requests_share_resident_experts(store: Path, embedder) -> None:
    service = PreMoeService(ServiceConfig(store=store, device="cpu", budget="0.5"), embedder=embedder)
    service.register_task("code", CODE, selection=Selection("tcess", "top_k", 4, "experts"))
    first = run(service, "def f(x):", task="code")
    assert first.loads["device"] == 0 and first.loads["cache"] + first.loads["disk"] == 12

    results: list[GenerationResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(run(service, "def g(y):", task="code"))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 3
    assert all(r.loads == {"device": 12, "cache": 0, "disk": 0} for r in results)  # nothing loaded again
    assert service.stats()["tasks"]["code"][0] == 4
