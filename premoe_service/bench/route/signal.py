"""Retrieval on both signals, measured: each signal alone and combined, no-match against an off-topic background,
and the router pass's cost beside the raw embed + search.

Run it as `python -m premoe_service.bench.route.signal --store var/reference-store --profiles profiles
--background reference/offtopic/background.jsonl --queries reference/heldout/queries.jsonl`. The calibration
(weights chosen, per-task leads) uses only the demos and the background; the queries are for reporting.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from ...retrieval import (
    Embedder,
    LocalProfileStore,
    MemoryProfileStore,
    Registry,
    RoutePolicy,
    RouteRecord,
    evaluate,
    load_route_records,
)
from ...retrieval.task_leads import calibrate
from ...runtime.router_signal import RouterSignal


def variants(base: RoutePolicy) -> dict[str, RoutePolicy]:
    """The decisions compared: each signal alone and the combination, all against the same none-class."""
    replace = dataclasses.replace
    return {
        "embedding alone": replace(base, input_weight=0.0, distribution_weight=0.0),
        "router distribution alone": replace(base, embedding_weight=0.0, input_weight=0.0, distribution_weight=1.0),
        "router input alone": replace(base, embedding_weight=0.0, input_weight=1.0, distribution_weight=0.0),
        "embedding + router distribution": replace(base, input_weight=0.0, distribution_weight=2.0),
        "embedding + router input": base,
    }


def report(name: str, registry: Registry, records: list[RouteRecord]) -> None:
    result = evaluate(registry, records)
    per = " ".join(f"{t}={e.top1_accuracy:.2f}" for t, e in result.per_task.items() if e.queries)
    worst = min(e.top1_accuracy for e in result.per_task.values() if e.queries)
    print(
        f"{name:<34} top-1 {result.top1_accuracy:.3f} (worst {worst:.2f}); off-topic rejected "
        f"{result.no_match_recall:.3f}, on-task lost {result.on_task_rejected:.3f}\n    {per}"
    )


def latency(registry: Registry, prompts: list[str], repeats: int) -> None:
    """Per prompt, one at a time and interleaved (so that load from elsewhere hits each alike): raw embed +
    search, the router pass, and the whole route; the best of `repeats` passes over the prompts."""
    embedder, index = registry.embedder, registry.index
    signal = registry.evidence.signal if registry.evidence is not None else None
    steps: dict[str, Callable[[str], object]] = {
        "raw": lambda p: index.search(embedder.encode([p]), registry.policy.neighbours),
        "route": registry.route,
    }
    if signal is not None:
        steps["router"] = lambda p: signal.features([p])
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        spent = dict.fromkeys(steps, 0.0)
        for prompt in prompts:
            for name, step in steps.items():
                start = time.perf_counter()
                step(prompt)
                spent[name] += time.perf_counter() - start
        best = {name: min(best[name], spent[name] / len(prompts) * 1e3) for name in steps}
    raw, route, router = best["raw"], best["route"], best.get("router", 0.0)
    tokens = statistics.mean(len(signal.tokenizer(p)["input_ids"]) for p in prompts) if signal else 0.0
    print(
        f"latency per prompt ({len(prompts)} prompts, mean {tokens:.1f} tokens, best of {repeats}): raw embed+search "
        f"{raw:.2f} ms; router pass {router:.2f} ms ({router / max(tokens, 1) * 1e3:.1f} us per prompt token); route "
        f"{route:.2f} ms = {route / raw:.2f}x raw; route without the router pass {(route - router) / raw:.2f}x raw"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--profiles", required=True, type=Path)
    parser.add_argument("--background", required=True, type=Path)
    parser.add_argument("--queries", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, help="folder of <task>/eval.jsonl: also report top-1 on the first 50 each")
    args = parser.parse_args()
    from ...store import Store

    embedder = Embedder()
    signal = RouterSignal.from_store(Store(args.store))
    background = [r.query for r in load_route_records(args.background)]
    records = load_route_records(args.queries)
    plain = Registry(LocalProfileStore(args.profiles), embedder=embedder)
    print(f"{len(records)} queries ({sum(r.task is not None for r in records)} on-task); {len(background)} background")
    report("embedding alone, threshold 0.18", plain, records)
    registry = Registry(LocalProfileStore(args.profiles), embedder=embedder, signal=signal, background=background)
    base = registry.policy
    for name, policy in variants(base).items():
        registry.policy = policy
        report(f"{name}, lead {policy.min_lead}", registry, records)
    registry.policy = base
    if args.data is not None:
        own = own_records(args.data, registry.names())
        report("own eval prompts, embedding alone", plain, own)
        report("own eval prompts, embedding + router input", registry, own)
    calibration = calibrate(registry)
    print(
        f"calibrated per-task leads (demos + lines vs background): {calibration.task_leads}; calibration positives "
        f"lost {calibration.positives_lost:.3f}, background rejected {calibration.background_rejected:.3f}"
    )
    for name, policy in variants(base).items():
        if name.startswith("embedding"):
            registry.policy = dataclasses.replace(policy, task_leads=calibrate_for(registry, policy))
            report(f"{name}, per-task leads", registry, records)
    # Latency as the server sees it with the registry in memory (no store version check per call).
    memory = Registry(MemoryProfileStore(), embedder=embedder, signal=signal, background=background)
    for name in registry.names():
        memory.register(registry.get(name))
    latency(memory, [r.query for r in records], args.repeats)


def own_records(folder: Path, names: list[str], per_task: int = 50) -> list[RouteRecord]:
    """The first eval prompts of each task, as `premoe eval`'s retrieval figure routes them."""
    from ...evaluation.run import load_task_data

    data = load_task_data(folder, names, per_task)
    return [RouteRecord(i.prompt or i.text[:200], name) for name, task in data.items() for i in task.items]


def calibrate_for(registry: Registry, policy: RoutePolicy) -> dict[str, float]:
    saved = registry.policy
    registry.policy = policy
    try:
        return calibrate(registry).task_leads
    finally:
        registry.policy = saved


if __name__ == "__main__":
    main()
