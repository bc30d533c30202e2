"""`premoe eval --channels`: expert-level mixed precision against channel-level plans at the same byte budgets.

Budgets are shares of the routed experts' bytes at 16 bits per parameter, as in `precision_eval`. Per task and
budget:
- `mixed-error`: `select_precisions` (each expert dropped, or whole at one precision; the same plans as
  `premoe eval --precisions`);
- `channels-<criterion>`: `select_channels` over the same options plus, for each precision, the best `k`
  channels of an expert for `k` on the channel grid, channels ranked by the profile's channel scores of that
  criterion (`heapr`, `camera`, `energy`); a quantized slice counts channel-major packed bytes with its scales.

A plan runs on the engine's full-precision slots holding what the plan computes with: each kept expert's
weights at its precision (dequantized; a channel slice re-quantized channel-major), its dropped channels zeroed
(a zero gate/up row and down column add nothing: the same as the expert cut to its kept channels), dropped
experts excluded by the masked router. `tests/test_atomic.py` checks this equals transformers on the checkpoint
`premoe export --channels` writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import InvalidArgument
from ..families.channels import gate_up_index
from ..pattern import FULL, Pattern
from ..profiler import Profile
from ..profiler.channel_plan import (
    DEFAULT_FRACTIONS,
    ChannelPlan,
    ExpertShape,
    channel_counts,
    channel_options,
    select_channels,
)
from ..profiler.channels import CHANNEL_CRITERIA
from ..profiler.demo_error import channel_kept, demo_errors
from ..profiler.demos import Demo
from ..profiler.precision_plan import OBJECTIVE_CRITERION, bf16_nbytes, select_precisions, store_options
from ..runtime.build import load_model
from ..runtime.slots import write_slot
from ..store import Store
from ..store.channels import ChannelReader
from ..store.quantized_copies import quantized_copies
from .metrics import exact_match, mean_nll
from .report import curves_of, retention_grid, write_files
from .run import TaskData, retention

EXPERT_LEVEL = "mixed-error"


@dataclass
class ChannelEvalResult:
    """`retention[task][method][budget]`, the share of bf16 bytes each plan holds, and how channels were held."""

    metric: dict[str, str] = field(default_factory=dict)
    full: dict[str, float] = field(default_factory=dict)
    retention: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    share: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    experts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # experts kept per plan
    channel_share: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # kept channels / all
    budgets: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)
    channel_counts: list[int] = field(default_factory=list)
    intermediate: int = 0
    items: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class PlanWeights:
    """What each expert computes with at each precision, whole or channel-major, read once (`store.channels`)."""

    def __init__(self, store: Store) -> None:
        self.reader = ChannelReader(store)
        self.store, self.transposed = store, self.reader.transposed
        self._cache: dict[tuple[int, int, str, bool], dict[str, Tensor]] = {}

    def expert(self, layer: int, expert: int, precision: str, sliced: bool) -> dict[str, Tensor]:
        """Expert tensors (runtime layout) at `precision`; `sliced`: its down projection quantized per channel."""
        key = (layer, expert, precision, sliced)
        if key not in self._cache:
            self._cache[key] = self.reader.expert(layer, expert, precision, channel_major=sliced)
        return self._cache[key]


def zero_channels(family: str, tensors: dict[str, Tensor], kept: Tensor, transposed: bool) -> dict[str, Tensor]:
    """An expert's tensors with every channel outside `kept` zeroed (gate/up rows, down column, gate/up bias)."""
    down = tensors["down_proj"]
    intermediate = int(down.shape[0] if transposed else down.shape[1])
    keep = torch.zeros(intermediate, dtype=torch.bool)
    keep[kept] = True
    out = dict(tensors)
    gate_up_keep = torch.zeros(2 * intermediate, dtype=torch.bool)
    gate_up_keep[gate_up_index(family, kept, intermediate)] = True
    if transposed:
        out["gate_up_proj"] = tensors["gate_up_proj"] * gate_up_keep[None, :].to(down.dtype)
        out["down_proj"] = down * keep[:, None].to(down.dtype)
    else:
        out["gate_up_proj"] = tensors["gate_up_proj"] * gate_up_keep[:, None].to(down.dtype)
        out["down_proj"] = down * keep[None, :].to(down.dtype)
    if "gate_up_proj_bias" in tensors:
        out["gate_up_proj_bias"] = tensors["gate_up_proj_bias"] * gate_up_keep.to(down.dtype)
    return out


