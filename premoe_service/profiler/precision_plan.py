"""Precision selection: for one task and one byte budget, each expert dropped or kept at one precision.

Every expert has options (drop, int2, int3, int4, int8, full), each with a cost in bytes and a value for the
task. The plan that maximises the summed value under the budget is a multiple-choice knapsack; it is solved
greedily on each expert's upper convex hull of (cost, value): the steps of all experts are taken in order of
value per byte while they fit (exact for the fractional relaxation, within one step of the optimum here).
Every layer first keeps the fewest experts routing needs (its best-scored ones, at their cheapest option).

Two objectives say what an option is worth (both measured by `premoe eval`; `error` measured better):
- `error`: the task's EASY-EP score `s` (normalised within each layer) times what the precision keeps of
  the expert, `s * (1 - err**2)`, with `err` the expert's relative weight error at that precision, measured
  when the store's quantized copy was written: the squared relative error is the share of the expert's
  output energy the precision perturbs; dropping (err = 1) loses all of `s`. Weighing by `1 - err` instead
  measured worse at tight budgets (C at 6.25%: 0.68 against 0.86).
- `mc`: the Mixture Compressor's importance, the router's probability mass (`tcess`: access frequency times
  routing weight), with the same error weight. MC's own linear value of bits (`s * bits / 16`) makes every
  byte worth the same, so its plans keep experts at full precision only and reduce to dropping.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import InvalidArgument
from ..families import MoESpec
from ..pattern import FULL, Pattern
from .selection import best_routable

Objective = Literal["error", "mc"]
OBJECTIVES: tuple[Objective, ...] = ("error", "mc")
OBJECTIVE_CRITERION: dict[str, str] = {"error": "easyep", "mc": "tcess"}  # the score each objective weighs


@dataclass(frozen=True)
class PrecisionOption:
    """One way to hold an expert: its precision, bytes per expert, and per-expert relative error [L, E].

    A channel option (`profiler.channel_plan`) holds only some of the expert's channels: `channels` of them,
    keeping the share `kept` [L, E] of each expert's channel score mass.
    """

    precision: str
    nbytes: int
    error: Tensor | None = None  # None: lossless (full precision)
    channels: int | None = None  # None: every channel
    kept: Tensor | None = None


@dataclass(frozen=True)
class PrecisionPlan:
    """A chosen plan: the pattern (kept experts and their precisions) and the bytes it holds."""

    pattern: Pattern
    nbytes: int
    counts: dict[str, int]  # precision -> experts held at it


def option_values(scores: Tensor, option: PrecisionOption, objective: Objective) -> Tensor:
    """[L, E] value of holding every expert at `option` (scores already normalised per layer)."""
    del objective  # the objectives differ in their scores (OBJECTIVE_CRITERION), not in the error weight
    value = scores.clone() if option.error is None else scores * (1 - option.error.double() ** 2).clamp_min(0)
    return value if option.kept is None else value * option.kept.double()


def select_precisions(
    scores: Tensor,
    spec: MoESpec,
    options: Mapping[str, PrecisionOption],
    budget_bytes: int,
    objective: Objective = "error",
    slots: Mapping[str, int] | None = None,
) -> PrecisionPlan:
    """The plan of highest summed value whose bytes fit `budget_bytes` (see the module doc).

    Args:
        slots: Most experts per layer at a precision (a server's slots: `full` and each `--precision-slots`);
            a step that would exceed them is not taken, and the expert stays where it was.
    """
    if objective not in OBJECTIVES:
        raise InvalidArgument(f"unknown objective {objective!r} (use {', '.join(OBJECTIVES)})", field="objective")
    scores, chosen = choose_options(scores, spec, options, budget_bytes, slots)
    layers = {layer: sorted(chosen[i]) for i, layer in enumerate(spec.moe_layers)}
    precisions = {layer: dict(chosen[i]) for i, layer in enumerate(spec.moe_layers)}
    pattern = Pattern.build(spec, layers, precisions)
    ordered = sorted(options.values(), key=lambda o: o.nbytes)
    cost_of = {o.precision: o.nbytes for o in ordered}
    counts = {o.precision: 0 for o in ordered}
    for layer in spec.moe_layers:
        for e in pattern.kept(layer):
            counts[pattern.precision(layer, e)] += 1
    return PrecisionPlan(pattern, sum(cost_of[p] * n for p, n in counts.items()), counts)


def choose_options(
    scores: Tensor,
    spec: MoESpec,
    options: Mapping[str, PrecisionOption],
    budget_bytes: int,
    slots: Mapping[str, int] | None = None,
    layer_weights: Tensor | None = None,
) -> tuple[Tensor, list[dict[int, str]]]:
    """The knapsack of `select_precisions` over any options (keys name them: a precision, or a precision at a
    channel count): per MoE layer (in order), kept expert -> the key of its option; and the scores normalised
    per layer. `layer_weights [L]`: what each layer's normalised scores are worth against the others' (None:
    every layer alike).
    """
    if not options:
        raise InvalidArgument("no precision to keep experts at", field="precisions")
    num_layers, num_experts = len(spec.moe_layers), spec.num_experts
    if scores.shape != (num_layers, num_experts):
        raise InvalidArgument(f"scores of shape {tuple(scores.shape)} do not fit the model", field="scores")
    scores = scores.double().clamp_min(0)
    scores = scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-30)
    if layer_weights is not None:
        if layer_weights.shape != (num_layers,) or not bool((layer_weights >= 0).all()):
            raise InvalidArgument(f"layer weights must be {num_layers} non-negative numbers", field="layer_weights")
        scores = scores * layer_weights.double().unsqueeze(1)
    ordered = sorted(options.items(), key=lambda item: item[1].nbytes)
    values = {key: option_values(scores, o, "error") for key, o in ordered}
    floor = spec.routing.min_experts
    if budget_bytes < floor * num_layers * ordered[0][1].nbytes:
        raise InvalidArgument(
            f"budget of {budget_bytes} bytes is below {floor} experts per layer at {ordered[0][0]} "
            f"({floor * num_layers * ordered[0][1].nbytes} bytes)",
            field="budget",
        )

    hulls = [[_hull(ordered, values, i, e) for e in range(num_experts)] for i in range(num_layers)]
    level = [[0] * num_experts for _ in range(num_layers)]  # steps taken on each expert's hull
    room = [dict(slots or {}) for _ in range(num_layers)]  # slots left per precision (absent: no limit)

    def fits(i: int, e: int, k: int) -> bool:
        """Whether step `k` of expert `e` in layer `i` finds a slot at the precision it reaches."""
        return room[i].get(hulls[i][e][k][2], 1) > 0

    def take(i: int, e: int, k: int) -> int:
        """Take expert `e`'s hull steps up to step `k` (its slot moves to the precision reached); their bytes."""
        before = hulls[i][e][level[i][e] - 1][2] if level[i][e] else None
        if before in room[i]:
            room[i][before] += 1
        reached = hulls[i][e][k][2]
        if reached in room[i]:
            room[i][reached] -= 1
        cost = sum(hulls[i][e][j][0] for j in range(level[i][e], k + 1))
        level[i][e] = k + 1
        return cost

    spent = 0
    for i in range(num_layers):  # the routing floor: each layer's best experts, each at its first hull step with room
        for e in sorted(range(num_experts), key=lambda x: (-float(scores[i, x]), x))[:floor]:
            for k in range(len(hulls[i][e])):
                if fits(i, e, k):
                    spent += take(i, e, k)
                    break
            else:
                raise InvalidArgument(
                    f"layer {spec.moe_layers[i]} has too few slots for {floor} experts at any precision offered",
                    field="slots",
                )
    steps = sorted(
        (-gain / cost if cost > 0 else float("-inf"), i, e, k)
        for i in range(num_layers)
        for e in range(num_experts)
        for k, (cost, gain, _) in enumerate(hulls[i][e])
    )
    blocked = [[False] * num_experts for _ in range(num_layers)]  # a step found no slot: a later one may jump it
    for sweep in range(1 if not slots else 4):  # with slot limits, later sweeps use the slots that moves freed
        for _, i, e, k in steps:
            if level[i][e] > k or (level[i][e] < k and not blocked[i][e] and sweep == 0):
                continue  # taken already, or (first sweep) out of budget
            cost = sum(hulls[i][e][j][0] for j in range(level[i][e], k + 1))
            if not fits(i, e, k):
                blocked[i][e] = True
            elif spent + cost <= budget_bytes:
                spent += take(i, e, k)
                blocked[i][e] = False
    cheapest = ordered[0][0]
    out = []
    for i, layer in enumerate(spec.moe_layers):
        chosen = {e: hulls[i][e][level[i][e] - 1][2] for e in range(num_experts) if level[i][e] > 0}
        if spec.routing.unroutable(list(chosen)) is not None:  # group routing: a routable set of that size
            kept = best_routable(scores[i], len(chosen), spec.routing, layer)
            chosen = {e: chosen.get(e, cheapest) for e in kept}
        out.append(chosen)
    return scores, out


def _hull(
    ordered: list[tuple[str, PrecisionOption]], values: Mapping[str, Tensor], layer: int, expert: int
) -> list[tuple[int, float, str]]:
    """Steps up one expert's upper convex hull of (bytes, value), from dropped: (added bytes, added value,
    option reached). Options that cost more for no more value are never steps."""
    points = [(0, 0.0, "drop")] + [(o.nbytes, float(values[key][layer, expert]), key) for key, o in ordered]
    hull = [points[0]]
    for point in points[1:]:
        if point[1] <= hull[-1][1]:
            continue
        while len(hull) >= 2:
            (c0, v0, _), (c1, v1, _) = hull[-2], hull[-1]
            # drop the middle point when it lies under the line from hull[-2] to the new point
            if (v1 - v0) * (point[0] - c0) <= (point[1] - v0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(point)
    return [(b[0] - a[0], b[1] - a[1], b[2]) for a, b in itertools.pairwise(hull)]


def store_options(
    store, full_nbytes: int | None = None, precisions: tuple[str, ...] | None = None
) -> dict[str, PrecisionOption]:
    """The options a store offers: full precision (at `full_nbytes`, default the store's own expert bytes) and
    each quantized copy (its blob bytes and measured errors), or only those named in `precisions`."""
    from ..store.quantized_copies import quantized_copies

    manifest = store.manifest
    options = {FULL: PrecisionOption(FULL, full_nbytes or manifest.expert_nbytes)}
    for name, copy in quantized_copies(manifest).items():
        error = torch.tensor([copy.errors[layer] for layer in manifest.moe_layers], dtype=torch.float64)
        options[name] = PrecisionOption(name, copy.expert_nbytes, error)
    if precisions is not None:
        unknown = [p for p in precisions if p not in options]
        if unknown:
            raise InvalidArgument(
                f"the store holds no {unknown} experts (it has {sorted(options)})", field="precisions"
            )
        options = {p: options[p] for p in precisions}
    return options


def bf16_nbytes(manifest) -> int:
    """Bytes of one expert at 16 bits per parameter: what budgets in `premoe eval` are shares of."""
    from ..store.manifest import DTYPES

    return manifest.expert_nbytes * 2 // DTYPES[manifest.dtype].itemsize
