"""`premoe bench scale`: residency, selection, routing constraints and the registry at DeepSeek-V3's shape.

Residency: 1,000 synthetic tasks (`scale_tasks.SyntheticTasks`: overlapping clusters of experts, compared with the
measured reference profiles in the report), a locality stream over them, and for each budget from 10% to 60% the
real `Residency` over the real DeepSeek-V3 transformers class's slots (tiny tensors; each expert counts its real
FP8 bytes) with each task's pattern from the real selection under group-limited routing: planning time per request,
bytes moved, hit rate; full reload and Belady's oracle on the same stream (simulated without slots, `oracle.py`).
Registry: start-up time and memory with 10,000 profile files, and route latency among them (`registry.py`).

Run it as `python -m premoe_service.bench.scale [--tasks N] [--requests N] [--registry-tasks N] ...`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from ...pattern import Pattern
from ...profiler import Selection
from ...profiler.profile import Profile
from ...runtime.eviction import SharedUseTracker
from ...runtime.residency import Budget, Residency
from ...store.reader import Store, TierStats
from ..common import machine, parse_options, target
from ..switch import oracle
from ..switch.benchmark import oracle_summary, parse_budgets
from ..switch.replay import replay, summarise
from ..switch.streams import locality_stream, switches
from . import registry
from .tasks import EXPERT_NBYTES_FP8, Shape, SyntheticTasks, deepseek_engine, pattern_of, resemblance


@dataclass
class ScaleOptions:
    """Settings of `premoe bench scale` (defaults: DeepSeek-V3's shape, a few minutes on 2 cores)."""

    tasks: int = 1000
    requests: int = 2000
    budgets: str = "0.1,0.2,0.3,0.4,0.5,0.6"
    zipf: float = 1.1
    mean_burst: float = 4.0
    seed: int = 0
    half_life: float = 64.0  # of the shared-use refinement, in requests
    no_refinement: bool = False
    expert_bytes: int = EXPERT_NBYTES_FP8
    registry_tasks: int = 10000  # 0 skips the registry part
    demos_per_task: int = 8
    route_prompts: int = 40
    route_rounds: int = 5
    threads: int = 2
    profiles: str = "profiles"  # measured profiles to compare the synthetic ones with, and demo vectors to scatter
    model: str = "models/reference-moe"  # the model those profiles were measured on (its config)
    data: str = "reference/tasks"  # eval texts the route prompts are cut from
    workdir: str = "var/bench-scale-profiles"  # the registry's profile files, removed afterwards
    moe_layers: int = 58
    experts: int = 256
    groups: int = 8
    topk_group: int = 4
    top_k: int = 8
    out: str | None = "var/bench-scale.json"
    plot: str | None = "var/bench-scale.png"
    quiet: bool = False


class _Books:
    """The residency's store argument: planning reads no expert, so only the tier counters are needed."""

    stats = TierStats()


def run(options: ScaleOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to `options.out` and plotted to `options.plot`)."""
    started, load_start = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(options.threads)
    budgets = parse_budgets(options.budgets)
    shape = Shape(options.moe_layers + 3, 3, options.experts, options.groups, options.topk_group, options.top_k)
    tasks = SyntheticTasks(shape, options.seed)
    names = [f"task-{i:05d}" for i in range(options.tasks)]
    stream = locality_stream(
        names, options.requests, zipf=options.zipf, mean_burst=options.mean_burst, seed=options.seed
    )
    log = (lambda text: None) if options.quiet else (lambda text: print(text, flush=True))
    results = []
    for budget in budgets:
        results.append(_one_budget(shape, tasks, stream, budget, options))
        log(f"budget {budget:.0%}: done ({time.perf_counter() - started:.0f} s)")
    report: dict[str, Any] = {
        "benchmark": "scale",
        "machine": machine(torch.device("cpu")),
        "config": dataclasses.asdict(options),
        "shape": dataclasses.asdict(shape) | {"moe_layers": shape.moe_layers, "expert_bytes": options.expert_bytes},
        "total_expert_bytes": shape.moe_layers * shape.experts * options.expert_bytes,
        "stream": {"requests": len(stream), "distinct_tasks": len(set(stream)), "switches": switches(stream)},
        "resemblance": _resemblance(shape, tasks, options),
        "results": results,
    }
    log(f"resemblance: done ({time.perf_counter() - started:.0f} s)")
    if options.registry_tasks > 0:
        report["registry"] = _registry(shape, tasks, options)
        log(f"registry: done ({time.perf_counter() - started:.0f} s)")
    report["machine"]["load_average"] = {"start": load_start, "end": os.getloadavg()}
    report["targets"] = _targets(report)
    report["seconds"] = time.perf_counter() - started
    _write(report, options)
    return report


def _one_budget(
    shape: Shape, tasks: SyntheticTasks, stream: list[str], budget: float, options: ScaleOptions
) -> dict[str, Any]:
    probe = deepseek_engine(shape, shape.top_k)
    capacity = Budget(fraction=budget).slots_per_layer(probe.spec, options.expert_bytes)
    spec, selection = probe.spec, Selection()  # synthetic profiles keep the default selection
    patterns: dict[str, Pattern] = {}
    start = time.perf_counter()
    for name in dict.fromkeys(stream):
        patterns[name] = pattern_of(tasks.scores(int(name.split("-")[1])), spec, capacity, selection)
    select_s = (time.perf_counter() - start) / len(patterns)
    summaries: dict[str, dict[str, Any]] = {}
    patterned = deepseek_engine(shape, capacity)
    residency = Residency(patterned, cast(Store, _Books()))
    records = replay(residency, stream, patterns)
    summaries["delta (LRU)"] = summarise(records, options.expert_bytes)
    if not options.no_refinement:
        refined = Residency(deepseek_engine(shape, capacity), cast(Store, _Books()))
        tracker = SharedUseTracker(refined, options.half_life)
        summaries["delta + shared-use"] = summarise(
            replay(refined, stream, patterns, before=tracker.observe), options.expert_bytes
        )
    sequence = [patterns[t] for t in stream]
    full = oracle.full_reload(sequence)
    summaries["full reload"] = {
        "loads": full.loads,
        "bytes_moved": full.loads * options.expert_bytes,
        "request_hit_rate": full.hit_requests / len(stream),
    }
    best = oracle.belady(sequence, spec.moe_layers, capacity, spec.num_experts)
    summaries["oracle (Belady)"] = oracle_summary(best, sequence, options.expert_bytes)
    lru = oracle.lru(sequence, spec.moe_layers, capacity)
    order = ("full reload", "delta (LRU)", "delta + shared-use", "oracle (Belady)")
    return {
        "budget": budget,
        "slots_per_layer": capacity,
        "pattern_experts_mean": sum(p.size for p in patterns.values()) / len(patterns),
        "selection_ms_per_task": select_s * 1e3,
        "switches": sum(r.switch for r in records),
        "policies": {name: summaries[name] for name in order if name in summaries},
        "checks": {
            "lru_simulated_loads": lru.loads,
            "lru_matches_simulation": lru.loads == summaries["delta (LRU)"]["loads"],
        },
    }


def _resemblance(shape: Shape, tasks: SyntheticTasks, options: ScaleOptions) -> dict[str, Any]:
    """Concentration and sharing of synthetic scores next to the measured reference profiles (patterns at 50%)."""
    spec = deepseek_engine(shape, shape.top_k).spec
    sample = [tasks.scores(i) for i in range(min(24, options.tasks))]
    half = max(spec.routing.min_experts, shape.experts // 2)
    synthetic = resemblance(sample, [pattern_of(s, spec, half, Selection()) for s in sample])
    measured: dict[str, Any] | None = None
    paths = sorted(Path(options.profiles).glob("*.safetensors"))
    if paths and (Path(options.model) / "config.json").exists():
        from transformers import AutoConfig

        from ...families import adapter_for

        config = AutoConfig.from_pretrained(options.model, local_files_only=True)
        ref_spec = adapter_for(config).spec(config)
        scores = [Profile.load(p).score(Selection().criterion) for p in paths]
        ref_half = max(ref_spec.routing.min_experts, ref_spec.num_experts // 2)
        measured = resemblance(scores, [pattern_of(s, ref_spec, ref_half, Selection()) for s in scores])
        measured["tasks"] = len(scores)
    return {"synthetic": synthetic | {"tasks": len(sample)}, "measured_reference": measured}


def _registry(shape: Shape, tasks: SyntheticTasks, options: ScaleOptions) -> dict[str, Any]:
    from ...retrieval.embedder import DEFAULT_EMBEDDER

    workdir = Path(options.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        start = time.perf_counter()
        written = registry.write_profiles(
            workdir,
            tasks,
            options.registry_tasks,
            moe_layers=tuple(range(3, 3 + shape.moe_layers)),
            embedder=DEFAULT_EMBEDDER,
            pool=registry.base_vectors(options.profiles, 384, options.seed),
            demos_per_task=options.demos_per_task,
            seed=options.seed,
        )
        write_s = time.perf_counter() - start
        prompts = registry.prompts_of(options.data, options.route_prompts, options.seed)
        result = registry.measure(workdir, options.threads, options.route_rounds, prompts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result | {"profile_bytes": written, "write_s": write_s, "demos_per_task": options.demos_per_task}


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    results = report["results"]
    at = min(results, key=lambda r: abs(r["budget"] - 0.5))
    policies = at["policies"]
    ours, full = policies["delta (LRU)"]["bytes_moved"], policies["full reload"]["bytes_moved"]
    best = policies["oracle (Belady)"]["bytes_moved"]

    def worst(key: str) -> float:
        return max(r["policies"]["delta (LRU)"][key] for r in results)

    targets: dict[str, Any] = {"budget": at["budget"]}
    targets[f"full reload / delta at {at['budget']:.0%} >= 3"] = target(full / ours if ours else float("inf"), 3.0)
    targets[f"delta / oracle at {at['budget']:.0%} <= 1.5"] = target(ours / best if best else 1.0, 1.5, above=False)
    targets["planning ms per request, mean over all requests (worst budget) < 1"] = target(
        worst("planning_ms_mean"), 1.0, above=False, strict=True
    )
    targets["planning ms per request, mean without first sight of a task (worst budget) < 1"] = target(
        worst("planning_ms_steady_mean"), 1.0, above=False, strict=True
    )
    targets["planning ms per request, p99 without first sight of a task (worst budget) < 1"] = target(
        worst("planning_ms_steady_p99"), 1.0, above=False, strict=True
    )
    registry = report.get("registry")
    if registry is not None:
        tasks = registry["tasks"]
        targets[f"route overhead beyond the embedding at {tasks} tasks, ms < 2"] = target(
            registry["overhead_ms"], 2.0, above=False
        )
        targets[f"registry start-up with {tasks} profiles, s < 30"] = target(
            registry["startup_s"], 30.0, above=False, strict=True
        )
    return targets


def _write(report: dict[str, Any], options: ScaleOptions) -> None:
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=1))
    if options.plot:
        from ..common import bytes_vs_budget

        results = report["results"]
        names = list(results[0]["policies"])
        title = (
            f"bench scale: {options.moe_layers} MoE layers x {options.experts} experts of "
            f"{options.expert_bytes / 1e6:.0f} MB, {options.tasks} tasks, {report['stream']['requests']} requests "
            f"({report['stream']['switches']} switches)"
        )
        bytes_vs_budget(
            options.plot,
            title,
            [r["budget"] for r in results],
            {n: [r["policies"][n]["bytes_moved"] / 1e12 for r in results] for n in names},
            "TB",
            (
                "planning ms per request",
                {
                    f"{n} {q}": [r["policies"][n][f"planning_ms_{q}"] for r in results]
                    for n in names
                    if "planning_ms_mean" in results[0]["policies"][n]
                    for q in ("mean", "p99")
                },
            ),
        )


def table(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    from .report import render

    return render(report)


def main(argv: list[str] | None = None) -> int:
    """`python -m premoe_service.bench.scale`: flags named after `ScaleOptions` (`--registry-tasks 0` skips the
    registry part), run, print the table."""
    print(table(run(parse_options(ScaleOptions, argv, "python -m premoe_service.bench.scale", __doc__ or ""))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
