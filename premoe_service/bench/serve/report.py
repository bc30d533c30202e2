"""`premoe bench serve`: the report, assembled from the runs (medians, ratios, targets) and as a readable table."""

from __future__ import annotations

from typing import Any

import torch

from ..common import cpus, machine, median, target

OURS_KEYS = (
    "tokens_per_s",
    "requests_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "route_p50_ms",
    "tokens_per_cpu_s",
    "cpu_s",
    "client_cpu_s",
)
TARGETS = {"padded_at_max_clients": 1.3, "alone_at_1_client": 0.95, "stall_p99_ratio": 1.5}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def assemble(
    config: dict[str, Any],
    device: torch.device,
    requests: Any,
    lengths: list[int],
    lone: dict[str, Any],
    ours: dict[int, list[dict[str, Any]]],
    base: dict[str, dict[int, dict[int, list[dict[str, Any]]]]],
    base_alone: dict[int, list[dict[str, Any]]],
    stall: dict[str, Any] | None,
) -> dict[str, Any]:
    def med(rows: list[dict[str, Any]], key: str = "tokens_per_s") -> float | None:
        return median([row.get(key) for row in rows])

    def errors_of(rows: list[dict[str, Any]]) -> list[str]:
        return sorted({row["error"] for row in rows if "error" in row})

    def best(by_threads: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
        """The median per thread count, and the best of them (what the baseline is compared at)."""
        medians = {t: med(rows) for t, rows in by_threads.items()}
        top = max((t for t in medians if medians[t] is not None), key=lambda t: medians[t] or 0.0, default=None)
        rows = [row for rows in by_threads.values() for row in rows]
        return {
            "tokens_per_s": None if top is None else medians[top],
            # per CPU second: the best thread count by that measure (the wall-time best at 2 threads spends twice
            # the CPU, which would flatter the server's ratio)
            "tokens_per_cpu_s": max(
                (v for t in by_threads if (v := med(by_threads[t], "tokens_per_cpu_s"))), default=None
            ),
            "threads": top,
            "by_threads": {str(t): v for t, v in medians.items()},
            "errors": errors_of(rows),
            "pids": sorted({row["pid"] for row in rows if "pid" in row}),
            "rounds": {str(t): r for t, r in by_threads.items()},
        }

    alone = best(base_alone)
    results: dict[str, Any] = {}
    for n, rows in ours.items():
        entry: dict[str, Any] = {"ours": {k: med(rows, k) for k in OURS_KEYS}}
        entry["ours"].update(
            errors=sum(r["errors"] for r in rows),
            error_messages=[m for r in rows for m in r["error_messages"]][:5],
            mismatches=sum(r["mismatches"] for r in rows),
            tokens=rows[0]["tokens"] if rows else 0,
            rounds=rows,
        )
        hf: dict[str, Any] = {"alone": alone}
        for kind in ("padded", "continuous"):
            hf[kind] = best(base[kind][n])
        entry["transformers"] = hf
        tps = entry["ours"]["tokens_per_s"]
        entry["ratios"] = {kind: _ratio(tps, hf[kind]["tokens_per_s"]) for kind in ("alone", "padded", "continuous")}
        per_cpu = entry["ours"]["tokens_per_cpu_s"]
        entry["cpu_ratios"] = {  # tokens per CPU second of the server's process against the baseline's
            kind: _ratio(per_cpu, hf[kind]["tokens_per_cpu_s"]) for kind in ("alone", "padded", "continuous")
        }
        results[str(n)] = entry
    top, one = str(max(ours)), str(min(ours))
    targets = {
        f"ours/padded at {top} clients >= {TARGETS['padded_at_max_clients']}": target(
            results[top]["ratios"]["padded"], TARGETS["padded_at_max_clients"], above=True
        ),
        f"ours/alone at {one} client >= {TARGETS['alone_at_1_client']}": target(
            results[one]["ratios"]["alone"], TARGETS["alone_at_1_client"], above=True
        ),
    }
    if stall is not None:
        targets[f"stall p99 cold/warm <= {TARGETS['stall_p99_ratio']}"] = target(
            stall.get("p99_ratio"), TARGETS["stall_p99_ratio"], above=False
        )
    return {
        "machine": machine(device),
        "config": config,
        "requests": [
            {"task": r.task, "prompt": r.prompt, "max_new_tokens": r.max_new_tokens, "real_tokens": n}
            for r, n in zip(requests, lengths, strict=True)
        ],
        "real_tokens": sum(lengths),
        "lone_pass": {k: v for k, v in lone.items() if k != "mismatched_requests"},
        "results": results,
        "stall": stall,
        "targets": targets,
        "errors": sum(e["ours"]["errors"] for e in results.values()) + lone["errors"] + (stall or {}).get("errors", 0),
        "mismatches": sum(e["ours"]["mismatches"] for e in results.values()),
    }


def table(report: dict[str, Any]) -> str:
    return render(report)


def _f(value: Any, spec: str = ".0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    gpu = f" ({m['gpu']})" if "gpu" in m else ""
    lines = [
        f"machine: {m['platform']}, {m['processor']}, {cpus(m)}, python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads; the engine {m.get('engine_threads', '?')}), "
        f"transformers {m['transformers']}, "
        f"device {m['device']}{gpu}",
        f"requests: {len(report['requests'])} ({c['per_task']} per task, {len({r['task'] for r in report['requests']})}"
        f" tasks, {'each naming its task' if c.get('name_tasks') else 'routed by the server'}), max_new_tokens "
        f"{c['max_new_tokens']}, greedy; {report['real_tokens']} real tokens "
        f"(the lone replies, EOS included); server budget {c['budget']}; median of {c['rounds']} interleaved rounds",
        _processes(report),
        "",
        f"{'clients':>7} {'tok/s':>7} {'req/s':>6} {'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} {'route ms':>8} "
        f"{'err':>4} {'!=alone':>7} | {'hf alone':>8} {'hf padded':>9} {'hf CB':>7} | {'/alone':>6} {'/padded':>7} "
        f"{'/CB':>5}",
    ]
    for n, entry in report["results"].items():
        o, hf, r = entry["ours"], entry["transformers"], entry["ratios"]
        lines.append(
            f"{n:>7} {_f(o['tokens_per_s']):>7} {_f(o['requests_per_s'], '.1f'):>6} "
            f"{_f(o['ttft_p50_ms'], '.1f') + ' / ' + _f(o['ttft_p99_ms'], '.1f'):>16} "
            f"{_f(o['itl_p50_ms'], '.1f') + ' / ' + _f(o['itl_p99_ms'], '.1f'):>15} "
            f"{_f(o.get('route_p50_ms'), '.1f'):>8} {o['errors']:>4} "
            f"{o['mismatches']:>7} | {_f(hf['alone']['tokens_per_s']):>8} {_f(hf['padded']['tokens_per_s']):>9} "
            f"{_f(hf['continuous']['tokens_per_s']):>7} | {_f(r['alone'], '.2f'):>6} {_f(r['padded'], '.2f'):>7} "
            f"{_f(r['continuous'], '.2f'):>5}"
        )
    lines.append(
        "tokens per CPU second (the server's CPU, all its threads and its door process, against the baseline "
        "process's at its best thread count by that measure; a busy machine disturbs it less than wall time): "
        + "; ".join(_per_cpu(n, e) for n, e in report["results"].items())
    )
    threads = [
        f"{kind} at {n}: " + ", ".join(f"{t} thr {_f(v)}" for t, v in entry["transformers"][kind]["by_threads"].items())
        for n, entry in report["results"].items()
        for kind in ("padded", "continuous")
        if entry["transformers"][kind]["by_threads"] and entry["transformers"][kind]["tokens_per_s"] is not None
    ]
    first = next(iter(report["results"].values()), None)
    if first is not None and first["transformers"]["alone"]["by_threads"]:
        threads.insert(
            0,
            "alone: " + ", ".join(f"{t} thr {_f(v)}" for t, v in first["transformers"]["alone"]["by_threads"].items()),
        )
    if threads:
        lines.append("transformers tok/s by torch threads (the best is compared): " + "; ".join(threads))
    for n, entry in report["results"].items():
        for kind in ("padded", "continuous"):
            for error in entry["transformers"][kind]["errors"]:
                lines.append(f"  hf {kind} at {n}: {error}")
        for message in entry["ours"]["error_messages"]:
            lines.append(f"  ours at {n}: {message}")
    llama = report.get("llama_cpp")
    if llama:
        lines.append(
            "llama.cpp's llama-server (every expert, a slot per client, the same prompt ids, greedy): "
            + "; ".join(
                f"{n} clients {_f(e['tokens_per_s'])} tok/s at {e['threads']} thr (ours/llama.cpp "
                f"{_f(e['ours_over_llama'], '.2f')}; {e['same_tokens_as_ours']}/{e['requests']} replies equal ours, "
                "whose experts are the tasks' patterns; "
                f"errors {e['errors']})"
                for n, e in llama.items()
            )
        )
    stall = report.get("stall")
    if stall:
        lines.append("")
        if "error" in stall:
            lines.append(f"stall check: {stall['error']}")
        else:
            cold, warm = stall["cold"], stall["warm"]
            lines += [
                f"stall check: a {stall['stream']['max_new_tokens']}-token stream ({stall['stream']['task']}) while "
                f"{len(stall['newcomer_tasks'])} newcomers ({', '.join(dict.fromkeys(stall['newcomer_tasks']))}, "
                f"{stall['newcomer_tokens']} tokens each) arrive; Redis behind a {stall['throttle_mb_per_s']:g} MB/s "
                f"proxy; median of {len(stall['rounds']['cold'])} rounds",
                f"  {'case':<44} {'ITL p50 ms':>10} {'p99 ms':>8} {'max ms':>8} {'loaded MiB':>10} {'experts':>8}",
                _stall_row(f"cold: {stall['slots_per_layer']} slots/layer, newcomers load", cold),
                _stall_row("warm: budget 1.0, experts resident", warm),
                f"  budget {stall['budget']}: the stream's experts fit beside one newcomer's, "
                f"{stall['forced_loads_per_newcomer']} experts at least to load per newcomer; patterns equal in "
                f"both cases: {stall['patterns_equal_in_both_cases']}",
                f"  p99 ratio cold/warm {_f(stall['p99_ratio'], '.2f')}; errors {stall['errors']}; "
                f"stream replies equal across cases: {stall['stream_replies_equal']}",
            ]
    lines.append("")
    for name, check in report["targets"].items():
        state = {True: "met", False: "NOT met", None: "n/a"}[check["met"]]
        lines.append(f"target {name}: {_f(check['value'], '.2f')} ({state})")
    lines.append(f"errors {report['errors']}, replies different from alone {report['mismatches']}")
    return "\n".join(lines)


def _per_cpu(clients: str, entry: dict[str, Any]) -> str:
    hf, ratios, ours = entry["transformers"], entry["cpu_ratios"], entry["ours"]
    ms = lambda v: _f(None if v is None else v * 1e3)  # noqa: E731
    return (
        f"{clients} clients: ours {_f(ours['tokens_per_cpu_s'])}, "
        f"alone {_f(hf['alone']['tokens_per_cpu_s'])}, padded {_f(hf['padded']['tokens_per_cpu_s'])} "
        f"({_f(ratios['alone'], '.2f')}x alone, {_f(ratios['padded'], '.2f')}x padded); "
        f"CPU ms a run: the server {ms(ours.get('cpu_s'))}, the clients' own process {ms(ours.get('client_cpu_s'))}"
    )


def _processes(report: dict[str, Any]) -> str:
    procs = report.get("processes", {})
    load = report["machine"].get("loadavg")
    text = (
        f"processes: server {procs.get('server', '-')} (premoe serve, default flags), transformers "
        f"{procs.get('baseline', '-')}, clients {', '.join(map(str, procs.get('clients', []))) or '-'}, "
        f"bench {procs.get('bench', '-')}"
    )
    if load:
        text += f"; load average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end"
    return text


def _stall_row(label: str, case: dict[str, Any]) -> str:
    mib = (case["newcomer_loaded_bytes"] or 0) / 2**20
    return (
        f"  {label:<44} {_f(case['itl_p50_ms'], '.1f'):>10} {_f(case['itl_p99_ms'], '.1f'):>8} "
        f"{_f(case['itl_max_ms'], '.1f'):>8} {mib:>10.2f} {_f(case['newcomer_loaded_experts']):>8}"
    )
