"""`bench switch` and `bench scale` at tiny settings: every figure reported, and the invariants that tie them together.

Timings are not checked (they depend on the machine); the figures in docs/measurements.md come from the default runs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from premoe_service.bench.scale.benchmark import ScaleOptions
from premoe_service.bench.scale.benchmark import run as run_scale
from premoe_service.bench.switch import oracle
from premoe_service.bench.switch.benchmark import SwitchOptions
from premoe_service.bench.switch.benchmark import run as run_switch
from premoe_service.bench.switch.streams import locality_stream, switches
from premoe_service.families import MoESpec, RoutingSpec
from premoe_service.pattern import Pattern
from premoe_service.runtime.slots import LayerSlots
from premoe_service.store import shard

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def switch_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bench-switch")
    shard(ROOT / "models" / "reference-moe", root / "store", progress=False)
    options = SwitchOptions(
        store=str(root / "store"),
        profiles=str(ROOT / "profiles"),
        budgets="0.5,0.75",
        requests=120,
        out=str(root / "switch.json"),
        plot=str(root / "switch.png"),
        quiet=True,
    )
    report = run_switch(options)
    assert json.loads(Path(options.out or "").read_text()) == json.loads(json.dumps(report))
    assert Path(options.plot or "").read_bytes()[:8] == PNG
    return report


@pytest.fixture(scope="module")
def scale_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bench-scale")
    options = ScaleOptions(
        tasks=30,
        requests=80,
        budgets="0.2,0.5",
        moe_layers=4,
        experts=64,
        registry_tasks=25,
        demos_per_task=3,
        route_prompts=4,
        route_rounds=1,
        profiles=str(ROOT / "profiles"),
        model=str(ROOT / "models" / "reference-moe"),
        data=str(ROOT / "reference" / "tasks"),
        workdir=str(root / "profiles"),
        out=str(root / "scale.json"),
        plot=str(root / "scale.png"),
        quiet=True,
    )
    report = run_scale(options)
    assert json.loads(Path(options.out or "").read_text()) == json.loads(json.dumps(report))
    assert Path(options.plot or "").read_bytes()[:8] == PNG
    assert not (root / "profiles").exists()  # the registry's profile files are removed afterwards
    return report


def check_policies(result: dict[str, Any], expert_nbytes: int) -> None:
    """Bytes ordered oracle <= delta <= full reload, rates in [0, 1], bytes = loads x expert size."""
    policies = result["policies"]
    best = policies["oracle (Belady)"]["bytes_moved"]
    for name in ("delta (LRU)", "delta + shared-use"):
        assert best <= policies[name]["bytes_moved"] <= policies["full reload"]["bytes_moved"], name
    for name, figures in policies.items():
        assert figures["bytes_moved"] == figures["loads"] * expert_nbytes, name
        for rate in ("expert_hit_rate", "request_hit_rate"):
            if rate in figures:
                assert 0.0 <= figures[rate] <= 1.0, (name, rate)
    for name in ("delta (LRU)", "delta + shared-use"):
        figures = policies[name]
        assert figures["planning_ms_mean"] > 0 and figures["planning_ms_p99"] >= figures["planning_ms_p50"] > 0
        assert figures["switches"] <= figures["requests"]
    assert result["checks"]["lru_matches_simulation"], result["checks"]


def test_bench_switch_reports_bytes_tiers_and_latency_per_budget(switch_report: dict[str, Any]) -> None:
    report = switch_report
    assert {"machine", "config", "model", "stream", "results", "refinement", "targets"} <= report.keys()
    assert report["machine"]["cpu_count"] >= 1
    nbytes = report["model"]["expert_nbytes"]
    assert [r["budget"] for r in report["results"]] == [0.5, 0.75]
    for result in report["results"]:
        check_policies(result, nbytes)
        assert result["checks"]["full_reload_simulated_loads"] == result["policies"]["full reload"]["loads"]
        for name in ("full reload", "delta (LRU)", "delta + shared-use"):
            figures = result["policies"][name]
            tiers = figures["loads_per_tier"]
            assert tiers.get("disk", 0) + tiers.get("cache", 0) == figures["loads"], name  # every load read once
            assert figures["switch_ms_p99"] >= figures["switch_ms_p50"] >= 0
    # A budget that holds more experts never moves more bytes, for every policy but the full reload.
    low, high = report["results"]
    for name in ("delta (LRU)", "oracle (Belady)"):
        assert high["policies"][name]["bytes_moved"] <= low["policies"][name]["bytes_moved"]
    targets = report["targets"]
    assert targets["budget"] == 0.5
    assert all(isinstance(c["met"], bool) for c in targets.values() if isinstance(c, dict))
    assert isinstance(report["refinement"]["kept"], bool)


def test_bench_scale_reports_planning_bytes_and_the_registry(scale_report: dict[str, Any]) -> None:
    report = scale_report
    assert {"machine", "shape", "stream", "resemblance", "results", "registry", "targets"} <= report.keys()
    assert report["shape"]["moe_layers"] == 4 and report["shape"]["experts"] == 64
    for result in report["results"]:
        check_policies(result, report["shape"]["expert_bytes"])
        assert result["selection_ms_per_task"] > 0
    for kind in ("synthetic", "measured_reference"):
        stats = report["resemblance"][kind]
        assert 0 < stats["top_quarter_mass"] <= 1 and 0 < stats["pattern_overlap_mean"] <= 1, kind
    registry = report["registry"]
    assert registry["tasks"] == 25 and registry["vectors"] == 25 * 3
    assert registry["startup_s"] > 0 and registry["route_ms"] > 0 and registry["embed_ms"] > 0
    assert registry["decide_ms"] > 0 and registry["registry_mib"] >= 0
    assert registry["prompts"] == 4
    assert all(isinstance(c["met"], bool) for c in report["targets"].values() if isinstance(c, dict))


# --- the reference policies themselves -----------------------------------------------------------------------------

SPEC = MoESpec("tiny", (0,), RoutingSpec(kind="softmax_topk", num_experts=6, top_k=1), "num_experts")


def fewest_loads(sets: list[frozenset[int]], capacity: int) -> int:
    """The optimum by exhaustive search: every choice of victims at every miss."""
    best = {frozenset(): 0}  # resident set -> fewest loads so far
    for want in sets:
        step: dict[frozenset[int], int] = {}
        for resident, loads in best.items():
            missing = want - resident
            keep = resident - want
            room = capacity - len(want)
            for kept in itertools.combinations(sorted(keep), min(room, len(keep))):
                after = frozenset(kept) | want
                step[after] = min(step.get(after, 1 << 30), loads + len(missing))
        best = step
    return min(best.values())


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_the_optimum_and_lru_is_no_better(seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    tasks = [Pattern({0: tuple(sorted(rng.choice(6, size=int(rng.integers(1, 4)), replace=False)))}) for _ in range(4)]
    sequence = [tasks[int(rng.integers(4))] for _ in range(9)]
    sets = oracle.layer_sets(sequence, 0)
    for capacity in (3, 4):
        best = oracle.belady(sequence, (0,), capacity, 6)
        assert best.loads == fewest_loads(sets, capacity)
        assert oracle.lru(sequence, (0,), capacity).loads >= best.loads
    assert oracle.full_reload(sequence).loads >= oracle.lru(sequence, (0,), 3).loads


def test_victims_are_least_recently_used_with_ties_to_the_lower_id() -> None:
    slots = LayerSlots(4, num_experts=9)
    for slot, expert in enumerate((5, 1, 3, 2)):
        slots.place(expert, slot)
    slots.touch((3, 1), tick=2)
    slots.touch((2,), tick=1)  # 5 was never used: first in line, then 2, then 1 and 3 (tied, lower id first)
    assert slots.victims({5, 1, 3, 2}, 4) == [5, 2, 1, 3]
    assert slots.assign({5, 7, 8}) == [(7, slots.slot_of[2]), (8, slots.slot_of[1])]
    slots.pin([1])
    assert slots.assign({5, 7, 8}) == [(7, slots.slot_of[2]), (8, slots.slot_of[3])]


def test_locality_stream_is_seeded_with_bursts() -> None:
    tasks = [f"t{i}" for i in range(20)]
    stream = locality_stream(tasks, 500, seed=3)
    assert stream == locality_stream(tasks, 500, seed=3) != locality_stream(tasks, 500, seed=4)
    assert len(stream) == 500 and set(stream) <= set(tasks)
    assert switches(stream) < 500 / 2  # bursts of mean length 4 leave about one switch in four requests
    assert switches(locality_stream(tasks, 500, mean_burst=1.0, seed=3)) > 400


def test_residency_checks_every_new_pattern_and_counts_pins_per_lease() -> None:
    from typing import cast

    from premoe_service.bench.scale.tasks import Shape, deepseek_engine
    from premoe_service.errors import PatternError, ResourceExhausted
    from premoe_service.runtime.residency import Residency
    from premoe_service.store.reader import Store, TierStats

    class Books:
        stats = TierStats()

    patterned = deepseek_engine(Shape(decoder_layers=3, dense_layers=1, experts=16, groups=4, topk_group=2, top_k=2), 8)
    residency = Residency(patterned, cast(Store, Books()))
    layers = patterned.spec.moe_layers
    thin = Pattern({layer: (0,) for layer in layers})  # fewer than top-k: refused, every time it is offered
    for _ in range(2):
        with pytest.raises(PatternError):
            residency.reserve(thin)
    wide = Pattern({layer: tuple(range(12)) for layer in layers})  # valid, but more than the 8 slots per layer
    with pytest.raises(ResourceExhausted, match="slots per layer"):
        residency.reserve(wide)
    a = Pattern({layer: (0, 1, 4, 5) for layer in layers})
    b = Pattern({layer: (0, 1, 8, 9) for layer in layers})
    for pattern in (a, a, b):
        for layer, expert, slot in residency.reserve(pattern) or []:
            residency.commit(layer, expert, slot)
    assert patterned.slots[layers[0]].pins == {0: 3, 1: 3, 4: 2, 5: 2, 8: 1, 9: 1}
    assert residency.is_resident(a) and residency.is_resident(b)
    residency.unpin(a)
    residency.unpin(b)
    assert patterned.slots[layers[0]].pins == {0: 1, 1: 1, 4: 1, 5: 1}
    residency.unpin(a)
    assert all(not patterned.slots[layer].pins for layer in layers)
