"""Evaluation reports: a Markdown table, the JSON, and a PNG of retention against budget per criterion."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .run import RETRIEVAL_ITEMS, EvalResult


def _fmt(value: float, metric: str) -> str:
    return f"{value:.3f}" if metric == "accuracy" else f"{math.exp(value):.2f}"


def markdown(result: EvalResult) -> str:
    """Per task: the full model's metric, then retention per criterion (rows) and budget (columns)."""
    lines = []
    budgets = sorted({b for t in result.retention.values() for c in t.values() for b in c}, key=float, reverse=True)
    criteria = sorted({c for t in result.retention.values() for c in t})
    header = "| task | metric | full | criterion | " + " | ".join(f"{float(b):.1%}" for b in budgets) + " |"
    lines += [header, "|" + "---|" * (4 + len(budgets))]
    for task, by_criterion in result.retention.items():
        metric = result.metric[task]
        shown = "accuracy" if metric == "accuracy" else "perplexity"
        for i, criterion in enumerate(criteria):
            cells = [f"{by_criterion[criterion].get(b, float('nan')):.3f}" for b in budgets]
            first = f"| {task} | {shown} | {_fmt(result.full[task], metric)} |" if i == 0 else "| | | |"
            lines.append(f"{first} {criterion} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Retention: pruned / full accuracy, or full / pruned perplexity; budgets are shares of routed experts."
    )
    if result.cross:
        tasks = list(result.cross)
        lines += [
            "",
            f"Cross-task retention at {result.cross_budget:.0%} ({result.cross_criterion}): "
            "rows are the pattern's task, columns the data's task.",
            "",
            "| pattern \\ data | " + " | ".join(tasks) + " |",
            "|" + "---|" * (1 + len(tasks)),
        ]
        for source in tasks:
            row = [f"{result.cross[source].get(t, float('nan')):.3f}" for t in tasks]
            lines.append(f"| {source} | " + " | ".join(row) + " |")
    if result.retrieval_top1 is not None:
        lines += ["", retrieval_label(result)]
    return "\n".join(lines) + "\n"


def retrieval_label(result: EvalResult) -> str:
    """The retrieval figure with what it covers: which tasks' eval prompts, how many, routed among which profiles."""
    tasks = result.retrieval_tasks
    return (
        f"Retrieval top-1 accuracy over the eval prompts of the {len(tasks)} evaluated tasks "
        f"({', '.join(tasks)}; first {RETRIEVAL_ITEMS} each, {result.retrieval_prompts} prompts; "
        f"routed among these tasks' profiles only): {result.retrieval_top1:.3f}"
    )


def write_reports(result: EvalResult, out: Path) -> list[Path]:
    """`out/eval.json`, `out/eval.md`, `out/retention.png`."""
    return write_files(out, "eval", result.to_json(), markdown(result), lambda path: plot(result, path), "retention")


def write_files(
    out: Path, stem: str, payload: dict[str, Any], text: str, draw: Callable[[Path], Path], picture: str | None = None
) -> list[Path]:
    """An evaluation's report files: `out/STEM.json`, `out/STEM.md` and the plot `out/PICTURE.png` (default STEM)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text)
    return [out / f"{stem}.json", out / f"{stem}.md", draw(out / f"{picture or stem}.png")]


def plot(result: EvalResult, path: Path) -> Path:
    return retention_grid(
        curves_of(result.retention, lambda c: "--" if c == "random" else "-"), "share of routed experts kept", path
    )


def curves_of(retention: dict[str, dict[str, dict[str, float]]], style: Callable[[str], str]) -> dict[str, list[Curve]]:
    """Per task, one curve per method: its (budget, retention) points in budget order (NaN cells left out), drawn
    in the line style `style` gives the method."""
    return {
        task: [
            (method, sorted((float(b), v) for b, v in by_budget.items() if not math.isnan(v)), style(method))
            for method, by_budget in sorted(methods.items())
        ]
        for task, methods in retention.items()
    }


Curve = tuple[str, list[tuple[float, float]], str]  # label, (budget, retention) points, line style


def retention_grid(curves: dict[str, list[Curve]], xlabel: str, path: Path, *, log2_x: bool = False) -> Path:
    """One panel of retention against budget per task, up to four panels a row; written as a PNG to `path`."""
    from ..plotting import pyplot

    plt = pyplot()

    tasks = list(curves)
    columns = min(4, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for label, points, style in curves[task]:
            ax.plot([x for x, _ in points], [y for _, y in points], style, marker="o", label=label)
        if log2_x:
            ax.set_xscale("log", base=2)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("retention")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
