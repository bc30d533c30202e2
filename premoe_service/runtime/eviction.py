"""Shared-use eviction (`premoe serve --eviction shared-use`): keep the experts that recently requested tasks share.

Each MoE layer keeps a decayed use count per expert: every request adds one to each expert of its pattern, and
all counts decay with a half-life of some requests. An expert that many popular tasks keep collects counts from
all of them, so it outlives an expert of one task that was merely used last. Eviction takes the lowest count
first and falls back to least recently used (ties to the lower expert id), so with equal counts it is LRU.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from ..pattern import Pattern
from .residency import Residency
from .slots import LayerSlots


@dataclass
class SharedUseSlots(LayerSlots):
    """`LayerSlots` whose victims are the experts with the least decayed use (see the module docstring).

    Attributes:
        use: The layer's decayed use count per expert, shared with the `SharedUseTracker` that updates it. [E]
    """

    use: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def victims(self, evictable: Collection[int], count: int) -> list[int]:
        use, last_used = self.use, self.last_used
        return heapq.nsmallest(count, evictable, key=lambda e: (float(use[e]), last_used.get(e, -1), e))


class SharedUseTracker:
    """The decayed use counts of every layer, updated before each request is planned.

    Args:
        layers: MoE layers.
        num_experts: Experts per layer.
        half_life: Requests after which a use counts half.
    """

    def __init__(self, layers: tuple[int, ...], num_experts: int, half_life: float = 64.0) -> None:
        self.decay = 0.5 ** (1.0 / half_life)
        self.use = {layer: np.zeros(num_experts, dtype=np.float64) for layer in layers}

    def install(self, residency: Residency) -> None:
        """Give every layer of the residency's engine `SharedUseSlots` (call before anything is loaded)."""
        engine = residency.engine
        for layer, old in engine.slots.items():
            if old.slot_of or old.loading:
                raise RuntimeError("install the refinement before any expert is loaded")
            engine._replace_slots(layer, SharedUseSlots(old.capacity, use=self.use[layer]))

    def observe(self, pattern: Pattern) -> None:
        """Count one use of each expert of a request's pattern (before it is planned; on the thread that plans)."""
        for layer, use in self.use.items():
            use *= self.decay
            use[list(pattern.kept(layer))] += 1.0
