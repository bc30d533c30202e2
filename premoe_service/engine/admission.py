"""The way into the batch: slot reservations for waiting requests, expert copies by the loader, and their
commits at a step boundary, after which a request whose experts are all resident is ready for a row."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..runtime import PatternedModel
from ..runtime.residency import Residency
from .loader import Loader, LoadJob
from .request import Request, Status

Failure = tuple[list[Request], BaseException]


class Admission:
    """Moves waiting requests towards READY; the engine loop calls it once per step, on its own thread.

    A request whose missing experts do not fit next to the pinned ones stays waiting without holding back
    those behind it. Copies run on the loader thread; only `commit` (at a step boundary) makes them routable.
    """

    def __init__(self, patterned: PatternedModel, residency: Residency, loader: Loader) -> None:
        self.patterned = patterned
        self.residency = residency
        self.loader = loader
        self._tried: dict[int, int] = {}  # request id -> the residency generation its last failed try saw

    def reserve(self, waiting: Sequence[Request], step: int) -> list[Failure]:
        """Pin and reserve slots for each request still waiting for them; queue its copies. Returns the
        requests whose pattern cannot be reserved at all, with the error."""
        failures: list[Failure] = []
        queued = [r for r in waiting if r.status is Status.WAITING_SLOTS]
        if len(self._tried) > 2 * len(queued) + 64:  # forget requests that left the queue
            ids = {r.id for r in queued}
            self._tried = {i: g for i, g in self._tried.items() if i in ids}
        for request in queued:
            try:
                copies = self._reserve(request, crowded=len(queued) > 1)
            except Exception as exc:
                failures.append(([request], exc))
                continue
            if copies is None:
                continue  # does not fit next to pinned experts now; those behind it may
            request.pinned = request.pattern
            hits = request.pattern.size - len(copies)
            request.loads["device"] += hits
            self.residency.store_hits(hits)
            request.status = Status.LOADING
            if copies:
                self.loader.submit(LoadJob(request.id, copies))
            elif self.residency.is_resident(request.pattern):
                _ready(request, step)
        return failures

    def _reserve(self, request: Request, crowded: bool) -> list[tuple[int, int, int]] | None:
        """The request's copies, or None while it must wait. With lending (`--under-pressure demote`) and a request
        that does not ask for full precision, while others wait too (`crowded`): its own pattern when that evicts
        nothing; else its pattern with the experts absent at full precision held at the lending precision, in lent
        slots (several per full slot, so more tasks fit side by side); else its own pattern, evicting. When it is
        alone, its own pattern first: memory has freed, and lent slots are taken back (promotion). A request that
        found no room is not tried again before the residency changes."""
        residency = self.residency
        if residency.patterned.lending is None or request.params.full_precision:
            return residency.reserve(request.pattern)
        if self._tried.get(request.id) == residency.generation:
            return None
        copies = residency.reserve(request.pattern, evict=not crowded)
        if copies is None:
            demoted = residency.demoted(request.pattern)
            copies = None if demoted is None else residency.reserve(demoted)
            if copies is not None:
                request.pattern = demoted  # type: ignore[assignment]
            elif crowded:
                copies = residency.reserve(request.pattern)
        if copies is None:
            self._tried[request.id] = residency.generation
        else:
            self._tried.pop(request.id, None)
        return copies

    def commit(self, waiting: Sequence[Request], step: int) -> list[Failure]:
        """Commit the copies that completed (publishing the new slot tables), account each job to the request
        that asked for it, and mark requests whose experts are now all resident READY. A failed copy fails
        every waiting request that needs one of its experts."""
        by_id = {r.id: r for r in waiting}
        committed = False
        failures: list[Failure] = []
        for job in self.loader.completed():
            owner = by_id.get(job.request_id)
            if owner is not None:
                owner.load_s += job.seconds
                owner.loaded_bytes += job.nbytes
                for tier, count in job.tiers.items():
                    owner.loads[tier] += count
            if job.error is None:
                self.residency.commit_all(job.copies)
                committed = True
                continue
            failed = {(layer, expert) for layer, expert, _ in job.copies}
            self.residency.abort_all(job.copies)
            victims = [r for r in waiting if r.pinned is not None and _uses(r, failed)]
            failures.append((victims, job.error))
        if committed:
            self.patterned.publish_slots()
        for request in waiting:
            if request.status is Status.LOADING and self.residency.is_resident(request.pattern):
                _ready(request, step)
        return failures


def _ready(request: Request, step: int) -> None:
    request.status = Status.READY
    request.times["ready"] = time.perf_counter()
    request.times["ready_step"] = step


def _uses(request: Request, experts: set[tuple[int, int]]) -> bool:
    return any((layer, e) in experts for layer, kept in request.pattern.layers.items() for e in kept)