def install_plan(patterned: Any, weights: PlanWeights, plan: ChannelPlan) -> Pattern:
    """Write the plan's kept experts (at their precision, dropped channels zeroed) into the engine's full slots,
    which must hold every expert; returns the full-precision pattern to activate (the same kept experts)."""
    spec, family = patterned.spec, weights.store.manifest.family
    for layer in spec.moe_layers:
        module = patterned.experts_module(layer)
        slot_of = patterned.slots[layer].slot_of
        for expert in plan.pattern.kept(layer):
            kept = plan.channels.get(layer, {}).get(expert)
            tensors = weights.expert(layer, expert, plan.pattern.precision(layer, expert), kept is not None)
            if kept is not None:
                tensors = zero_channels(family, tensors, kept, weights.transposed)
            write_slot(module, slot_of[expert], tensors)
    return Pattern.build(spec, plan.pattern.layers)


def evaluate_channels(
    store: Store,
    profiles: dict[str, Profile],
    data: dict[str, TaskData],
    *,
    budgets: Sequence[float],
    precisions: Sequence[str],
    criteria: Sequence[str] = CHANNEL_CRITERIA,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    demos: dict[str, list[Demo]] | None = None,
    device: str | None = None,
    progress: bool = True,
    answer_margin: int = 2,
) -> ChannelEvalResult:
    """Every task under expert-level mixed precision and each criterion's channel plans at each budget (see the
    module doc). With a task's `demos`, precisions are weighed by their error measured on them."""
    unknown = [c for c in criteria if c not in CHANNEL_CRITERIA]
    if unknown:
        raise InvalidArgument(
            f"unknown channel criteria {unknown} (use {', '.join(CHANNEL_CRITERIA)})", field="channels"
        )
    copies = quantized_copies(store.manifest)
    groups = {copies[p].group_size for p in precisions if copies[p].group_size}
    group_size = groups.pop() if len(groups) == 1 else 64
    unit = bf16_nbytes(store.manifest)
    options = store_options(store, full_nbytes=unit, precisions=(FULL, *precisions))
    shape = ExpertShape.of(store.manifest)
    counts = channel_counts(shape.intermediate, fractions)
    patterned, _ = load_model(store, device=device)
    spec = patterned.spec
    full = Pattern.full(spec)
    patterned.apply(full, store)
    weights = PlanWeights(store)
    total = unit * spec.num_experts * len(spec.moe_layers)
    result = ChannelEvalResult(
        budgets=[f"{b:g}" for b in budgets],
        precisions=list(precisions),
        channel_counts=counts,
        intermediate=shape.intermediate,
    )

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)

    def measure(task: TaskData) -> float:
        if task.exact:
            return exact_match(patterned.model, tokenizer, task.items, margin=answer_margin)
        return mean_nll(patterned.model, tokenizer, task.items)

    methods = [EXPERT_LEVEL, *(f"channels-{c}" for c in criteria)]
    bar = tqdm(total=len(data) * (1 + len(budgets) * len(methods)), desc="eval channels", disable=not progress)
    for name, task in data.items():
        profile = profiles[name]
        metric = result.metric[name] = "accuracy" if task.exact else "nll"
        result.items[name] = len(task.items)
        install_plan(patterned, weights, ChannelPlan(full, {}, 0, {}))
        patterned.activate(full)
        result.full[name] = measure(task)
        bar.update()
        measured = bool(demos and demos.get(name))
        task_options = demo_errors(store, demos[name], options) if measured else options  # type: ignore[index]
        kept_by = (
            channel_kept(store, demos[name], {c: profile.channel_score(c) for c in criteria}, counts)  # type: ignore[index]
            if measured
            else {}
        )
        scores = profile.score(OBJECTIVE_CRITERION["error"])
        kept: dict[str, dict[str, float]] = {m: {} for m in methods}
        shares: dict[str, dict[str, float]] = {m: {} for m in methods}
        experts: dict[str, dict[str, int]] = {m: {} for m in methods}
        channel_shares: dict[str, dict[str, float]] = {m: {} for m in methods}
        for budget in budgets:
            key = f"{budget:g}"
            plans: dict[str, ChannelPlan | None] = {}
            try:
                expert_plan = select_precisions(scores, spec, task_options, int(budget * total))
                plans[EXPERT_LEVEL] = ChannelPlan(expert_plan.pattern, {}, expert_plan.nbytes, {})
            except InvalidArgument:  # below the routing floor at the cheapest precision
                plans[EXPERT_LEVEL] = None
            for criterion in criteria:
                channel_scores = profile.channel_score(criterion)
                sliced = channel_options(
                    task_options, channel_scores, shape, counts, group_size, kept_by.get(criterion)
                )
                try:
                    plans[f"channels-{criterion}"] = select_channels(
                        scores, channel_scores, spec, sliced, int(budget * total)
                    )
                except InvalidArgument:
                    plans[f"channels-{criterion}"] = None
            for method, plan in plans.items():
                if plan is None:
                    kept[method][key] = shares[method][key] = channel_shares[method][key] = float("nan")
                    experts[method][key] = 0
                else:
                    patterned.activate(install_plan(patterned, weights, plan))
                    kept[method][key] = retention(metric, result.full[name], measure(task))
                    shares[method][key] = plan.nbytes / total
                    experts[method][key] = plan.pattern.size
                    held = sum(
                        plan.channel_count(layer, e, shape.intermediate)
                        for layer in spec.moe_layers
                        for e in plan.pattern.kept(layer)
                    )
                    channel_shares[method][key] = held / (plan.pattern.size * shape.intermediate)
                bar.update()
        result.retention[name], result.share[name] = kept, shares
        result.experts[name], result.channel_share[name] = experts, channel_shares
    bar.close()
    return result


