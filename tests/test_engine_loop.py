"""Scheduling in the engine loop: no head-of-line blocking, bounded waits, queue limits, deadlines, accounting."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from premoe_service.engine import BatchLimits, EngineLoop, Request, SamplingParams, Status
from premoe_service.engine import GenerationResult as Outcome
from premoe_service.errors import DeadlineExceeded, ResourceExhausted
from premoe_service.families.tiny import save_tiny_checkpoint, tiny_model, tiny_tokenizer
from premoe_service.pattern import Pattern
from premoe_service.runtime.build import load_model
from premoe_service.runtime.residency import Budget
from premoe_service.store import Store, open_cache, shard

from .references import masked_transformers

PROMPT = [5, 17, 33, 9, 60, 61, 12]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loop")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")  # 3 MoE layers x 8 experts, top-2
    shard(root / "ckpt", root / "store", progress=False)
    return root / "store"


def make_loop(store_dir: Path, **limits: int) -> EngineLoop:
    """An engine with 4 of 8 slots per layer (budget 0.5) and its loop, driven step by step by the test."""
    store = Store(store_dir, open_cache(None))
    patterned, residency = load_model(store, Budget(fraction=0.5), device="cpu")
    return EngineLoop(patterned, residency, store, eos=set(), limits=BatchLimits(**limits))


def pattern(loop: EngineLoop, experts: list[int]) -> Pattern:
    return Pattern.build(loop.patterned.spec, dict.fromkeys(loop.patterned.spec.moe_layers, experts))


def request(loop: EngineLoop, experts: list[int], new_tokens: int, **options) -> Request:
    return Request(
        PROMPT, pattern(loop, experts), SamplingParams(max_new_tokens=new_tokens), tiny_tokenizer(), **options
    )


def step_until(loop: EngineLoop, done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"condition not reached: {loop.stats}"
        if not loop.step():
            time.sleep(0.002)  # expert copies run on the loader thread


def outcome(req: Request) -> Outcome:
    *_, last = req.events()
    assert isinstance(last, Outcome)
    return last


def pins(loop: EngineLoop) -> int:
    return sum(sum(slots.pins.values()) for slots in loop.patterned.slots.values())


def test_a_request_that_cannot_fit_waits_without_blocking_those_behind_it(store_dir: Path) -> None:
    loop = make_loop(store_dir)
    long = loop.submit(request(loop, [0, 1], 40))
    step_until(loop, lambda: long.status is Status.RUNNING)
    wide = loop.submit(request(loop, [4, 5, 6, 7], 6))  # needs all 4 slots; 2 are pinned by `long`
    small = loop.submit(request(loop, [2, 3], 6))  # fits next to `long`
    step_until(loop, lambda: small.status is Status.FINISHED)
    assert wide.status is Status.WAITING_SLOTS and long.status is Status.RUNNING
    step_until(loop, lambda: wide.status is Status.FINISHED)
    assert long.status is Status.FINISHED  # `wide` got its slots only once `long` let go of them
    results = [outcome(r) for r in (long, wide, small)]
    assert [len(r.token_ids) for r in results] == [40, 6, 6]
    alone = make_loop(store_dir)
    again = alone.submit(request(alone, [4, 5, 6, 7], 6))
    alone.run_until_idle()
    assert outcome(again).token_ids == results[1].token_ids
    assert pins(loop) == 0


def test_a_request_waits_for_slots_at_most_its_lease_timeout(store_dir: Path) -> None:
    loop = make_loop(store_dir)
    long = loop.submit(request(loop, [0, 1], 200))
    step_until(loop, lambda: long.status is Status.RUNNING)
    wide = loop.submit(request(loop, [4, 5, 6, 7], 4, wait_timeout_s=0.2))
    step_until(loop, lambda: wide.status is Status.FINISHED)
    with pytest.raises(ResourceExhausted, match="pinned") as info:
        outcome(wide)
    assert info.value.field == "budget" and long.status is Status.RUNNING
    loop.run_until_idle()
    assert len(outcome(long).token_ids) == 200 and pins(loop) == 0


def test_the_queue_is_bounded(store_dir: Path) -> None:
    loop = make_loop(store_dir, max_queue=2)
    loop.submit(request(loop, [0, 1], 2))
    loop.submit(request(loop, [0, 1], 2))
    with pytest.raises(ResourceExhausted) as info:
        loop.submit(request(loop, [0, 1], 2))
    assert info.value.field == "queue"
    loop.run_until_idle()
    loop.submit(request(loop, [0, 1], 2))  # room again once the queue drained
    loop.run_until_idle()


def test_a_request_past_its_deadline_stops_and_lets_go_of_its_slots(store_dir: Path) -> None:
    loop = make_loop(store_dir)
    late = loop.submit(request(loop, [0, 1], 200, deadline=time.monotonic() + 600))
    other = loop.submit(request(loop, [0, 1], 5))
    step_until(loop, lambda: len(late.generated) >= 3)
    late.deadline = time.monotonic()  # it passes while the request is decoding
    step_until(loop, lambda: late.status is Status.FINISHED)
    with pytest.raises(DeadlineExceeded):
        outcome(late)
    assert 3 <= len(late.generated) < 10
    loop.run_until_idle()
    assert len(outcome(other).token_ids) == 5 and pins(loop) == 0


def test_each_request_accounts_for_the_loads_it_caused(store_dir: Path) -> None:
    loop = make_loop(store_dir)
    layers = len(loop.patterned.spec.moe_layers)
    first = loop.submit(request(loop, [0, 1], 2))
    loop.run_until_idle()
    cold = outcome(first)
    assert cold.loads == {"device": 0, "cache": 0, "disk": 2 * layers}
    assert cold.loaded_bytes == 2 * layers * Store(store_dir).manifest.expert_nbytes
    second = loop.submit(request(loop, [0, 2], 2))
    loop.run_until_idle()
    warm = outcome(second)
    assert warm.loads == {"device": layers, "cache": 0, "disk": layers}  # expert 0 resident, 2 read once


def test_a_few_ready_requests_wait_a_bounded_number_of_steps_to_join_together(store_dir: Path) -> None:
    loop = make_loop(store_dir, max_join_wait_steps=3)
    running = [loop.submit(request(loop, [0, 1], 30)) for _ in range(4)]
    step_until(loop, lambda: all(r.status is Status.RUNNING for r in running))
    late = loop.submit(request(loop, [0, 1], 4))  # 1 ready < 0.3 x 4 running: it waits for company
    step_until(loop, lambda: late.status is Status.READY)
    waited = 0
    while late.status is Status.READY:
        assert loop.step()
        waited += 1
    assert waited == 3  # held in the step it became ready and the two after it; the third prefills it
    loop.run_until_idle()
    alone = make_loop(store_dir)
    again = alone.submit(request(alone, [0, 1], 4))
    alone.run_until_idle()
    assert outcome(late).token_ids == outcome(again).token_ids


def test_log_probabilities_of_generated_and_prompt_tokens_are_transformers(store_dir: Path) -> None:
    loop = make_loop(store_dir)
    experts = [0, 1]
    scored = Request(PROMPT, pattern(loop, experts), SamplingParams(max_new_tokens=5, logprobs=3), tiny_tokenizer())
    prompt_only = Request(
        PROMPT,
        pattern(loop, experts),
        SamplingParams(max_new_tokens=0, logprobs=2, prompt_logprobs=True),
        tiny_tokenizer(),
    )
    loop.submit(scored)
    loop.submit(prompt_only)
    loop.run_until_idle()
    generated, prompt = outcome(scored), outcome(prompt_only)
    reference = tiny_model("qwen3_moe")
    layers = {layer: experts for layer in loop.patterned.spec.moe_layers}
    with torch.no_grad(), masked_transformers(reference, layers):
        ids = torch.tensor([PROMPT + generated.token_ids])
        expected = torch.log_softmax(reference(input_ids=ids).logits[0].double(), dim=-1)
    assert generated.logprobs is not None and len(generated.logprobs) == 5
    for step, item in enumerate(generated.logprobs):
        row = expected[len(PROMPT) - 1 + step]
        assert item.token == generated.token_ids[step] and item.logprob is not None
        assert abs(item.logprob - float(row[item.token])) < 1e-4
        assert [token for token, _ in item.top] == row.topk(3).indices.tolist()
    assert prompt.token_ids == [] and prompt.finish_reason == "length" and prompt.logprobs == []
    assert prompt.prompt_logprobs is not None and len(prompt.prompt_logprobs) == len(PROMPT)
    assert prompt.prompt_logprobs[0].token == PROMPT[0] and prompt.prompt_logprobs[0].logprob is None
    for position, item in enumerate(prompt.prompt_logprobs[1:]):
        assert item.token == PROMPT[position + 1] and item.logprob is not None
        assert abs(item.logprob - float(expected[position, item.token])) < 1e-4 and len(item.top) == 2
