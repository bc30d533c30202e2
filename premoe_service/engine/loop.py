"""The engine loop: one thread owns the model and serves every running request, of any task, per forward pass."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import Unavailable
from ..intra_op import available as intra_op_available
from ..intra_op import hold_threads, intra_op_threads, release_teams
from ..pattern import Pattern
from ..runtime import PatternedModel
from ..runtime.context import RoutingContext
from ..runtime.residency import Residency
from .admission import Admission
from .batch import RunningBatch, StepPlan, forward
from .inbox import Inbox
from .kv import KVPool, check_kv_tokens
from .loader import Loader
from .outbox import Outbox
from .request import Request, Status
from .result import GenerationResult
from .schedule import hold_ends, pick_joiners
from .stats import BatchLimits, LoopStats
from .text import prompt_logprobs, sample

log = logging.getLogger(__name__)

# Seconds the loop waits idle (no request queued or decoding) before the KV pool gives back what it grew by: long
# enough that a steady load does not grow it again each burst, short enough that a burst's memory comes back soon.
KV_SHRINK_IDLE_S = 10.0


class EngineLoop:
    """Continuous batching across tasks.

    Each step: take new requests; commit expert copies that completed (they become routable now, at a
    step boundary); retire cancelled and expired requests; reserve slots for waiting requests whose
    missing experts fit next to the pinned ones (the loader copies them beside the loop; a request that
    does not fit waits without blocking those behind it); give the requests whose experts are all resident a
    KV pool row; run ONE forward pass in which every decoding row brings its last token and joining rows bring
    their prompt (in chunks under the prompt-token budget), so a join never costs the running rows a pass of
    their own; sample every row that completed a token (greedy rows in one argmax); stream; retire finished
    rows. Every forward pass carries a routing context, so each token routes by its row's pattern.

    Use `start()` for the background thread, or call `step()` directly (tests drive it step by step).

    The serving layer gives its policies here, once: `widen` makes a wider pattern for a request whose prefill
    coverage fell below its floor (from its pattern, the prompt's mean router scores per layer and the floor);
    `count` is told of every result of a request submitted with a route plan (the per-task stats); `observe`
    sees the pattern of every request taken in (shared-use eviction). `eos` are the model's end-of-sequence ids.
    """

    def __init__(
        self,
        patterned: PatternedModel,
        residency: Residency,
        source: Any,
        *,
        eos: set[int],
        pad_id: int = 0,
        limits: BatchLimits | None = None,
        loader_gate: threading.Event | None = None,
        stopping: Callable[[], bool] | None = None,
        threads: int | None = None,
        compiled: bool = False,
        observe: Callable[[Pattern], None] | None = None,
        widen: Callable[[Pattern, dict[int, torch.Tensor], float], Pattern] | None = None,
        count: Callable[[GenerationResult], None] | None = None,
        arriving: Callable[[], int] | None = None,
    ) -> None:
        self.patterned = patterned
        self.arriving = arriving or (lambda: 0)
        self._hold_until = 0.0  # an idle hold's end (`BatchLimits.idle_hold_s`; `time.perf_counter`), 0 when none
        self.residency = residency
        self.limits = limits or BatchLimits()
        self.eos = frozenset(eos)
        self.widen = widen
        self.count = count
        self.top_k = patterned.spec.top_k
        self.pad_id = pad_id
        self.stopping = stopping or (lambda: False)
        self.threads = threads  # torch intra-op threads for its forward passes; None: leave torch's setting
        self.stats = LoopStats()
        self._inbox = Inbox(observe)
        self.outbox = Outbox()
        self.loader = Loader(patterned, source, gate=loader_gate, wake=self._inbox.wake.set)
        self.admission = Admission(patterned, residency, self.loader)
        self.waiting: list[Request] = []  # FIFO: waiting for slots, loading, or ready for a row
        self.batch = RunningBatch(
            patterned, self.limits.max_rows, compiled=compiled, max_kv_tokens=self.limits.max_kv_tokens
        )
        self.plan: StepPlan | None = None  # the last forward pass's plan (its rows and kept logits)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.moe_layers = len(patterned.spec.moe_layers)

    # --- outside --------------------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request (any thread); its events come through `request.events()`.

        Raises:
            InvalidArgument: Its prompt and max_new_tokens alone exceed `limits.max_kv_tokens` (field
                "max_new_tokens"): it could never join.
            ResourceExhausted: The queue is full.
        """
        check_kv_tokens(len(request.prompt_ids), request.params.max_new_tokens, self.limits.max_kv_tokens)
        request.outbox = self.outbox
        request.eos = self.eos
        self._inbox.put(request, waiting=len(self.waiting), limit=self.limits.max_queue)
        return request

    def start(self) -> EngineLoop:
        """Compile and warm the decoder stack (when compiled) on this thread, at the engine's thread count, then
        start the loop's thread, which holds that count as its own. The process's other threads (doors, loader,
        router signal) then take one intra-op thread each, and this thread's parked OpenMP workers end: GNU OpenMP
        counts every thread's, and once they outnumber the cores every parallel region waits for the kernel to wake
        its workers (`intra_op`; with a 2-thread engine on 2 cores, one client got 0.71x the tokens/s of a
        1-thread engine before, 1.08x after)."""
        with intra_op_threads(self.threads):
            if self.batch.compiled:  # said at the server's level: it holds the start for seconds
                log.warning("compiling the decoder stack before serving (seconds; inductor caches it for later starts)")
                seconds = self.batch.warm_up()
                log.warning("the decoder stack runs %s", self.batch.stack_state(seconds))
        if self.threads is not None:
            # Without per-thread counts (another platform), torch's process-wide one is the engine's, as before.
            torch.set_num_threads(1 if intra_op_available() else self.threads)
        release_teams()
        self._thread = threading.Thread(target=self._run, name="premoe-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> list[Request]:
        """The requests holding KV rows (decoding, or their prompt being fed), in join order."""
        return self.batch.requests

    @property
    def kv(self) -> KVPool:
        """The KV pool of the running requests."""
        return self.batch.pool

    def in_flight(self) -> list[Request]:
        """A snapshot of the requests queued or decoding (any thread)."""
        return [*self.running, *self.waiting]

    def close(self) -> None:
        """Stop the loop; requests still queued or decoding fail with UNAVAILABLE."""
        self._closed = True
        self._inbox.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.loader.close()
        for request in [*self.waiting, *self.running, *self._inbox.take_all()]:
            request.fail(Unavailable("the server is shutting down", field="server"))

    def idle(self) -> bool:
        """No request submitted, queued or decoding."""
        return not (self.waiting or self.running or len(self._inbox))

    def run_until_idle(self, timeout_s: float = 60.0) -> None:
        """Step on the calling thread until no request is queued or running (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while not self.idle():
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests still pending after {timeout_s}s: {self.stats}")
            self._inbox.wake.clear()
            if not self.step():
                self._inbox.wake.wait(0.01)

    def _run(self) -> None:
        idle_since: float | None = None
        while not self._closed:
            self._inbox.wake.clear()
            try:
                busy = self.step()
            except Exception as exc:  # a step that fails fails its requests, never the loop
                log.exception("engine step failed")
                self._fail(list(self.running), exc)
                busy = False
            if busy or not self.idle():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= KV_SHRINK_IDLE_S:
                self._shrink_kv()
            if not busy:  # a submission wakes it; a hold ends on time (or when the others arrive)
                timeout = 0.02 if self.waiting else 0.5
                if self._hold_until:
                    timeout = min(timeout, max(self._hold_until - time.perf_counter(), 0.0005))
                self._inbox.wake.wait(timeout)

    def _shrink_kv(self) -> None:
        """The KV pool back to its starting size, when it grew and no request holds it (the loop is idle)."""
        freed = self.kv.shrink()
        if freed:
            log.info("idle: the KV pool gave back %.1f MiB (back to %d blocks)", freed / 2**20, self.kv.blocks)
            self.stats.observe(self.waiting, 0, len(self._inbox), self.loader, self.kv, self._reserved_kv_tokens())

    # --- one step -------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Run one scheduling step; returns whether a forward pass ran. Its events reach the doors' event loops
        when it ends, one hand-over per event loop."""
        with self.outbox.holding():
            return self._step()

    @torch.no_grad()
    def _step(self) -> bool:
        start = time.perf_counter()
        if self.threads is not None and torch.get_num_threads() != self.threads:
            hold_threads(self.threads)  # the stepping thread's own count (tests step on theirs)
        self.waiting.extend(self._inbox.take_all())
        self._fail_all(self.admission.commit(self.waiting, self.stats.steps))
        self._retire_gone()
        self._fail_all(self.admission.reserve(self.waiting, self.stats.steps))
        self._join()
        self.stats.add("schedule", time.perf_counter() - start)
        ran = self._forward_step()
        self.stats.observe(
            self.waiting, len(self.running), len(self._inbox), self.loader, self.kv, self._reserved_kv_tokens()
        )
        if ran:
            self.stats.record_step(time.perf_counter() - start)
        return ran

    def _retire_gone(self) -> None:
        now, stopping = time.monotonic(), self.stopping()
        for request in [*self.waiting, *self.running]:
            error = request.expiry(now, stopping)
            if error is not None:
                self._drop(request)
                request.fail(error)
            elif request.gone():
                self._drop(request)
                self._finish(request, "cancelled")

    # --- the forward pass -----------------------------------------------------------------------------------

    def _join(self) -> None:
        """Give the requests `pick_joiners` chooses a pool row each; their prompts ride in the next passes."""
        arriving = 0 if self.running or not self.limits.idle_hold_s else self.arriving()
        chosen = pick_joiners(
            self.waiting,
            len(self.running),
            self.limits,
            self.stats.steps,
            self.batch.pending_prompt_tokens(),
            self._reserved_kv_tokens(),
            arriving,
            time.perf_counter(),
        )
        ready = [r for r in self.waiting if r.status is Status.READY] if arriving and not chosen else []
        self._hold_until = hold_ends(ready, self.limits) if ready else 0.0
        if chosen:
            self._remove_waiting(chosen)
            self.batch.add(chosen)

    def _reserved_kv_tokens(self) -> int:
        """The running requests' reserved KV tokens under `limits.max_kv_tokens`; 0 without a cap."""
        return self.batch.reserved_kv_tokens() if self.limits.max_kv_tokens is not None else 0

    def _forward_step(self) -> bool:
        """One forward pass over the batch: decode rows and prompt chunks together; sample, stream, retire."""
        clock, add = time.perf_counter(), self.stats.add
        plan = self.batch.plan(self.limits.max_prefill_tokens)
        if plan is None:
            return False
        self.plan = plan
        add("inputs", -clock + (clock := time.perf_counter()))
        try:
            logits = forward(self.batch, plan)
        except Exception as exc:
            log.exception("a forward pass failed")
            self._fail(list(plan.rows), exc)
            return True
        seconds = time.perf_counter() - clock
        add("forward", -clock + (clock := time.perf_counter()))
        if plan.decoding:
            self.stats.decode_steps += 1
        if plan.prompt_tokens:
            self.stats.prefill_steps += 1
        emitting = [b for b, kept in enumerate(plan.kept) if kept]
        index = torch.tensor([plan.kept[b][-1] for b in emitting], dtype=torch.long, device=logits.device)
        last = logits.index_select(0, index)
        tokens = sample(last, [plan.rows[b] for b in emitting]) if emitting else []
        add("sampling", -clock + (clock := time.perf_counter()))
        context = plan.context
        coverage, skipped = context.collect().tolist(), context.take_skipped()
        for b, request in enumerate(plan.rows):
            request.cached += plan.counts[b]
            request.count_coverage(coverage[b], plan.counts[b] * self.moe_layers, skipped[b])
            if not request.generated:
                request.times["prefill_s"] = request.times.get("prefill_s", 0.0) + seconds
        add("coverage", -clock + (clock := time.perf_counter()))
        finished: list[Request] = []
        for i, b in enumerate(emitting):
            request = plan.rows[b]
            if not request.generated:  # its prompt is complete: its first token
                if request.params.prompt_logprobs:
                    scored = logits[plan.kept[b].start : plan.kept[b].stop]
                    ids = torch.tensor(request.prompt_ids, device=scored.device)
                    request.prompt_scores = prompt_logprobs(scored, ids, request.params.logprobs or 0)
                checks = request.coverage_floor > 0 and not request.widened
                if checks and self._widen(request, context, b, len(request.prompt_ids)):
                    finished.append(request)  # back to the queue with a wider pattern; its prefill is dropped
                    continue
                request.status = Status.RUNNING
                request.times["first_token"] = time.perf_counter()
                if request.params.max_new_tokens == 0:  # scoring only
                    self._finish(request, "length")
                    finished.append(request)
                    continue
            if self._emit(request, tokens[i], last[i]):
                finished.append(request)
        clock = time.perf_counter()
        if finished:
            self.batch.remove(finished)
        add("inputs", time.perf_counter() - clock)
        return True

    # --- per request ----------------------------------------------------------------------------------

    def _emit(self, request: Request, token: int, logits: torch.Tensor) -> bool:
        """Give the request its next token; returns True when that finished it (it is then answered)."""
        self.stats.tokens += 1
        start = time.perf_counter()
        reason, piece = request.take(token, logits)
        sent = time.perf_counter()
        request.send(piece)
        if reason:
            self._finish(request, reason)
        self.stats.add("text", sent - start)
        self.stats.add("events", time.perf_counter() - sent)
        return bool(reason)

    def _widen(self, request: Request, context: RoutingContext, row: int, length: int) -> bool:
        """Widen a request whose prefill coverage fell short; it goes back to the head of the queue."""
        if self.widen is None:
            return False
        scores = {layer: sums[row] / length for layer, sums in context.prompt_scores.items()}
        if not request.widen_after_prefill(scores, self.widen):
            return False
        self._unpin(request)
        self.waiting.insert(0, request)
        return True

    def _finish(self, request: Request, reason: str) -> None:
        """Answer a request with `reason` and give back its pins (the caller takes it out of the queue or batch)."""
        self._unpin(request)
        request.finish_reason = reason
        request.send(request.text.finish())
        result = request.result(reason, self.top_k)
        if self.count is not None and request.plan is not None:
            self.count(result)
        request.finish(result)

    def _unpin(self, request: Request) -> None:
        if request.pinned is not None:
            self.residency.unpin(request.pinned)
            request.pinned = None

    def _drop(self, request: Request) -> None:
        """Take a request out of the queue or the batch and give back its pins."""
        if request in self.running:
            self.batch.remove([request])
        elif request in self.waiting:
            self._remove_waiting([request])
        self._unpin(request)

    def _remove_waiting(self, requests: Sequence[Request]) -> None:
        gone = {id(r) for r in requests}
        self.waiting = [r for r in self.waiting if id(r) not in gone]

    def _fail_all(self, failures: list[tuple[list[Request], BaseException]]) -> None:
        for requests, error in failures:
            self._fail(requests, error)

    def _fail(self, requests: Sequence[Request], error: BaseException) -> None:
        for request in requests:
            self._drop(request)
            request.fail(error)
