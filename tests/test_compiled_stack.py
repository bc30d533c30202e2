"""The compiled decoder stack (`engine/compiled_stack.py`): exact to the batching tests' bounds, compiled once.

- The batching scenario of `tests/test_batching.py` (five requests of different patterns joining at four steps and
  leaving at five) runs through a loop whose stack is compiled, for every family in float32; every row's logits
  are compared with the same references alone and held to the same bound (the larger of 1e-5 and twice
  transformers' own batching noise, near-tie flips allowed). The stack must have run compiled throughout.
- A float64 model runs eager (its families' float32 norms would round differently compiled).
- The warm-up compiles every shape class the scenario meets: serving it compiles nothing more, nor serving prompts
  fed in chunks that keep no logit, or scored whole (prompt logprobs). Where a prompt's step cannot be traced with
  unbacked sizes, the warm-up traces it with its sizes known and still covers the scenario.
- Attention runs inside the graph, over the KV pool's tensors; where that fails to compile, it runs behind the
  opaque operator, logged once.
- The experts run through the compiled experts kernel wherever the family's experts module takes the engine's
  experts forward; a kernel that fails to compile is logged, and the experts run their eager paths. Steps of as
  many pairs as the kernel takes, decode or prompt, compute the experts inside their graph; wider ones call the
  opaque operator.
- Without a working C++ compiler the stack says why and runs eager, with the eager stack's logits.
- The service compiles its stack when it starts (the default) and answers as an eager one.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from premoe_service.engine import BatchLimits, EngineLoop, Request, SamplingParams, Status, compiled_stack
from premoe_service.engine.attention import GraphStep
from premoe_service.engine.compiled_stack import CompiledStack
from premoe_service.engine.kv import BLOCK_SIZE
from premoe_service.families.tiny import tiny_tokenizer
from premoe_service.pattern import Pattern
from premoe_service.runtime.experts_forward import INLINE_PAIRS

from . import test_batching as batching
from . import test_mixed_batching as mixed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# Rows of the compiled loops here: the tiny models' experts are computed inside the graph up to 64 decode rows
# (128 pairs), so a pool of 16 rows spares each test's warm-up the wider decode graph (seconds on a cold cache); the
# test of that graph lowers the bound.
ROWS = 16


def compiled_loop(setup: batching.Setup, **limits: Any) -> EngineLoop:
    limits.setdefault("max_rows", ROWS)
    loop = EngineLoop(
        setup.patterned,
        setup.residency,
        setup.store,
        eos=set(),
        pad_id=0,
        limits=BatchLimits(max_join_wait_steps=0, **limits),
        compiled=True,
    )
    assert isinstance(loop.batch.stack, CompiledStack)
    loop.batch.warm_up()
    return loop


class StackObserver(batching.Observer):
    """The batching tests' observer, fed from the stack's output: hooks on `lm_head` would be traced into the
    compiled graph, so the stack's call is wrapped instead (it returns the kept positions' logits, as `lm_head`)."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.logits = defaultdict(list)
        self.prefill_rows, self.decode_rows, self._rows, self._hooks = [], [], [], []
        self.stack = loop.batch.stack

        def observed(*args: Any) -> torch.Tensor:
            self._before(None, None, {})
            out: torch.Tensor = self.stack(*args)  # type: ignore[misc]
            self._after(None, None, {}, out)
            return out

        loop.batch.stack = observed  # type: ignore[assignment]


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def serve_scenario(
    loop: EngineLoop, setup: batching.Setup, job_list: Sequence[batching.Job]
) -> tuple[list[Request], StackObserver, batching.Driver]:
    """The batching tests' schedule through `loop`, observed at its stack."""
    observer = StackObserver(loop)
    driver = batching.Driver(loop, observer)
    requests = [job.request(setup) for job in job_list]
    try:
        for group, gap in batching.SCHEDULE:
            driver.join(*(requests[i] for i in group))
            driver.forward_steps(gap)
        driver.finish()
    finally:
        loop.loader.close()
    return requests, observer, driver


