"""Demotion under memory pressure (`premoe serve --under-pressure demote`, `runtime/lending.py`).

A request whose experts do not fit at full precision next to the ones running requests pin is served with those
experts from the store's int8 copy, in full-precision slots lent out (each holds several int8 experts), instead of
waiting: its logits equal transformers on the checkpoint with those experts dequantized; the resident bytes never
pass the budget; a request that asks for full precision waits as before; when memory frees, full-precision requests
take the lent slots back.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe_service.engine import EngineLoop, Request, SamplingParams, Status
from premoe_service.errors import InvalidArgument, ResourceExhausted
from premoe_service.families.tiny import TINY_CONFIGS, save_tiny_checkpoint, tiny_tokenizer
from premoe_service.pattern import Pattern
from premoe_service.runtime.build import load_model
from premoe_service.runtime.lending import attach_lending
from premoe_service.runtime.slot_book import BLOCKED, RESIDENT
from premoe_service.store import Store, shard
from premoe_service.store.export import export_pruned
from premoe_service.store.quantized_copies import add_precisions

from .test_exactness import ATOL, logits, padded_batch

FULL_SLOTS = 4  # of 8 experts per layer
PINNED, OTHER = [0, 4], [1, 2, 5, 6]  # each spans both halves of the experts


def shapes(store_dir: Path) -> tuple[int, list[int], list[int]]:
    """Full slots a layer and two disjoint patterns for the family, `pinned` and `other`, keeping the same count in
    every expert group (grouped routers score groups by their best experts; export needs even groups); the slots
    hold `pinned` and half of `other`, so `other` fits only demoted."""
    config = json.loads((store_dir / "config.json").read_text())
    experts = Store(store_dir).manifest.num_experts
    groups = int(config.get("n_group") or 1)
    if groups == 1:
        pinned, other = PINNED, OTHER
    else:  # each group: its first half pinned, its second half the other pattern
        size = experts // groups
        pinned = [g * size + i for g in range(groups) for i in range(size // 2)]
        other = [g * size + i for g in range(groups) for i in range(size // 2, size)]
    return len(pinned) + len(other) // 2, pinned, other


FAMILIES = sorted(TINY_CONFIGS)


def family_store(root: Path, family: str) -> Path:
    save_tiny_checkpoint(root / "ckpt", family)
    shard(root / "ckpt", root / "store", progress=False)
    add_precisions(root / "store", ("int8", "int4"), 8, progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return family_store(tmp_path_factory.mktemp("demote"), "qwen3_moe")


@pytest.fixture(scope="module", params=FAMILIES)
def any_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return family_store(tmp_path_factory.mktemp(f"demote-{request.param}"), request.param)


def lending_model(store_dir: Path, precision: str = "int8", capacity: int = FULL_SLOTS):
    store = Store(store_dir)
    patterned, residency = load_model(store, capacity=capacity, wait_timeout_s=0.5)
    attach_lending(patterned, store, {}, precision)
    return store, patterned, residency


def experts(patterned, ids: list[int]) -> Pattern:
    return Pattern.build(patterned.spec, {layer: ids for layer in patterned.spec.moe_layers})


def test_lent_sub_slots_are_disjoint_views_inside_the_full_slots(any_store: Path) -> None:
    capacity = shapes(any_store)[0]
    store, patterned, _ = lending_model(any_store, capacity=capacity)
    lending = patterned.lending
    assert lending is not None and lending.k >= 2
    layer = patterned.spec.moe_layers[0]
    bank = patterned.quantized.banks[layer]["int8"]  # type: ignore[union-attr]
    assert bank.capacity == capacity * lending.k and bank.nbytes == 0
    assert (lending.lent.expert_in_slot[:, : bank.capacity] == BLOCKED).all()  # nothing lent yet
    module = patterned.experts_module(layer)
    spans: dict[int, list[tuple[int, int]]] = {}
    for (_, _), sub in bank.tensors.items():
        for q in range(bank.capacity):
            view = sub[q]
            base = next(
                p for p in module.parameters() if p.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
            )
            slot_bytes = base[0].numel() * base.element_size()
            start = view.data_ptr() - base.data_ptr()
            assert start // slot_bytes == q // lending.k  # inside its full slot
            assert (start + view.numel() * view.element_size() - 1) // slot_bytes == q // lending.k
            spans.setdefault(id(base), []).append((start, start + view.numel() * view.element_size()))
    for ranges in spans.values():
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))  # no two views overlap
    with pytest.raises(InvalidArgument) as refused:
        attach_lending(patterned, store, {"int8": 2}, "int8")
    assert refused.value.field == "demote_to"


def test_a_demoted_pattern_computes_the_dequantized_checkpoint(any_store: Path, tmp_path: Path) -> None:
    """Two experts a layer pinned at full precision leave two full slots free: a pattern of four other experts
    cannot fit at full precision, so it is demoted, lent two slots (int8 sub-slots), loaded into them, and computes
    what transformers computes on the checkpoint with those four experts dequantized; in every family."""
    capacity, pinned_ids, other_ids = shapes(any_store)
    store, patterned, residency = lending_model(any_store, capacity=capacity)
    pinned, other = experts(patterned, pinned_ids), experts(patterned, other_ids)
    with residency.lease(pinned):
        assert residency.reserve(other) is None  # at full precision it must wait
        demoted = residency.demoted(other)
        assert demoted is not None
        assert all(demoted.precision(layer, e) == "int8" for layer in demoted.layers for e in demoted.kept(layer))
        with residency.lease(demoted):
            lending = patterned.lending
            needed = -(-len(other_ids) // lending.k)
            assert lending is not None and lending.lends == needed * len(patterned.spec.moe_layers)
            assert residency.resident_bytes(store.manifest.expert_nbytes) <= residency.capacity_bytes(
                store.manifest.expert_nbytes
            )
            export_pruned(store, demoted, tmp_path / "pruned", progress=False)
            exported = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
            ids, mask = padded_batch()
            with torch.no_grad():
                residency.activate(demoted)
                ours = logits(patterned.model, ids, mask)
            assert (logits(exported, ids, mask) - ours).abs().max().item() <= ATOL
            # the pinned experts' full slots were not touched
            with torch.no_grad():
                residency.activate(pinned)
                export_pruned(store, pinned, tmp_path / "pinned", progress=False)
                theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "pinned", dtype=torch.float32).eval()
                assert (logits(theirs, ids, mask) - logits(patterned.model, ids, mask)).abs().max().item() <= ATOL


def test_full_precision_takes_lent_slots_back_once_they_are_unpinned(store_dir: Path) -> None:
    _, patterned, residency = lending_model(store_dir)
    lending = patterned.lending
    assert lending is not None
    pinned, other = experts(patterned, [0, 1]), experts(patterned, [4, 5, 6, 7])
    with residency.lease(pinned):
        demoted = residency.demoted(other)
        assert demoted is not None
        slots_lent = pytest.raises(ResourceExhausted, match="does not fit")
        with residency.lease(demoted), slots_lent, residency.lease(experts(patterned, [2, 3, 4]), timeout_s=0.2):
            pass
    assert lending.returns == 0
    with residency.lease(other):  # nothing pinned now: the lent slots come back, the four experts at full
        assert lending.returns == 2 * len(patterned.spec.moe_layers)
        assert (patterned.book.state[:, [4, 5, 6, 7]] == RESIDENT).all()
        assert not (lending.full.expert_in_slot == BLOCKED).any()
        assert residency.demoted(other) is None  # all at full precision: nothing to demote


def step_until(loop: EngineLoop, done, timeout_s: float = 60.0) -> None:
    """Drive the loop on this thread until `done()` (expert copies run on the loader thread meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the engine did not get there in time"
        if not loop.step():
            time.sleep(0.002)


@pytest.fixture
def engine(store_dir: Path) -> Iterator[tuple[EngineLoop, object]]:
    store, patterned, residency = lending_model(store_dir)
    loop = EngineLoop(patterned, residency, store, eos=set())
    yield loop, patterned
    loop.close()


def test_the_engine_demotes_a_waiting_request_and_a_full_precision_one_waits(engine) -> None:
    """Through the engine loop: a request running on two experts a layer for many steps, then one on four others:
    it is served at once with those at int8 (its result's pattern says so); the same request asking for full
    precision waits until the first is done, then runs at full precision."""
    loop, patterned = engine
    tokenizer = tiny_tokenizer()
    prompt = tokenizer("the quick brown fox")["input_ids"]
    first = Request(prompt, experts(patterned, [0, 1]), SamplingParams(max_new_tokens=40, min_tokens=40), tokenizer)
    demoted = Request(prompt, experts(patterned, [4, 5, 6, 7]), SamplingParams(max_new_tokens=3), tokenizer)
    loop.submit(first)
    step_until(loop, lambda: first.status is Status.RUNNING and len(first.generated) >= 2)
    loop.submit(demoted)
    step_until(loop, lambda: demoted.status is Status.FINISHED)
    assert first.status is not Status.FINISHED  # served beside the first, not after it
    *_, result = demoted.events()
    counts = result.plan.pattern.precision_counts()
    assert counts == {"int8": 4 * len(patterned.spec.moe_layers)}, counts
    exact = Request(
        prompt,
        experts(patterned, [5, 6, 7, 3]),
        SamplingParams(max_new_tokens=3, full_precision=True),
        tokenizer,
    )
    loop.submit(exact)
    step_until(loop, lambda: exact.status is Status.FINISHED)
    assert first.status is Status.FINISHED  # it had to wait for the first request's experts
    *_, result = exact.events()
    assert result.plan.pattern.precision_counts() == {"full": 4 * len(patterned.spec.moe_layers)}


def test_nothing_is_demoted_when_every_expert_fits(store_dir: Path) -> None:
    _, patterned, residency = lending_model(store_dir, capacity=8)
    with residency.lease(experts(patterned, [0, 1, 2, 3])):
        assert residency.demoted(experts(patterned, [4, 5, 6, 7])) is not None  # absent now ...
        assert residency.reserve(experts(patterned, [4, 5, 6, 7])) is not None  # ... but they fit at full
    assert patterned.lending is not None and patterned.lending.lends == 0
    assert not np.any(patterned.book.expert_in_slot == BLOCKED)


# --- a server started with --under-pressure demote --------------------------------------------------------------


def test_a_server_that_demotes_serves_a_task_that_does_not_fit_from_int8(
    store_dir: Path, tmp_path: Path, embedder, capsys: pytest.CaptureFixture[str]
) -> None:
    """Budget 5 of 8 slots a layer, tasks a and b (two experts a layer each) pinned: task c's two experts do not fit
    at full precision next to them (one free slot), so its request is served at int8 from the free slot, lent; the
    same request asking for full precision waits for room (and times out here), and gets it once b is unloaded."""
    import grpc

    from premoe_service.bench.pressure import measure
    from premoe_service.bench.serve.clients import Req
    from premoe_service.cli import main
    from premoe_service.client import PreMoeClient
    from premoe_service.server import running_server
    from premoe_service.serving import ServiceConfig

    from .test_task_lifecycle import TOKEN, http, profile

    with pytest.raises(InvalidArgument) as bad:
        ServiceConfig(store=store_dir, under_pressure="evict")
    assert bad.value.field == "under_pressure"
    with pytest.raises(InvalidArgument) as bad:
        ServiceConfig(store=store_dir, demote_to="int5")
    assert bad.value.field == "demote_to"
    for index, name in enumerate(("a", "b", "c")):
        profile(store_dir, name, 2 * index, embedder).save(tmp_path / f"{name}.safetensors")
    config = ServiceConfig(
        store=store_dir,
        profiles=tmp_path,
        port=0,
        http_port=0,
        device="cpu",
        budget="0.625",
        admin_token=TOKEN,
        route_signal=False,
        lease_timeout_s=1.0,
        engine_threads=1,
        under_pressure="demote",
    )
    with running_server(config, embedder=embedder) as (handle, port):
        layers = len(handle.core.spec.moe_layers)
        with PreMoeClient(f"127.0.0.1:{port}", admin_token=TOKEN, timeout=60) as client:
            client.load_task("a", pin=True)
            client.load_task("b", pin=True)
            served = client.generate("the quick brown fox", task="c", max_new_tokens=3).stats
            assert dict(served.precisions) == {"int8": 2 * layers}, served.precisions
            stats = client.stats()  # one slot a layer lent, c's two experts in it
            assert (stats.lent_slots, stats.demoted_experts) == (layers, 2 * layers)
            assert stats.resident_bytes <= stats.budget_bytes
            assert main(["stats", "--server", f"127.0.0.1:{port}"]) == 0
            assert f"demoted  {2 * layers} experts in {layers} lent" in capsys.readouterr().out
            requests = [Req(i, ("a", "c")[i % 2], "the quick brown fox", 3) for i in range(8)]
            row = measure(f"127.0.0.1:{port}", requests, 2, ["a", "b", "c"], demote_to="int8")
            assert row["failures"] == 0 and 0.3 < row["demoted_token_share"] < 0.7  # c's half of the tokens
            assert set(row["precision_share"]) == {"full", "int8"}
            with pytest.raises(grpc.RpcError) as waited:
                client.generate("the quick brown fox", task="c", max_new_tokens=3, full_precision=True)
            assert waited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            client.unload_task("b")
            exact = client.generate("the quick brown fox", task="c", max_new_tokens=3, full_precision=True).stats
            assert dict(exact.precisions) == {"full": 2 * layers}
            # LoadTask at the demotion precision holds a task there, in lent slots, pinned until UnloadTask
            loaded = client.load_task("b", pin=True, precision="int8")
            assert dict(loaded.task.residency.precisions) == {"int8": 2 * layers} and loaded.task.residency.pinned
            stats = client.generate("the quick brown fox", task="b", max_new_tokens=2).stats
            assert dict(stats.precisions) == {"int8": 2 * layers} and stats.loads.cache + stats.loads.disk == 0
            assert client.unload_task("b").released_experts == 2 * layers
        body = json.dumps({"model": "c", "prompt": "the quick", "max_tokens": 2, "full_precision": True}).encode()
        assert http((handle, port), "POST", "/v1/completions", body)[0] == 200
        body = json.dumps({"model": "c", "prompt": "the quick", "max_tokens": 2, "full_precision": "yes"}).encode()
        status, reply = http((handle, port), "POST", "/v1/completions", body)
        assert status == 400 and reply["error"]["param"] == "full_precision"


def test_auto_demotes_only_with_the_copy_and_no_slots_of_its_own(store_dir: Path, tmp_path: Path) -> None:
    from premoe_service.errors import FailedPrecondition
    from premoe_service.serving import ServiceConfig
    from premoe_service.serving.core import _demotion

    store = Store(store_dir)
    assert _demotion(ServiceConfig(store=store_dir), store) == "int8"  # the default: auto, the copy is there
    assert _demotion(ServiceConfig(store=store_dir, demote_to="int4"), store) == "int4"
    assert _demotion(ServiceConfig(store=store_dir, under_pressure="wait"), store) is None
    assert _demotion(ServiceConfig(store=store_dir, precision_slots="int8=2"), store) is None
    bare = family_store(tmp_path, "qwen3_moe").parent / "bare"
    shard(tmp_path / "ckpt", bare, progress=False)  # no lower-precision copies
    assert _demotion(ServiceConfig(store=bare), Store(bare)) is None
    with pytest.raises(FailedPrecondition) as refused:
        _demotion(ServiceConfig(store=bare, under_pressure="demote"), Store(bare))
    assert refused.value.field == "demote_to"
