"""One forward pass per step over the KV pool (issue 24): joins ride in the decode pass, long prompts are fed in
chunks, rows join and leave without copying the pool, a row holds pool blocks for its own tokens only (the pool is
paged), and each request still gets what it gets alone.

float64 with eager experts, as in tests/test_batching.py: logits are compared with transformers on the request alone
(the same references and tolerance)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from premoe_service.engine import BatchLimits, EngineLoop, KVPool, SamplingParams, Status
from premoe_service.engine.kv import BLOCK_SIZE, NULL_BLOCK
from premoe_service.engine.schedule import pick_joiners
from premoe_service.engine.text import draw, sample
from premoe_service.errors import InvalidArgument

from .test_batching import F64_TOL, Driver, Job, Observer, Report, build, compare, outcome, prompt, run_alone


def _loop(setup, **limits) -> EngineLoop:
    return EngineLoop(
        setup.patterned, setup.residency, setup.store, eos=set(), limits=BatchLimits(max_join_wait_steps=0, **limits)
    )


def _forwards(loop: EngineLoop) -> list[int]:
    calls: list[int] = []
    loop.patterned.model.lm_head.register_forward_pre_hook(lambda *_: calls.append(1))  # once per forward pass
    return calls


def test_a_join_rides_in_the_decode_pass_and_long_prompts_are_chunked(tmp_path: Path) -> None:
    setup = build(tmp_path, "qwen3_moe", torch.float64)
    loop = _loop(setup, max_prefill_tokens=4)  # prompts of 9 and 11 tokens go in chunks of at most 4
    observer, driver, calls = Observer(loop), Driver(loop), _forwards(loop)
    job_list = [Job(prompt(6, 0), None, 12), Job(prompt(9, 1), None, 6), Job(prompt(11, 2), None, 5)]
    requests = [job.request(setup) for job in job_list]
    driver.join(requests[0])  # 6 tokens: chunks 4 + 2, then decoding
    tokens_before = len(requests[0].generated)
    driver.submit(requests[1], requests[2])
    steps_before, calls_before = driver.steps, len(calls)
    driver.until(lambda: all(r.status is Status.RUNNING for r in requests[1:]))
    # While the 20 prompt tokens went in (4 per pass), the first request decoded in every one of those passes.
    assert len(calls) - calls_before == driver.steps - steps_before == 5
    assert len(requests[0].generated) - tokens_before == 5
    driver.finish()
    observer.close()
    assert len(calls) == driver.steps  # one forward pass per step, never a separate prefill pass
    report = compare(setup, job_list, requests, observer, Report())
    assert report.failures(F64_TOL, allow_near_ties=False) == []
    for job, request in zip(job_list, requests, strict=True):
        assert outcome(request).token_ids == run_alone(setup, job)


def test_rows_join_and_leave_without_copying_the_pool(tmp_path: Path) -> None:
    setup = build(tmp_path, "qwen3_moe", torch.float64)
    loop = _loop(setup)
    driver = Driver(loop)
    long, short = Job(prompt(5, 3), None, 14).request(setup), Job(prompt(7, 4), None, 3).request(setup)
    driver.join(long)
    pool = loop.kv
    pointers = {layer: (keys.data_ptr(), pool.values[layer].data_ptr()) for layer, keys in pool.keys.items()}
    driver.join(short)
    driver.until(lambda: short.status is Status.FINISHED)
    assert long.status is Status.RUNNING and short.row is None  # it left and gave its row back
    after = {layer: (keys.data_ptr(), pool.values[layer].data_ptr()) for layer, keys in pool.keys.items()}
    assert after == pointers and pool.free_rows == pool.rows - 1
    driver.finish()


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def test_each_row_holds_blocks_for_its_own_tokens_and_a_long_row_grows_no_other(tmp_path: Path) -> None:
    """A request decoding far past a block's width beside short ones that join and leave at other columns: each
    row holds the blocks of its own tokens only (the unpaged pool gave every row the longest row's width), the pool
    does not grow, blocks come back when rows leave, and every request's logits and tokens are those alone."""
    setup = build(tmp_path, "qwen3_moe", torch.float64)
    loop = _loop(setup)
    observer, driver = Observer(loop), Driver(loop)
    long = Job(prompt(7, 5), None, 4 * BLOCK_SIZE + 3)  # crosses four block boundaries while decoding
    short = [Job(prompt(length, 6 + i), None, new) for i, (length, new) in enumerate(((3, 20), (14, 9), (5, 2)))]
    job_list = [long, *short]
    requests = [job.request(setup) for job in job_list]
    pool = loop.kv
    start_bytes = None
    driver.join(requests[0])
    for request, gap in zip(requests[1:], (5, 11, 17), strict=True):
        driver.forward_steps(gap)
        driver.join(request)
        start_bytes = start_bytes or pool.nbytes()
        held = {r.id: len(pool.table[r.row]) for r in requests if r.row is not None}
        for r in requests:
            if r.row is not None:  # the blocks of its prompt and the tokens it decoded so far
                assert held[r.id] == _blocks(r.cached), (r.cached, held)
        assert pool.held_blocks == sum(held.values())
        assert loop.stats.kv_blocks_held == pool.held_blocks and loop.stats.kv_bytes == pool.nbytes()  # the gauges
    driver.finish()
    observer.close()
    assert pool.held_blocks == 0 and pool.free_rows == pool.rows
    assert pool.grown == 0 and pool.nbytes() == start_bytes
    report = compare(setup, job_list, requests, observer, Report())
    assert report.failures(F64_TOL, allow_near_ties=False) == []
    for job, request in zip(job_list, requests, strict=True):
        assert outcome(request).token_ids == run_alone(setup, job)


def test_a_kv_cap_holds_requests_back_until_their_tokens_fit_and_the_pool_within_it(tmp_path: Path) -> None:
    """`max_kv_tokens`: a request joins only while its prompt and max_new_tokens (in whole blocks) fit beside the
    running ones'; the others wait their turn in arrival order, the pool stays within the cap, and every request
    still gets what it gets alone. One that could never fit is refused naming max_new_tokens."""
    setup = build(tmp_path, "qwen3_moe", torch.float64)
    cap = 4 * BLOCK_SIZE
    loop = _loop(setup, max_kv_tokens=cap)
    observer, driver = Observer(loop), Driver(loop)
    # Each reserves two blocks (7..10 prompt tokens + 20 new ones): two run at once, never three.
    job_list = [Job(prompt(7 + i, 20 + i), None, 20) for i in range(4)]
    requests = [job.request(setup) for job in job_list]
    driver.submit(*requests)
    running: list[int] = []
    reserved: list[int] = []  # the gauge after each step

    def done() -> bool:
        running.append(len(loop.running))
        reserved.append(loop.stats.kv_reserved_tokens)
        return all(r.status is Status.FINISHED for r in requests)

    driver.until(done)
    assert max(running) == 2 and max(reserved) == cap and reserved[-1] == 0
    assert driver.joined[requests[2].id] > driver.left[requests[0].id]  # the third waited for the first to leave
    assert driver.joined[requests[1].id] < driver.left[requests[0].id]  # the second ran beside the first
    assert loop.kv.blocks <= cap // BLOCK_SIZE + 1 and loop.kv.grown == 0  # the cap's blocks and the null block
    observer.close()
    report = compare(setup, job_list, requests, observer, Report())
    assert report.failures(F64_TOL, allow_near_ties=False) == []
    for job, request in zip(job_list, requests, strict=True):
        assert outcome(request).token_ids == run_alone(setup, job)
    with pytest.raises(InvalidArgument) as info:
        loop.submit(Job(prompt(30, 40), None, cap - 29).request(setup))  # 30 + 35 tokens: five blocks
    assert info.value.field == "max_new_tokens"


def test_a_request_that_does_not_fit_the_kv_cap_holds_back_those_behind_it() -> None:
    """No later request overtakes one waiting for room (it would never get it while small ones keep coming)."""
    limits = BatchLimits(max_join_wait_steps=0, max_kv_tokens=4 * BLOCK_SIZE)

    def ready(tokens: int, new: int) -> Any:
        return SimpleNamespace(
            status=Status.READY, prompt_ids=[1] * tokens, params=SimpleNamespace(max_new_tokens=new), times={}
        )

    big, small = ready(20, 20), ready(4, 4)  # three blocks, one block
    assert pick_joiners([big, small], 1, limits, 0, reserved=2 * BLOCK_SIZE) == []
    assert pick_joiners([small, big], 1, limits, 0, reserved=2 * BLOCK_SIZE) == [small]
    assert pick_joiners([big, small], 0, limits, 0, reserved=0) == [big, small]


def test_an_idle_engine_holds_ready_requests_for_those_still_arriving_then_lets_them_go() -> None:
    limits = BatchLimits(idle_hold_s=0.03)

    def ready(at: float) -> Any:
        return SimpleNamespace(
            status=Status.READY, prompt_ids=[1] * 4, params=SimpleNamespace(max_new_tokens=4), times={"ready": at}
        )

    first = ready(10.0)
    assert pick_joiners([first], 0, limits, 0, arriving=2, now=10.01) == []  # others are being routed: it waits
    assert pick_joiners([first], 0, limits, 0, arriving=2, now=10.04) == [first]  # ... no longer than the hold
    assert pick_joiners([first], 0, limits, 0, arriving=0, now=10.01) == [first]  # alone: at once
    assert pick_joiners([first], 3, limits, 0, arriving=2, now=10.01) == [first]  # rows run: the join rules apply
    assert pick_joiners([first], 0, BatchLimits(idle_hold_s=0), 0, arriving=2, now=10.01) == [first]
    with pytest.raises(InvalidArgument) as err:
        BatchLimits(idle_hold_s=-1)
    assert err.value.field == "idle_hold_s"


def test_a_burst_arriving_at_an_idle_engine_goes_in_one_pass(tmp_path: Path) -> None:
    """The first request is ready while a second is still being routed: no pass runs for it alone; once the second
    is queued (nothing arriving any more) both prompts go in the same first pass, and each gets its tokens alone."""
    setup = build(tmp_path, "qwen3_moe", torch.float64)
    arriving = [1]
    loop = EngineLoop(
        setup.patterned,
        setup.residency,
        setup.store,
        eos=set(),
        limits=BatchLimits(max_join_wait_steps=0, idle_hold_s=60.0),
        arriving=lambda: arriving[0],
    )
    calls = _forwards(loop)
    job_list = [Job(prompt(6, 0), None, 4), Job(prompt(9, 1), None, 4)]
    requests = [job.request(setup) for job in job_list]
    driver = Driver(loop)
    driver.submit(requests[0])
    deadline = time.monotonic() + 60
    while requests[0].status is not Status.READY:  # its experts resident: it could join
        assert time.monotonic() < deadline
        driver.step()
    for _ in range(20):
        assert not loop.step()  # held: the second is still arriving
    assert calls == [] and requests[0].row is None
    arriving[0] = 0
    driver.submit(requests[1])
    driver.until(lambda: all(r.generated for r in requests))
    assert len(calls) == 1  # both prompts in the first pass
    driver.finish()
    for job, request in zip(job_list, requests, strict=True):
        assert outcome(request).token_ids == run_alone(setup, job)


def test_the_pool_gives_blocks_lowest_first_and_doubles_keeping_what_it_holds() -> None:
    pool = KVPool(2, torch.device("cpu"), blocks=4)  # the null block and three others
    first, second = pool.take(), pool.take()
    pool.reserve(first, 2 * BLOCK_SIZE)  # two blocks
    assert pool.table[first] == [1, 2] and NULL_BLOCK not in pool.table[first]
    keys = torch.arange(2 * BLOCK_SIZE * 3, dtype=torch.float32).view(2 * BLOCK_SIZE, 1, 3)
    slots = torch.tensor([pool.slot(first, c) for c in range(2 * BLOCK_SIZE)])
    pool.write(0, keys, -keys, slots)
    pool.reserve(second, 2 * BLOCK_SIZE + 1)  # three blocks: one free, so the pool doubles
    assert pool.grown == 1 and pool.blocks == 8 and pool.table[second] == [3, 4, 5]
    assert torch.equal(pool.keys[0].view(-1, 1, 3)[slots], keys)  # kept through the copy
    assert torch.equal(pool.values[0].view(-1, 1, 3)[slots], -keys)
    pool.give_back(first)
    assert pool.held_blocks == 3 and pool.table[first] == []
    row = pool.take()
    pool.reserve(row, 1)
    assert pool.table[row] == [1]  # the lowest free block
    assert pool.row_tables([row, second], 2 * BLOCK_SIZE + 1) == [1, NULL_BLOCK, NULL_BLOCK, 3, 4, 5]
    # It returns to its starting blocks only when no row holds one (and no borrowed row is out).
    assert pool.shrink() == 0 and pool.blocks == 8
    pool.give_back(row)
    pool.give_back(second)
    borrowed = pool.borrow(1)
    assert pool.shrink() == 0
    pool.return_borrowed()
    grown = pool.nbytes()
    assert pool.shrink() == grown - pool.nbytes() == grown // 2 and pool.blocks == pool.start_blocks == 4
    assert pool.shrunk == 1 and pool.shrink() == 0 and borrowed == [2]
    assert pool.keys[0].shape[0] == 4 and torch.count_nonzero(pool.keys[0]) == 0
    again = pool.take()
    pool.reserve(again, 4 * BLOCK_SIZE)  # four blocks: three free, so it doubles again
    assert pool.table[again] == [1, 2, 3, 4] and pool.grown == 2 and pool.blocks == 8


def test_an_idle_loop_gives_back_what_its_kv_pool_grew_by_and_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests longer than the pool's start make it double; once the loop has been idle `KV_SHRINK_IDLE_S`, the
    pool is back to its starting blocks (the gauges say so), and the same requests then get the same tokens, which
    are their tokens alone."""
    from premoe_service.engine import loop as loop_module

    monkeypatch.setattr(loop_module, "KV_SHRINK_IDLE_S", 0.05)
    setup = build(tmp_path, "qwen3_moe", torch.float64)
    loop = _loop(setup, max_rows=2).start()
    pool = loop.kv
    start = pool.blocks
    job_list = [Job(prompt(150 + i, 60 + i), None, 200) for i in range(2)]  # ~350 tokens a row: more than 256
    try:
        rounds = []
        for _ in range(2):
            requests = [job.request(setup) for job in job_list]
            for request in requests:
                loop.submit(request)
            rounds.append([outcome(r).token_ids for r in requests])
            assert pool.grown == len(rounds) and pool.blocks > start  # it doubled for them (again)
            deadline = time.monotonic() + 30
            while pool.shrunk < len(rounds):
                assert time.monotonic() < deadline, "the idle loop kept its grown pool"
                time.sleep(0.02)
            assert pool.blocks == start and all(t.shape[0] == start for t in pool.keys.values())
            assert loop.stats.kv_blocks == start and loop.stats.kv_bytes == pool.nbytes()
    finally:
        loop.close()
    assert rounds[0] == rounds[1]
    for job, tokens in zip(job_list, rounds[0], strict=True):
        assert tokens == run_alone(setup, job)


def test_greedy_rows_take_the_first_of_tied_maxima_as_transformers_argmax_does() -> None:
    """Rows of few distinct values (most maxima tied, at any place in the row): each greedy row's token is
    `torch.argmax`'s, the first maximal index (transformers' greedy search)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (64, 3072), generator=generator).float()
    logits[5] = 1.0  # a row all tied
    greedy = SimpleNamespace(params=SamplingParams(), barred=list)
    tokens = sample(logits, [greedy] * 64)
    assert tokens == [int(torch.argmax(row)) for row in logits]
    assert tokens[5] == 0


def test_unseeded_rows_draw_together_from_each_rows_distribution() -> None:
    torch.manual_seed(0)
    a, b = [2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]
    logits = torch.tensor([a, b, a]).repeat(4000, 1)  # rows: (a, T=1), (b, T=0.5), (a, T=1, top-p 0.75)
    drawn = torch.tensor(draw(logits, [1.0, 0.5, 1.0] * 4000, [1.0, 1.0, 0.75] * 4000)).view(4000, 3)
    share = [torch.bincount(drawn[:, row], minlength=4).double() / 4000 for row in range(3)]
    softmax = torch.softmax(torch.tensor([a, b], dtype=torch.float64) / torch.tensor([[1.0], [0.5]]), -1)
    assert (share[0] - softmax[0]).abs().max() < 0.03
    assert (share[1] - softmax[1]).abs().max() < 0.03
    # top-p 0.75 keeps the two tokens whose mass before them is below 0.75, renormalised
    kept = torch.tensor([softmax[0, 0], softmax[0, 1], 0.0, 0.0], dtype=torch.float64)
    assert (share[2] - kept / kept.sum()).abs().max() < 0.03
