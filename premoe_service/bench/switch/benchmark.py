"""`premoe bench switch`: task switches on the reference model, delta residency against full reload and Belady.

A stream of requests over the registered tasks with task locality (Zipf popularity, bursts; seeded) goes through
the real residency and store at two or three budgets: `Residency.reserve`, the store's tiered reads straight into
slot memory, `commit`, the routers' slot tables published, `unpin`, one request at a time and without the forward
pass. Each task's pattern is its default selection capped at the slots per layer, as `TaskBook.pattern` derives it.
Compared on the same stream: a full reload of the pattern at every task change (PreMoe's way, through the same
code), Belady's oracle (the fewest loads possible), and one refinement, shared-use eviction (`eviction.py`).

Run it as `python -m premoe_service.bench.switch [--requests N] [--budgets 0.5,0.625,0.75] ...`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import InvalidArgument
from ...families import MoESpec
from ...pattern import Pattern
from ...profiler import Selection, select
from ...profiler.profile import Profile
from ...runtime.build import load_model
from ...runtime.eviction import SharedUseTracker
from ...runtime.residency import Budget
from ...store import Store, open_cache
from ..common import machine, parse_options
from . import oracle
from .replay import replay, store_reader, summarise
from .streams import locality_stream, switches

POLICIES = ("full reload", "delta (LRU)", "delta + shared-use", "oracle (Belady)")
TARGETS = {"full_over_delta_at_50": 3.0, "delta_over_oracle_at_50": 1.5}


@dataclass
class SwitchOptions:
    """Settings of `premoe bench switch` (defaults: the reference model, ~1 minute on 2 cores)."""

    store: str | None = None  # None: var/reference-store, sharded from `model` when missing
    model: str = "models/reference-moe"
    profiles: str = "profiles"
    budgets: str = "0.5,0.625,0.75"  # residency capacity as shares of all routed experts' bytes
    requests: int = 4000
    zipf: float = 1.1
    mean_burst: float = 4.0
    seed: int = 0
    half_life: float = 64.0  # of the shared-use refinement, in requests
    out: str | None = "var/bench-switch.json"
    plot: str | None = "var/bench-switch.png"
    quiet: bool = False


def reference_store(store: str | None, model: str) -> Path:
    """The store to use: the given one, else var/reference-store, sharded from `model` the first time."""
    if store is not None:
        return Path(store)
    path = Path("var/reference-store")
    if not (path / "manifest.json").exists():
        from ...store import shard

        shard(model, path, progress=False)
    return path


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = sorted({float(b) for b in text.split(",") if b.strip()})
    except ValueError as exc:
        raise InvalidArgument(
            f"budgets {text!r} must be comma-separated shares, e.g. 0.5,0.75", field="budgets"
        ) from exc
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise InvalidArgument(f"budgets {text!r} must be shares in (0, 1]", field="budgets")
    return budgets


def run(options: SwitchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to `options.out` and plotted to `options.plot`)."""
    started, load_start = time.perf_counter(), os.getloadavg()
    budgets = parse_budgets(options.budgets)
    store_dir = reference_store(options.store, options.model)
    profiles = [Profile.load(p) for p in sorted(Path(options.profiles).glob("*.safetensors"))]
    if not profiles:
        raise InvalidArgument(f"no profiles (*.safetensors) in {options.profiles}", field="profiles")
    probe = Store(store_dir)
    nbytes, dense = probe.manifest.expert_nbytes, probe.dense_state_dict("cpu")
    stream = locality_stream(
        [p.name for p in profiles],
        options.requests,
        zipf=options.zipf,
        mean_burst=options.mean_burst,
        seed=options.seed,
    )
    results = []
    for budget in budgets:
        entry = _one_budget(store_dir, dense, profiles, stream, budget, options)
        results.append(entry)
        if not options.quiet:
            print(f"budget {budget:.0%}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    report: dict[str, Any] = {
        "benchmark": "switch",
        "machine": machine(torch.device("cpu")),
        "config": dataclasses.asdict(options),
        "model": {
            "store": str(store_dir),
            "family": probe.manifest.family,
            "moe_layers": len(probe.manifest.moe_layers),
            "experts_per_layer": probe.manifest.num_experts,
            "expert_nbytes": nbytes,
            "tasks": [p.name for p in profiles],
        },
        "stream": {"requests": len(stream), "switches": switches(stream)},
        "results": results,
    }
    report["machine"]["load_average"] = {"start": load_start, "end": os.getloadavg()}
    report["refinement"] = _refinement_verdict(report["results"])
    report["targets"] = _targets(report["results"])
    report["seconds"] = time.perf_counter() - started
    _write(report, options)
    return report