def count_kernel_calls(stack: CompiledStack) -> list[int]:
    """How many passes go to the compiled experts kernel from now on: [calls]."""
    calls = [0]
    kernel = stack._compiled_experts

    def counted(*args: Any) -> torch.Tensor:
        calls[0] += 1
        out: torch.Tensor = kernel(*args)
        return out

    stack._compiled_experts = counted
    return calls


def run_compiled(
    setup: batching.Setup, job_list: Sequence[batching.Job]
) -> tuple[list[Request], StackObserver, batching.Driver]:
    loop = compiled_loop(setup)
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack)
    assert stack.failure is None, stack.failure
    compiled = graphs()
    kernel_calls = count_kernel_calls(stack)
    out = serve_scenario(loop, setup, job_list)
    assert stack.failure is None, stack.failure
    assert stack.experts_failure is None, stack.experts_failure
    assert stack.graph_failure is None, stack.graph_failure  # attention ran inside the graph
    assert graphs() == compiled, "a shape class compiled while serving: the warm-up missed it"
    if stack.experts:  # the family's experts take the engine's experts forward: the kernel's code computed them,
        # inside the graph where it takes the step's pairs (every module here), or behind the opaque call
        assert kernel_calls[0] > 0 or all(getattr(experts, INLINE_PAIRS, 0) for experts in stack.experts)
    return out


@pytest.mark.parametrize("family", batching.FAMILIES)
def test_compiled_float32_within_transformers_batching_noise(family: str, tmp_path: Path) -> None:
    setup = batching.build(tmp_path, family, torch.float32)
    job_list = batching.jobs(setup)
    noise = batching.transformers_batch_noise(setup.reference, [job.prompt for job in job_list])
    tol = max(batching.F32_FLOOR, 2 * noise)
    requests, observer, driver = run_compiled(setup, job_list)
    batching.check_timeline(driver, observer)
    report = batching.compare(setup, job_list, requests, observer)
    print(f"\n{family} float32 compiled: tol {tol:.2e}; max |diff| alone {report.diff['alone']:.2e}")
    assert report.failures(tol, allow_near_ties=True) == []


def test_prompts_in_chunks_or_scored_whole_compile_nothing_after_the_warm_up(tmp_path: Path) -> None:
    """The warm-up traces a step with a prompt without specializing its rows or kept logits: the same graph serves
    a prompt alone, chunks under the prompt-token budget that keep no logit, and a prompt scored whole (every
    position's logits kept), each request getting its tokens alone."""
    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    loop = compiled_loop(setup, max_prefill_tokens=4)  # the prompts below go in chunks of at most 4 tokens
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack)
    compiled = graphs()
    jobs = [batching.Job(batching.prompt(length, seed), None, 4) for seed, length in enumerate((6, 9, 2, 11))]
    requests = [job.request(setup) for job in jobs]

    def scored_request() -> Request:
        params = SamplingParams(max_new_tokens=2, prompt_logprobs=True)
        return Request(list(batching.prompt(7, 4)), Pattern.full(setup.spec), params, tiny_tokenizer(), stream=False)

    scored = scored_request()
    driver = batching.Driver(loop)
    try:
        driver.join(requests[0])  # alone: a chunk of 4 that keeps no logit, then one of 2 that keeps its last
        driver.submit(*requests[1:], scored)
        driver.finish()
    finally:
        loop.loader.close()
    assert stack.failure is None and stack.graph_failure is None
    assert graphs() == compiled, "a step with a prompt compiled while serving"
    for job, request in zip(jobs, requests, strict=True):
        assert batching.outcome(request).token_ids == batching.run_alone(setup, job)
    eager, alone = batching.make_loop(setup), scored_request()
    try:
        eager.submit(alone)
        eager.run_until_idle(timeout_s=20)
    finally:
        eager.loader.close()
    got, want = batching.outcome(scored).prompt_logprobs, batching.outcome(alone).prompt_logprobs
    assert got is not None and want is not None and len(got) == len(want) == 7
    assert [t.token for t in got] == [t.token for t in want] and got[0].logprob is None
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got[1:], want[1:], strict=True)) < 1e-4  # type: ignore[operator]


