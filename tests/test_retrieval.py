"""Retrieval on the real MiniLM model and real FAISS: embedding, the index, scoring, decisions, calibration."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from premoe_service.errors import InvalidArgument, NotFound
from premoe_service.profiler.profile import Profile
from premoe_service.retrieval import (
    DEFAULT_THRESHOLD,
    CheckedPrompt,
    Embedder,
    RoutePolicy,
    Router,
    TaskIndex,
    check_prompt,
    evaluate,
    load_route_records,
    suggest_threshold,
    task_scores,
)
from premoe_service.retrieval.embedder import SHARED_BATCH, _Call, _plan
from premoe_service.retrieval.index import faiss_gpus

NONSENSE = "zxqv blorf 7781 qqq"


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def router(embedder: Embedder, demo_profiles: dict[str, Profile]) -> Router:
    index = TaskIndex(embedder.dim)
    index.add_many((name, p.demo_embeddings.numpy()) for name, p in demo_profiles.items())
    return Router(embedder, index)


# --- embedder ---------------------------------------------------------------------------------------


def test_embedder_gives_unit_vectors_offline(embedder: Embedder) -> None:
    vectors = embedder.encode(["How do I bake bread?", "Proofing and kneading dough", "Black holes and stars"])
    # the default precision is "auto": bfloat16 where the CPU multiplies it natively, named apart
    assert embedder.name == ("all-MiniLM-L6-v2" + ("" if embedder.precision == "float32" else "@bfloat16.2"))
    assert embedder.dim == 384
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]  # baking is nearer to dough than to black holes
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert embedder.encode([]).shape == (0, 384)


def test_embedder_batches_agree(embedder: Embedder) -> None:
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(7)]
    np.testing.assert_allclose(embedder.encode(texts, batch_size=2), embedder.encode(texts), atol=1e-5)


def _encode_at_once(embedder: Embedder, calls: list[list[str]]) -> list[np.ndarray | BaseException]:
    """Make `calls` on threads while the model is busy, so that they all wait; then let them run."""
    results: list[np.ndarray | BaseException] = [np.zeros(0)] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = embedder.encode(calls[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with embedder._cond:  # the model is busy: every call waits
        embedder._busy = True
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(embedder._waiting) < len(calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(embedder._waiting) == len(calls)
    with embedder._cond:
        embedder._busy = False
        embedder._cond.notify_all()
    for thread in threads:
        thread.join(60)
    return results


def test_calls_made_at_once_share_passes_and_each_gets_its_own_vectors(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [[f"prompt {i} about {topic}"] for i, topic in enumerate(["bread", "stars", "tax law", "python"] * 3)]
    calls[5] = ["two texts in one call", "the second of them"]
    alone = [embedder.encode(c) for c in calls]
    passes: list[int] = []
    forward = embedder._forward
    monkeypatch.setattr(embedder, "_forward", lambda texts, size: passes.append(len(texts)) or forward(texts, size))
    results = _encode_at_once(embedder, calls)
    # one run over every waiting call's texts, in passes of at most SHARED_BATCH texts
    assert sum(passes) == sum(len(c) for c in calls) and len(passes) == 2 and max(passes) <= SHARED_BATCH
    for got, want in zip(results, alone, strict=True):
        assert isinstance(got, np.ndarray) and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)  # float32 rounding of a shared pass, nothing more


def test_a_call_is_answered_when_its_pass_is_done_not_the_whole_run(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SHARED_BATCH short calls fill the first pass; the long one runs in a second pass, which waits (at most 20 s)
    # for the short calls to have returned: they may only if they were answered when their own pass ended.
    calls = [[f"short {i}"] for i in range(SHARED_BATCH)] + [["a much longer prompt that sorts after the others"]]
    returned = threading.Event()
    seen: list[bool] = []
    forward = embedder._forward

    def second_pass_waits(texts: list[str], size: int) -> np.ndarray:
        if calls[-1][0] in texts:
            seen.append(returned.wait(20))
        return forward(texts, size)

    monkeypatch.setattr(embedder, "_forward", second_pass_waits)
    short_done: list[str] = []
    encode = embedder.encode

    def counted(texts: list[str], **kwargs: Any) -> np.ndarray:
        vectors = encode(texts, **kwargs)
        if texts[0].startswith("short"):
            short_done.append(texts[0])
            if len(short_done) == SHARED_BATCH:
                returned.set()
        return vectors

    monkeypatch.setattr(embedder, "encode", counted)
    results = _encode_at_once(embedder, calls)
    assert seen == [True]  # every short call had returned before the long one's pass ran
    assert all(isinstance(r, np.ndarray) and r.shape == (1, 384) for r in results)


def test_calls_planned_earlier_run_before_a_later_call_however_short(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two passes are planned (SHARED_BATCH short calls, then a long one); while the first runs, a shorter call
    # arrives. It must wait for the planned long pass, not overtake it: shortest-first holds within a plan only,
    # so that a stream of short prompts cannot starve a long one.
    calls = [[f"short {i}"] for i in range(SHARED_BATCH)] + [["a much longer prompt that sorts after the others"]]
    late = ["x"]
    later = threading.Thread(target=lambda: embedder.encode(late))
    order: list[list[str]] = []
    forward = embedder._forward

    def recorded(texts: list[str], size: int) -> np.ndarray:
        if not order:  # the first pass: the late call arrives and waits
            later.start()
            deadline = time.monotonic() + 20
            while not any(c.texts == late for c in embedder._waiting) and time.monotonic() < deadline:
                time.sleep(0.01)
        order.append(list(texts))
        return forward(texts, size)

    monkeypatch.setattr(embedder, "_forward", recorded)
    _encode_at_once(embedder, calls)
    later.join(60)
    assert [len(texts) for texts in order] == [SHARED_BATCH, 1, 1]
    assert order[1] == calls[-1] and order[2] == late  # the planned long pass first, then the late call


def test_waiting_calls_are_planned_into_passes_shortest_first() -> None:
    short, mid, long_ = (_Call([t], None) for t in ("a", "a b c", "a b c d e f g"))
    sized = _Call(["with a batch size"], 4)
    big = _Call([f"text {i}" for i in range(SHARED_BATCH + 1)], None)
    planned = _plan([long_, sized, *(_Call([f"t{i}"], None) for i in range(SHARED_BATCH - 2)), mid, big, short], 32)
    assert planned[0] == (4, [sized])  # a call with its own batch size runs alone, at that size
    sizes = [size for size, _ in planned[1:]]
    texts = [[t for c in group for t in c.texts] for _, group in planned[1:]]
    assert sizes == [SHARED_BATCH] * 3 and [len(t) for t in texts] == [SHARED_BATCH, SHARED_BATCH + 1, 1]
    # shortest texts first (a call by its longest text); a call of more than SHARED_BATCH texts is a pass alone
    assert texts[0][0] == "a" and texts[0][-1] == "a b c" and planned[2][1] == [big] and planned[3][1] == [long_]
    assert _plan([short], 32) == [(32, [short])]  # one call alone runs at the embedder's batch size


def test_a_call_whose_texts_fail_fails_alone(embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = embedder._forward

    def failing(texts: list[str], size: int) -> np.ndarray:
        if "poison" in texts:
            raise ValueError("cannot encode poison")
        return forward(texts, size)

    monkeypatch.setattr(embedder, "_forward", failing)
    calls = [["fine one"], ["poison"], ["fine two", "fine three"]]
    results = _encode_at_once(embedder, calls)
    assert isinstance(results[1], ValueError)
    assert isinstance(results[0], np.ndarray) and results[0].shape == (1, 384)
    assert isinstance(results[2], np.ndarray) and results[2].shape == (2, 384)


def test_embedder_rejects_bad_input(embedder: Embedder) -> None:
    with pytest.raises(InvalidArgument) as info:
        embedder.encode(["fine", 3])  # type: ignore[list-item]
    assert info.value.field == "texts[1]"
    with pytest.raises(InvalidArgument) as info:
        embedder.encode("a bare string")
    assert info.value.field == "texts"


def test_embedder_needs_a_local_model(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        Embedder(tmp_path / "no-such-model")
    assert info.value.field == "embedder"


# --- index ------------------------------------------------------------------------------------------


def test_exact_search_equals_numpy() -> None:
    rng = np.random.default_rng(1)
    tasks = {f"t{i}": unit_rows(rng, 4, 16) for i in range(5)}
    index = TaskIndex(16, kind="flat")
    index.add_many(tasks.items())
    queries = unit_rows(rng, 3, 16)
    all_vectors = np.concatenate(list(tasks.values()))
    owners = [name for name, v in tasks.items() for _ in range(len(v))]
    for query, hits in zip(queries, index.search(queries, 6), strict=True):
        expected = np.argsort(-(all_vectors @ query))[:6]
        assert [t for t, _ in hits] == [owners[i] for i in expected]
        np.testing.assert_allclose([s for _, s in hits], (all_vectors @ query)[expected], atol=1e-5)


def test_removing_a_task_keeps_the_others_untouched() -> None:
    rng = np.random.default_rng(2)
    index = TaskIndex(8, kind="flat")
    a, b, c = unit_rows(rng, 3, 8), unit_rows(rng, 2, 8), unit_rows(rng, 4, 8)
    index.add_many([("a", a), ("b", b), ("c", c)])
    assert index.remove("b") and not index.remove("b")
    hits = index.search(b, 9)
    assert all(task != "b" for row in hits for task, _ in row) and len(hits[0]) == 7
    np.testing.assert_allclose(index.vectors("c"), c, atol=1e-6)  # stored, not recomputed
    # The row -> task map stays aligned after the removal: a's own vectors find a first.
    assert [row[0][0] for row in index.search(a, 1)] == ["a", "a", "a"]


def test_hnsw_agrees_with_exact_search() -> None:
    rng = np.random.default_rng(3)
    tasks = [(f"t{i}", unit_rows(rng, 5, 64)) for i in range(600)]  # 3,000 vectors
    exact, hnsw = TaskIndex(64, kind="flat"), TaskIndex(64, kind="hnsw")
    exact.add_many(tasks)
    hnsw.add_many(tasks)
    assert hnsw.uses_hnsw and not exact.uses_hnsw
    # Queries near stored demos, as real prompts are near their task's demos.
    picks = np.concatenate([v for _, v in tasks])[rng.integers(0, 3000, 200)]
    queries = picks + 0.3 * unit_rows(rng, 200, 64)
    truth = [row[0][0] for row in exact.search(queries, 1)]
    recall = np.mean([row[0][0] == t for row, t in zip(hnsw.search(queries, 1), truth, strict=True)])
    assert recall >= 0.95, f"HNSW recall@1 {recall:.3f}"

    # Removal rebuilds the graph from the stored vectors.
    assert hnsw.remove("t0") and exact.remove("t0")
    assert hnsw.remove_many(name for name, _ in tasks[:100]) == exact.remove_many(n for n, _ in tasks[:100]) == 99
    assert hnsw.ntotal == exact.ntotal == 2500
    truth = [row[0][0] for row in exact.search(queries, 1)]
    answers = [row[0][0] for row in hnsw.search(queries, 1)]
    assert not {f"t{i}" for i in range(100)} & set(answers)
    assert np.mean([a == t for a, t in zip(answers, truth, strict=True)]) >= 0.95


def test_auto_index_moves_to_hnsw_and_back() -> None:
    rng = np.random.default_rng(4)
    index = TaskIndex(8, kind="auto", hnsw_threshold=40)
    for i in range(9):
        index.add(f"t{i}", unit_rows(rng, 5, 8))
    assert index.uses_hnsw and index.ntotal == 45
    for i in range(6):
        index.remove(f"t{i}")
    assert index.ntotal == 15 and not index.uses_hnsw  # below half the threshold: exact again


def test_index_rejects_bad_vectors() -> None:
    index = TaskIndex(8)
    with pytest.raises(InvalidArgument) as info:
        index.add("t", np.ones((2, 7), dtype=np.float32))
    assert info.value.field == "demo_embeddings"
    with pytest.raises(InvalidArgument):
        index.add("t", np.full((1, 8), np.nan, dtype=np.float32))
    assert index.search(np.ones((1, 8), dtype=np.float32), 5) == [[]]


def test_index_device_follows_the_faiss_build() -> None:
    """faiss-cpu (this project's default install) searches on the CPU under "auto"; asking for a GPU index from a
    build without GPU support is refused naming the field, as is an unknown device. (With faiss-gpu and a GPU,
    "auto" builds the exact index on the GPU: that path needs the device machine.)"""
    gpus = faiss_gpus()
    assert TaskIndex(8).device == ("gpu" if gpus else "cpu")
    assert TaskIndex(8, device="cpu").device == "cpu"
    for device in (["gpu"] if gpus == 0 else []) + ["tpu"]:
        with pytest.raises(InvalidArgument) as info:
            TaskIndex(8, device=device)  # type: ignore[arg-type]
        assert info.value.field == "device"


# --- scoring and decisions --------------------------------------------------------------------------


def test_task_score_is_the_mean_of_its_top_m_demos() -> None:
    neighbours = [("a", 0.9), ("b", 0.8), ("a", 0.7), ("a", 0.6), ("a", 0.5), ("c", 0.4), ("b", 0.3)]
    counts = {"a": 8, "b": 8, "c": 1}
    ranked = task_scores(neighbours, counts.__getitem__, top_m=3)
    # a: mean(0.9, 0.7, 0.6); b: mean(0.8, 0.3, 0.3 padded with the lowest neighbour); c has one demo.
    assert [t for t, _ in ranked] == ["a", "b", "c"]
    np.testing.assert_allclose([s for _, s in ranked], [(0.9 + 0.7 + 0.6) / 3, (0.8 + 0.3 + 0.3) / 3, 0.4])


def test_held_out_queries_find_their_task(router: Router, held_out_queries: list[tuple[str, str]]) -> None:
    decisions = router.route_many([q for q, _ in held_out_queries])
    for (query, task), decision in zip(held_out_queries, decisions, strict=True):
        assert decision.ranked[0][0] == task, (query, decision.ranked[:3])
        assert decision.matched and decision.task == task, (query, decision.reason)
        assert decision.fallback_tasks == []


def test_nonsense_falls_back_to_a_union_or_the_general_task(router: Router) -> None:
    decision = router.route(NONSENSE)
    assert decision.score is not None and decision.score < DEFAULT_THRESHOLD
    assert not decision.matched and decision.task is None
    top = decision.ranked[0][1]
    expected = [t for t, s in decision.ranked if s >= top - router.policy.union_margin][: router.policy.union_max]
    assert decision.fallback_tasks == expected and decision.fallback_tasks[0] == decision.ranked[0][0]
    assert "union" in decision.reason

    general = Router(router.embedder, router.index, RoutePolicy(fallback="general", general_task="general"))
    decision = general.route(NONSENSE)
    assert not decision.matched and decision.fallback_tasks == ["general"]


def test_a_per_task_threshold_overrides_the_global_one(router: Router) -> None:
    query = "Give me a recipe for banana bread."
    assert router.route(query).task == "cooking"
    strict = Router(router.embedder, router.index, RoutePolicy(task_thresholds={"cooking": 0.99}))
    decision = strict.route(query)
    assert decision.ranked[0][0] == "cooking" and not decision.matched


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_blank_prompts_are_refused(router: Router, prompt: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        router.route(prompt)
    assert info.value.field == "prompt"


def test_a_prompt_is_checked_once_and_then_trusted() -> None:
    """A door checks a prompt's text once (`check_prompt`); the `CheckedPrompt` it hands on passes every later
    `check_prompt` (the serving core's, the registry's) as it is, equal to the text it was made from."""
    checked = check_prompt("def add(a, b):")
    assert isinstance(checked, CheckedPrompt) and checked == "def add(a, b):"
    assert check_prompt(checked, field="anything") is checked
    with pytest.raises(InvalidArgument) as info:
        check_prompt(" \n", field="prompt[2]")
    assert info.value.field == "prompt[2]"


def test_contradictory_policies_are_refused() -> None:
    with pytest.raises(InvalidArgument) as info:
        RoutePolicy(fallback="general")
    assert info.value.field == "general_task"
    with pytest.raises(InvalidArgument):
        RoutePolicy(threshold=1.5)
    with pytest.raises(InvalidArgument):
        RoutePolicy(top_m=0)


# --- calibration ------------------------------------------------------------------------------------


def test_evaluate_reports_accuracy_and_a_threshold(router: Router, held_out_queries: list[tuple[str, str]]) -> None:
    records = [{"query": q, "task": t} for q, t in held_out_queries]
    records += [{"query": NONSENSE, "task": None}, {"query": "qwpoeiru 00231 zzkx", "task": None}]
    result = evaluate(router, records)
    assert result.records == 12 and result.labelled == 10
    assert result.top1_accuracy == 1.0 and result.match_accuracy == 1.0
    assert result.no_match_recall == 1.0 and result.no_match_precision == 1.0
    scores = [d.score or 0.0 for d in router.route_many([str(r["query"]) for r in records])]
    assert result.suggested_threshold is not None
    assert max(scores[-2:]) < result.suggested_threshold < min(scores[:-2])
    assert result.balanced_accuracy == 1.0


def test_evaluate_per_task_confusion_and_thresholds_match_a_direct_computation(
    embedder: Embedder, demo_profiles: dict[str, Profile], held_out_queries: list[tuple[str, str]]
) -> None:
    labelled: list[tuple[str, str | None]] = list(held_out_queries)
    # Mislabelled and ambiguous queries so that top-1 misses, rejections and off-diagonal cells all occur.
    labelled += [
        ("How long should I roast a chicken?", "astronomy"),
        ("The striker scored a penalty in extra time.", "legal-contracts"),
        ("Sort a list of recipes by cooking time in Python", "cooking"),
        ("Which planet has the most moons?", "football"),
        (NONSENSE, None),
        ("qwpoeiru 00231 zzkx", None),
        ("Bonjour, comment allez-vous ?", None),
        ("SELECT name FROM users;", None),
    ]
    index = TaskIndex(embedder.dim)
    index.add_many((name, p.demo_embeddings.numpy()) for name, p in demo_profiles.items())
    scores = [d.score or 0.0 for d in Router(embedder, index).route_many([q for q, _ in labelled])]
    router = Router(embedder, index, RoutePolicy(threshold=float(np.median(scores))))
    result = evaluate(router, [{"query": q, "task": t} for q, t in labelled])

    decisions = router.route_many([q for q, _ in labelled])
    tops = [d.ranked[0][0] for d in decisions]
    labels = [t for _, t in labelled]
    tasks = sorted({t for t in labels if t is not None} | set(tops))
    assert list(result.per_task) == tasks
    for task in tasks:
        mine = [i for i, t in enumerate(labels) if t == task]
        item = result.per_task[task]
        assert item.queries == len(mine)
        assert item.top1_accuracy == pytest.approx(sum(tops[i] == task for i in mine) / len(mine))
        assert item.match_accuracy == pytest.approx(sum(decisions[i].task == task for i in mine) / len(mine))
        assert item.ranked_first == tops.count(task)
        first = [i for i, top in enumerate(tops) if top == task]
        right = [decisions[i].score or 0.0 for i in first if labels[i] == task]
        wrong = [decisions[i].score or 0.0 for i in first if labels[i] != task]
        assert result.suggested_thresholds[task] == suggest_threshold(right, wrong)[0]
    cells: dict[tuple[str | None, str | None], int] = {}
    for label, decision in zip(labels, decisions, strict=True):
        cells[label, decision.task] = cells.get((label, decision.task), 0) + 1
    flat = {(row, col): n for row, cols in result.confusion.items() for col, n in cols.items()}
    assert flat == cells
    rejected = [i for i, d in enumerate(decisions) if not d.matched]
    off_topic = [i for i, t in enumerate(labels) if t is None]
    on_task = [i for i, t in enumerate(labels) if t is not None]
    assert result.no_match_precision == pytest.approx(sum(labels[i] is None for i in rejected) / len(rejected))
    assert result.no_match_recall == pytest.approx(sum(not decisions[i].matched for i in off_topic) / len(off_topic))
    assert result.on_task_rejected == pytest.approx(sum(not decisions[i].matched for i in on_task) / len(on_task))
    # The set is not trivial: the figures above would not all hold by accident.
    assert any(row != col for row, col in cells) and 0 < len(rejected) < len(labelled)
    assert any(result.suggested_thresholds[t] is not None for t in tasks)
    assert any(result.per_task[t].top1_accuracy < 1 for t in tasks)


def test_suggested_threshold_splits_the_widest_gap() -> None:
    assert suggest_threshold([0.5, 0.6, 0.7], [0.1, 0.2]) == (0.35, 1.0)
    threshold, balanced = suggest_threshold([0.3, 0.6], [0.1, 0.4])
    assert balanced == 0.75 and threshold is not None
    assert suggest_threshold([0.5], []) == (None, None)


def test_route_records_are_read_and_bad_lines_named(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"query": "sort a list", "task": "python-coding"})
        + "\n\n"
        + json.dumps({"query": "hi", "task": None})
    )
    records = load_route_records(good)
    assert [(r.query, r.task) for r in records] == [("sort a list", "python-coding"), ("hi", None)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "task": null}\n{"query": "b", "task": null}\n{"query": "", "task": null}\n')
    with pytest.raises(InvalidArgument, match="line 3") as info:
        load_route_records(bad)
    assert info.value.field == f"{bad}:3"
    bad.write_text('{"query": "a", "task": "Not A Name"}\n')
    with pytest.raises(InvalidArgument, match="line 1"):
        load_route_records(bad)
    bad.write_text("not json\n")
    with pytest.raises(InvalidArgument, match="line 1"):
        load_route_records(bad)
    with pytest.raises(NotFound):
        load_route_records(tmp_path / "missing.jsonl")


def test_demos_and_examples_are_checked_once_and_then_trusted() -> None:
    """The gRPC door checks a RegisterTask's demos and examples once (`check_demos`, `check_examples`, after the
    sizes); what it hands on passes the task book's checks as it is."""
    from premoe_service.profiler.demos import CheckedDemos, CheckedExamples, check_demos, check_examples
    from premoe_service.server.gen import premoe_pb2 as pb
    from premoe_service.server.types import RegisterCall
    from premoe_service.serving import ServiceConfig

    config = ServiceConfig(store="unused")
    call = RegisterCall.from_pb(pb.RegisterTaskRequest(name="t", demos=["a demo"], examples=["an example"]), config)
    assert isinstance(call.demos, CheckedDemos) and [d.text for d in call.demos] == ["a demo"]
    assert isinstance(call.examples, CheckedExamples) and list(call.examples) == ["an example"]
    assert check_demos(call.demos) is call.demos and check_examples(call.examples) is call.examples
    for request, field in (
        (pb.RegisterTaskRequest(name="t", demos=[]), "demos"),
        (pb.RegisterTaskRequest(name="t", demos=["ok", " \n"]), "demos[1]"),
        (pb.RegisterTaskRequest(name="t", demos=["ok"], examples=[""]), "examples[0]"),
    ):
        with pytest.raises(InvalidArgument) as info:
            RegisterCall.from_pb(request, config)
        assert info.value.field == field