def _one_budget(
    store_dir: Path,
    dense: dict[str, torch.Tensor],
    profiles: list[Profile],
    stream: list[str],
    budget: float,
    options: SwitchOptions,
) -> dict[str, Any]:
    def fresh() -> tuple[Any, Store]:
        store = Store(store_dir, cache=open_cache(None))  # each policy starts from a cold in-process cache
        _, residency = load_model(store, Budget(fraction=budget), device="cpu", dense=dense)
        return residency, store

    residency, store = fresh()
    spec, capacity = (
        residency.patterned.spec,
        residency.patterned.slots[residency.patterned.spec.moe_layers[0]].capacity,
    )
    patterns = {p.name: task_pattern(p, spec, capacity, store.manifest.expert_nbytes) for p in profiles}
    nbytes = store.manifest.expert_nbytes
    summaries: dict[str, dict[str, Any]] = {}
    records = replay(residency, stream, patterns, reader=store_reader(residency, store))
    summaries["delta (LRU)"] = summarise(records, nbytes)
    refined, refined_store = fresh()
    tracker = SharedUseTracker(refined, options.half_life)
    refined_records = replay(
        refined, stream, patterns, reader=store_reader(refined, refined_store), before=tracker.observe
    )
    summaries["delta + shared-use"] = summarise(refined_records, nbytes)
    full, full_store = fresh()
    summaries["full reload"] = summarise(
        replay(full, stream, patterns, reader=store_reader(full, full_store), full_reload=True), nbytes
    )
    sequence = [patterns[t] for t in stream]
    best = oracle.belady(sequence, spec.moe_layers, capacity, spec.num_experts)
    summaries["oracle (Belady)"] = oracle_summary(best, sequence, nbytes)
    lru = oracle.lru(sequence, spec.moe_layers, capacity)
    return {
        "budget": budget,
        "slots_per_layer": capacity,
        "pattern_experts_mean": sum(p.size for p in patterns.values()) / len(patterns),
        "policies": {name: summaries[name] for name in POLICIES},
        "checks": {
            "lru_simulated_loads": lru.loads,
            "lru_matches_simulation": lru.loads == summaries["delta (LRU)"]["loads"],
            "full_reload_simulated_loads": oracle.full_reload(sequence).loads,
        },
    }


def task_pattern(profile: Profile, spec: MoESpec, capacity: int, expert_nbytes: int) -> Pattern:
    """The task's pattern as `TaskBook.pattern` derives it: its stored selection, capped at the slots per layer."""
    selection = Selection.from_json(profile.selection) if profile.selection else Selection()
    return select(profile.score(selection.criterion), spec, selection, expert_nbytes, max_per_layer=capacity)


def oracle_summary(best: oracle.SimResult, sequence: list[Pattern], nbytes: int) -> dict[str, Any]:
    """The oracle's figures in the shape of `replay.summarise` (it has no tiers and no latency)."""
    wanted = sum(p.size for p in sequence)
    return {
        "loads": best.loads,
        "bytes_moved": best.loads * nbytes,
        "evictions": best.evictions,
        "expert_hit_rate": 1 - best.loads / wanted if wanted else 1.0,
        "request_hit_rate": best.hit_requests / len(sequence) if sequence else 1.0,
    }


def _refinement_verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    lru = [r["policies"]["delta (LRU)"]["bytes_moved"] for r in results]
    refined = [r["policies"]["delta + shared-use"]["bytes_moved"] for r in results]
    better = all(b <= a for a, b in zip(lru, refined, strict=True)) and any(
        b < a for a, b in zip(lru, refined, strict=True)
    )
    return {
        "name": "shared-use eviction",
        "bytes_lru": lru,
        "bytes_refined": refined,
        "kept": better,
        "rule": "kept only if it moves no more bytes than LRU at every budget and fewer at one",
    }


def _targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    at = min(results, key=lambda r: abs(r["budget"] - 0.5))
    policies = at["policies"]
    ours = policies["delta (LRU)"]["bytes_moved"]
    full, best = policies["full reload"]["bytes_moved"], policies["oracle (Belady)"]["bytes_moved"]
    fewer = full / ours if ours else float("inf")
    above = ours / best if best else 1.0
    return {
        "budget": at["budget"],
        f"full reload / delta >= {TARGETS['full_over_delta_at_50']}": {
            "value": fewer,
            "met": fewer >= TARGETS["full_over_delta_at_50"],
        },
        f"delta / oracle <= {TARGETS['delta_over_oracle_at_50']}": {
            "value": above,
            "met": above <= TARGETS["delta_over_oracle_at_50"],
        },
    }


def _write(report: dict[str, Any], options: SwitchOptions) -> None:
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=1))
    if options.plot:
        from ..common import bytes_vs_budget

        results = report["results"]
        budgets = [r["budget"] for r in results]
        bytes_moved = {name: [r["policies"][name]["bytes_moved"] / 2**20 for r in results] for name in POLICIES}
        latency = {
            f"{name} p{q}": [r["policies"][name][f"switch_ms_p{q}"] for r in results]
            for name in ("full reload", "delta (LRU)")
            for q in (50, 99)
        }
        model = report["model"]
        title = (
            f"bench switch: {model['family']} {model['moe_layers']}x{model['experts_per_layer']} experts, "
            f"{len(model['tasks'])} tasks, {report['stream']['requests']} requests ({report['stream']['switches']} "
            f"switches)"
        )
        bytes_vs_budget(options.plot, title, budgets, bytes_moved, "MiB", ("switch latency (ms)", latency))


def table(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    from .report import render

    return render(report)


def main(argv: list[str] | None = None) -> int:
    """`python -m premoe_service.bench.switch`: flags named after `SwitchOptions` (`--budgets 0.5,0.75`), run, print
    the table."""
    print(table(run(parse_options(SwitchOptions, argv, "python -m premoe_service.bench.switch", __doc__ or ""))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
