"""Exactness under continuous batching (issue 11): every request in a batch gets what it would get alone.

The engine loop serves requests with different expert patterns in one forward pass. For every tiny family, five
requests (one with all experts, four with different half patterns; prompts of 3 to 12 tokens) join the running batch
at four different steps, two of them in one batched prefill, and leave at five different steps. A forward hook on the
engine model's `lm_head` records every row's logits. Each request's logits are compared with independent references
run on that request alone: transformers with the excluded experts' router scores masked, and transformers on a
checkpoint pruned to the request's experts (the unmodified model for the all-experts request). The references are fed
the engine's tokens, so logits stay comparable even after a near-tie flip.

- float64 (the references with eager experts: the CPU grouped path rejects float64; the engine runs its own
  experts path): logits within 1e-9 of both references; greedy tokens equal. Except DeepSeek V2/V3:
  transformers computes their router (and V2's rotary embedding) in float32 even in a float64 model, so
  transformers itself differs by ~1e-7 between a batched and a lone prompt; there the bound is twice that
  difference, measured in the test as for float32.
- float32: logits within max(1e-5, twice the difference transformers itself shows between a left-padded batch and
  each prompt alone, measured here on the same prompts); greedy tokens equal except where the reference's top-2
  margin is below 1e-4 (rounding, not a bug; counted and printed).
- Seeded sampling gives the same tokens in the batch as alone through the loop, and alone twice.
- A request whose experts are loading waits (not RUNNING) while the batch keeps decoding, held by a shut loader gate,
  and a request queued behind it whose experts are resident runs and finishes meanwhile.
- The same `compare` fails on injected bugs: a shifted row mask, a t % B token-to-row map, a missing attention mask,
  positions from the cache width, and experts made routable before their copy completed.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import DynamicCache

from premoe_service.engine import BatchLimits, EngineLoop, Request, SamplingParams, Status
from premoe_service.engine.attention import PackedStep
from premoe_service.engine.result import GenerationResult as Outcome
from premoe_service.families import MoESpec
from premoe_service.families.tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer
from premoe_service.pattern import Pattern
from premoe_service.runtime import PatternedModel
from premoe_service.runtime.build import load_model
from premoe_service.runtime.context import PatternTables, RoutingContext
from premoe_service.runtime.residency import Budget, Residency
from premoe_service.store import Store, open_cache, shard

from .references import masked_transformers, pruned_checkpoint_model, random_pattern

FAMILIES = sorted(TINY_CONFIGS)
F64_TOL = 1e-9
F32_FLOOR = 1e-5
MARGIN = 1e-4  # float32 greedy flips are accepted only where the top-2 logit margin is below this
TEMPERATURE, TOP_P = 0.8, 0.9  # seeded sampling


# --- set-up -------------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@dataclass
class Setup:
    family: str
    dtype: torch.dtype
    reference: Any  # the transformers model the store was cut from
    store: Store
    patterned: PatternedModel
    residency: Residency

    @property
    def spec(self) -> MoESpec:
        return self.patterned.spec


def _eager(model: Any, dtype: torch.dtype) -> Any:
    if dtype == torch.float64:
        model.set_experts_implementation("eager")
    return model


def build(root: Path, family: str, dtype: torch.dtype, budget: Budget | None = None) -> Setup:
    """A tiny checkpoint of `family` in `dtype`, sharded into a store, and the engine loaded from the store."""
    reference = _eager(tiny_model(family, dtype=dtype), dtype)
    reference.generation_config.eos_token_id = None
    reference.save_pretrained(root / "ckpt")
    tiny_tokenizer().save_pretrained(root / "ckpt")
    shard(root / "ckpt", root / "store", progress=False)
    store = Store(root / "store", open_cache(None))
    patterned, residency = load_model(store, budget, device="cpu")  # the engine's own experts path, float64 too
    return Setup(family, dtype, reference, store, patterned, residency)


def make_loop(setup: Setup, gate: threading.Event | None = None) -> EngineLoop:
    """A loop that prefills ready requests at once, so the scenario's join steps are exact."""
    limits = BatchLimits(max_join_wait_steps=0)
    return EngineLoop(
        setup.patterned, setup.residency, setup.store, eos=set(), pad_id=0, loader_gate=gate, limits=limits
    )