def test_rows_across_many_pool_blocks_compile_nothing_more_and_hold_the_bounds(tmp_path: Path) -> None:
    """Rows decoding across several blocks of the paged pool (block tables wider than any warm-up step's, rows
    crossing into new blocks at different steps) run the warm-up's graphs, and hold the float32 bounds."""
    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    shapes = ((7, 5, 4 * BLOCK_SIZE + 3), (12, 6, 2 * BLOCK_SIZE), (4, 7, 5))
    job_list = [batching.Job(batching.prompt(length, seed), None, new) for length, seed, new in shapes]
    noise = batching.transformers_batch_noise(setup.reference, [job.prompt for job in job_list])
    loop = compiled_loop(setup)
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack)
    compiled = graphs()
    observer = StackObserver(loop)
    driver = batching.Driver(loop, observer)
    requests = [job.request(setup) for job in job_list]
    try:
        for request, gap in zip(requests, (9, 20, 0), strict=True):
            driver.join(request)
            driver.forward_steps(gap)
        driver.finish()
    finally:
        observer.close()
        loop.loader.close()
    assert stack.graph_failure is None and stack.failure is None
    assert graphs() == compiled, "a shape class compiled while serving: the warm-up missed it"
    report = batching.compare(setup, job_list, requests, observer)
    assert report.failures(max(batching.F32_FLOOR, 2 * noise), allow_near_ties=True) == []


@pytest.mark.parametrize("rows", [1, 2])
def test_a_batch_of_fewer_rows_than_the_warm_up_steps_compiles_and_serves(rows: int, tmp_path: Path) -> None:
    """`--max-batch-rows` 1 or 2: the warm-up's steps of up to three rows run on rows the pool lends beyond the
    batch's, which it takes back; the loop then serves requests one or two at a time within the float32 bounds."""
    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    job_list = batching.jobs(setup)[:3]
    noise = batching.transformers_batch_noise(setup.reference, [job.prompt for job in job_list])
    loop = compiled_loop(setup, max_rows=rows)
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack)
    assert stack.failure is None and stack.graph_failure is None
    assert len(loop.kv.table) == rows and loop.kv.held_blocks == 0  # the lent rows and their blocks came back
    observer = StackObserver(loop)
    driver = batching.Driver(loop, observer)
    requests = [job.request(setup) for job in job_list]
    try:
        driver.submit(*requests)
        driver.finish()
    finally:
        observer.close()
        loop.loader.close()
    report = batching.compare(setup, job_list, requests, observer)
    assert report.failures(max(batching.F32_FLOOR, 2 * noise), allow_near_ties=True) == []


