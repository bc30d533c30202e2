"""How many tasks one replica's budget holds side by side: what Serve's multiplexing LRU should be sized to. Patterns
share experts, so the count comes from the union of their kept experts per layer against the layer's slots, not
from the budget over a pattern's size (which says 1 where 4 fit on the reference model)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence


def tasks_that_fit(
    patterns: Sequence[Mapping[int, frozenset[int]]], slots: Mapping[int, int], *, orders: int = 64, seed: int = 0
) -> float:
    """The mean number of tasks, taken in a random order, whose patterns fit the slots together before one does not.

    Args:
        patterns: Each task's kept experts per MoE layer.
        slots: Slots per MoE layer.
        orders: Random orders to average over (seeded, so the answer is stable).
    """
    if not patterns:
        return 0.0
    rng = random.Random(seed)
    order = list(range(len(patterns)))
    total = 0
    for _ in range(orders):
        rng.shuffle(order)
        held: dict[int, set[int]] = {layer: set() for layer in slots}
        for index in order:
            pattern = patterns[index]
            if any(len(held[layer] | pattern.get(layer, frozenset())) > slots[layer] for layer in slots):
                break
            for layer in slots:
                held[layer] |= pattern.get(layer, frozenset())
            total += 1
    return total / orders


def tasks_per_replica(patterns: Sequence[Mapping[int, frozenset[int]]], slots: Mapping[int, int], experts: int) -> int:
    """Serve's LRU size for a replica: -1 (no limit) when every expert has a slot, else the tasks that fit on
    average (at least 1); with no task registered yet, 1 per half of the slots' share of the experts."""
    if all(capacity >= experts for capacity in slots.values()):
        return -1
    if not patterns:
        return max(1, int(2 * min(slots.values()) / experts))
    return max(1, int(tasks_that_fit(patterns, slots)))
