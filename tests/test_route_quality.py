"""Serving width (a no-match and a task measured to keep too little get every expert) and the route-quality
benchmark's scoring, checked against transformers itself."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from premoe_service.bench.route.quality import ContinuationScorer, QualityRow, summarise, task_retention
from premoe_service.engine import SamplingParams
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.pattern import Pattern
from premoe_service.profiler import Demo, profile_store
from premoe_service.retrieval import LocalProfileStore, RouteDecision
from premoe_service.retrieval.routing_record import RoutingRecord
from premoe_service.serving import ServiceConfig, ServingCore
from premoe_service.serving.width import choose_width
from premoe_service.store import Store, shard

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    root = tmp_path_factory.mktemp("quality")
    model = save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    return model, root / "store"


def test_width_serves_a_no_match_and_a_costly_task_wide_and_says_why() -> None:
    match = RouteDecision([("code", 1.0)], "code", True, [], "code matched")
    none = RouteDecision([("code", 0.1)], None, False, ["code"], "below")
    assert not choose_width(match, {"code": 0.95}).wide
    costly = choose_width(match, {"code": 0.8})
    assert costly.wide and "0.800" in costly.why and "code" in costly.why
    assert choose_width(none, {}).wide and "no task matched" in choose_width(none, {}).why
    assert not choose_width(none, {}, all_fit=False).wide  # a budget below every expert keeps the union fallback
    assert not choose_width(match, {"code": 0.8}, all_fit=False).wide
    unsure = RouteDecision([("code", 1.0)], "code", True, [], "code matched", similarity=0.3, lead=0.2)
    assert choose_width(unsure, {}).wide and "0.20" in choose_width(unsure, {}).why
    assert not choose_width(unsure, {}, wide_lead=0.1).wide


def test_the_scorer_continues_and_scores_as_transformers_does(checkpoint) -> None:
    model, store_dir = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(store_dir)
    scorer = ContinuationScorer(Store(store_dir), tokenizer, max_new_tokens=6)
    ids, cont = scorer.continuation("def add(a, b):")
    reference = model.generate(
        torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=list(scorer.eos) or None
    )
    assert cont == reference[0, len(ids) :].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids + cont])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[len(ids) - 1 : -1], torch.tensor(cont))
    assert scorer.nll(ids, cont, scorer.full) == pytest.approx(float(expected), abs=1e-5)
    # Fewer experts cost likelihood on a random tiny model: the pattern really is applied.
    spec = scorer.spec
    narrow = Pattern.build(spec, {layer: list(range(spec.top_k)) for layer in spec.moe_layers})
    assert scorer.nll(ids, cont, narrow) != pytest.approx(scorer.nll(ids, cont, scorer.full), abs=1e-4)


def test_the_server_serves_a_task_that_keeps_too_little_with_every_expert(checkpoint, embedder, tmp_path) -> None:
    _, store_dir = checkpoint
    demos = ["def add(a, b):\n    return a + b", "def sub(a, b):\n    return a - b", "for i in range(3): print(i)"]
    profile, _ = profile_store(Store(store_dir), "code", [Demo(d) for d in demos], embedder=embedder)
    profile.save(tmp_path / "code.safetensors")
    core = ServingCore(ServiceConfig(store=store_dir, profiles=tmp_path, port=0, device="cpu"), embedder=embedder)
    try:
        prompt = "def mul(a, b):\n    return a * b"
        *_, small = core.generate(prompt, SamplingParams(max_new_tokens=1), stream=False)
        assert small.plan.task == "code" and small.plan.pattern == core.tasks.pattern(profile)
        LocalProfileStore(tmp_path).write_routing(RoutingRecord(task_retention={"code": 0.5}).to_bytes())
        core.registry.refresh()
        *_, wide = core.generate(prompt, SamplingParams(max_new_tokens=1), stream=False)
        assert wide.plan.task == "code" and wide.plan.pattern == Pattern.full(core.spec)
        assert "keeps 0.500" in wide.plan.reason and "keeps" not in small.plan.reason
    finally:
        core.close()


def test_summary_and_task_retention_count_what_they_say() -> None:
    def row(label: str | None, retention: float, own: float = math.nan, share: float = 0.5) -> QualityRow:
        return QualityRow("q", label, "match", label or "", label or "", False, "", share, retention, own)

    rows = [row("a", 1.0, 0.9), row("a", 0.5, 0.7), row(None, 1.0, share=1.0)]
    summary = summarise(rows)
    assert summary["a"].mean == 0.75 and summary["a"].own_mean == pytest.approx(0.8)
    assert summary["off-topic"].share == 1.0 and summary["on-task"].n == 2
    assert task_retention(rows) == {"a": 0.8}