def test_a_prompt_step_that_cannot_be_traced_unbacked_gets_graphs_with_its_sizes_known(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A family whose code needs a prompt step's sizes known: here the rows are marked without their lower bound,
    and the graph traces transformers' sdpa attention function (not the written-out one it traces by default), whose
    `reshape(B, -1, Q, d)` cannot be traced so (the data-dependent guard `B != 0`). The warm-up logs it once, traces
    that step and a prompt alone with their sizes known, and attention stays inside the graph: the batching scenario
    compiles nothing while serving and holds the float32 bounds."""

    def unbounded(graph: GraphStep, keep: torch.Tensor) -> None:
        torch._dynamo.decorators.mark_unbacked(graph.blocks, 0, shape_id="rows")
        torch._dynamo.decorators.mark_unbacked(graph.query_pos, 0, shape_id="rows")

    monkeypatch.setattr(compiled_stack, "_unbacked", unbounded)
    monkeypatch.setattr(compiled_stack, "written_attention", lambda model, inner: inner)
    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    job_list = batching.jobs(setup)
    noise = batching.transformers_batch_noise(setup.reference, [job.prompt for job in job_list])
    with caplog.at_level(logging.WARNING, logger="premoe_service.engine.compiled_stack"):
        requests, observer, _ = run_compiled(setup, job_list)  # graph attention, nothing compiled while serving
    assert sum("compiles with its sizes known" in r.getMessage() for r in caplog.records) == 1
    report = batching.compare(setup, job_list, requests, observer)
    assert report.failures(max(batching.F32_FLOOR, 2 * noise), allow_near_ties=True) == []


def opaque_experts_calls(loop: EngineLoop) -> int | None:
    """One step of `loop`: how many times its pass called the experts' opaque operator (`premoe::experts`); None
    when no pass ran (the loader was still bringing experts in)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ran = loop.step()
    if not ran:
        time.sleep(0.001)
        return None
    return sum(event.count for event in prof.key_averages() if event.key == "premoe::experts")


def test_steps_compute_the_experts_inside_the_graph_up_to_the_kernels_pairs(tmp_path: Path) -> None:
    """A step of up to `kernel_pairs` (token, expert) pairs computes the experts inside its graph (no opaque call),
    decode steps and steps that bring a prompt alike; a wider one calls the operator once per MoE layer. The
    warm-up compiled the graphs of both sides (nothing compiles while serving), and every request gets its tokens
    alone. (The bound stays the engine's: a graph loaded from inductor's cache brings the size ranges it was traced
    with, so a lowered bound here would make the other tests' loops compile while serving.)"""
    from premoe_service.engine.attention import current_step
    from premoe_service.runtime import experts_forward

    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    loop = compiled_loop(setup, max_rows=68)
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack) and stack.experts
    bound = min(experts_forward.kernel_pairs(experts) for experts in stack.experts) // stack.top_k  # tokens
    assert stack.inline_rows == bound and bound + 3 <= loop.limits.max_rows
    compiled = graphs()
    jobs = [batching.Job(batching.prompt(3, seed), None, new) for seed, new in enumerate(range(2, bound + 5))]
    late = [batching.Job(batching.prompt(3, 100 + seed), None, 2) for seed in range(3)]  # join a few decode rows
    requests = [job.request(setup) for job in jobs + late]
    waiting = requests[len(jobs) :]
    steps: list[tuple[bool, int]] = []  # (brings a prompt, tokens) of each pass

    def observed(*args: Any) -> torch.Tensor:
        step = current_step()
        assert step is not None
        steps.append((step.query_index is not None, args[0].shape[1]))
        out: torch.Tensor = stack(*args)
        return out

    loop.batch.stack = observed  # type: ignore[assignment]
    calls: dict[str, list[int]] = {"few prompt": [], "many prompt": [], "few decode": [], "many decode": []}
    try:
        for request in requests[: len(jobs)]:
            loop.submit(request)
        while not all(r.status is Status.FINISHED for r in requests):
            if waiting and len(loop.running) <= bound - 4 and not loop.waiting and not loop._inbox:
                loop.submit(waiting.pop(0))
            before = len(steps)
            if (count := opaque_experts_calls(loop)) is not None and len(steps) == before + 1:
                prompt, tokens = steps[-1]
                calls[f"{'few' if tokens <= bound else 'many'} {'prompt' if prompt else 'decode'}"].append(count)
    finally:
        loop.loader.close()
    layers = len(stack.experts)
    assert calls["few decode"] and set(calls["few decode"]) == {0}
    assert calls["many decode"] and set(calls["many decode"]) == {layers}
    assert calls["few prompt"] and set(calls["few prompt"]) == {0}
    assert calls["many prompt"] and set(calls["many prompt"]) == {layers}
    assert graphs() == compiled, "a step compiled while serving: the warm-up missed it"
    for job, request in zip(jobs + late, requests, strict=True):
        assert batching.outcome(request).token_ids == batching.run_alone(setup, job)


