"""What a request carries through the engine loop and what it is answered with: the route it was given, and its
one result, which the doors encode as they are."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..pattern import Pattern
from .text import TokenLogprob


@dataclass
class RoutePlan:
    """Which pattern serves a prompt and why (the loop carries it untouched into the request's result)."""

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
    """What a finished request reports: the last event of its stream, from the engine loop to the doors."""

    text: str
    token_ids: list[int]
    finish_reason: str  # eos | length | stop | cancelled
    plan: RoutePlan  # the route it was given, with the pattern that served it (wider when `widened`)
    loads: dict[str, int]
    loaded_bytes: int
    coverage: float
    widened: bool
    timings: dict[str, float]  # route_ms, queue_ms, load_ms, prefill_ms, decode_ms, total_ms
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # per generated token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # per prompt token (the first has none), when asked for
    expert_calls: int = 0  # routed expert calls (tokens x MoE layers x top-k)
    expert_calls_skipped: int = 0  # of those, skipped by the request's expert skip threshold
    prompt_ids: list[int] = field(default_factory=list)  # the prompt's tokens as the model read them