@dataclass(frozen=True)
class Job:
    """One request of a scenario: prompt, kept experts (None: all), new tokens, and its sampling options."""

    prompt: tuple[int, ...]
    kept: dict[int, list[int]] | None
    new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def request(self, setup: Setup) -> Request:
        pattern = Pattern.full(setup.spec) if self.kept is None else Pattern.build(setup.spec, self.kept)
        params = SamplingParams(
            max_new_tokens=self.new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )
        return Request(list(self.prompt), pattern, params, tiny_tokenizer(), stream=False)


def prompt(length: int, seed: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(1000 + seed)
    return tuple(torch.randint(3, 128, (length,), generator=generator).tolist())


# (prompt length, pattern seed or None for all experts, new tokens)
SHAPES = ((5, None, 12), (9, 1, 5), (12, 2, 10), (7, 3, 7), (3, 4, 4))
# Groups of jobs submitted together, and the forward steps to run after the group joined. With each join at the step
# after its submission: joins at steps 1, 3, 4 (two jobs in one prefill) and 6; leaves at 11, 6, 12, 9 and 8.
SCHEDULE: tuple[tuple[tuple[int, ...], int], ...] = (((0,), 1), ((1,), 0), ((2, 3), 1), ((4,), 0))


def jobs(setup: Setup, sampled: bool = False) -> list[Job]:
    per_layer = setup.spec.num_experts // 2
    out = []
    for index, (length, seed, new) in enumerate(SHAPES):
        kept = None if seed is None else random_pattern(setup.reference, per_layer, seed=seed)
        job = Job(prompt(length, index), kept, new)
        out.append(replace(job, temperature=TEMPERATURE, top_p=TOP_P, seed=100 + index) if sampled else job)
    assert len({j.prompt for j in out}) == len(out)
    assert len({str(j.kept) for j in out}) == len(out)  # all patterns differ
    return out


# --- driving the loop and watching its forward passes ----------------------------------------------------------------


class Observer:
    """Records each request's logits per forward pass, from hooks on the engine model's `lm_head` (the loop is not
    changed; the engine may run the model's decoder stack without calling the model itself, `runtime.decoder_stack`).

    The loop's plan of the pass names the request of each kept logits row (a decoding row's, or a joining row's
    whose prompt the pass completes; a row still being fed its prompt has none). `decode_rows` counts the rows that
    decoded in each pass, `prefill_rows` the rows whose prompt a pass completed.
    """

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.logits: dict[int, list[Tensor]] = defaultdict(list)
        self.prefill_rows: list[int] = []
        self.decode_rows: list[int] = []
        self._rows: list[tuple[int, int]] = []
        head = loop.patterned.model.lm_head
        self._hooks = [
            head.register_forward_pre_hook(self._before, with_kwargs=True),
            head.register_forward_hook(self._after, with_kwargs=True),
        ]

    def expect(self, request: Request) -> None:
        pass

    def _before(self, _module, _args, kwargs) -> None:
        plan = self.loop.plan
        assert plan is not None
        self._rows = [(r.id, kept[-1]) for r, kept in zip(plan.rows, plan.kept, strict=True) if kept]
        decoding = sum(1 for r in plan.rows if r.generated)
        joining = sum(1 for r, kept in zip(plan.rows, plan.kept, strict=True) if kept and not r.generated)
        if decoding:
            self.decode_rows.append(decoding)
        if joining:
            self.prefill_rows.append(joining)

    def _after(self, _module, _args, _kwargs, output) -> None:
        logits = output[0].detach().to("cpu", copy=True)  # [K, V]: the pass's kept positions
        for request_id, index in self._rows:
            self.logits[request_id].append(logits[index])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


class Driver:
    """Steps the loop on the test's thread and notes at which forward step each request joined and left."""

    def __init__(self, loop: EngineLoop, observer: Observer | None = None) -> None:
        self.loop = loop
        self.observer = observer
        self.steps = 0
        self.requests: list[Request] = []
        self.joined: dict[int, int] = {}
        self.left: dict[int, int] = {}

    def submit(self, *requests: Request) -> None:
        for request in requests:
            if self.observer is not None:
                self.observer.expect(request)
            self.requests.append(request)
            self.loop.submit(request)

    def step(self) -> bool:
        if not self.loop.step():
            time.sleep(0.001)  # loads run on the loader thread
            return False
        self.steps += 1
        for request in self.requests:
            if request.generated and request.id not in self.joined:
                self.joined[request.id] = self.steps
            if request.status is Status.FINISHED and request.id not in self.left:
                self.left[request.id] = self.steps
        return True

    def until(self, done: Callable[[], bool], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"loop did not get there in {timeout_s}s: {self.loop.stats}"
            self.step()

    def forward_steps(self, count: int) -> None:
        target = self.steps + count
        self.until(lambda: self.steps >= target)

    def join(self, *requests: Request) -> None:
        self.submit(*requests)
        self.until(lambda: all(r.status in (Status.RUNNING, Status.FINISHED) for r in requests))

    def finish(self) -> None:
        self.until(lambda: all(r.status is Status.FINISHED for r in self.requests))


_outcomes: dict[int, Outcome] = {}


def outcome(request: Request) -> Outcome:
    """The finished request's outcome (its event stream can be read once; raises what the request failed with)."""
    if request.id not in _outcomes:
        last = list(request.events())[-1]
        assert isinstance(last, Outcome)
        _outcomes[request.id] = last
    return _outcomes[request.id]


def run_batched(setup: Setup, job_list: Sequence[Job]) -> tuple[list[Request], Observer, Driver]:
    """Run the jobs through one loop on the schedule; returns the requests (finished), logits and timeline."""
    loop = make_loop(setup)
    observer = Observer(loop)
    driver = Driver(loop, observer)
    requests = [job.request(setup) for job in job_list]
    try:
        for group, gap in SCHEDULE:
            driver.join(*(requests[i] for i in group))
            driver.forward_steps(gap)
        driver.finish()
    finally:
        observer.close()
        loop.loader.close()
    return requests, observer, driver


def run_alone(setup: Setup, job: Job) -> list[int]:
    loop = make_loop(setup)
    request = job.request(setup)
    try:
        loop.submit(request)
        loop.run_until_idle(timeout_s=20)
    finally:
        loop.loader.close()
    return outcome(request).token_ids


# --- references ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def forced_logits(model: Any, prompt_ids: Sequence[int], tokens: Sequence[int]) -> Tensor:
    """Logits `[len(tokens), V]` of the request alone: prompt, then one decode step per given token (KV cache)."""
    cache = DynamicCache(config=model.config)  # what transformers makes itself (sliding-window layers included)
    out = model(input_ids=torch.tensor([list(prompt_ids)]), cache=cache, use_cache=True)
    rows = [out.logits[0, -1]]
    for token in tokens[:-1]:
        out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
        rows.append(out.logits[0, -1])
    return torch.stack(rows)


def references(setup: Setup, job: Job, tokens: Sequence[int]) -> dict[str, Tensor]:
    """Per-step logits of the request alone from transformers with masked router scores and on a pruned checkpoint."""
    model = setup.reference
    if job.kept is None:
        alone = forced_logits(model, job.prompt, tokens)
        return {"alone": alone, "pruned": alone}
    with masked_transformers(model, job.kept):
        alone = forced_logits(model, job.prompt, tokens)
    pruned = _eager(pruned_checkpoint_model(model, job.kept), setup.dtype)
    return {"alone": alone, "pruned": forced_logits(pruned, job.prompt, tokens)}


@torch.no_grad()
def transformers_batch_noise(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int = 12) -> float:
    """The largest logit difference between transformers' `generate` on a left-padded batch and on each prompt alone
    (over the steps where the batch's tokens still equal the lone run's): the floor of batched float arithmetic."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p))
        mask[row, width - len(p) :] = 1
    options = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    batched = model.generate(input_ids=ids, attention_mask=mask, **options)
    worst = 0.0
    for row, p in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([list(p)]), **options)
        for step in range(new_tokens):
            worst = max(worst, (batched.logits[step][row] - alone.logits[step][0]).abs().max().item())
            if batched.sequences[row, width + step] != alone.sequences[0, len(p) + step]:
                break
    return worst


# --- the comparison -----------------------------------------------------------------------------------------------


@dataclass
class Report:
    """How far each request's batched logits and tokens are from its references.

    `diff[name]` is the largest absolute logit difference against reference `name` over all requests and steps;
    `flips` are (request, step, reference, top-2 margin) where the engine's token is not the reference's argmax;
    `near_ties` counts steps whose reference top-2 margin is below `MARGIN`; `problems` are structural failures
    (a request that failed, or logits missing for some of its tokens).
    """

    diff: dict[str, float] = field(default_factory=lambda: {"alone": 0.0, "pruned": 0.0})
    flips: list[tuple[int, int, str, float]] = field(default_factory=list)
    near_ties: int = 0
    steps: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max(self.diff.values())

    def failures(self, tol: float, allow_near_ties: bool) -> list[str]:
        out = list(self.problems)
        out += [f"logits differ from {name} by {d:.3g} > {tol:.3g}" for name, d in self.diff.items() if not d <= tol]
        for index, step, name, margin in self.flips:
            if not (allow_near_ties and margin < MARGIN):
                out.append(f"request {index} step {step}: token differs from {name} (top-2 margin {margin:.3g})")
        return out


def top2_margin(logits: Tensor) -> float:
    top = logits.topk(2).values
    return (top[0] - top[1]).item()


def compare(
    setup: Setup, job_list: Sequence[Job], requests: Sequence[Request], observer: Observer, report: Report | None = None
) -> Report:
    """Compare each finished greedy request's recorded logits and tokens with its references alone."""
    report = report or Report()
    for index, (job, request) in enumerate(zip(job_list, requests, strict=True)):
        try:
            tokens = outcome(request).token_ids
        except Exception as exc:  # a request the loop failed
            report.problems.append(f"request {index} failed: {exc!r}")
            continue
        got = observer.logits.get(request.id, [])
        if len(tokens) != job.new_tokens or len(got) != len(tokens):
            report.problems.append(f"request {index}: {len(tokens)} tokens, {len(got)} logit rows")
            continue
        batched = torch.stack(got)
        for name, expected in references(setup, job, tokens).items():
            report.diff[name] = max(report.diff[name], (batched - expected).abs().max().item())
            for step, token in enumerate(tokens):
                if int(expected[step].argmax()) != token:
                    report.flips.append((index, step, name, top2_margin(expected[step])))
        report.near_ties += sum(top2_margin(row) < MARGIN for row in batched)  # as the engine saw them
        report.steps += len(tokens)
    return report


def batched_report(setup: Setup) -> tuple[Report, Driver, Observer]:
    job_list = jobs(setup)
    requests, observer, driver = run_batched(setup, job_list)
    return compare(setup, job_list, requests, observer), driver, observer


# --- exactness ----------------------------------------------------------------------------------------------------


def check_timeline(driver: Driver, observer: Observer) -> None:
    """Requests joined at different steps (two in one batched prefill), left at different steps, ran 4+ at once."""
    ids = [r.id for r in driver.requests]
    joins = [driver.joined[i] for i in ids]
    leaves = [driver.left[i] for i in ids]
    assert joins[0] < joins[1] < joins[2] == joins[3] < joins[4], joins
    assert len(set(leaves)) == len(leaves), leaves
    assert leaves != sorted(leaves)  # some leave before requests that joined earlier
    assert max(observer.decode_rows) >= 4, observer.decode_rows
    assert max(observer.prefill_rows) >= 2, observer.prefill_rows


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_float64_equals_alone_and_pruned_checkpoint(family: str, tmp_path: Path) -> None:
    setup = build(tmp_path, family, torch.float64)
    # Zero for most families. DeepSeek's transformers code computes its router and (V2) rotary embedding in float32
    # even in a float64 model, so the last-bit differences of a batched float64 matmul can move a float32 rounding:
    # transformers itself then differs by ~1e-7 between a batch and a lone prompt, and so may we, by at most twice that.
    noise = transformers_batch_noise(setup.reference, [job.prompt for job in jobs(setup)])
    tol = max(F64_TOL, 2 * noise)
    report, driver, observer = batched_report(setup)
    check_timeline(driver, observer)
    print(
        f"\n{family} float64: transformers batch noise {noise:.2e}, tol {tol:.2e}; max |diff| alone "
        f"{report.diff['alone']:.2e} pruned {report.diff['pruned']:.2e}"
    )
    assert report.failures(tol, allow_near_ties=False) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_float32_within_transformers_batching_noise(family: str, tmp_path: Path) -> None:
    setup = build(tmp_path, family, torch.float32)
    noise = transformers_batch_noise(setup.reference, [job.prompt for job in jobs(setup)])
    tol = max(F32_FLOOR, 2 * noise)
    report, driver, observer = batched_report(setup)
    check_timeline(driver, observer)
    flips = [f for f in report.flips if f[3] < MARGIN]
    print(
        f"\n{family} float32: transformers batch noise {noise:.2e}, tol {tol:.2e}; max |diff| alone "
        f"{report.diff['alone']:.2e} pruned {report.diff['pruned']:.2e}; near-tie steps {report.near_ties}/"
        f"{report.steps}, margin-skipped flips {len(flips)} {flips}"
    )
    assert report.failures(tol, allow_near_ties=True) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_batched_equals_alone(family: str, tmp_path: Path) -> None:
    setup = build(tmp_path, family, torch.float32)
    job_list = jobs(setup, sampled=True)
    requests, observer, driver = run_batched(setup, job_list)
    assert len(driver.left) == len(job_list) and max(observer.decode_rows) >= 4
    batched = [outcome(r).token_ids for r in requests]
    for job, tokens in zip(job_list, batched, strict=True):
        first, second = run_alone(setup, job), run_alone(setup, job)
        assert first == second  # the seed alone decides
        assert tokens == first
    greedy = [run_alone(setup, Job(j.prompt, j.kept, j.new_tokens)) for j in job_list]
    assert batched != greedy  # sampling really sampled


# --- expert loads beside the loop ---------------------------------------------------------------------------------


@dataclass
class GateRun:
    setup: Setup
    jobs: list[Job]
    requests: list[Request]
    observer: Observer
    waiting_statuses: list[Status]  # the newcomer's status at each step while the gate was shut
    runner_tokens: list[int]  # the running request's token count at each of those steps
    resident_while_shut: bool  # whether any of the newcomer's missing experts was routable while the gate was shut
    overtaken: bool  # whether a request with resident experts, queued behind the loading one, finished meanwhile


def gate_run(root: Path, shut_steps: int = 4) -> GateRun:
    """Half the experts fit. C fills two slots per layer and leaves; A runs long; B (experts neither in A nor resident:
    they evict C's) is submitted while the loader gate is shut, then D (A's experts, resident) behind it; the gate
    opens after `shut_steps` steps."""
    setup = build(root, "qwen3_moe", torch.float64, Budget(fraction=0.5))
    spec = setup.spec
    assert all(setup.patterned.slots[layer].capacity == 4 for layer in spec.moe_layers)
    kept: dict[str, dict[int, list[int]]] = {name: {} for name in "ABC"}
    for layer in spec.moe_layers:
        order = torch.randperm(spec.num_experts, generator=torch.Generator().manual_seed(layer)).tolist()
        kept["A"][layer], kept["B"][layer], kept["C"][layer] = order[:2], order[2:4], order[4:6]
    job_c, job_a, job_b, job_d = (
        Job(prompt(n, 50 + n), kept[k], t) for k, n, t in (("C", 4, 3), ("A", 6, 14), ("B", 8, 6), ("A", 5, 3))
    )
    gate = threading.Event()
    gate.set()
    loop = make_loop(setup, gate)
    observer = Observer(loop)
    driver = Driver(loop, observer)
    job_list = [job_c, job_a, job_b, job_d]
    req_c, req_a, req_b, req_d = requests = [job.request(setup) for job in job_list]
    statuses, counts, routable = [], [], False
    try:
        driver.submit(req_c)
        driver.finish()
        driver.join(req_a)
        gate.clear()
        driver.submit(req_b)
        for step in range(shut_steps):
            driver.forward_steps(1)
            if step == 0:
                driver.submit(req_d)
            statuses.append(req_b.status)
            counts.append(len(req_a.generated))
            routable |= any(
                e in setup.patterned.slots[layer].slot_of for layer in spec.moe_layers for e in kept["B"][layer]
            )
        overtaken = req_d.status is Status.FINISHED and req_b.status is Status.LOADING
        gate.set()
        driver.finish()
    finally:
        gate.set()
        observer.close()
        loop.loader.close()
    return GateRun(setup, job_list, requests, observer, statuses, counts, routable, overtaken)


def test_loads_run_beside_decoding_behind_a_shut_gate(tmp_path: Path) -> None:
    run = gate_run(tmp_path)
    assert all(s is not Status.RUNNING for s in run.waiting_statuses), run.waiting_statuses
    assert run.waiting_statuses[-1] is Status.LOADING
    assert not run.resident_while_shut
    assert run.runner_tokens == list(range(run.runner_tokens[0], run.runner_tokens[0] + len(run.runner_tokens)))
    assert run.overtaken  # no head-of-line blocking
    assert max(run.observer.decode_rows) == 2  # B joined A's batch once its experts arrived
    report = compare(run.setup, run.jobs, run.requests, run.observer)
    assert report.failures(F64_TOL, allow_near_ties=False) == []


# --- the comparison catches injected bugs -------------------------------------------------------------------------

MUTATION_FAMILIES = ["deepseek_v3", "qwen3_moe"]
MUTATION_TOL = 1e-4  # looser than any tolerance the exactness tests use: each bug must be caught even at this


def _shift_rows(context: RoutingContext, tables: PatternTables) -> None:
    row_pattern = tables.row_pattern.roll(1)  # each row gets the previous row's pattern
    context.token_pattern = row_pattern[context.token_row]


def _rows_modulo(context: RoutingContext, tables: PatternTables) -> None:
    token_row = torch.arange(context.token_row.numel()) % context.rows  # t % B instead of the row's own tokens
    context.token_pattern, context.token_row = tables.row_pattern[token_row], token_row


def _mutate_context(monkeypatch: pytest.MonkeyPatch, change: Callable[[RoutingContext, PatternTables], None]) -> None:
    original = RoutingContext.packed.__func__  # type: ignore[attr-defined]

    def packed(cls, tables, counts, *args, **kwargs):
        context = original(cls, tables, counts, *args, **kwargs)
        change(context, tables)
        return context

    monkeypatch.setattr(RoutingContext, "packed", classmethod(packed))


MUTATIONS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "shifted row mask": lambda mp: _mutate_context(mp, _shift_rows),
    "token-to-row map t % B": lambda mp: _mutate_context(mp, _rows_modulo),
    "missing attention mask": lambda mp: mp.setattr(  # every column of the row visible, none after it masked
        PackedStep,
        "mask",
        lambda self, window, dtype: torch.zeros((*self.query_pos.shape, self.width), dtype=dtype).unsqueeze(1),
    ),
    "positions from the cache width": lambda mp: mp.setattr(
        PackedStep, "position_ids", lambda self: torch.full_like(self.positions, self.width - 1).unsqueeze(0)
    ),
}


@pytest.mark.parametrize("family", MUTATION_FAMILIES)
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_compare_catches_batching_bugs(mutation: str, family: str, tmp_path: Path, monkeypatch) -> None:
    setup = build(tmp_path, family, torch.float64)
    MUTATIONS[mutation](monkeypatch)
    report, _, _ = batched_report(setup)
    print(f"\n{family} with {mutation}: max |diff| {report.max_diff:.2e}, {len(report.flips)} token flips")
    assert report.failures(MUTATION_TOL, allow_near_ties=True) != [], report


def test_compare_catches_an_expert_routed_before_its_copy_completed(tmp_path: Path, monkeypatch) -> None:
    reserve, commit = Residency.reserve, Residency.commit

    def early_reserve(self, pattern):
        copies = reserve(self, pattern)
        for layer, expert, _slot in copies or []:
            self.patterned.slots[layer].commit(expert)  # routable now, before the loader wrote the bytes
        if copies:
            self.patterned.publish_slots()
        return copies

    def late_commit(self, layer, expert):
        if expert in self.patterned.slots[layer].loading:
            commit(self, layer, expert)

    monkeypatch.setattr(Residency, "reserve", early_reserve)
    monkeypatch.setattr(Residency, "commit", late_commit)
    run = gate_run(tmp_path)
    assert run.resident_while_shut
    report = compare(run.setup, run.jobs, run.requests, run.observer)
    print(f"\nqwen3_moe with experts routed before their copy: max |diff| {report.max_diff:.2e}")
    assert report.failures(MUTATION_TOL, allow_near_ties=True) != [], report