def test_a_prompt_of_up_to_a_decode_graphs_rows_attends_token_by_token_in_that_graph(tmp_path: Path) -> None:
    """A step that brings prompts beside decoding rows (whose grouped queries would be mostly padding), of no more
    tokens than the decode graph that computes the experts inside takes rows, attends token by token (each token a
    row of one query) and runs in the graph of several decode rows; a lone prompt (one logit kept), or a step of
    more tokens, keeps its rows and the prompt's graph. Nothing compiles while serving, and every request gets its
    tokens alone (float32 bounds of the batching tests: greedy tokens equal)."""
    from premoe_service.engine.attention import current_step

    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    loop = compiled_loop(setup)
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack) and stack.inline_rows == 64
    compiled = graphs()
    first = batching.Job(batching.prompt(5, 0), None, 16)
    decoding = [batching.Job(batching.prompt(21 + i, 1 + i), None, 10) for i in range(3)]
    joining = batching.Job(batching.prompt(6, 9), None, 4)
    jobs = [first, *decoding, joining]
    requests = [job.request(setup) for job in jobs]
    steps: list[tuple[bool, bool]] = []  # (brings a prompt, ran in a decode graph) of each pass

    def observed(*args: Any) -> torch.Tensor:
        step = current_step()
        assert step is not None
        out: torch.Tensor = stack(*args)
        steps.append((step.query_index is not None, stack.graph.decode))
        return out

    loop.batch.stack = observed  # type: ignore[assignment]
    driver = batching.Driver(loop)
    try:
        driver.join(requests[0])  # a lone prompt: one logit kept
        driver.join(*requests[1:4])  # three prompts (66 tokens) beside a decoding row: 67 tokens, beyond 64
        driver.forward_steps(2)
        driver.join(requests[4])  # a 6-token prompt beside four decoding rows: 10 tokens
        driver.finish()
    finally:
        loop.loader.close()
    assert stack.failure is None and stack.graph_failure is None
    assert graphs() == compiled, "a step compiled while serving"
    prompt_steps = [decode for prompt, decode in steps if prompt]
    assert prompt_steps == [False, False, True]  # the lone prompt, the 67 tokens; the 10 token by token
    for job, request in zip(jobs, requests, strict=True):
        assert batching.outcome(request).token_ids == batching.run_alone(setup, job)


def test_the_graphs_compute_attention_written_out_where_the_model_runs_sdpa(tmp_path: Path) -> None:
    """A model configured for sdpa: its compiled steps, prompt and decode, trace the family's attention written out
    (`written_attention`), which the graph's own kernels compute: no step calls sdpa, and every request gets its
    tokens alone."""
    from torch.profiler import ProfilerActivity, profile

    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    assert setup.patterned.model.config._attn_implementation == "sdpa"
    loop = compiled_loop(setup)
    jobs = [batching.Job(batching.prompt(4, seed), None, 6) for seed in range(3)]
    requests = [job.request(setup) for job in jobs]
    passes, sdpa = 0, 0
    try:
        for request in requests:
            loop.submit(request)
        while not all(r.status is Status.FINISHED for r in requests):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                ran = loop.step()
            passes += ran
            sdpa += sum(e.count for e in prof.key_averages() if "scaled_dot_product" in e.key)
            if not ran:
                time.sleep(0.001)
    finally:
        loop.loader.close()
    assert passes >= 6 and sdpa == 0
    for job, request in zip(jobs, requests, strict=True):
        assert batching.outcome(request).token_ids == batching.run_alone(setup, job)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_rows_with_banked_experts_and_skips_route_inside_the_graph_as_eager(family: str, tmp_path: Path) -> None:
    """Routing runs inside the graph on what the eager router reads from the routing context: the mixed-precision
    scenario of `tests/test_mixed_batching.py` (a row whose experts sit in quantized slot banks and which skips its
    low-weight experts, beside a drop-only row and an all-experts row), compiled. Each row equals its checkpoint to
    the same bound, nothing compiles after the warm-up, and each request's coverage and skipped expert calls equal
    the eager loop's on the same tokens."""
    stacks: list[CompiledStack] = []

    def loop_of(patterned: Any, residency: Any, store: Any) -> EngineLoop:
        limits = BatchLimits(max_rows=ROWS, max_join_wait_steps=0)
        loop = EngineLoop(patterned, residency, store, eos=set(), pad_id=0, limits=limits, compiled=True)
        assert isinstance(loop.batch.stack, CompiledStack)
        loop.batch.warm_up()
        stacks.append(loop.batch.stack)
        compiled.append(graphs())
        return loop

    compiled: list[int] = []
    served = mixed.mixed_rows_scenario(family, tmp_path / "compiled", loop_of, StackObserver)
    (stack,) = stacks
    assert (stack.failure, stack.graph_failure, stack.experts_failure) == (None, None, None)
    assert graphs() == compiled[0], "a step compiled while serving: the warm-up missed it"
    eager = mixed.mixed_rows_scenario(family, tmp_path / "eager")
    for name, request in served.items():
        assert request.generated == eager[name].generated, name
        assert request.experts_skipped == eager[name].experts_skipped, name
        coverage = request.coverage_sum / request.coverage_count
        assert coverage == pytest.approx(eager[name].coverage_sum / eager[name].coverage_count, abs=1e-6), name
    assert served["mixed"].coverage_sum < served["mixed"].coverage_count  # its pattern leaves some mass out


