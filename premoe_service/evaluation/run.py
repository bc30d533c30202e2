"""`premoe eval`: quality kept per task, criterion and budget; the cross-task matrix; retrieval accuracy."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import InvalidArgument, NotFound
from ..pattern import Pattern
from ..profiler import CRITERIA, DEFAULT_CRITERION, Profile, Selection, select
from ..runtime.build import load_model
from ..runtime.model import PatternedModel
from ..store import Store
from .metrics import EvalItem, exact_match, mean_nll, perplexity

RANDOM = "random"  # the random floor, measured beside the criteria
EVAL_CRITERIA: tuple[str, ...] = (*CRITERIA, RANDOM)  # what `criteria` of `evaluate_grid` may name


@dataclass
class TaskData:
    name: str
    items: list[EvalItem]

    @property
    def exact(self) -> bool:
        return self.items[0].exact


def load_eval_items(path: Path, limit: int | None = None) -> list[EvalItem]:
    """Read `{"prompt", "answer"}` or `{"text"}` records; errors name the line."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"not JSON ({exc.msg})", field=f"{path.name} line {number}") from exc
        if "prompt" in record and "answer" in record:
            items.append(EvalItem(prompt=str(record["prompt"]), answer=str(record["answer"])))
        elif "text" in record:
            items.append(EvalItem(text=str(record["text"])))
        else:
            raise InvalidArgument('expected {"prompt", "answer"} or {"text"}', field=f"{path.name} line {number}")
    if not items:
        raise InvalidArgument(f"{path} holds no items", field=str(path))
    if len({i.exact for i in items}) != 1:
        raise InvalidArgument("a task's items are all exact-match or all text", field=str(path))
    return items[:limit] if limit else items


RETRIEVAL_ITEMS = 50  # eval prompts per task that the retrieval figure routes


@dataclass
class EvalResult:
    """Metrics: `full[task]`, `grid[task][criterion][budget]`, `cross[pattern_task][data_task]`, retrieval."""

    metric: dict[str, str] = field(default_factory=dict)  # task -> "accuracy" | "nll"
    full: dict[str, float] = field(default_factory=dict)
    grid: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    retention: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    cross: dict[str, dict[str, float]] = field(default_factory=dict)
    cross_budget: float = 0.5
    cross_criterion: str = ""
    retrieval_top1: float | None = None
    retrieval_tasks: list[str] = field(default_factory=list)  # the tasks whose eval prompts retrieval_top1 covers
    retrieval_prompts: int = 0  # how many prompts it counts (the first RETRIEVAL_ITEMS of each task)
    items: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def retention(metric: str, full: float, pruned: float) -> float:
    """Accuracy ratio; for likelihood tasks the ratio of full to pruned perplexity."""
    if metric == "accuracy":
        return pruned / full if full > 0 else float("nan")
    return perplexity(full) / perplexity(pruned)


def random_pattern(patterned: PatternedModel, budget: float, seed: int) -> Pattern:
    """The random floor: uniformly random experts, the same count per layer as a uniform budget."""
    rng = random.Random(seed)
    spec = patterned.spec
    count = max(spec.top_k, round(budget * spec.num_experts))
    scores = [[rng.random() for _ in range(spec.num_experts)] for _ in spec.moe_layers]
    return select(torch.tensor(scores), spec, Selection("tcess", "top_k", count, "experts"))


def evaluate_grid(
    store: Store,
    profiles: dict[str, Profile],
    data: dict[str, TaskData],
    *,
    criteria: Sequence[str],
    budgets: Sequence[float],
    cross_criterion: str = DEFAULT_CRITERION,
    cross_budget: float = 0.5,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    router: Callable[[str], str | None] | None = None,
    answer_margin: int = 2,
) -> EvalResult:
    """Every task under every criterion and budget (fraction of routed experts, spread by the global
    budget policy), the random floor, the full model, and task A's pattern on task B's data."""
    unknown = [c for c in criteria if c not in EVAL_CRITERIA]
    if unknown:
        raise InvalidArgument(f"unknown criteria {unknown} (use {', '.join(EVAL_CRITERIA)})", field="criteria")
    if cross_criterion not in CRITERIA:
        raise InvalidArgument(
            f"unknown criterion {cross_criterion!r} (use {', '.join(CRITERIA)})", field="cross_criterion"
        )
    patterned, _ = load_model(store, device=device)
    spec = patterned.spec
    result = EvalResult(cross_budget=cross_budget, cross_criterion=cross_criterion)

    def measure(task: TaskData, pattern: Pattern) -> float:
        patterned.apply(pattern, store)
        if task.exact:
            return exact_match(patterned.model, tokenizer, task.items, margin=answer_margin)
        return mean_nll(patterned.model, tokenizer, task.items)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
    jobs = len(data) * (1 + len(budgets) * len(criteria)) + len(data) * len(data)
    bar = tqdm(total=jobs, desc="eval", unit="run", disable=not progress)
    full = Pattern.full(spec)
    for name, task in data.items():
        result.metric[name] = "accuracy" if task.exact else "nll"
        result.items[name] = len(task.items)
        result.full[name] = measure(task, full)
        bar.update()
        result.grid[name], result.retention[name] = {}, {}
        for criterion in criteria:
            result.grid[name][criterion], result.retention[name][criterion] = {}, {}
            for budget in budgets:
                key = f"{budget:g}"
                if budget * spec.num_experts < spec.routing.min_experts:  # below routing's floor: no pattern
                    result.grid[name][criterion][key] = result.retention[name][criterion][key] = float("nan")
                    bar.update()
                    continue
                if criterion == RANDOM:
                    pattern = random_pattern(patterned, budget, seed)
                else:
                    scores = profiles[name].score(criterion)
                    pattern = select(scores, spec, Selection(criterion, "budget", budget, "fraction"))
                value = measure(task, pattern)
                result.grid[name][criterion][key] = value
                result.retention[name][criterion][key] = retention(result.metric[name], result.full[name], value)
                bar.update()
    for source, profile in profiles.items():
        if source not in data:
            continue
        pattern = select(
            profile.score(cross_criterion), spec, Selection(cross_criterion, "budget", cross_budget, "fraction")
        )
        result.cross[source] = {}
        for target, task in data.items():
            value = measure(task, pattern)
            result.cross[source][target] = retention(result.metric[target], result.full[target], value)
            bar.update()
    bar.close()
    if router is not None:
        hits = total = 0
        for name, task in data.items():
            for item in task.items[:RETRIEVAL_ITEMS]:
                total += 1
                hits += router(item.prompt or item.text[:200]) == name
        result.retrieval_top1 = hits / total if total else None
        result.retrieval_tasks = sorted(data)
        result.retrieval_prompts = total
    return result


def load_task_data(tasks_dir: Path, names: Sequence[str], limit: int | None) -> dict[str, TaskData]:
    data = {}
    for name in names:
        path = tasks_dir / name / "eval.jsonl"
        if not path.exists():
            raise NotFound(f"no evaluation set at {path}", field="tasks")
        data[name] = TaskData(name, load_eval_items(path, limit))
    return data
