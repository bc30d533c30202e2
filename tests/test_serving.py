"""The serving domain without gRPC: coverage guardrail, fallback patterns, shared residency between requests,
the registry seeded into Redis from local profiles."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from premoe_service.errors import InvalidArgument
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.pattern import Pattern
from premoe_service.profiler import Demo, Profile, Selection
from premoe_service.retrieval import RedisProfileStore
from premoe_service.serving import GenerationResult, SamplingParams, ServiceConfig, ServingCore
from premoe_service.store import Store, shard

CODE = [Demo("def add(a, b):\n    return a + b\n"), Demo("for i in range(3):\n    print(i)\n")]
MATH = [Demo("12+30=42"), Demo("7+8=15"), Demo("100+23=123")]


def tiny_store(root: Path, family: str) -> Path:
    save_tiny_checkpoint(root / "ckpt", family)
    shard(root / "ckpt", root / "store", progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("serving"), "qwen3_moe")


@pytest.fixture(scope="module")
def grouped_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V3: 16 experts in 4 groups scored by their best two, 2 groups and 4 experts per token."""
    return tiny_store(tmp_path_factory.mktemp("serving-grouped"), "deepseek_v3")


def run(service: ServingCore, prompt: str, **kwargs) -> GenerationResult:
    *pieces, result = service.generate(prompt, SamplingParams(max_new_tokens=4), **kwargs)
    assert isinstance(result, GenerationResult) and all(isinstance(p, str) for p in pieces)
    return result


def test_low_coverage_widens_the_pattern_with_the_prompts_experts(store: Path, embedder) -> None:
    service = ServingCore(ServiceConfig(store=store, device="cpu", coverage_floor=0.95), embedder=embedder)
    service.register_task("code", CODE, selection=Selection("tcess", "top_k", 2, "experts"))
    result = run(service, "def add(a, b):", task="code")
    assert result.widened
    assert result.plan.pattern.size > 6  # more than 2 experts in each of the 3 layers
    assert result.coverage > 0.5

    relaxed = ServingCore(ServiceConfig(store=store, device="cpu", coverage_floor=0.0), embedder=embedder)
    relaxed.register_task("code", CODE, selection=Selection("tcess", "top_k", 2, "experts"))
    kept = run(relaxed, "def add(a, b):", task="code")
    assert not kept.widened and kept.plan.pattern.size == 6 and kept.coverage < result.coverage


def test_a_task_deleted_while_a_prompt_is_routed_to_it_is_served_as_found(store: Path, embedder) -> None:
    """The search matches a task that another client deletes right after: the prompt is served with the profile
    the registry returned with the decision (no second read of it), never answered NOT_FOUND for a task it did
    not name (found by `premoe bench soak`); the next prompt goes to what remains."""
    service = ServingCore(ServiceConfig(store=store, device="cpu", route_threshold=0.0), embedder=embedder)
    code = service.register_task("code", CODE, selection=Selection("tcess", "top_k", 3, "experts"))
    service.register_task("math", MATH, selection=Selection("tcess", "top_k", 3, "experts"))
    prompt = "def add(a, b): return a + b"
    assert service.route(prompt).task == "code"
    search = service.registry.route

    def search_then_delete(text: str, **options: Any):  # another client's DeleteTask lands between search and read
        decision = search(text, **options)
        if decision.task == "code":
            service.delete_task("code")
        return decision

    service.registry.route = search_then_delete  # type: ignore[method-assign]
    plan = service.route(prompt)
    assert plan.decision == "match" and plan.task == "code" and plan.pattern == code.pattern
    assert "code" not in service.registry.names() and service.route(prompt).task == "math"


