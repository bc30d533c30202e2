"""The engine loop: one thread owns the model and serves every running request, of any task, per forward pass."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from ..errors import Unavailable
from ..pattern import Pattern
from ..runtime import PatternedModel
from ..runtime.context import RoutingContext
from ..runtime.residency import Residency
from .admission import Admission
from .batch import RunningBatch, forward
from .inbox import Inbox
from .kv import KVBatch
from .loader import Loader
from .request import Request, Status
from .schedule import pick_joiners
from .stats import BatchLimits, LoopStats
from .text import prompt_logprobs

log = logging.getLogger(__name__)


class EngineLoop:
    """Continuous batching across tasks.

    Each step: take new requests; commit expert copies that completed (they become routable now, at a
    step boundary); retire cancelled and expired requests; reserve slots for waiting requests whose
    missing experts fit next to the pinned ones (the loader copies them beside the loop; a request that
    does not fit waits without blocking those behind it); prefill the requests whose experts are all
    resident in one batched forward and merge them into the batch; run one decode forward for all rows;
    sample each row with its own options; stream; retire finished rows. Every forward pass carries a
    routing context, so each row routes by its own pattern.

    Use `start()` for the background thread, or call `step()` directly (tests drive it step by step).
    """

    def __init__(
        self,
        engine: PatternedModel,
        residency: Residency,
        source: Any,
        *,
        eos: set[int],
        pad_id: int = 0,
        limits: BatchLimits | None = None,
        loader_gate: threading.Event | None = None,
        stopping: Callable[[], bool] | None = None,
        threads: int | None = None,
        observe: Callable[[Pattern], None] | None = None,
    ) -> None:
        self.engine = engine
        self.residency = residency
        self.limits = limits or BatchLimits()
        self.eos = eos
        self.pad_id = pad_id
        self.stopping = stopping or (lambda: False)
        self.threads = threads  # torch intra-op threads for its forward passes; None: leave torch's setting
        self.stats = LoopStats()
        self._inbox = Inbox(observe)
        self.loader = Loader(engine, source, gate=loader_gate, wake=self._inbox.wake.set)
        self.admission = Admission(engine, residency, self.loader)
        self.waiting: list[Request] = []  # FIFO: waiting for slots, loading, or ready for a row
        self.batch = RunningBatch(engine)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.moe_layers = len(engine.spec.moe_layers)

    # --- outside --------------------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request (any thread); its events come through `request.events()`."""
        self._inbox.put(request, waiting=len(self.waiting), limit=self.limits.max_queue)
        return request

    def start(self) -> EngineLoop:
        self._thread = threading.Thread(target=self._run, name="premoe-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> list[Request]:
        """The requests decoding, in batch row order."""
        return self.batch.requests

    @property
    def kv(self) -> KVBatch | None:
        """The batch's KV rows (None while no request decodes)."""
        return self.batch.kv

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
        while not self._closed:
            self._inbox.wake.clear()
            try:
                busy = self.step()
            except Exception as exc:  # a step that fails fails its requests, never the loop
                log.exception("engine step failed")
                self._fail(list(self.running), exc)
                busy = False
            if not busy:
                self._inbox.wake.wait(0.02 if self.waiting else 0.5)

    # --- one step -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> bool:
        """Run one scheduling step; returns whether a forward pass ran."""
        start = time.perf_counter()
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # re-applied: others in the process may change it
        self.waiting.extend(self._inbox.take_all())
        self._fail_all(self.admission.commit(self.waiting, self.stats.steps))
        self._retire_gone()
        self._fail_all(self.admission.reserve(self.waiting, self.stats.steps))
        self.stats.add("schedule", time.perf_counter() - start)
        ran = self._prefill()
        if self.running:
            self._decode()
            ran = True
        self.stats.observe(self.waiting, len(self.running), len(self._inbox), self.loader)
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

    # --- forward passes -------------------------------------------------------------------------------

    def _prefill(self) -> bool:
        """Prefill the requests `pick_joiners` chooses in one forward pass and merge them into the batch."""
        chosen = pick_joiners(self.waiting, len(self.running), self.limits, self.stats.steps)
        if not chosen:
            return False
        self._remove_waiting(chosen)
        start = time.perf_counter()
        ids, mask, positions = KVBatch.prefill_inputs([r.prompt_ids for r in chosen], self.pad_id, self.engine.device)
        lengths = [len(r.prompt_ids) for r in chosen]
        keep_scores = any(r.coverage_floor > 0 and not r.widened for r in chosen)
        patterns = [r.pattern for r in chosen]
        context = RoutingContext.build(self.engine, patterns, ids.shape[1], lengths, keep_scores=keep_scores)
        scoring = chosen[0].params.prompt_logprobs  # then it is alone, and every position's logits are kept
        cache = DynamicCache()
        logits = self._forward(chosen, context, ids, mask, positions, cache, 0 if scoring else 1)
        if logits is None:
            return True
        if scoring:
            chosen[0].prompt_scores = prompt_logprobs(logits[0], ids[0], chosen[0].params.logprobs or 0)
        seconds = time.perf_counter() - start
        self.stats.prefill_steps += 1
        coverage = context.collect().tolist()
        last = logits[:, -1]
        kv = KVBatch.after_prefill(cache, mask)
        keep: list[int] = []
        for row, request in enumerate(chosen):
            request.times["prefill_s"] = request.times.get("prefill_s", 0.0) + seconds
            request.count_coverage(coverage[row], lengths[row] * self.moe_layers)
            if keep_scores and self._widen(request, context, row, lengths[row]):
                continue  # back to the queue with a wider pattern; this prefill is discarded
            request.status = Status.RUNNING
            request.times["first_token"] = time.perf_counter()
            if request.params.max_new_tokens == 0:  # scoring only
                self._finish(request, "length")
            elif not self._emit(request, request.choose(last[row]), last[row]):
                keep.append(row)
        if not keep:
            return True
        if len(keep) < len(chosen):
            kv.select(keep)
        self.batch.add([chosen[row] for row in keep], kv)
        return True

    def _decode(self) -> None:
        rows, kv, clock, add = self.running, self.batch.kv, time.perf_counter(), self.stats.add
        assert kv is not None
        ids, mask, positions, context = self.batch.decode_inputs()
        add("inputs", -clock + (clock := time.perf_counter()))
        logits = self._forward(list(rows), context, ids, mask, positions, kv.cache, 1)
        add("forward", -clock + (clock := time.perf_counter()))
        if logits is None:
            return
        kv.advance(mask)
        self.stats.decode_steps += 1
        last = logits[:, -1]
        tokens = last.argmax(-1).tolist()
        for row, request in enumerate(rows):
            if request.params.temperature != 0:
                tokens[row] = request.choose(last[row])
        add("sampling", -clock + (clock := time.perf_counter()))
        coverage, skipped = context.collect().tolist(), context.take_skipped()
        for row, request in enumerate(rows):
            request.count_coverage(coverage[row], self.moe_layers, skipped[row])
        add("coverage", -clock + (clock := time.perf_counter()))
        finished = [request for row, request in enumerate(rows) if self._emit(request, tokens[row], last[row])]
        clock = time.perf_counter()
        if finished:
            self.batch.remove(finished)
        add("inputs", time.perf_counter() - clock)

    def _forward(self, requests: list[Request], context: RoutingContext, *inputs: Any) -> torch.Tensor | None:
        """`forward(engine, context, *inputs)`; on an error its requests fail and the loop goes on (None)."""
        try:
            return forward(self.engine, context, *inputs)
        except Exception as exc:
            log.exception("a forward pass failed")
            self._fail(requests, exc)
            return None

    # --- per request ----------------------------------------------------------------------------------

    def _emit(self, request: Request, token: int, logits: torch.Tensor) -> bool:
        """Give the request its next token; returns True when that finished it (it is then answered)."""
        self.stats.tokens += 1
        start = time.perf_counter()
        reason, piece = request.take(token, logits, self.eos)
        sent = time.perf_counter()
        request.send(piece)
        if reason:
            self._finish(request, reason)
        self.stats.add("text", sent - start)
        self.stats.add("events", time.perf_counter() - sent)
        return bool(reason)

    def _widen(self, request: Request, context: RoutingContext, row: int, length: int) -> bool:
        """Widen a request whose prefill coverage fell short; it goes back to the head of the queue."""
        pinned = request.pinned
        if not request.widen_after_prefill(
            {layer: sums[row] / length for layer, sums in context.prompt_scores.items()}
        ):
            return False
        request.pinned = pinned
        self._unpin(request)
        self.waiting.insert(0, request)
        return True

    def _finish(self, request: Request, reason: str) -> None:
        """Answer a request with `reason` and give back its pins (the caller takes it out of the queue or batch)."""
        self._unpin(request)
        request.finish_reason = reason
        request.send(request.text.finish())
        request.finish(request.outcome(reason))

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
