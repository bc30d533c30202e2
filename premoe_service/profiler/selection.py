"""Selection: turn a score matrix into a pattern under a policy (top-k per layer, coverage, global budget)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from ..errors import InvalidArgument, PatternError
from ..families import MoESpec, RoutingSpec
from ..pattern import Pattern
from .criteria import CRITERIA, DEFAULT_CRITERION

Policy = Literal["top_k", "coverage", "budget"]
POLICIES: tuple[Policy, ...] = ("top_k", "coverage", "budget")


@dataclass(frozen=True)
class Selection:
    """How a task's pattern is derived from its scores.

    Attributes:
        criterion: Which score matrix (a name in `CRITERIA`).
        policy: `top_k` (value = experts per layer), `coverage` (value = share of each layer's score mass,
            in (0, 1]), or `budget` (value = experts across all layers; with `unit="bytes"`, bytes).
        value: The policy's number.
        unit: `experts` or `bytes` (budget only).
        precisions: Lower precisions (quantized copies the store holds) the plan may hold experts at; empty
            for a drop-only pattern. Needs a budget in bytes or as a fraction (of the store's expert bytes).
    """

    # The defaults are what `premoe eval` on the reference model measured best (docs/evaluation.md):
    # EASY-EP scores spread over layers by a global budget of half the routed experts.
    criterion: str = DEFAULT_CRITERION
    policy: Policy = "budget"
    value: float = 0.5
    unit: Literal["experts", "bytes", "fraction"] = "fraction"
    precisions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise InvalidArgument(
                f"unknown criterion {self.criterion!r} (use {', '.join(CRITERIA)})", field="criterion"
            )
        if self.policy not in POLICIES:
            raise InvalidArgument(
                f"unknown selection policy {self.policy!r} (use {', '.join(POLICIES)})", field="policy"
            )
        if not (isinstance(self.value, int | float) and math.isfinite(self.value) and self.value > 0):
            raise InvalidArgument(f"selection value {self.value!r} must be a positive number", field="value")
        if self.policy == "coverage" and self.value > 1:
            raise InvalidArgument("coverage is a share of the score mass in (0, 1]", field="value")
        if self.unit == "fraction" and self.value > 1:
            raise InvalidArgument("a fraction of the routed experts lies in (0, 1]", field="value")
        self._check_precisions()

    def _check_precisions(self) -> None:
        from ..store.quant import BITS  # the store's lower precisions

        if isinstance(self.precisions, str) or not all(isinstance(p, str) for p in self.precisions):
            raise InvalidArgument("a list of precision names, e.g. ['int4', 'int2']", field="precisions")
        object.__setattr__(self, "precisions", tuple(dict.fromkeys(self.precisions)))  # JSON gives a list
        for name in self.precisions:
            if name not in BITS:
                raise InvalidArgument(
                    f"unknown precision {name!r:.40} (use {', '.join(BITS)}; full precision is always an option)",
                    field="precisions",
                )
        if self.precisions and (self.policy != "budget" or self.unit == "experts"):
            raise InvalidArgument(
                "a mixed-precision plan is chosen under a byte budget: give it in bytes or as a fraction of the "
                "store's expert bytes, not as experts per layer, coverage or an expert count",
                field="precisions",
            )

    def to_json(self) -> dict[str, Any]:
        data = {"criterion": self.criterion, "policy": self.policy, "value": self.value, "unit": self.unit}
        if self.precisions:  # absent otherwise: profiles written before precisions read the same
            data["precisions"] = list(self.precisions)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Selection:
        return cls(**data) if data else cls()


def select(
    scores: Tensor,
    spec: MoESpec,
    selection: Selection,
    expert_nbytes: int | None = None,
    max_per_layer: int | None = None,
) -> Pattern:
    """The pattern that `selection` picks from `scores` [L, E] (rows in `spec.moe_layers` order).

    Every layer keeps at least the routing's `min_experts`; ties go to the lower expert id. `max_per_layer` caps each
    layer (a server's slots per layer); a budget's experts that a full layer cannot take go to the others.
    """
    if scores.shape != (len(spec.moe_layers), spec.num_experts):
        raise InvalidArgument(
            f"scores of shape {tuple(scores.shape)} do not fit "
            f"{len(spec.moe_layers)} layers x {spec.num_experts} experts",
            field="scores",
        )
    scores = scores.double().clamp_min(0)
    floor = spec.routing.min_experts
    cap = spec.num_experts if max_per_layer is None else min(spec.num_experts, max_per_layer)
    if cap < floor:
        raise InvalidArgument(f"at most {cap} experts per layer, below the minimum {floor}", field="max_per_layer")
    counts = [min(c, cap) for c in _counts(scores, spec, selection, floor, expert_nbytes, cap)]
    layers = {
        layer: best_routable(scores[i], counts[i], spec.routing, layer) for i, layer in enumerate(spec.moe_layers)
    }
    return Pattern.build(spec, layers)


def _order(row: Tensor) -> list[int]:
    """Experts by descending score, ties by ascending id (deterministic)."""
    return sorted(range(row.numel()), key=lambda e: (-float(row[e]), e))


def _counts(
    scores: Tensor, spec: MoESpec, sel: Selection, floor: int, expert_nbytes: int | None, cap: int
) -> list[int]:
    num_layers, num_experts = scores.shape
    if sel.policy == "top_k":
        per_layer = round(sel.value * num_experts) if sel.unit == "fraction" else int(sel.value)
        return [min(num_experts, max(floor, per_layer))] * num_layers
    if sel.policy == "coverage":
        counts = []
        for row in scores:
            total = float(row.sum())
            if total <= 0:
                counts.append(floor)
                continue
            mass, n = 0.0, 0
            for expert in _order(row):
                mass += float(row[expert]) / total
                n += 1
                if mass >= sel.value - 1e-12:
                    break
            counts.append(min(num_experts, max(floor, n)))
        return counts
    # budget: a global count, layers compete on scores normalised within each layer
    if sel.unit == "bytes":
        if not expert_nbytes:
            raise InvalidArgument("a byte budget needs the store's expert size", field="unit")
        budget = int(sel.value) // expert_nbytes
    elif sel.unit == "fraction":
        budget = round(sel.value * num_layers * num_experts)
    else:
        budget = int(sel.value)
    if budget < floor * num_layers:
        raise InvalidArgument(
            f"budget of {budget} experts is below the minimum {floor} per layer x {num_layers} layers", field="value"
        )
    budget = min(budget, num_layers * cap)
    normalised = scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-30)
    counts = [floor] * num_layers
    candidates = []
    for i, row in enumerate(normalised):
        for rank, expert in enumerate(_order(row)):
            if rank >= floor:
                candidates.append((-float(row[expert]), i, rank))
    candidates.sort()
    extra = budget - floor * num_layers
    for _, i, _ in candidates:
        if extra == 0:
            break
        if counts[i] < cap:
            counts[i] += 1
            extra -= 1
    return counts


def best_routable(row: Tensor, count: int, routing: RoutingSpec, layer: int) -> list[int]:
    """The `count` experts of one layer with the best scores in `row` [E] that routing can use: under
    group-limited routing the best groups are seeded first, and a group that is scored by its best two is
    entered with two experts at once, never one. Ties go to the lower expert id."""
    order = _order(row)
    if routing.group_rule is None:
        return sorted(order[:count])
    size = routing.group_size
    least = routing.group_entry
    kept: set[int] = set()
    per_group = [0] * routing.groups
    # Seed the best groups (by their best `least` scores) so that routing always finds `topk_group` groups.
    group_strength = [
        (-sum(sorted((float(row[e]) for e in range(g * size, (g + 1) * size)), reverse=True)[:least]), g)
        for g in range(routing.groups)
    ]
    seed_per_group = max(least, math.ceil(routing.top_k / routing.topk_group))
    for _, g in sorted(group_strength)[: routing.topk_group]:
        for e in [e for e in order if e // size == g][:seed_per_group]:
            kept.add(e)
            per_group[g] += 1
    for expert in order:
        if len(kept) >= count:
            break
        if expert in kept:
            continue
        g = expert // size
        if per_group[g] == 0 and least == 2:
            if count - len(kept) < 2:
                continue
            partner = next(e for e in order if e // size == g and e != expert)
            kept.update((expert, partner))
            per_group[g] += 2
        else:
            kept.add(expert)
            per_group[g] += 1
    if len(kept) != count:
        raise PatternError(f"cannot keep exactly {count} experts under group-limited routing", field=f"layer {layer}")
    return sorted(kept)