def test_a_prompt_counts_as_arriving_while_it_is_routed_and_not_once_queued_or_failed(store: Path, embedder) -> None:
    """What the engine's idle hold waits for (`BatchLimits.idle_hold_s`): submissions not yet queued."""
    service = ServingCore(ServiceConfig(store=store, device="cpu", route_threshold=0.0), embedder=embedder)
    try:
        service.register_task("code", CODE, selection=Selection("tcess", "top_k", 3, "experts"))
        search, routing, go = service.registry.route, threading.Event(), threading.Event()
        seen: list[int] = []

        def slow_search(text: str, **options: Any):
            seen.append(service.arrivals)
            routing.set()
            assert go.wait(30)
            if text == "fail":
                raise InvalidArgument("refused by the test", field="prompt")
            return search(text, **options)

        service.registry.route = slow_search  # type: ignore[method-assign]
        results: list[Any] = []
        for prompt in ("def add(a, b):", "fail"):
            routing.clear()
            go.clear()
            submit = threading.Thread(target=lambda p=prompt: results.append(_try_submit(service, p)))
            submit.start()
            assert routing.wait(30)
            assert service.arrivals == 1
            go.set()
            submit.join(60)
            assert service.arrivals == 0
        assert seen == [1, 1]
        assert isinstance(results[0], GenerationResult) and isinstance(results[1], InvalidArgument)
    finally:
        service.close()


def _try_submit(service: ServingCore, prompt: str) -> Any:
    try:
        return list(service.generate(prompt, SamplingParams(max_new_tokens=2)))[-1]
    except InvalidArgument as exc:
        return exc


def test_no_match_falls_back_to_the_union_of_the_nearest_tasks(store: Path, embedder) -> None:
    # A budget below every expert: the union of the close tasks' patterns (with them all, every expert: below).
    config = ServiceConfig(store=store, device="cpu", route_threshold=0.99, budget="0.9")
    service = ServingCore(config, embedder=embedder)
    code = service.register_task("code", CODE, selection=Selection("tcess", "top_k", 3, "experts"))
    math = service.register_task("math", MATH, selection=Selection("tcess", "top_k", 3, "experts"))
    plan = service.route("def sub(a, b): return a - b")
    assert plan.decision == "fallback" and plan.fallback_tasks
    union = code.pattern.union(math.pattern) if len(plan.fallback_tasks) == 2 else None
    expected = union or (code.pattern if plan.fallback_tasks == ["code"] else math.pattern)
    assert plan.pattern == expected
    whole = ServingCore(ServiceConfig(store=store, device="cpu", route_threshold=0.99), embedder=embedder)
    whole.register_task("code", CODE, selection=Selection("tcess", "top_k", 3, "experts"))
    wide = whole.route("def sub(a, b): return a - b")
    assert wide.decision == "fallback" and wide.pattern == Pattern.full(whole.spec) and "every expert" in wide.reason


def test_requests_share_resident_experts(store: Path, embedder) -> None:
    service = ServingCore(ServiceConfig(store=store, device="cpu", budget="0.5"), embedder=embedder)
    service.register_task("code", CODE, selection=Selection("tcess", "top_k", 4, "experts"))
    first = run(service, "def f(x):", task="code")
    assert first.loads["device"] == 0 and first.loads["cache"] + first.loads["disk"] == 12

    results: list[GenerationResult] = []
    errors: list[BaseException] = []

    def request() -> None:
        try:
            results.append(run(service, "def g(y):", task="code"))
        except BaseException as exc:  # a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    assert len(results) == 3
    assert all(r.loads == {"device": 12, "cache": 0, "disk": 0} for r in results)  # nothing loaded again
    assert service.stats().tasks["code"][0] == 4


def test_shared_use_eviction_counts_each_request_and_keeps_the_tokens(store: Path, embedder) -> None:
    """`eviction="shared-use"`: the slots evict by the decayed use counts the engine loop keeps for every request
    it takes in; which experts stay resident changes, the tokens of a request do not."""
    services = {
        policy: ServingCore(ServiceConfig(store=store, device="cpu", budget="0.5", eviction=policy), embedder=embedder)
        for policy in ("lru", "shared-use")
    }
    tokens = {}
    for policy, service in services.items():
        service.register_task("code", CODE, selection=Selection("tcess", "top_k", 3, "experts"))
        service.register_task("math", MATH, selection=Selection("tcess", "top_k", 3, "experts"))
        tokens[policy] = [run(service, p, task=t).token_ids for t, p in [("code", "def f(x):"), ("math", "1+2=")] * 2]
    assert tokens["lru"] == tokens["shared-use"]
    shared = services["shared-use"]
    math = shared.tasks.pattern(shared.registry.get("math"))
    counts = shared.patterned.book.use
    assert counts is not None  # the counts order the victims
    for row, layer in enumerate(shared.spec.moe_layers):
        kept = list(math.kept(layer))
        assert (counts[row, kept] > 0).all() and counts[row].sum() > 0  # every request counted its experts
    assert services["lru"].patterned.book.use is None
    with pytest.raises(InvalidArgument) as info:
        ServiceConfig(store=store, eviction="fifo")  # type: ignore[arg-type]
    assert info.value.field == "eviction"
    for service in services.values():
        service.close()


