"""Reference policies replayed on a stream of patterns without slots: Belady's oracle, plain LRU, full reload.

Each MoE layer is its own cache of `capacity` slots, and every expert of a layer has the same size, so counting
loads counts bytes. Requests are served one at a time: a request's whole pattern must be resident at once.

- Belady: on a miss, evict the resident experts outside the current pattern whose next use lies farthest in the
  future. For equal-size items this is the fewest loads any policy can achieve (demand paging loses nothing: a
  prefetch can always be postponed to the moment of use), so it is the lower bound on bytes moved.
- LRU: the residency's own rule (least recently used first, ties to the lower expert id), computed here without
  slots or stores as an independent check of what the real code measured.
- Full reload: PreMoe's way, the whole pattern loaded again at every task change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...pattern import Pattern


@dataclass
class SimResult:
    """Experts loaded and evicted over a stream, and the requests whose pattern was already resident."""

    loads: int = 0
    evictions: int = 0
    hit_requests: int = 0


def layer_sets(patterns: Sequence[Pattern], layer: int) -> list[frozenset[int]]:
    """Each request's kept experts of `layer`, one frozenset per distinct pattern object (shared, not copied)."""
    cache: dict[int, frozenset[int]] = {}
    return [cache.setdefault(id(p), frozenset(p.kept(layer))) for p in patterns]


def belady(patterns: Sequence[Pattern], layers: Sequence[int], capacity: int, num_experts: int) -> SimResult:
    """Loads with the farthest-next-use eviction (the offline optimum)."""
    result = SimResult()
    hits = np.ones(len(patterns), dtype=bool)
    for layer in layers:
        wanted = layer_sets(patterns, layer)
        next_use = _next_use(wanted, num_experts)  # [T + 1, E]
        resident: set[int] = set()
        for t, want in enumerate(wanted):
            missing = want - resident
            if not missing:
                continue
            hits[t] = False
            short = len(resident) + len(missing) - capacity
            if short > 0:
                candidates = np.fromiter(resident - want, dtype=np.int64)
                # farthest next use first; among experts never used again, any order gives the same loads
                order = np.argsort(-next_use[t + 1, candidates], kind="stable")
                gone = candidates[order[:short]]
                resident.difference_update(gone.tolist())
                result.evictions += short
            resident |= missing
            result.loads += len(missing)
    result.hit_requests = int(hits.sum())
    return result


def lru(patterns: Sequence[Pattern], layers: Sequence[int], capacity: int) -> SimResult:
    """Loads with least-recently-used eviction, ties to the lower expert id (what `LayerSlots.plan` does)."""
    result = SimResult()
    hits = np.ones(len(patterns), dtype=bool)
    for layer in layers:
        wanted = layer_sets(patterns, layer)
        last_used: dict[int, int] = {}
        for t, want in enumerate(wanted):
            missing = want - last_used.keys()
            if missing:
                hits[t] = False
                short = len(last_used) + len(missing) - capacity
                if short > 0:
                    candidates = sorted((last_used[e], e) for e in last_used.keys() - want)
                    for _, expert in candidates[:short]:
                        del last_used[expert]
                    result.evictions += short
                result.loads += len(missing)
            last_used.update(dict.fromkeys(want, t))
    result.hit_requests = int(hits.sum())
    return result


def full_reload(patterns: Sequence[Pattern]) -> SimResult:
    """Loads when every task change reloads the whole pattern (a repeat of the same task reloads nothing)."""
    result = SimResult()
    for t, pattern in enumerate(patterns):
        if t and pattern is patterns[t - 1]:
            result.hit_requests += 1
        else:
            result.loads += pattern.size
    return result


def _next_use(wanted: Sequence[frozenset[int]], num_experts: int) -> np.ndarray:
    """[T + 1, E]: the first request at or after t that keeps expert e, T when none does."""
    steps = len(wanted)
    out = np.full((steps + 1, num_experts), steps, dtype=np.int64)
    for t in range(steps - 1, -1, -1):
        out[t] = out[t + 1]
        out[t, list(wanted[t])] = t
    return out
