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

    def reserve(self, waiting: Sequence[Request], step: int) -> list[Failure]:
        """Pin and reserve slots for each request still waiting for them; queue its copies. Returns the
        requests whose pattern cannot be reserved at all, with the error."""
        failures: list[Failure] = []
        for request in waiting:
            if request.status is not Status.WAITING_SLOTS:
                continue
            try:
                copies = self.residency.reserve(request.pattern)
                if copies is None and not request.params.full_precision:
                    copies = self._demote(request)
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

    def _demote(self, request: Request) -> list[tuple[int, int, int]] | None:
        """With lending (`--under-pressure demote`): reserve the request's pattern with the experts that are not at
        full precision now held at the lending precision; the request is then served with that pattern."""
        demoted = self.residency.demoted(request.pattern)
        if demoted is None:
            return None
        copies = self.residency.reserve(demoted)
        if copies is not None:
            request.pattern = demoted
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
