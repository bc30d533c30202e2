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
    """The decayed use counts of every layer, updated before each request is planned.

    Args:
        layers: MoE layers.
        num_experts: Experts per layer.
        half_life: Requests after which a use counts half.
    """

    def __init__(self, layers: tuple[int, ...], num_experts: int, half_life: float = 64.0) -> None:
        self.decay = 0.5 ** (1.0 / half_life)
        self.counts = np.zeros((len(layers), num_experts), dtype=np.float64)  # [L, E], MoE layers in order
        self.use = {layer: self.counts[row] for row, layer in enumerate(layers)}  # row views
        self._residency: Residency | None = None

    def install(self, residency: Residency) -> None:
        """Make the counts the primary eviction key of the residency's slots (before anything is loaded)."""
        book = residency.engine.book
        if book.state.any():
            raise RuntimeError("install the refinement before any expert is loaded")
        if book.state.shape != self.counts.shape:
            raise RuntimeError(f"the engine has {book.state.shape} experts, the counts {self.counts.shape}")
        book.use = self.counts
        self._residency = residency

    def observe(self, pattern: Pattern) -> None:
        """Count one use of each expert of a request's pattern (before it is planned; on the thread that plans)."""
        self.counts *= self.decay
        if self._residency is not None:
            self.counts += self._residency.engine.full_mask(pattern)
        else:
            for layer, use in self.use.items():
                use[list(pattern.kept(layer))] += 1.0