def markdown(result: ChannelEvalResult) -> str:
    """Retention per task (rows: methods) and budget (columns), then the worst task of each method."""
    budgets = result.budgets
    header = "| task | metric | method | " + " | ".join(f"{float(b):.3%}".rstrip("0").rstrip(".") for b in budgets)
    lines = [header + " |", "|" + "---|" * (3 + len(budgets))]
    for task, by_method in result.retention.items():
        shown = "accuracy" if result.metric[task] == "accuracy" else "perplexity"
        for i, (method, by_budget) in enumerate(by_method.items()):
            cells = []
            for b in budgets:
                value = by_budget.get(b, float("nan"))
                held = result.experts[task][method].get(b, 0)
                channels = result.channel_share[task][method].get(b, float("nan"))
                cells.append(
                    "-"
                    if math.isnan(value)
                    else f"{value:.3f} ({held}e" + (f", {channels:.0%}ch)" if channels < 1 else ")")
                )
            first = f"| {task} | {shown} |" if i == 0 else "| | |"
            lines.append(f"{first} {method} | " + " | ".join(cells) + " |")
    methods = list(next(iter(result.retention.values())))
    for i, method in enumerate(methods):
        cells = []
        for b in budgets:
            values = [result.retention[t][method][b] for t in result.retention]
            cells.append("-" if any(math.isnan(v) for v in values) else f"{min(values):.3f}")
        lines.append(("| **worst task** | |" if i == 0 else "| | |") + f" {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Retention: pruned / full accuracy, or full / pruned perplexity. Budgets are shares of the routed experts' "
        "bytes at 16 bits per parameter; quantized experts and channel slices count packed bytes with scales and zero "
        f"points. In brackets: experts kept, and the share of their channels held (grid: {result.channel_counts} of "
        f"{result.intermediate}).",
    ]
    return "\n".join(lines) + "\n"


def write_channel_reports(result: ChannelEvalResult, out: Path) -> list[Path]:
    """`out/channels.json`, `out/channels.md`, `out/channels.png`."""
    return write_files(out, "channels", result.to_json(), markdown(result), lambda path: plot(result, path))


def plot(result: ChannelEvalResult, path: Path) -> Path:
    curves = curves_of(result.retention, lambda method: "--" if method == EXPERT_LEVEL else "-")
    return retention_grid(curves, "share of the experts' bf16 bytes", path, log2_x=True)