def test_an_experts_kernel_that_fails_to_compile_leaves_the_experts_eager(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel's compile fails at its first call (here as dynamo fails on code it cannot trace): the failure
    is logged once and named by the stack's state, the stack itself stays compiled, and the experts run their
    eager paths within the float32 bounds."""
    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    job_list = batching.jobs(setup)
    loop = EngineLoop(setup.patterned, setup.residency, setup.store, eos=set(), compiled=True)
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack) and stack.experts

    def untraceable(*_: Any) -> torch.Tensor:
        raise torch._dynamo.exc.Unsupported("a call dynamo cannot trace")

    stack._compiled_experts = untraceable
    with caplog.at_level(logging.WARNING, logger="premoe_service.engine.compiled_stack"):
        loop.batch.warm_up()
        assert "a call dynamo cannot trace" in loop.batch.stack_state()  # before the observer wraps the stack
        requests, observer, _ = serve_scenario(loop, setup, job_list)
    assert stack.failure is None and stack.experts_failure is not None
    assert sum("the experts run eager" in r.getMessage() for r in caplog.records) == 1
    noise = batching.transformers_batch_noise(setup.reference, [job.prompt for job in job_list])
    report = batching.compare(setup, job_list, requests, observer)
    assert report.failures(max(batching.F32_FLOOR, 2 * noise), allow_near_ties=True) == []


def test_attention_that_fails_to_compile_inside_the_graph_runs_behind_the_opaque_operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Attention inside the graph fails to compile (here its function raises while traced): the failure is logged
    once and named by the stack's state, the warm-up compiles the opaque operator's graphs instead (nothing
    compiles while serving), the stack stays compiled, and the rows hold the float32 bounds."""
    from premoe_service.engine import attention

    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    job_list = batching.jobs(setup)

    def untraceable(*_: Any) -> torch.Tensor:
        raise attention.UnsupportedAttention("a layout the graph cannot take")

    monkeypatch.setattr(attention, "graph_attention", untraceable)
    loop = EngineLoop(setup.patterned, setup.residency, setup.store, eos=set(), compiled=True)
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack)
    with caplog.at_level(logging.WARNING, logger="premoe_service.engine.compiled_stack"):
        loop.batch.warm_up()
        state = loop.batch.stack_state()  # dynamo reports the raise in its own words
        assert state.startswith("compiled") and "attention outside the graph" in state
        compiled = graphs()
        requests, observer, _ = serve_scenario(loop, setup, job_list)
    assert stack.failure is None and stack.graph_failure is not None
    assert graphs() == compiled, "the opaque operator's shape classes compiled while serving"
    assert sum("attention runs outside the compiled graph" in r.getMessage() for r in caplog.records) == 1
    noise = batching.transformers_batch_noise(setup.reference, [job.prompt for job in job_list])
    report = batching.compare(setup, job_list, requests, observer)
    assert report.failures(max(batching.F32_FLOOR, 2 * noise), allow_near_ties=True) == []


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_a_bfloat16_model_serves_compiled_with_nothing_compiled_after_the_warm_up(family: str, tmp_path: Path) -> None:
    """Routing weights come in the model's dtype (Qwen3-MoE) or in float32 (DeepSeek-V3): the warm-up compiles the
    experts kernel for both, so a bfloat16 model compiles nothing while serving, and the kernel computes its
    experts. (No bfloat16 bound exists against transformers; the float32 tests hold the values.)"""
    setup = batching.build(tmp_path, family, torch.bfloat16)
    requests, _, _ = run_compiled(setup, batching.jobs(setup))
    assert all(request.generated for request in requests)


