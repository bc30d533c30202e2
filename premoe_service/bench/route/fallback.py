"""What a no-match gets: the quality the union fallback keeps on each task's data, beside the task's own pattern.

Run it as `python -m premoe_service.bench.route.fallback --store var/reference-store --profiles profiles
--background reference/offtopic/background.jsonl`. For every eval prompt of a task the registry's decision is
taken as if nothing matched (threshold 1): its fallback tasks are the ones within the union margin of the top
task's similarity (at most three), and their patterns are unioned and trimmed to the slot capacity of the budget,
as the server does. Prompts are grouped by fallback and the task metric (exact-match accuracy, or per-token NLL
for text tasks, retention = full / pruned perplexity) is measured per group and averaged over prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from pathlib import Path

from ...evaluation.metrics import EvalItem, exact_match, mean_nll
from ...evaluation.run import TaskData, load_task_data, retention
from ...pattern import Pattern
from ...profiler import Selection
from ...retrieval import Embedder, LocalProfileStore, Registry, load_route_records
from ...runtime.build import load_model
from ...runtime.residency import Budget
from ...runtime.router_signal import RouterSignal
from ...serving.tasks import TaskBook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--profiles", required=True, type=Path)
    parser.add_argument("--background", required=True, type=Path)
    parser.add_argument("--data", type=Path, default=Path("reference/tasks"))
    parser.add_argument("--budget", type=float, default=0.5, help="share of the routed experts the slots hold")
    parser.add_argument("--limit", type=int, default=50, help="eval items per task")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from ...store import Store

    store = Store(args.store)
    patterned, _ = load_model(store, Budget(fraction=1.0))
    tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
    background = [r.query for r in load_route_records(args.background)]
    registry = Registry(
        LocalProfileStore(args.profiles),
        embedder=Embedder(),
        signal=RouterSignal.from_store(store, dense=patterned.dense_state_dict()),
        background=background,
    )
    # every prompt takes the fallback: no similarity reaches the floors (with and without the none-class)
    registry.policy = dataclasses.replace(registry.policy, threshold=1.0, background_floor=1.0)
    capacity = Budget(fraction=args.budget).slots_per_layer(patterned.spec, store.manifest.expert_nbytes)
    book = TaskBook(registry, store, patterned.spec, Selection(), patterned)
    book.max_per_layer = capacity
    names = registry.names()
    data = load_task_data(args.data, names, args.limit)

    def measure(task: TaskData, items: list[EvalItem], pattern: Pattern) -> float:
        patterned.apply(pattern, store)
        return (
            exact_match(patterned.model, tokenizer, items)
            if task.exact
            else mean_nll(patterned.model, tokenizer, items)
        )

    print(f"budget {args.budget:g} ({capacity} of {patterned.spec.num_experts} experts per layer), {args.limit} items")
    print(f"{'task':<12} {'metric':<8} {'full':>7} {'own':>7} {'fallback':>9}  most common fallback")
    for name in names:
        task = data[name]
        metric = "accuracy" if task.exact else "nll"
        full = measure(task, task.items, Pattern.full(patterned.spec))
        own = measure(task, task.items, book.pattern(registry.get(name)))
        groups: dict[tuple[str, ...], list[EvalItem]] = {}
        for item in task.items:
            decision = registry.route(item.prompt or item.text[:200])
            groups.setdefault(tuple(decision.fallback_tasks), []).append(item)
        total = 0.0
        for tasks, items in groups.items():
            total += len(items) * measure(task, items, book.fallback_pattern(list(tasks), capacity))
        fallback = total / len(task.items)
        common = Counter({k: len(v) for k, v in groups.items()}).most_common(1)[0]
        print(
            f"{name:<12} {metric:<8} {full:>7.3f} {retention(metric, full, own):>7.3f} "
            f"{retention(metric, full, fallback):>9.3f}  {'+'.join(common[0])} ({common[1]} of {len(task.items)})"
        )


if __name__ == "__main__":
    main()
