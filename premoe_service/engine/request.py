"""One request's state in the engine loop, and what the loop hands back to whoever submitted it."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import DeadlineExceeded, ResourceExhausted, Unavailable
from ..pattern import Pattern
from .outbox import Outbox
from .params import SamplingParams
from .result import GenerationResult, RoutePlan
from .text import TextStream, TokenLogprob, choose, token_logprobs

_ids = itertools.count(1)


class Status(enum.Enum):
    WAITING_SLOTS = "waiting for slots"  # its missing experts do not fit next to pinned ones yet
    LOADING = "loading experts"  # slots reserved, copies in flight
    READY = "waiting for a row"  # every expert resident, not yet prefilled
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """A generation request as the engine loop sees it.

    Args:
        prompt_ids: Tokenized prompt.
        pattern: The experts it may route to (leased from admission to its last token).
        params: Its decoding options (own seed, temperature, top-p, stop strings).
        tokenizer: For its incremental text.
        deadline: `time.monotonic()` after which it fails with DEADLINE_EXCEEDED.
        cancelled: Returns True once the caller has gone; polled at every step.
        stream: Send text pieces as they come (else only the result).
        coverage_floor: Below this prefill coverage the pattern is widened once (the loop's widening policy
            decides how).
        wait_timeout_s: How long it may wait for slots pinned by others.
        loop: Deliver events to this asyncio loop (read them with `aevents()`); None: `events()`.
        sink: Where its events go instead of its own queue (then neither `events()` nor `aevents()` is read): an
            `EventSink`, whose target takes the events (text pieces, the result, or a `Failed`) of every request
            sharing it in one call per engine step, on the engine's thread. The door process's relay takes a step's
            events of all its calls this way.
        plan: The route it was given, reported in its result (None: a pattern given directly, not counted in the
            per-task stats).
        times: Moments known before it is made (`started`: when its submission began, for `total_ms`).
    """

    prompt_ids: list[int]
    pattern: Pattern
    params: SamplingParams
    tokenizer: Any
    deadline: float | None = None
    cancelled: Callable[[], bool] = lambda: False
    stream: bool = True
    coverage_floor: float = 0.0
    wait_timeout_s: float = 30.0
    loop: asyncio.AbstractEventLoop | None = None
    sink: EventSink | None = None
    plan: RoutePlan | None = None
    times: dict[str, float] = field(default_factory=dict)
    eos: frozenset[int] = frozenset()  # the model's EOS ids, set by the loop it is submitted to (`barred`)
    outbox: Outbox | None = None  # set by the engine loop it is submitted to: its events for `loop` wait there
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING_SLOTS
    generated: list[int] = field(default_factory=list)
    finish_reason: str = ""
    widened: bool = False
    pinned: Pattern | None = None  # the pattern whose pins it holds
    coverage_sum: float = 0.0
    coverage_count: int = 0
    experts_skipped: int = 0
    loads: dict[str, int] = field(default_factory=lambda: {"device": 0, "cache": 0, "disk": 0})
    loaded_bytes: int = 0
    load_s: float = 0.0
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_scores: list[TokenLogprob] = field(default_factory=list)
    row: int | None = None  # its KV pool row while it is in the running batch
    cached: int = 0  # its tokens in the KV pool (prompt chunks fed so far, then generated tokens)
    _events: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    _abandoned: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device="cpu")
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        self.text = TextStream(self.tokenizer, self.params.stop)
        self.times["submitted"] = time.perf_counter()
        self.wait_until = time.monotonic() + self.wait_timeout_s
        self._aqueue: asyncio.Queue[Any] | None = asyncio.Queue() if self.loop is not None else None

    # --- loop side --------------------------------------------------------------------------------

    def gone(self) -> bool:
        return self._abandoned.is_set() or self.cancelled()

    def send(self, piece: str) -> None:
        if piece and self.stream:
            self._put(piece)

    def finish(self, result: GenerationResult) -> None:
        self.status = Status.FINISHED
        self._put(result)

    def fail(self, error: BaseException) -> None:
        self.status = Status.FINISHED
        self._put(Failed(error))

    def _put(self, item: Any) -> None:
        if self.sink is not None:
            if self.outbox is not None:
                self.outbox.put_direct(self.sink, item)
            else:
                self.sink.target.deliver([(self.sink.key, item)])
            return
        if self.loop is None or self._aqueue is None:
            self._events.put(item)
            return
        if self.outbox is not None:
            self.outbox.put(self.loop, self._aqueue, item)
            return
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._aqueue.put_nowait, item)

    def expiry(self, now: float, stopping: bool) -> Exception | None:
        """Why it must end now without an answer (shutdown, deadline, slots never freed up), or None."""
        if stopping:
            return Unavailable("the server is shutting down", field="server")
        if self.deadline is not None and now > self.deadline:
            return DeadlineExceeded("the deadline passed before the request finished", field="deadline")
        if self.status is Status.WAITING_SLOTS and now > self.wait_until:
            return ResourceExhausted(
                f"pattern of {self.pattern.size} experts does not fit next to the pinned slots of running "
                f"requests (waited {self.wait_timeout_s:.1f}s)",
                field="budget",
            )
        return None

    def count_coverage(self, share_sum: float, routings: int, skipped: int = 0) -> None:
        """Add a forward pass's coverage: the summed router share on the pattern over its `routings` (tokens x MoE
        layers), and the routed expert calls it skipped."""
        self.coverage_sum += share_sum
        self.coverage_count += routings
        self.experts_skipped += skipped

    def widen_after_prefill(
        self, prompt_scores: dict[int, Tensor], widen: Callable[[Pattern, dict[int, Tensor], float], Pattern]
    ) -> bool:
        """When its prefill coverage is below its floor, take the wider pattern `widen` gives for its pattern, the
        prompt's mean router scores per layer and its floor, and wait for slots again (the prefill is discarded).
        Returns whether it did."""
        if self.coverage_sum / self.coverage_count >= self.coverage_floor:
            return False
        wider = widen(self.pattern, prompt_scores, self.coverage_floor)
        if wider == self.pattern:
            return False
        self.pattern, self.widened, self.status = wider, True, Status.WAITING_SLOTS
        self.coverage_sum, self.coverage_count = 0.0, 0
        return True

    def whole_prompt(self) -> bool:
        """Its prompt must be fed in one forward pass: every position is scored, or the prompt's router scores
        decide whether its pattern is widened."""
        return self.params.prompt_logprobs or (self.coverage_floor > 0 and not self.widened)

    def choose(self, logits: Tensor) -> int:
        """Its next token from its row's logits `[V]` (already barred), with its own options and generator."""
        return choose(logits, self.params, self.generator)

    def barred(self) -> list[int]:
        """The tokens it may not draw now: those that would end it while it has fewer than `min_tokens` (vLLM's
        rule: its EOS unless `ignore_eos`, and its `stop_token_ids`)."""
        if len(self.generated) >= self.params.min_tokens:
            return []
        return sorted((set() if self.params.ignore_eos else set(self.eos)) | set(self.params.stop_token_ids))

    def take(self, token: int, logits: Tensor) -> tuple[str, str]:
        """Append its next token (its log-probability too when asked for); returns why that token finished the
        request (eos: one of its `eos` ids, which the loop set at submit; stop, length, or "") and the text it
        completes, which the caller sends."""
        params, eos = self.params, self.eos
        self.generated.append(token)
        if params.logprobs is not None:
            self.token_logprobs += token_logprobs(logits.unsqueeze(0), torch.tensor([token]), params.logprobs)
        if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
            return ("eos" if token in eos and not params.ignore_eos else "stop"), ""
        piece = self.text.push(token)
        if self.text.stopped:
            return "stop", piece
        return ("length" if len(self.generated) >= self.params.max_new_tokens else ""), piece

    def result(self, reason: str, top_k: int) -> GenerationResult:
        """What it reports once finished for `reason` (`top_k`: routed experts per token, to count expert calls)."""
        now = time.perf_counter()
        times = self.times
        plan = self.plan or RoutePlan("override", "", 0.0, self.pattern)
        return GenerationResult(
            text=self.text.text,
            token_ids=list(self.generated),
            finish_reason=reason,
            plan=replace(plan, pattern=self.pattern),
            loads=dict(self.loads),
            loaded_bytes=self.loaded_bytes,
            coverage=self.coverage_sum / self.coverage_count if self.coverage_count else 1.0,
            widened=self.widened,
            timings={
                "route_ms": plan.seconds * 1e3,
                "queue_ms": (times.get("ready", now) - times["submitted"]) * 1e3,
                "load_ms": self.load_s * 1e3,
                "prefill_ms": times.get("prefill_s", 0.0) * 1e3,
                "decode_ms": (now - times.get("first_token", now)) * 1e3,
                "total_ms": (now - times.get("started", times["submitted"])) * 1e3,
            },
            prompt_tokens=len(self.prompt_ids),
            logprobs=list(self.token_logprobs) if self.params.logprobs is not None else None,
            prompt_logprobs=list(self.prompt_scores) if self.params.prompt_logprobs else None,
            expert_calls=self.coverage_count * top_k,
            expert_calls_skipped=self.experts_skipped,
            prompt_ids=list(self.prompt_ids),
        )

    # --- caller side ------------------------------------------------------------------------------

    def events(self) -> Iterator[str | GenerationResult]:
        """Text pieces (when streaming), then the result; raises what the request failed with. Closing the
        iterator early abandons the request (the loop frees its row and slots at the next step)."""
        try:
            while True:
                item = self._events.get()
                if isinstance(item, Failed):
                    raise item.error
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            self._abandoned.set()

    async def aevents(self) -> AsyncGenerator[str | GenerationResult, None]:
        """`events()` for a request submitted with `loop`: awaited on that loop, no thread in between."""
        assert self._aqueue is not None, "submit the request with loop= to read its events asynchronously"
        try:
            while True:
                item = await self._aqueue.get()
                if isinstance(item, Failed):
                    raise item.error
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            self._abandoned.set()


@dataclass(frozen=True)
class EventSink:
    """Where a request's events go: `target.deliver([(key, item), ...])`, with the events of every request sharing
    `target` in one call per engine step (on the engine's thread), or at once when put from another thread."""

    target: Any
    key: Any


@dataclass
class Failed:
    """The last event of a request that failed (what `events()` raises), as a sink receives it."""

    error: BaseException
