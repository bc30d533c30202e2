"""Per-pattern masks the engine reads on every request, cached by the pattern's identity (every request of a
task shares its pattern object): the excluded experts per layer for the routers, and the kept experts of all
layers as `[L, E]` arrays for the slot books, one for full precision and one per lower precision (experts held in
part, a channel plan's, are in neither: they sit in channel slots, `runtime.channel_slots`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np
import torch

from ..families import MoESpec
from ..pattern import FULL, Pattern
from .slot_book import wanted_mask

T = TypeVar("T")


class _ByPattern(Generic[T]):
    """Values derived from patterns, for the `size` patterns used last."""

    def __init__(self, derive: Callable[[Pattern], T], size: int = 256) -> None:
        self.derive, self.size = derive, size
        self._entries: dict[int, tuple[Pattern, T]] = {}

    def __call__(self, pattern: Pattern) -> T:
        key = id(pattern)
        entry = self._entries.pop(key, None)
        if entry is None or entry[0] is not pattern:  # a new pattern, or another one at a reused address
            entry = (pattern, self.derive(pattern))
            while len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry  # most recently used last
        return entry[1]


class PatternMasks:
    """The masks of the patterns used last, for a model of `spec` whose routers run on `device`."""

    def __init__(self, spec: MoESpec, device: Callable[[], torch.device]) -> None:
        self.spec, self.device = spec, device
        self.excluded = _ByPattern(self._excluded)
        self.full = _ByPattern(self._full)
        self.lowered = _ByPattern(self._lowered)

    def _excluded(self, pattern: Pattern) -> dict[int, torch.Tensor | None]:
        num_experts, device = self.spec.num_experts, self.device()
        return {
            layer: None if len(pattern.kept(layer)) == num_experts else pattern.excluded(layer, num_experts, device)
            for layer in self.spec.moe_layers
        }

    def _full(self, pattern: Pattern) -> np.ndarray:
        kept = [full_kept(pattern, layer) for layer in self.spec.moe_layers]
        return wanted_mask(len(kept), self.spec.num_experts, kept)

    def _lowered(self, pattern: Pattern) -> dict[str, np.ndarray]:
        """Precision -> bool `[L, E]`: the experts `pattern` holds at that precision below full."""
        rows = {layer: row for row, layer in enumerate(self.spec.moe_layers)}
        masks: dict[str, np.ndarray] = {}
        for layer, lowered in pattern.precisions.items():
            sliced = pattern.channels.get(layer, {})
            for expert, precision in lowered.items():
                if precision != FULL and expert not in sliced:
                    if precision not in masks:
                        masks[precision] = np.zeros((len(rows), self.spec.num_experts), dtype=bool)
                    masks[precision][rows[layer], expert] = True
        return masks


def full_kept(pattern: Pattern, layer: int) -> tuple[int, ...]:
    """The experts `pattern` keeps whole at full precision in `layer`."""
    lowered, sliced = pattern.precisions.get(layer), pattern.channels.get(layer)
    if not lowered and not sliced:
        return pattern.kept(layer)
    return tuple(e for e in pattern.kept(layer) if e not in (lowered or {}) and e not in (sliced or {}))
