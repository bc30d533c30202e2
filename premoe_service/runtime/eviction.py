"""Shared-use eviction (`premoe serve --eviction shared-use`): keep the experts that recently requested tasks share.

Each MoE layer keeps a decayed use count per expert: every request adds one to each expert of its pattern, and
all counts decay with a half-life of some requests. An expert that many popular tasks keep collects counts from
all of them, so it outlives an expert of one task that was merely used last. Eviction takes the lowest count
first and falls back to least recently used (ties to the lower expert id), so with equal counts it is LRU.
"""

from __future__ import annotations

import numpy as np

from ..pattern import Pattern
from .residency import Residency


class SharedUseTracker:
    """The decayed use counts of every layer of a residency's slots, their primary eviction key, updated before
    each request is planned. Made before anything is loaded.

    Args:
        residency: The residency whose slot book the counts order (every MoE layer, every expert).
        half_life: Requests after which a use counts half.
    """

    def __init__(self, residency: Residency, half_life: float = 64.0) -> None:
        book = residency.patterned.book
        if book.state.any():
            raise RuntimeError("install the refinement before any expert is loaded")
        self.decay = 0.5 ** (1.0 / half_life)
        self.patterned = residency.patterned
        self.counts = np.zeros(book.state.shape, dtype=np.float64)  # [L, E], MoE layers in order
        book.use = self.counts

    def observe(self, pattern: Pattern) -> None:
        """Count one use of each expert of a request's pattern (before it is planned; on the thread that plans)."""
        self.counts *= self.decay
        self.counts += self.patterned.full_mask(pattern)
