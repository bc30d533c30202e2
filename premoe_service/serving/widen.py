"""Widening a pattern after prefill: the experts a prompt's tokens wanted most, added until the prompt's router
mass on the pattern reaches the coverage floor."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..families.base import MoESpec
from ..pattern import Pattern


def widen_pattern(
    spec: MoESpec, capacity: Mapping[int, int], pattern: Pattern, prompt_scores: dict[int, torch.Tensor], floor: float
) -> Pattern:
    """Add, per layer, the experts with the highest mean router mass over the prompt until that mass on the pattern
    reaches `floor` or the layer's `capacity` (its slots) is full. Group-limited routing may need an expert's group
    entered with a partner, or not at all: the family's routing rule says which experts join together."""
    routing = spec.routing
    layers = {}
    for layer in spec.moe_layers:
        kept = list(pattern.kept(layer))
        scores = prompt_scores.get(layer)
        if scores is not None:
            share = float(scores[kept].sum())
            order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
            for expert in order:
                if share >= floor or len(kept) >= capacity[layer]:
                    break
                added = [] if expert in kept else routing.joining(kept, expert, order)
                if added and len(kept) + len(added) <= capacity[layer]:
                    kept += added
                    share += float(scores[added].sum())
        layers[layer] = kept
    return Pattern.build(spec, layers)
