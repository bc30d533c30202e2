"""The router signal against transformers itself, the combined decision's per-task rules, and profiles without it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from premoe_service.cli import main
from premoe_service.errors import FailedPrecondition, InvalidArgument
from premoe_service.families import adapter_for
from premoe_service.families.tiny import save_tiny_checkpoint, tiny_tokenizer
from premoe_service.profiler.profile import Profile
from premoe_service.retrieval import LocalProfileStore, MemoryProfileStore, Registry, RoutePolicy, RouteRecord
from premoe_service.retrieval.decision import decide_combined
from premoe_service.retrieval.evidence import PromptEvidence
from premoe_service.retrieval.task_leads import calibrate, demo_lines, load_task_leads
from premoe_service.runtime.router_signal import RouterSignal
from premoe_service.store import Store, shard

TEXTS = ["def add(a, b):\n    return a + b", "The cat sat on the mat.", "x"]
BACKGROUND = ['{"id": 7, "ok": true}', "<p>hello</p>", "SELECT 1;", "1 2 3 4 5 6 7", "@@@ ###"]


def tiny_store(tmp_path: Path, family: str) -> tuple[torch.nn.Module, Store]:
    model = save_tiny_checkpoint(tmp_path / f"{family}-ckpt", family)
    shard(tmp_path / f"{family}-ckpt", tmp_path / f"{family}-store", progress=False)
    return model, Store(tmp_path / f"{family}-store")


@pytest.mark.parametrize(
    "family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
)
def test_router_signal_equals_the_first_moe_routers_output_in_transformers(family: str, tmp_path: Path) -> None:
    model, store = tiny_store(tmp_path, family)
    signal = RouterSignal.from_store(store)  # the store's dense part only: no routed expert anywhere
    # The plain pass (no exception inside, so it compiles whole) gives the stopped forward's very bits.
    assert signal.mode == "plain"
    for text in TEXTS:
        ids = torch.tensor([tiny_tokenizer()(text)["input_ids"]])
        with torch.no_grad():
            plain, reference = signal._plain(ids), signal._reference(ids)  # type: ignore[misc]
        assert all(torch.equal(a, b) for a, b in zip(plain, reference, strict=True))
    adapter = adapter_for(model.config)
    layer = adapter.spec(model.config).moe_layers[0]
    assert signal.layer == layer
    seen: dict[str, torch.Tensor] = {}
    router = adapter.router(model, layer)
    handle = router.register_forward_hook(lambda _m, args, out: seen.update(inputs=args[0], logits=out[0]))
    tokenizer = tiny_tokenizer()
    try:
        for text in TEXTS:
            with torch.no_grad():
                model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
            inputs = seen["inputs"].reshape(-1, seen["inputs"].shape[-1]).float()  # [T, H]
            logits = seen["logits"].float()  # [T, E]
            probs = logits.sigmoid() if family == "deepseek_v3" else logits.softmax(dim=-1)
            expected = probs.mean(dim=0) / probs.mean(dim=0).sum()
            got = signal.features([text])
            np.testing.assert_allclose(got.scores[0], expected.numpy(), atol=1e-5)
            np.testing.assert_allclose(got.inputs[0], inputs.mean(dim=0).numpy(), atol=1e-5)
    finally:
        handle.remove()


def test_the_signal_falls_back_to_the_models_forward_where_the_plain_pass_fails_or_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from premoe_service.runtime import router_signal

    _, store = tiny_store(tmp_path, "qwen3_moe")
    expected = RouterSignal.from_store(store).features(TEXTS)

    def fails(*_: object, **__: object) -> object:
        def compiled(*_: object) -> None:
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(router_signal.torch, "compile", fails)
    with caplog.at_level("WARNING", logger=router_signal.__name__):
        uncompiled = RouterSignal.from_store(store, compiled=True)
    assert uncompiled.mode == "plain" and "could not be compiled" in caplog.text
    found = [uncompiled.features(TEXTS)]
    # A layer that does not return its residual when its block answers zeros: the plain pass is not used.
    monkeypatch.setattr(router_signal._NoBlock, "forward", lambda self, hidden, *_, **__: hidden)
    reference = RouterSignal.from_store(store, compiled=True)
    assert reference.mode == "reference"
    found.append(reference.features(TEXTS))
    for got in found:
        assert np.array_equal(got.scores, expected.scores) and np.array_equal(got.inputs, expected.inputs)


def test_the_compiled_signal_runs_at_its_own_thread_count_whatever_its_callers(tmp_path: Path) -> None:
    # Dynamo guards a graph on the calling thread's intra-op count: callers at other counts (the server's signal
    # threads after the engine set its count, a registration on a door's thread) compiled it again, each, and past
    # dynamo's cache limit (8) a call failed. Every pass runs at the signal's own count: one graph, the same bits.
    import threading

    from torch._dynamo.utils import counters

    from premoe_service.intra_op import available, intra_op_threads

    if not available():
        pytest.skip("this platform has no per-thread intra-op count to set")
    _, store = tiny_store(tmp_path, "qwen3_moe")
    with intra_op_threads(2):  # built at another count than it runs at
        signal = RouterSignal.from_store(store, compiled=True)
    assert signal.mode == "compiled"
    expected = signal.features(TEXTS)
    graphs = counters["stats"]["unique_graphs"]
    found: list[object] = []

    def call(count: int) -> None:
        try:
            with intra_op_threads(count):
                found.append(signal.features(TEXTS))
        except Exception as exc:  # kept for the assertion below, not lost in a thread
            found.append(exc)

    for count in range(1, 11):  # more counts than dynamo's cache holds graphs
        caller = threading.Thread(target=call, args=(count,))
        caller.start()
        caller.join()
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
    for got in found:
        assert not isinstance(got, Exception), got
        assert np.array_equal(got.scores, expected.scores) and np.array_equal(got.inputs, expected.inputs)


def evidence(inputs: dict[str, float], none: float | None) -> PromptEvidence:
    return PromptEvidence(inputs, {task: 0.0 for task in inputs}, none, none, 0.0)


def test_per_task_thresholds_and_leads_decide_the_match() -> None:
    ranked = [("code", 0.40), ("maths", 0.30), ("prose", 0.20)]
    found = evidence({"code": 0.9, "maths": 0.5, "prose": 0.4}, none=0.25)
    policy = RoutePolicy(threshold=0.18, input_weight=1.0)
    decision = decide_combined(ranked, found, policy)
    assert decision.task == "code" and decision.lead is not None and decision.similarity == pytest.approx(0.40)
    # The task's own lead replaces the global one, for that task only.
    strict = dataclasses.replace(policy, task_leads={"code": decision.lead + 0.01})
    refused = decide_combined(ranked, found, strict)
    assert not refused.matched and "off-topic background" in refused.reason
    assert decide_combined(ranked, found, dataclasses.replace(policy, task_leads={"maths": 99.0})).task == "code"
    # The similarity threshold applies per task too, with the global one for every other task.
    assert not decide_combined(ranked, found, dataclasses.replace(policy, task_thresholds={"code": 0.41})).matched
    assert decide_combined(ranked, found, dataclasses.replace(policy, task_thresholds={"maths": 0.9})).matched
    # A prompt more like the background than any task gets no match, and the fallback unions close tasks.
    offtopic = evidence({"code": 0.1, "maths": 0.1, "prose": 0.1}, none=0.9)
    unmatched = decide_combined(ranked, offtopic, dataclasses.replace(policy, min_lead=0.0, union_margin=0.15))
    assert not unmatched.matched and unmatched.fallback_tasks == ["code", "maths"]
    with pytest.raises(InvalidArgument, match="lead"):
        RoutePolicy(task_leads={"code": float("inf")})


def test_with_a_none_class_the_similarity_floor_is_the_background_floor() -> None:
    ranked = [("code", 0.14), ("maths", 0.05)]
    policy = RoutePolicy(threshold=0.18, background_floor=0.10, input_weight=1.0)
    found = evidence({"code": 0.9, "maths": 0.2}, none=0.1)
    # The none-class decides no-match; the floor under it is the lower background floor, not the global threshold.
    assert decide_combined(ranked, found, policy).task == "code"
    refused = decide_combined(ranked, found, dataclasses.replace(policy, background_floor=0.15))
    assert not refused.matched and "0.140 similar < 0.150" in refused.reason
    # Without a background the global threshold stays the floor; a task's own threshold overrides both.
    assert not decide_combined(ranked, evidence({"code": 0.9, "maths": 0.2}, none=None), policy).matched
    assert not decide_combined(ranked, found, dataclasses.replace(policy, task_thresholds={"code": 0.2})).matched
    assert policy.threshold_for("code") == 0.18 and policy.threshold_for("code", background=True) == 0.10
    with pytest.raises(InvalidArgument, match="cosine threshold") as info:
        RoutePolicy(background_floor=1.5)
    assert info.value.field is not None and "background_floor" in info.value.field


@pytest.fixture(scope="module")
def qwen_store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("signal"), "qwen3_moe")[1].dir


@pytest.fixture(scope="module")
def qwen_signal(qwen_store: Path) -> RouterSignal:
    return RouterSignal.from_store(Store(qwen_store))


def task_profile(name: str, demos: list[str], embedder, signal: RouterSignal | None) -> Profile:
    router = {} if signal is None else signal.profile_fields(demos)
    return Profile(
        name=name,
        fingerprint="test",
        moe_layers=(0,),
        scores={"tcess": torch.rand(1, 8)},
        demos=demos,
        demo_embeddings=torch.from_numpy(embedder.encode(demos)),
        embedder=embedder.name,
        **router,  # type: ignore[arg-type]
    )


def test_a_profile_without_a_signal_gets_one_from_its_demos_or_is_refused(
    tmp_path: Path, embedder, demo_tasks, qwen_signal: RouterSignal
) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    old = task_profile("cooking", demo_tasks["cooking"], embedder, None)
    # A format-1 file (written before the router signal existed) is read as a profile without one.
    (folder / "cooking.safetensors").write_bytes(
        old.to_bytes().replace(b'"format_version":"2"', b'"format_version":"1"')
    )
    assert Profile.load(folder / "cooking.safetensors").router_scores is None
    registry = Registry(LocalProfileStore(folder), embedder=embedder, signal=qwen_signal)
    kept = registry.get("cooking")
    expected = qwen_signal.features(demo_tasks["cooking"])
    assert kept.router_layer == qwen_signal.layer
    np.testing.assert_allclose(kept.router_inputs.numpy(), expected.inputs, atol=1e-6)  # type: ignore[union-attr]
    # Without demos there is nothing to compute it from: refused, saying how to rebuild.
    bare = dataclasses.replace(old, name="empty", demos=[])
    with pytest.raises(InvalidArgument, match="profile the task again"):
        registry.register(bare)
    # A format this build does not know is refused with the same advice.
    (tmp_path / "future.safetensors").write_bytes(
        old.to_bytes().replace(b'"format_version":"2"', b'"format_version":"9"')
    )
    with pytest.raises(FailedPrecondition, match="premoe profile"):
        Profile.load(tmp_path / "future.safetensors")


def test_registry_routes_on_both_signals_and_calibrates_per_task_leads(
    embedder, demo_tasks, held_out_queries, qwen_signal: RouterSignal
) -> None:
    registry = Registry(MemoryProfileStore(), embedder=embedder, signal=qwen_signal, background=BACKGROUND)
    for name, demos in demo_tasks.items():
        registry.register(task_profile(name, demos, embedder, qwen_signal))
    decision = registry.route(held_out_queries[0][0])
    assert decision.lead is not None and decision.similarity is not None
    result = calibrate(registry)
    assert set(result.task_leads) <= set(demo_tasks)
    query, task = held_out_queries[0]
    with_labelled = calibrate(registry, labelled=[RouteRecord(query, task)])  # a user's own labelled prompt counts
    assert with_labelled.positives[task] == result.positives[task] + 1
    assert all(lead <= registry.policy.min_lead for lead in result.task_leads.values())  # only ever relaxes
    # Calibrated leads are what the decision then applies.
    registry.policy = dataclasses.replace(registry.policy, task_leads=result.task_leads)
    again = registry.route(held_out_queries[0][0])
    top = again.ranked[0][0]
    floor = registry.policy.threshold_for(top, background=True)
    assert floor == registry.policy.background_floor == 0.10
    assert again.matched == (again.similarity >= floor and again.lead >= result.task_leads.get(top, -1.0))  # type: ignore[operator]
    # Calibration's figures count what the floor refuses as well as what the lead does.
    registry.policy = dataclasses.replace(registry.policy, background_floor=0.999)
    floored = calibrate(registry)
    assert floored.positives_lost == 1.0 and floored.background_rejected == 1.0
    with pytest.raises(InvalidArgument, match="background"):
        Registry(MemoryProfileStore(), embedder=embedder, background=BACKGROUND)


def test_demo_lines_cut_long_demos_only() -> None:
    assert demo_lines("add: 1+2=3") == []
    code = "def double_plus_one(value):\n    doubled = value * 2\n    return doubled + 1\n\nprint(double_plus_one(3))"
    lines = demo_lines(code)
    assert "doubled = value * 2" in lines and code not in lines
    assert all(len(line.replace(" ", "")) >= 12 for line in lines)


def test_route_evaluate_reports_both_signals_and_writes_the_calibration(
    tmp_path: Path, qwen_store: Path, demo_profiles, held_out_queries, capsys
) -> None:
    for profile in demo_profiles.values():  # format-2 profiles without a router signal: computed from the demos
        profile.save(tmp_path / f"{profile.name}.safetensors")
    queries, background = tmp_path / "queries.jsonl", tmp_path / "background.jsonl"
    records = [{"query": q, "task": t} for q, t in held_out_queries] + [{"query": "SELECT 2;", "task": None}]
    queries.write_text("".join(json.dumps(r) + "\n" for r in records))
    background.write_text("".join(json.dumps({"query": q, "task": None}) + "\n" for q in BACKGROUND))
    out_file = tmp_path / "calibration.json"
    args = ["route", "--evaluate", str(queries), "--profiles", str(tmp_path), "--store", str(qwen_store)]
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"query": held_out_queries[1][0], "task": held_out_queries[1][1]}) + "\n")
    more = ["--calibration-queries", str(mine), "--calibrate-out", str(out_file)]
    code = main([*args, "--background", str(background), *more])
    out, _ = capsys.readouterr()
    assert "1 labelled" in out
    assert code == 0 and "embedding alone: top-1" in out and "embedding + router signal" in out
    assert "lead" in out.split("per task")[1].splitlines()[1] and "confusion" in out
    assert load_task_leads(out_file).keys() <= set(demo_profiles)
    code = main(["route", "--evaluate", str(queries), "--profiles", str(tmp_path), "--background", str(background)])
    _, err = capsys.readouterr()
    assert code == 2 and "--store" in err and "Traceback" not in err


def test_the_server_registry_takes_the_signal_background_and_leads_from_its_config(
    tmp_path: Path, qwen_store: Path, embedder
) -> None:
    from premoe_service.runtime.build import load_model
    from premoe_service.serving import ServiceConfig
    from premoe_service.serving.routing import build_registry

    background, leads = tmp_path / "background.jsonl", tmp_path / "leads.json"
    background.write_text("".join(json.dumps({"query": q, "task": None}) + "\n" for q in BACKGROUND))
    leads.write_text(json.dumps({"format": 1, "task_leads": {"cooking": -2.5}}))
    store = Store(qwen_store)
    patterned, _ = load_model(store, device="cpu")
    config = ServiceConfig(store=qwen_store, route_background=background, route_calibration=leads)
    registry = build_registry(config, store, patterned, embedder, None)
    assert registry.evidence is not None and registry.evidence.background_size == len(BACKGROUND)
    assert registry.policy.lead_for("cooking") == -2.5 and registry.policy.lead_for("other") == -1.0
    assert registry.policy.threshold_for("cooking", background=True) == 0.10  # the none-class's own floor
    explicit = build_registry(ServiceConfig(store=qwen_store, route_threshold=0.3), store, patterned, embedder, None)
    assert explicit.policy.threshold_for("cooking", background=True) == explicit.policy.threshold == 0.3
    plain = build_registry(ServiceConfig(store=qwen_store, route_signal=False), store, patterned, embedder, None)
    assert plain.evidence is None
    with pytest.raises(InvalidArgument, match="router signal") as info:
        ServiceConfig(store=qwen_store, route_signal=False, route_background=background)
    assert info.value.field == "route_background"
    leads.write_text("{}")
    with pytest.raises(InvalidArgument, match="not a calibration file"):
        build_registry(config, store, patterned, embedder, None)


def test_the_benchmarked_classifier_learns_the_none_class_from_background_items() -> None:
    from premoe_service.bench.route.classifier import Item, fit, margin_at_loss

    rng = np.random.default_rng(0)

    def item(label: str | None) -> Item:
        high, low = 0.6 + 0.1 * rng.random(), 0.2 + 0.1 * rng.random()
        sims = {t: high if t == label else low for t in ("a", "b", "c")}
        none = high if label is None else low
        ranked = sorted(sims.items(), key=lambda kv: -kv[1])
        return Item(str(label), label, ranked, PromptEvidence(dict(sims), dict(sims), none, none, none))

    train = [item(label) for label in ["a", "b", "c", None] * 10]
    model = fit(train, "raw+z", l2=1e-3)
    assert [model.decide(item(label))[1] for label in ("a", "b", "c", None)] == ["a", "b", "c", None]
    assert model.lead(item("a"))[1] > 0 > model.lead(item(None))[1]
    assert margin_at_loss([3.0, 1.0, 2.0, 4.0], 0.0) == 1.0 and margin_at_loss([3.0, 1.0, 2.0, 4.0], 0.5) == 3.0
