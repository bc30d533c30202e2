"""Token generation on the patterned model: prefill, decode steps, sampling, stop strings, coverage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from ..errors import DeadlineExceeded, InvalidArgument, Unavailable
from ..families import Routing, full_scores
from ..pattern import Pattern
from ..runtime.residency import Residency


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options; `temperature == 0` is greedy and equals transformers' greedy `generate`."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self, limit: int) -> SamplingParams:
        """Validate against the server's token limit; errors name the field."""
        if not 1 <= self.max_new_tokens <= limit:
            raise InvalidArgument(f"must lie in 1..{limit}, got {self.max_new_tokens}", field="max_new_tokens")
        if not (0 <= self.temperature <= 10) or self.temperature != self.temperature:
            raise InvalidArgument(f"must lie in [0, 10], got {self.temperature}", field="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"must lie in (0, 1], got {self.top_p}", field="top_p")
        if any(not s for s in self.stop) or len(self.stop) > 16:
            raise InvalidArgument("stop strings must be non-empty, at most 16", field="stop")
        return self


@dataclass
class CoverageMeter:
    """Per forward pass: the share of the full router's probability mass on the active pattern's experts,
    averaged over tokens and MoE layers; also keeps the prompt's mean router scores per layer."""

    pattern: Pattern
    spec_routing: Any
    total: float = 0.0
    count: int = 0
    keep_prompt_scores: bool = False
    prompt_scores: dict[int, Tensor] = field(default_factory=dict)
    _kept: dict[int, Tensor] = field(default_factory=dict)

    def __call__(self, layer: int, hidden: Tensor, routing: Routing) -> None:
        scores = full_scores(self.spec_routing, routing.logits)  # [T, E]
        kept = self._kept.get(layer)
        if kept is None:
            kept = torch.tensor(self.pattern.kept(layer), device=scores.device)
            self._kept[layer] = kept
        share = scores.index_select(1, kept).sum(-1) / scores.sum(-1).clamp_min(1e-30)  # [T]
        self.total += float(share.sum())
        self.count += share.numel()
        if self.keep_prompt_scores:
            self.prompt_scores[layer] = (scores / scores.sum(-1, keepdim=True)).mean(0).cpu()

    @property
    def coverage(self) -> float:
        return self.total / self.count if self.count else 1.0


@dataclass
class Step:
    """One generated token and the text it completes (may be empty while a character is incomplete)."""

    token_id: int
    text: str


@dataclass
class Decoding:
    """State of one request's generation."""

    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    meter: CoverageMeter | None = None


class Generator:
    """Runs one request on the shared model; every forward pass holds the residency's model lock and
    activates the request's (leased) pattern first, so requests with other patterns interleave safely.

    Args:
        residency: Owner of the engine, its slots and the model lock.
        tokenizer: The model's tokenizer.
        deadline: `time.monotonic()` value after which no more work starts (None: none).
        cancelled: Returns True when the caller has gone (stops generation between tokens).
    """

    def __init__(
        self,
        residency: Residency,
        tokenizer: Any,
        *,
        deadline: float | None = None,
        cancelled: Callable[[], bool] | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.residency = residency
        self.engine = residency.engine
        self.tokenizer = tokenizer
        self.deadline = deadline
        self.cancelled = cancelled or (lambda: False)
        self.stopping = stopping or (lambda: False)
        config = self.engine.config
        generation = getattr(self.engine.model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None) or getattr(config, "eos_token_id", None)
        self.eos: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def encode(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise InvalidArgument("prompt encodes to no tokens", field="prompt")
        return ids

    def _check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the deadline passed during generation", field="deadline")
        if self.stopping():
            raise Unavailable("the server is shutting down", field="server")

    def _forward(self, ids: Tensor, cache: Any, pattern: Pattern, meter: CoverageMeter | None) -> Any:
        """One forward pass with `pattern` active, holding the model lock (routers serve one pattern at a time)."""
        with self.residency.model_lock:
            self.residency.activate(pattern)
            self.engine.set_observer(meter)
            try:
                return self.engine.model(input_ids=ids, past_key_values=cache, use_cache=True)
            finally:
                self.engine.set_observer(None)

    @torch.no_grad()
    def prefill(self, state: Decoding, pattern: Pattern, *, keep_prompt_scores: bool = False) -> tuple[Tensor, Any]:
        """Run the prompt with `pattern` active; returns the last logits and the KV cache."""
        self._check_time()
        meter = CoverageMeter(pattern, self.engine.spec.routing, keep_prompt_scores=keep_prompt_scores)
        start = time.perf_counter()
        ids = torch.tensor([state.prompt_ids], device=self.engine.device)
        out = self._forward(ids, DynamicCache(config=self.engine.config), pattern, meter)
        state.prefill_s += time.perf_counter() - start
        state.meter = meter
        return out.logits[0, -1], out.past_key_values

    @torch.no_grad()
    def decode(
        self, state: Decoding, pattern: Pattern, logits: Tensor, cache: Any, params: SamplingParams
    ) -> Iterator[Step]:
        """Yield tokens until max_new_tokens, an EOS token or a stop string."""
        generator = torch.Generator(device="cpu")
        if params.seed is not None:
            generator.manual_seed(params.seed)
        meter = state.meter
        start = time.perf_counter()
        emitted = ""
        while True:
            token = _choose(logits, params, generator)
            state.generated.append(token)
            if token in self.eos:
                state.finish_reason = "eos"
                break
            text = self.tokenizer.decode(state.generated, skip_special_tokens=True)
            stop_at = _stop_position(text, params.stop)
            if stop_at is not None:
                text = text[:stop_at]
            stable = text if stop_at is not None else _stable_prefix(text, params.stop)
            delta, emitted = stable[len(emitted) :], stable
            state.text = text
            yield Step(token, delta)
            if stop_at is not None:
                state.finish_reason = "stop"
                break
            if len(state.generated) >= params.max_new_tokens:
                state.finish_reason = "length"
                break
            self._check_time()
            if self.cancelled():
                state.finish_reason = "cancelled"
                break
            out = self._forward(torch.tensor([[token]], device=self.engine.device), cache, pattern, meter)
            logits, cache = out.logits[0, -1], out.past_key_values
        if state.finish_reason == "eos":
            state.text = self.tokenizer.decode(state.generated, skip_special_tokens=True)
        if len(state.text) > len(emitted):
            yield Step(-1, state.text[len(emitted) :])  # flush characters held back
        state.decode_s += time.perf_counter() - start


def _choose(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def _stop_position(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s in text]
    return min(positions) if positions else None


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Text safe to send: hold back a trailing replacement character (the next token may complete the
    UTF-8 sequence) and a tail that could still grow into a stop string."""
    if text.endswith("\ufffd"):
        text = text[:-1]
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold]
