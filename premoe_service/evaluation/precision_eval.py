"""`premoe eval --precisions`: drop-only, uniform quantization and mixed precision at the same byte budgets.

Budgets are shares of the routed experts' bytes at 16 bits per parameter (bf16, what MoE checkpoints ship in),
whatever the store's dtype. Per task and budget:
- `drop`: EASY-EP's pattern under the global budget policy, each kept expert counted at 16 bits (on an fp32
  store it computes at fp32: a slight favour to this baseline);
- `uniform`: every expert at the highest quantized precision whose bytes fit (none: the cell stays empty);
- `mixed-<objective>`: `select_precisions`, each expert dropped or at one precision, quantized copies counted
  with their scales and zero points, full-precision experts at 16 bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import InvalidArgument
from ..pattern import FULL, Pattern
from ..profiler import Profile, Selection, select
from ..profiler.demo_error import demo_errors
from ..profiler.demos import Demo
from ..profiler.precision_plan import OBJECTIVE_CRITERION, OBJECTIVES, bf16_nbytes, select_precisions, store_options
from ..runtime.build import load_model
from ..runtime.quantized import attach_precisions
from ..store import Store
from .metrics import exact_match, mean_nll
from .report import curves_of, retention_grid, write_files
from .run import TaskData, retention

DROP, UNIFORM = "drop", "uniform"


@dataclass
class PrecisionEvalResult:
    """`retention[task][method][budget]`, the bytes each plan holds (share of bf16 bytes), and what uniform used."""

    metric: dict[str, str] = field(default_factory=dict)
    full: dict[str, float] = field(default_factory=dict)
    retention: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    share: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    uniform: dict[str, str] = field(default_factory=dict)  # budget -> precision of the uniform row ("" none)
    precisions: list[str] = field(default_factory=list)
    group_size: int = 0
    items: dict[str, int] = field(default_factory=dict)
    demo_measured: list[str] = field(default_factory=list)  # tasks whose precision errors were measured on demos

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def evaluate_precisions(
    store: Store,
    profiles: dict[str, Profile],
    data: dict[str, TaskData],
    *,
    budgets: Sequence[float],
    precisions: Sequence[str],
    objectives: Sequence[str] = OBJECTIVES,
    demos: dict[str, list[Demo]] | None = None,
    device: str | None = None,
    progress: bool = True,
    answer_margin: int = 2,
) -> PrecisionEvalResult:
    """Every task under drop-only, uniform and mixed-precision plans at each budget (share of bf16 bytes). With a
    task's `demos`, the mixed plans weigh each precision by its error measured on them (`profiler.demo_error`),
    else by the relative weight error the store recorded."""
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise InvalidArgument(f"unknown objectives {unknown} (use {', '.join(OBJECTIVES)})", field="objectives")
    unit = bf16_nbytes(store.manifest)
    options = store_options(store, full_nbytes=unit, precisions=(FULL, *precisions))
    patterned, _ = load_model(store, device=device)
    spec = patterned.spec
    attach_precisions(patterned, store, dict.fromkeys(precisions, spec.num_experts))
    total = unit * spec.num_experts * len(spec.moe_layers)
    experts = spec.num_experts * len(spec.moe_layers)
    result = PrecisionEvalResult(precisions=list(precisions))
    copies = [o for o in options.values() if o.precision != FULL]
    result.group_size = _group_size(store, precisions)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)

    def measure(task: TaskData, pattern: Pattern) -> float:
        patterned.apply(pattern, store)
        if task.exact:
            return exact_match(patterned.model, tokenizer, task.items, margin=answer_margin)
        return mean_nll(patterned.model, tokenizer, task.items)

    methods = [DROP, UNIFORM, *(f"mixed-{o}" for o in objectives)]
    bar = tqdm(total=len(data) * (1 + len(budgets) * len(methods)), desc="eval precisions", disable=not progress)
    for budget in budgets:
        fitting = [o for o in copies if o.nbytes * experts <= budget * total]
        result.uniform[f"{budget:g}"] = max(fitting, key=lambda o: o.nbytes).precision if fitting else ""
    for name, task in data.items():
        metric = result.metric[name] = "accuracy" if task.exact else "nll"
        result.items[name] = len(task.items)
        result.full[name] = measure(task, Pattern.full(spec))
        bar.update()
        task_options = options
        if demos and demos.get(name):
            task_options = demo_errors(store, demos[name], options)
            result.demo_measured.append(name)
        kept: dict[str, dict[str, float]] = {m: {} for m in methods}
        shares: dict[str, dict[str, float]] = {m: {} for m in methods}
        for budget in budgets:
            key = f"{budget:g}"
            plans: dict[str, tuple[Pattern, float] | None] = {}
            try:
                pattern = select(
                    profiles[name].score("easyep"), spec, Selection("easyep", "budget", budget, "fraction")
                )
                plans[DROP] = (pattern, pattern.size * unit / total)
            except InvalidArgument:  # below the routing floor: dropping alone cannot reach this budget
                plans[DROP] = None
            uniform = result.uniform[key]
            plans[UNIFORM] = None
            if uniform:
                layers = {layer: range(spec.num_experts) for layer in spec.moe_layers}
                lowered = {layer: dict.fromkeys(range(spec.num_experts), uniform) for layer in spec.moe_layers}
                plans[UNIFORM] = (Pattern.build(spec, layers, lowered), options[uniform].nbytes * experts / total)
            for objective in objectives:
                scores = profiles[name].score(OBJECTIVE_CRITERION[objective])
                plan = select_precisions(scores, spec, task_options, int(budget * total), objective)  # type: ignore[arg-type]
                plans[f"mixed-{objective}"] = (plan.pattern, plan.nbytes / total)
            for method, chosen in plans.items():
                if chosen is None:
                    kept[method][key] = shares[method][key] = float("nan")
                else:
                    kept[method][key] = retention(metric, result.full[name], measure(task, chosen[0]))
                    shares[method][key] = chosen[1]
                bar.update()
        result.retention[name], result.share[name] = kept, shares
    bar.close()
    return result


def _group_size(store: Store, precisions: Sequence[str]) -> int:
    from ..store.quantized_copies import quantized_copies

    copies = quantized_copies(store.manifest)
    sizes = {copies[p].group_size for p in precisions if copies[p].group_size}  # a float copy has no groups
    return sizes.pop() if len(sizes) == 1 else 0


def markdown(result: PrecisionEvalResult) -> str:
    """Retention per task (rows: methods) and budget (columns: shares of the experts' bf16 bytes)."""
    budgets = sorted(result.uniform, key=float, reverse=True)
    lines = [
        "| task | metric | method | " + " | ".join(f"{float(b):.2%}" for b in budgets) + " |",
        "|" + "---|" * (3 + len(budgets)),
    ]
    for task, by_method in result.retention.items():
        shown = "accuracy" if result.metric[task] == "accuracy" else "perplexity"
        for i, (method, by_budget) in enumerate(by_method.items()):
            cells = []
            for b in budgets:
                value = by_budget.get(b, float("nan"))
                if method == UNIFORM and result.uniform[b]:
                    cells.append(f"{value:.3f} ({result.uniform[b]})")
                else:
                    cells.append("-" if math.isnan(value) else f"{value:.3f}")
            first = f"| {task} | {shown} |" if i == 0 else "| | |"
            lines.append(f"{first} {method} | " + " | ".join(cells) + " |")
    worst = {
        m: {b: min(result.retention[t][m][b] for t in result.retention) for b in budgets}
        for m in next(iter(result.retention.values()))
    }
    for i, (method, by_budget) in enumerate(worst.items()):
        cells = ["-" if math.isnan(v) else f"{v:.3f}" for v in by_budget.values()]
        lines.append(("| **worst task** | |" if i == 0 else "| | |") + f" {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Retention: pruned / full accuracy, or full / pruned perplexity. Budgets are shares of the routed experts' "
        "bytes at 16 bits per parameter; quantized experts count their packed bytes with scales and zero points"
        + (f" (groups of {result.group_size})." if result.group_size else " (bf16 copies: their cast tensors)."),
    ]
    return "\n".join(lines) + "\n"


def write_precision_reports(result: PrecisionEvalResult, out: Path) -> list[Path]:
    """`out/precision.json`, `out/precision.md`, `out/precision.png`."""
    return write_files(out, "precision", result.to_json(), markdown(result), lambda path: plot(result, path))


def plot(result: PrecisionEvalResult, path: Path) -> Path:
    curves = curves_of(result.retention, lambda method: "-" if method.startswith("mixed") else "--")
    return retention_grid(curves, "share of the experts' bf16 bytes", path, log2_x=True)
