"""What the serving domain hands the doors: routing plans, submitted requests and their results."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..engine import Outcome, Request, TokenLogprob
from ..pattern import Pattern


@dataclass
class RoutePlan:
    """Which pattern serves a prompt and why."""

    decision: str  # match | override | fallback
    task: str
    score: float
    pattern: Pattern
    ranked: list[tuple[str, float]] = field(default_factory=list)
    fallback_tasks: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0
    similarity: float | None = None  # the top task's embedding similarity (None: override or no tasks)
    lead: float | None = None  # its combined lead over the off-topic none-class (None without one)


@dataclass
class GenerationResult:
    """The outcome of a request (the last stream chunk carries it)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    plan: RoutePlan
    loads: dict[str, int]
    loaded_bytes: int
    coverage: float
    widened: bool
    timings: dict[str, float]
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # per generated token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # per prompt token (the first has none), when asked for
    expert_calls: int = 0  # routed expert calls (tokens x MoE layers x top-k)
    expert_calls_skipped: int = 0  # of those, skipped by the request's expert skip threshold
    prompt_ids: list[int] = field(default_factory=list)  # the prompt's tokens as the model read them


@dataclass
class Submission:
    """A request queued in the engine loop, with what is needed to report its outcome."""

    request: Request
    plan: RoutePlan
    started: float
    count: Callable[[str, float], None]  # records (task, coverage) in the service's per-task stats
    top_k: int = 0  # routed experts per token, to count expert calls

    def result(self, outcome: Outcome) -> GenerationResult:
        """The reply for the request's outcome (counted once in the per-task stats)."""
        plan = self.plan
        self.count(plan.task, outcome.coverage)
        return GenerationResult(
            text=outcome.text,
            token_ids=outcome.token_ids,
            finish_reason=outcome.finish_reason,
            plan=replace(plan, pattern=outcome.pattern),
            loads=outcome.loads,
            loaded_bytes=outcome.loaded_bytes,
            coverage=outcome.coverage,
            widened=outcome.widened,
            timings={
                "route_ms": plan.seconds * 1e3,
                **outcome.timings,
                "total_ms": (time.perf_counter() - self.started) * 1e3,
            },
            prompt_tokens=outcome.prompt_tokens,
            logprobs=outcome.logprobs,
            prompt_logprobs=outcome.prompt_logprobs,
            expert_calls=outcome.routings * self.top_k,
            expert_calls_skipped=outcome.experts_skipped,
            prompt_ids=list(self.request.prompt_ids),
        )


@dataclass
class TaskCounters:
    requests: int = 0
    coverage_sum: float = 0.0


@dataclass(frozen=True)
class ServiceStats:
    """A snapshot of the service: residency, expert loads, per-task requests, the engine loop's load."""

    resident_experts: int
    capacity_experts: int
    resident_bytes: int
    budget_bytes: int
    loads: dict[str, int]  # expert loads served per tier: device, cache, disk
    loaded_bytes: int  # bytes read from the cache and the disk
    evictions: int
    tasks: dict[str, tuple[int, float]]  # task -> (requests, mean coverage)
    cache_health: str  # ok | degraded
    in_flight: int
    queued: int
    generated_tokens: int
