"""`premoe bench switch`: the report as a readable table."""

from __future__ import annotations

from typing import Any

from ..common import cpus, ms, pct


def machine_line(m: dict[str, Any]) -> str:
    gpu = f" ({m['gpu']})" if "gpu" in m else ""
    load = m.get("load_average")
    busy = f"; load average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end" if load else ""
    return (
        f"machine: {m['platform']}, {m['processor']}, {cpus(m)}, python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']}{gpu}{busy}"
    )


def target_line(targets: dict[str, Any]) -> str:
    parts = []
    for name, check in targets.items():
        if isinstance(check, dict):
            value = check["value"]
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            parts.append(f"{name}: {shown} ({'met' if check['met'] else 'NOT met'})")
    return "; ".join(parts)


def render(report: dict[str, Any]) -> str:
    model, config, stream = report["model"], report["config"], report["stream"]
    lines = [
        machine_line(report["machine"]),
        f"model: {model['family']}, {model['moe_layers']} MoE layers x {model['experts_per_layer']} experts of "
        f"{model['expert_nbytes'] / 2**10:.0f} KiB; {len(model['tasks'])} tasks; {stream['requests']} requests, "
        f"{stream['switches']} task switches (Zipf {config['zipf']}, mean burst {config['mean_burst']}, seed "
        f"{config['seed']}); one request at a time; patterns: each task's selection capped at the slots per layer",
        "",
        f"{'budget':>6} {'slots':>5} {'policy':<19} {'MiB moved':>9} {'loads':>6} {'disk':>5} {'cache':>6} "
        f"{'hit exp':>7} {'hit req':>7} {'evict':>6} {'switch p50/p99 ms':>17} {'plan ms':>7}",
    ]
    for result in report["results"]:
        first = True
        for name, p in result["policies"].items():
            head = f"{result['budget']:>6.1%} {result['slots_per_layer']:>5}" if first else " " * 12
            first = False
            tiers = p.get("loads_per_tier", {"disk": "-", "cache": "-"})
            latency = f"{p['switch_ms_p50']:.2f} / {p['switch_ms_p99']:.2f}" if "switch_ms_p50" in p else "-"
            lines.append(
                f"{head} {name:<19} {p['bytes_moved'] / 2**20:>9.1f} {p['loads']:>6} {tiers.get('disk', 0):>5} "
                f"{tiers.get('cache', 0):>6} {pct(p.get('expert_hit_rate')):>7} {pct(p.get('request_hit_rate')):>7} "
                f"{p['evictions']:>6} {latency:>17} {ms(p.get('planning_ms_mean')):>7}"
            )
        check = result["checks"]
        lines.append(
            f"{'':12} LRU replayed without slots: {check['lru_simulated_loads']} loads "
            f"({'equal' if check['lru_matches_simulation'] else 'DIFFERENT'}); full reload simulated: "
            f"{check['full_reload_simulated_loads']} loads"
        )
    refinement = report["refinement"]
    lines += [
        "",
        "hit exp: share of requested experts already resident; hit req: requests that loaded nothing; switch: from "
        "planning until the pattern is routable, over requests that changed task; disk reads may come from the OS "
        "page cache",
        f"targets at {report['targets']['budget']:.0%}: {target_line(report['targets'])}",
        f"refinement ({refinement['name']}): {'kept' if refinement['kept'] else 'not kept'} "
        f"({refinement['rule']}); bytes vs LRU per budget: "
        + ", ".join(
            f"{b / max(a, 1):.3f}" for a, b in zip(refinement["bytes_lru"], refinement["bytes_refined"], strict=True)
        ),
        f"ran in {report['seconds']:.0f} s",
    ]
    return "\n".join(lines)
