"""Task lifecycle: warm a task's experts into device slots ahead of its traffic, pin them, unload them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..engine import EngineLoop
from ..engine.loader import LoadJob
from ..errors import InvalidArgument, ResourceExhausted, Unavailable
from ..pattern import Pattern
from ..retrieval import Registry
from ..runtime.residency import Residency
from .tasks import TaskBook, TaskResidency

# `LoadJob.request_id` of a task load: no request owns it, so the loop only commits it (request ids count from 1).
TASK_LOAD = -1


@dataclass(frozen=True)
class LoadResult:
    """What a `LoadTask` did: experts found resident (`device`) and loaded per tier, bytes moved, time taken."""

    loads: dict[str, int]
    loaded_bytes: int
    seconds: float


@dataclass(frozen=True)
class UnloadResult:
    was_pinned: bool
    released_experts: int
    released_bytes: int


@dataclass
class TaskLifecycle:
    """Loads, pins and unloads tasks on a serving engine. Calls are serialised (one lifecycle change at a time),
    so that a pin's fit check and the pin itself see the same pinned tasks; requests are never held by it.

    A load reserves the task's missing experts as a request's admission does (pinning its pattern meanwhile),
    hands the copies to the engine loop's loader, and returns once the loop has committed them at a step boundary:
    the next request of the task finds every expert resident. Without `pin` the pattern is unpinned again (the
    experts are the most recently used, so the last to be evicted); with `pin` it stays pinned until `unload`.

    Attributes:
        loaded: Tasks loaded with `load` and not unloaded since: `unload` of another task keeps their experts.
    """

    registry: Registry
    tasks: TaskBook
    residency: Residency
    loop: EngineLoop
    expert_nbytes: int
    default_timeout_s: float
    loaded: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loading: Counter[str] = field(default_factory=Counter)

    def load(
        self, name: str, *, pin: bool = False, timeout_s: float | None = None, precision: str | None = None
    ) -> LoadResult:
        """Make task `name`'s experts resident (and pinned with `pin`); with `precision`, every expert of its pattern
        at that lower precision, which its requests are then served at until `unload` (without, its own plan again).

        Raises:
            NotFound: No such task.
            InvalidArgument: A negative or non-finite `timeout_s`; a precision the store has no copies at or the
                server no slots for (`--precision-slots`).
            ResourceExhausted: The pattern does not fit next to the experts of pinned tasks (the message names them
                and their bytes), in a layer's slots (of that precision), or next to the slots that running requests
                pin within the timeout.
            Unavailable: Reading the experts failed (the store's error is in the message).
        """
        if timeout_s is not None and not 0 <= timeout_s < float("inf"):
            raise InvalidArgument(f"must be a finite number of seconds >= 0, got {timeout_s}", field="timeout_s")
        wait_s = timeout_s or self.default_timeout_s
        profile = self.registry.get(name)
        if precision:
            self._check_precision(precision)
            pattern, nbytes = self.tasks.lower(profile, precision)
        else:
            pattern, nbytes = self.tasks.own_plan(profile)
        with self._lock:
            self._loading[name] += 1
            try:
                if pin:
                    self.residency.check_task_pin(name, pattern, self._nbytes_of)
                result = self._warm(name, pattern, wait_s)
                if pin:
                    self.residency.adopt_task_pin(name, pattern)
                else:
                    self.residency.unpin(pattern)
                if precision:
                    self.tasks.hold(profile, pattern, nbytes)
                else:
                    self.tasks.release(name)
                self.loaded.add(name)
                return result
            finally:
                self._loading[name] -= 1

    def _check_precision(self, precision: str) -> None:
        quantized = self.residency.patterned.quantized
        held = [] if quantized is None else quantized.precisions
        if precision not in held:
            raise InvalidArgument(
                f"this server has no slots for {precision!r} experts (it has {held or 'none'}: --precision-slots)",
                field="precision",
            )

    def _warm(self, name: str, pattern: Pattern, wait_s: float) -> LoadResult:
        """Reserve (and pin) the pattern's missing experts, copy them on the loader, wait for the loop's commit."""
        start = time.perf_counter()
        deadline = time.monotonic() + wait_s
        copies: list[tuple[int, int, int]] | None = None

        def reserved() -> bool:
            nonlocal copies
            copies = self.residency.reserve(pattern)
            return copies is not None

        if not self.residency.wait_until(reserved, wait_s) or copies is None:
            raise ResourceExhausted(
                f"task {name!r}: its {pattern.size} experts do not fit next to the experts pinned by running requests "
                f"and other loads (waited {wait_s:.1f}s); retry, or give a longer timeout_s",
                field="timeout_s",
            )
        hits = pattern.size - len(copies)
        self.residency.store_hits(hits)
        job = LoadJob(TASK_LOAD, copies)
        if copies:
            self.loop.loader.submit(job)
            remaining = max(deadline - time.monotonic(), 0.0)
            done = self.residency.wait_until(
                lambda: job.error is not None or self.residency.is_resident(pattern), remaining + 60.0
            )
            if job.error is not None or not done:
                self.residency.unpin(pattern)
                why = f"reading them failed: {job.error}" if job.error is not None else "the copies did not complete"
                raise Unavailable(f"task {name!r} was not loaded: {why}", field="name")
        loads = {"device": hits, **job.tiers}
        return LoadResult(loads, job.nbytes, time.perf_counter() - start)

    def unload(self, name: str) -> UnloadResult:
        """Unpin task `name` and release its experts' slots, except the experts that pinned tasks, running requests
        or other loaded tasks hold. A task that is not loaded is released all the same (its experts may be
        resident because requests used it)."""
        profile = self.registry.get(name)
        with self._lock:
            patterns = [self.tasks.own_plan(profile)[0]]
            held = self.tasks.release(name)
            if held is not None:
                patterns.append(held)
            return self._unload(name, patterns)

    def forget(self, name: str) -> None:
        """A deleted task: drop its pin and release what it held (its profile is gone, so use the pinned pattern)."""
        with self._lock:
            held = self.tasks.release(name)
            self._unload(name, [] if held is None else [held])

    def _unload(self, name: str, patterns: list[Pattern]) -> UnloadResult:
        previous = self.residency.unpin_task(name)
        self.loaded.discard(name)
        if previous is not None and all(previous is not p for p in patterns):
            patterns.append(previous)
        keep = [self._pattern_of(other) for other in sorted(self.loaded)]
        keep += [p for task, p in self.residency.task_pins.items() if task != name]
        experts, nbytes = self.residency.release(patterns, [p for p in keep if p is not None], self.expert_nbytes)
        return UnloadResult(previous is not None, experts, nbytes)

    def residency_of(self, name: str, pattern: Pattern) -> TaskResidency:
        """The task's pattern against the slots now, with its pin and load state. A task replaced since it was pinned
        is still pinned (the pin holds the pattern it had; loading it again moves the pin to the new one)."""
        state = self.residency.describe(pattern, self.expert_nbytes)
        pinned = name in self.residency.task_pins
        return TaskResidency(state, pinned, state.loading or self._loading[name] > 0)

    def _pattern_of(self, name: str) -> Pattern | None:
        try:
            return self.tasks.pattern(self.registry.get(name))
        except Exception:  # deleted meanwhile: nothing of it to keep
            return None

    def _nbytes_of(self, pattern: Pattern) -> int:
        return self.residency.describe(pattern, self.expert_nbytes).nbytes if pattern.size else 0
