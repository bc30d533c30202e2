"""`premoe bench scale`: the report as readable tables."""

from __future__ import annotations

from typing import Any

from ..common import ms, pct
from ..switch.report import machine_line


def render(report: dict[str, Any]) -> str:
    shape, config, stream = report["shape"], report["config"], report["stream"]
    lines = [
        machine_line(report["machine"]),
        f"shape: {shape['moe_layers']} MoE layers x {shape['experts']} experts ({shape['groups']} groups, "
        f"{shape['topk_group']} per token, top-{shape['top_k']}), {shape['expert_bytes'] / 1e6:.1f} MB per expert "
        f"(accounted; slots hold tiny tensors), {report['total_expert_bytes'] / 1e9:.0f} GB of routed experts",
        f"stream: {stream['requests']} requests over {config['tasks']} synthetic tasks ({stream['distinct_tasks']} "
        f"requested, {stream['switches']} switches; Zipf {config['zipf']}, mean burst {config['mean_burst']}, seed "
        f"{config['seed']}); one request at a time",
        "",
        f"{'budget':>6} {'slots':>5} {'policy':<19} {'TB moved':>9} {'GB/req':>7} {'hit exp':>7} {'hit req':>7} "
        f"{'plan ms: mean/p50/p99/max':>26} {'steady mean/p99':>15} {'unpin ms':>8} {'publish ms':>10}",
    ]
    for result in report["results"]:
        first = True
        for name, p in result["policies"].items():
            head = f"{result['budget']:>6.0%} {result['slots_per_layer']:>5}" if first else " " * 12
            first = False
            timed = "planning_ms_mean" in p
            plan = (
                f"{p['planning_ms_mean']:.3f}/{p['planning_ms_p50']:.3f}/{p['planning_ms_p99']:.3f}/"
                f"{p['planning_ms_max']:.1f}"
                if timed
                else "-"
            )
            steady = f"{p['planning_ms_steady_mean']:.3f}/{p['planning_ms_steady_p99']:.3f}" if timed else "-"
            lines.append(
                f"{head} {name:<19} {p['bytes_moved'] / 1e12:>9.2f} "
                f"{p['bytes_moved'] / stream['requests'] / 1e9:>7.1f} {pct(p.get('expert_hit_rate')):>7} "
                f"{pct(p.get('request_hit_rate')):>7} {plan:>26} {steady:>15} {ms(p.get('unpin_ms_mean')):>8} "
                f"{ms(p.get('publish_ms_mean')):>10}"
            )
        check = result["checks"]
        lines.append(
            f"{'':12} pattern {result['pattern_experts_mean']:.0f} experts; selection "
            f"{result['selection_ms_per_task']:.0f} ms per task (once per task and budget); "
            "LRU replayed without slots: "
            f"{'equal' if check['lru_matches_simulation'] else 'DIFFERENT'} loads"
        )
    lines += [
        "",
        "plan: Residency.reserve (which experts to load, which to evict, slots reserved, pins taken); steady: without "
        "each task's first request, whose pattern the residency checks once against the model; full reload and "
        "oracle are replayed without slots (oracle.py)",
        "",
        "resemblance of the synthetic scores to measured ones (patterns at 50% of each layer):",
    ]
    for kind, stats in report["resemblance"].items():
        if stats:
            lines.append(
                f"  {kind:<19} {stats['tasks']:>3} tasks: top-quarter mass {stats['top_quarter_mass']:.3f}, zero "
                f"{stats['zero_share']:.3f}, pattern overlap {stats['pattern_overlap_mean']:.3f} "
                f"({stats['pattern_overlap_min']:.3f}..{stats['pattern_overlap_max']:.3f})"
            )
    registry = report.get("registry")
    if registry is not None:
        lines += [
            "",
            f"registry: {registry['tasks']} profiles ({registry['profile_bytes'] / 1e9:.2f} GB of files, "
            f"{registry['demos_per_task']} synthetic demo vectors each: {registry['vectors']} vectors, "
            f"{registry['index']} index), {registry['threads']} threads, fresh process",
            f"  start-up {registry['startup_s']:.1f} s (+ embedder load {registry['embedder_load_s']:.1f} s); memory "
            f"+{registry['registry_mib']:.0f} MiB (RSS {registry['rss_after_mib']:.0f} MiB)",
            f"  route {registry['route_ms']:.2f} ms, beyond its own embedding {registry['overhead_ms']:.2f} ms "
            f"(refresh check, search, scoring, decision; search+scoring+decision alone {registry['decide_ms']:.2f}); "
            f"embed alone {registry['embed_ms']:.2f}, raw FAISS search {registry['raw_search_ms']:.2f}: route / (embed "
            f"+ raw search) = {registry['route_over_raw']:.2f}; {registry['prompts']} prompts of ~40 tokens x "
            f"{registry['rounds']} rounds, medians; matched {registry['matched_share']:.0%}",
        ]
    lines += ["", "targets:"]
    for name, check in report["targets"].items():
        if isinstance(check, dict):
            lines.append(f"  {name}: {check['value']:.3g} ({'met' if check['met'] else 'NOT met'})")
    lines.append(f"ran in {report['seconds']:.0f} s")
    return "\n".join(lines)