def test_a_float64_model_runs_eager(tmp_path: Path) -> None:
    """Its norms compute in float32, which compiled kernels round in another order (`compiles`)."""
    setup = batching.build(tmp_path, "qwen3_moe", torch.float64)
    loop = EngineLoop(setup.patterned, setup.residency, setup.store, eos=set(), compiled=True)
    try:
        assert loop.batch.stack is not None and not isinstance(loop.batch.stack, CompiledStack)
        assert loop.batch.warm_up() is None
    finally:
        loop.loader.close()


def test_without_a_compiler_the_stack_runs_eager_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch._inductor.config as inductor

    setup = batching.build(tmp_path, "qwen3_moe", torch.float32)
    job_list = batching.jobs(setup)
    # A compiler that does not exist, and no cache (a cached kernel would need no compiler).
    broken = inductor.patch({"cpp.cxx": (str(tmp_path / "no-such-compiler"),), "force_disable_caches": True})
    with broken, caplog.at_level(logging.WARNING, logger="premoe_service.engine.compiled_stack"):
        loop = compiled_loop(setup)
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack)
    assert stack.failure is not None
    assert any("runs eager" in r.getMessage() for r in caplog.records)
    # It serves, eager: the batching scenario within the float32 bounds.
    requests, observer, _ = serve_scenario(loop, setup, job_list)
    assert stack.failure is not None
    noise = batching.transformers_batch_noise(setup.reference, [job.prompt for job in job_list])
    report = batching.compare(setup, job_list, requests, observer)
    assert report.failures(max(batching.F32_FLOOR, 2 * noise), allow_near_ties=True) == []


def test_the_service_starts_with_its_stack_compiled_and_answers_as_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedder
) -> None:
    """`premoe serve`'s default (`ServiceConfig.compile_step`, on unless PREMOE_COMPILE_STEP says otherwise): the
    engine compiles its stack and the router signal its pass before it serves, nothing compiles while serving, and
    both answer as eager ones (the signal's scores within rounding)."""
    from premoe_service.families.tiny import save_tiny_checkpoint
    from premoe_service.runtime.decoder_stack import DecoderStack
    from premoe_service.serving import GenerationResult, SamplingParams, ServiceConfig, ServingCore
    from premoe_service.store import shard

    save_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    prompts = ["def add(a, b):", "12+30=", "the cat sat on the", "for i in range(3):"]

    def answers(service: ServingCore) -> list[list[int]]:
        out = []
        try:
            for prompt in prompts:
                *_, result = service.generate(prompt, SamplingParams(max_new_tokens=6))
                assert isinstance(result, GenerationResult)
                out.append(result.token_ids)
        finally:
            service.close()
        return out

    monkeypatch.delenv("PREMOE_COMPILE_STEP", raising=False)
    before = graphs()
    compiled = ServingCore(ServiceConfig(store=tmp_path / "store", device="cpu"), embedder=embedder)
    stack = compiled.loop.batch.stack
    assert isinstance(stack, CompiledStack) and stack.failure is None
    signal = compiled.registry.evidence.signal  # type: ignore[union-attr]
    assert signal.mode == "compiled"
    started = graphs()
    assert started >= before + 4  # one row decoding, one prompt, several rows, the signal: compiled before serving
    got = answers(compiled)
    signals = signal.features(prompts)  # texts of several lengths, one graph
    assert graphs() == started and stack.failure is None

    monkeypatch.setenv("PREMOE_COMPILE_STEP", "0")
    eager = ServingCore(ServiceConfig(store=tmp_path / "store", device="cpu"), embedder=embedder)
    assert type(eager.loop.batch.stack) is DecoderStack
    eager_signal = eager.registry.evidence.signal  # type: ignore[union-attr]
    assert eager_signal.mode == "plain"
    expected = eager_signal.features(prompts)
    np.testing.assert_allclose(signals.scores, expected.scores, atol=1e-5)
    np.testing.assert_allclose(signals.inputs, expected.inputs, atol=1e-5)
    assert got == answers(eager)
