"""Replaying a request stream through the real residency: reserve, read into slots, commit, publish, unpin.

This is what the engine loop does for each request (`EngineLoop._reserve`, the loader's CPU copy, `_commit_loads`,
`_unpin`), one request at a time and without the forward pass, timed step by step.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...pattern import Pattern
from ...runtime.residency import Residency
from ...runtime.slot_book import RESIDENT
from ...runtime.slots import slot_buffers
from ...store.reader import Store
from ..common import percentile

Copies = list[tuple[int, int, int]]  # (layer, expert, slot)
Reader = Callable[[Copies], list[str]]  # reads the copies into their slots; returns each one's tier


@dataclass
class RequestRecord:
    """One request of a replay.

    Attributes:
        task: The request's task.
        switch: Whether the task differs from the previous request's.
        first: Whether this is the task's first request in the replay (the residency checks a pattern against the
            model the first time it sees it, once per task in a running service).
        planning_s: `Residency.reserve`: which experts to load, which to evict, slots reserved and pins taken.
        read_s: Reading the missing experts into their slots.
        publish_s: Committing the copies and publishing the routers' slot tables.
        resident_s: From the start of planning until the whole pattern is routable (the switch latency).
        unpin_s: `Residency.unpin` when the request ends.
        loads: Experts loaded; `hits` the pattern's experts found resident; `evictions` experts evicted.
        tiers: Loads per tier the store read them from.
    """

    task: str
    switch: bool
    first: bool
    planning_s: float
    read_s: float
    publish_s: float
    resident_s: float
    unpin_s: float
    loads: int
    hits: int
    evictions: int
    tiers: dict[str, int] = field(default_factory=dict)


def store_reader(residency: Residency, store: Store) -> Reader:
    """Reads copies straight into slot memory through the store's tiers, as the loader does on the CPU."""
    patterned, names = residency.patterned, store.part_names

    def read(copies: Copies) -> list[str]:
        items = [(layer, e, slot_buffers(patterned.experts_module(layer), slot, names)) for layer, e, slot in copies]
        return list(store.read_many_into(items))

    return read


def evict_unpinned(residency: Residency) -> int:
    """Empty every slot no lease pins (a full reload starts from nothing); returns the experts evicted."""
    book = residency.patterned.book
    rows, experts = np.nonzero((book.state == RESIDENT) & (book.pins == 0))
    book.evict(rows, experts)
    return int(rows.size)


def replay(
    residency: Residency,
    stream: Sequence[str],
    patterns: dict[str, Pattern],
    *,
    reader: Reader | None = None,
    full_reload: bool = False,
    publish: bool = True,
    before: Callable[[Pattern], None] | None = None,
) -> list[RequestRecord]:
    """Serve `stream` one request at a time through `residency`.

    Args:
        residency: The real residency over an engine's slots.
        stream: The task of each request.
        patterns: Each task's pattern.
        reader: Reads copies into slots; None only books them (slots that hold no real bytes).
        full_reload: Empty the unpinned slots at every task change first (PreMoe's way).
        publish: Publish the routers' slot tables after committing, as the engine loop does.
        before: Called with each request's pattern before it is planned (eviction refinements learn here).
    """
    patterned, records = residency.patterned, []
    previous: str | None = None
    seen: set[str] = set()
    gc.collect()  # start from a settled heap: the patterns were just made
    for task in stream:
        pattern = patterns[task]
        switch, first = task != previous, task not in seen
        previous = task
        seen.add(task)
        evicted = evict_unpinned(residency) if full_reload and switch else 0
        if before is not None:
            before(pattern)
        evictions = residency.stats.evictions
        start = time.perf_counter()
        copies = residency.reserve(pattern)
        planned = time.perf_counter()
        if copies is None:  # one request at a time: nothing else is pinned, so every pattern fits
            raise RuntimeError(f"the pattern of task {task!r} does not fit the slots")
        tiers = reader(copies) if reader is not None and copies else []
        read = time.perf_counter()
        residency.commit_all(copies)
        if publish and copies:
            patterned.publish_slots()
        resident = time.perf_counter()
        residency.unpin(pattern)
        unpinned = time.perf_counter()
        counted: dict[str, int] = {}
        for tier in tiers:
            counted[tier] = counted.get(tier, 0) + 1
        records.append(
            RequestRecord(
                task=task,
                switch=switch,
                first=first,
                planning_s=planned - start,
                read_s=read - planned,
                publish_s=resident - read,
                resident_s=resident - start,
                unpin_s=unpinned - resident,
                loads=len(copies),
                hits=pattern.size - len(copies),
                evictions=evicted + residency.stats.evictions - evictions,
                tiers=counted,
            )
        )
    return records


def summarise(records: Sequence[RequestRecord], expert_nbytes: int) -> dict[str, Any]:
    """Totals and latency percentiles of a replay (milliseconds; switch latency over the requests that switched)."""
    loads = sum(r.loads for r in records)
    hits = sum(r.hits for r in records)
    tiers: dict[str, int] = {"device": hits}
    for record in records:
        for tier, count in record.tiers.items():
            tiers[tier] = tiers.get(tier, 0) + count
    switched = [r.resident_s * 1e3 for r in records if r.switch]
    planning = [r.planning_s * 1e3 for r in records]
    steady = [r.planning_s * 1e3 for r in records if not r.first]
    return {
        "requests": len(records),
        "switches": len(switched),
        "loads": loads,
        "bytes_moved": loads * expert_nbytes,
        "evictions": sum(r.evictions for r in records),
        "expert_hit_rate": hits / (hits + loads) if hits + loads else 1.0,
        "request_hit_rate": sum(1 for r in records if r.loads == 0) / len(records) if records else 1.0,
        "loads_per_tier": tiers,
        "switch_ms_p50": percentile(switched, 50),
        "switch_ms_p99": percentile(switched, 99),
        "planning_ms_mean": statistics.fmean(planning) if planning else 0.0,
        "planning_ms_p50": percentile(planning, 50),
        "planning_ms_p99": percentile(planning, 99),
        "planning_ms_max": max(planning, default=0.0),
        # without each task's first request (the residency's one-time check of a pattern it has not seen)
        "planning_ms_steady_mean": statistics.fmean(steady) if steady else 0.0,
        "planning_ms_steady_p50": percentile(steady, 50),
        "planning_ms_steady_p99": percentile(steady, 99),
        "planning_ms_steady_max": max(steady, default=0.0),
        "publish_ms_mean": statistics.fmean([r.publish_s * 1e3 for r in records]) if records else 0.0,
        "unpin_ms_mean": statistics.fmean([r.unpin_s * 1e3 for r in records]) if records else 0.0,
    }
