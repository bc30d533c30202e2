"""`premoe bench ray`'s figures: one routing mode's measurements from the replicas' published stats and the clients'
records, the split of the saving between routing (affinity) and shared experts (pattern overlap), and the table."""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict
from typing import Any

from ..common import percentile


def _delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, int]:
    """Counters moved during the measured stream, summed over replicas."""
    total = {"loaded_bytes": 0, "device": 0, "cache": 0, "disk": 0, "evictions": 0, "generated_tokens": 0}
    for replica, end in after.items():
        begin = before.get(replica)
        for name in ("loaded_bytes", "evictions", "generated_tokens"):
            total[name] += int(end[name]) - (int(begin[name]) if begin else 0)
        for tier in ("device", "cache", "disk"):
            total[tier] += int(end["loads"][tier]) - (int(begin["loads"][tier]) if begin else 0)
    return total


def per_replica(records: list[dict[str, Any]]) -> dict[str, list[tuple[str, bool]]]:
    """Each replica's (task, measured) in the order the requests started."""
    sequences: dict[str, list[tuple[float, str, bool]]] = defaultdict(list)
    for record in records:
        sequences[record["replica"]].append((record["start"], record["task"], bool(record.get("measured", True))))
    return {replica: [(task, m) for _, task, m in sorted(items)] for replica, items in sequences.items()}


def task_lru_bytes(sequences: dict[str, list[tuple[str, bool]]], pattern_bytes: dict[str, int], held: int) -> int:
    """Bytes the measured requests would move if each replica kept its `held` most recently used tasks whole and
    patterns shared no expert (a request for any other task loads its whole pattern); the warm-up requests fill
    the cache first. Only routing changes this figure."""
    moved = 0
    for tasks in sequences.values():
        resident: OrderedDict[str, None] = OrderedDict()
        for task, measured in tasks:
            if task in resident:
                resident.move_to_end(task)
                continue
            moved += pattern_bytes[task] if measured else 0
            resident[task] = None
            if len(resident) > held:
                resident.popitem(last=False)
    return moved


def summarise_mode(
    records: list[dict[str, Any]],
    warm: list[dict[str, Any]],
    before: dict[str, dict],
    after: dict[str, dict],
    wall: float,
    pattern_bytes: dict[str, int],
    held: int,
) -> dict[str, Any]:
    """One routing mode's figures over the measured stream (`records`; `warm`: the warm-up's, before it)."""
    moved = _delta(before, after)
    lookups = moved["device"] + moved["cache"] + moved["disk"]
    latencies = [r["seconds"] for r in records]
    tokens = sum(int(r["tokens"]) for r in records)
    by_task: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        by_task[record["task"]][record["replica"]] += 1
    on_top = sum(counts.most_common(1)[0][1] for counts in by_task.values())
    sequences = per_replica(records)
    switches = sum(sum(1 for i, t in enumerate(seq) if i == 0 or seq[i - 1] != t) for seq in sequences.values())
    history = per_replica([{**r, "measured": False} for r in warm] + records)
    return {
        "requests": len(records),
        "bytes_moved": moved["loaded_bytes"],
        "expert_loads": {tier: moved[tier] for tier in ("device", "cache", "disk")},
        "hit_rate": moved["device"] / lookups if lookups else 1.0,
        "evictions": moved["evictions"],
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "wall_s": wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "task_on_one_replica": on_top / len(records) if records else 0.0,
        "requests_per_replica": {replica: len(seq) for replica, seq in sorted(sequences.items())},
        "task_switches": switches,
        "task_lru_bytes": task_lru_bytes(history, pattern_bytes, held),
    }


def decompose(modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where the saving comes from. `measured`: default routing's bytes over affinity's. `no_sharing_*`: the bytes
    each mode's placement would move if patterns shared no expert and a replica's budget held `tasks_per_replica`
    whole patterns (whole-task LRU over the same requests): what routing alone is worth. `sharing_default`: how
    much less default routing really moved than that, thanks to experts shared between patterns."""
    default, affinity = modes["default"], modes["affinity"]
    return {
        "measured": default["bytes_moved"] / affinity["bytes_moved"] if affinity["bytes_moved"] else None,
        "no_sharing_default_bytes": default["task_lru_bytes"],
        "no_sharing_affinity_bytes": affinity["task_lru_bytes"],
        "sharing_default": default["task_lru_bytes"] / default["bytes_moved"] if default["bytes_moved"] else None,
    }


def _times(value: float | None) -> str:
    return "all of it (nothing moved)" if value is None else f"{value:.2f}x"


def table(report: dict[str, Any]) -> str:
    """The report as a markdown table (the README's) and the split of the saving."""
    mib = 1 << 20
    rows = [
        "| routing | bytes moved MiB | expert loads (cache+disk) | expert hit rate | tokens/s | latency p50/p99 ms "
        "| task on one replica | requests per replica | task switches | no-sharing MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("default", "Serve default (no model id)"), ("affinity", "by task (multiplexed model id)")):
        m = report["modes"][name]
        loads = m["expert_loads"]["cache"] + m["expert_loads"]["disk"]
        rows.append(
            f"| {label} | {m['bytes_moved'] / mib:.1f} | {loads} | {m['hit_rate']:.4f} "
            f"| {m['tokens_per_s']:.0f} | {m['latency_p50_s'] * 1e3:.0f} / {m['latency_p99_s'] * 1e3:.0f} "
            f"| {m['task_on_one_replica']:.2f} | {' / '.join(map(str, m['requests_per_replica'].values()))} "
            f"| {m['task_switches']} | {m['task_lru_bytes'] / mib:.1f} |"
        )
    d = report["decomposition"]
    rows += [
        "",
        f"Affinity moves {_times(d['measured'])} fewer expert bytes than Serve's default routing. Without shared "
        f"experts (whole-task LRU of {report['budget']['tasks_per_replica']} tasks per replica) default routing "
        f"would move {d['no_sharing_default_bytes'] / mib:.1f} MiB and affinity "
        f"{d['no_sharing_affinity_bytes'] / mib:.1f} MiB: shared experts cut default routing's bytes "
        f"{_times(d['sharing_default'])}, and affinity removes {_times(d['measured'])} of what remains.",
    ]
    return "\n".join(rows)