def test_widening_under_group_routing_keeps_every_group_routable(grouped_store: Path, embedder) -> None:
    # 7 slots per layer: a widening that entered a group with one expert, or left a group with one, would be a
    # pattern DeepSeek-V3's routing cannot run (a group is scored by its best two experts).
    service = ServingCore(
        ServiceConfig(store=grouped_store, device="cpu", budget=str(7 / 16), coverage_floor=0.99), embedder=embedder
    )
    service.register_task("code", CODE, selection=Selection("tcess", "top_k", 4, "experts"))
    result = run(service, "def add(a, b):", task="code")
    assert result.widened
    layers = result.plan.pattern.layers
    assert result.plan.pattern.size > 4 * len(layers)  # it did widen
    for experts in layers.values():
        per_group = np.bincount(np.asarray(experts) // 4, minlength=4)  # groups of 4 consecutive experts
        assert len(experts) <= 7 and all(n == 0 or n >= 2 for n in per_group), per_group
        assert (per_group > 0).sum() >= 2  # routing picks two groups per token
    service.close()


def test_the_fallback_is_trimmed_to_the_slots_by_summed_normalised_scores(store: Path, embedder) -> None:
    service = ServingCore(ServiceConfig(store=store, device="cpu", budget="0.5"), embedder=embedder)  # 4 slots
    profiles = []
    for name, demos in (("code", CODE), ("math", MATH)):
        service.register_task(name, demos, selection=Selection("tcess", "top_k", 4, "experts"))
        profiles.append(service.registry.get(name))
    union = service.tasks.pattern(profiles[0]).union(service.tasks.pattern(profiles[1]))
    assert any(len(kept) > 4 for kept in union.layers.values())  # there is something to trim

    pattern = service.tasks.fallback_pattern(["code", "math"], capacity=4)
    for row, (layer, kept) in enumerate(union.layers.items()):
        total = sum(p.scores["tcess"][row].double().numpy() / float(p.scores["tcess"][row].sum()) for p in profiles)
        best = sorted(kept, key=lambda e: (-total[e], e))[:4]
        assert pattern.kept(layer) == tuple(sorted(best))
    with service.residency.lease(pattern):  # it fits the slots
        pass
    service.close()


def test_local_profiles_seed_the_shared_registry_in_redis(store: Path, embedder, redis_server, tmp_path: Path) -> None:
    redis_server.flush()
    manifest = Store(store).manifest
    fingerprint = manifest.fingerprint
    shared = RedisProfileStore(redis_server.url, namespace=f"premoe-registry:{fingerprint}")

    def profile(name: str, description: str) -> Profile:
        layers = tuple(manifest.moe_layers)
        scores = {"tcess": torch.rand(len(layers), manifest.num_experts, generator=torch.Generator().manual_seed(1))}
        return Profile(name, fingerprint, layers, scores, description=description, demos=[d.text for d in CODE])

    profile("code", "local").save(tmp_path / "code.safetensors")
    profile("math", "local").save(tmp_path / "math.safetensors")
    shared.write(profile("math", "already shared"), replace=False)

    config = ServiceConfig(store=store, device="cpu", profiles=tmp_path, redis_url=redis_server.url)
    service = ServingCore(config, embedder=embedder)
    assert sorted(shared.revisions()) == ["code", "math"]
    assert shared.read("code")[0].description == "local"  # seeded from the local file
    assert shared.read("math")[0].description == "already shared"  # what Redis holds is never overwritten
    assert sorted(service.registry.names()) == ["code", "math"]
    # A replica with no local profiles serves the same tasks from Redis.
    replica = ServingCore(ServiceConfig(store=store, device="cpu", redis_url=redis_server.url), embedder=embedder)
    assert replica.registry.get("code").description == "local"
    service.close()
    replica.close()
