"""`premoe bench serve`: the report as a readable table."""

from __future__ import annotations

from typing import Any


def _f(value: Any, spec: str = ".0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    gpu = f" ({m['gpu']})" if "gpu" in m else ""
    lines = [
        f"machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads; the engine {m.get('engine_threads', '?')}), "
        f"transformers {m['transformers']}, "
        f"device {m['device']}{gpu}",
        f"requests: {len(report['requests'])} ({c['per_task']} per task, {len({r['task'] for r in report['requests']})}"
        f" tasks), max_new_tokens {c['max_new_tokens']}, greedy; {report['real_tokens']} real tokens "
        f"(the lone replies, EOS included); server budget {c['budget']}; median of {c['rounds']} interleaved rounds",
        "",
        f"{'clients':>7} {'tok/s':>7} {'req/s':>6} {'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} {'err':>4} "
        f"{'!=alone':>7} | {'hf alone':>8} {'hf padded':>9} {'hf CB':>7} | {'/alone':>6} {'/padded':>7} {'/CB':>5}",
    ]
    for n, entry in report["results"].items():
        o, hf, r = entry["ours"], entry["transformers"], entry["ratios"]
        lines.append(
            f"{n:>7} {_f(o['tokens_per_s']):>7} {_f(o['requests_per_s'], '.1f'):>6} "
            f"{_f(o['ttft_p50_ms'], '.1f') + ' / ' + _f(o['ttft_p99_ms'], '.1f'):>16} "
            f"{_f(o['itl_p50_ms'], '.1f') + ' / ' + _f(o['itl_p99_ms'], '.1f'):>15} {o['errors']:>4} "
            f"{o['mismatches']:>7} | {_f(hf['alone']['tokens_per_s']):>8} {_f(hf['padded']['tokens_per_s']):>9} "
            f"{_f(hf['continuous']['tokens_per_s']):>7} | {_f(r['alone'], '.2f'):>6} {_f(r['padded'], '.2f'):>7} "
            f"{_f(r['continuous'], '.2f'):>5}"
        )
    for n, entry in report["results"].items():
        for kind in ("padded", "continuous"):
            for error in entry["transformers"][kind]["errors"]:
                lines.append(f"  hf {kind} at {n}: {error}")
        for message in entry["ours"]["error_messages"]:
            lines.append(f"  ours at {n}: {message}")
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


def _stall_row(label: str, case: dict[str, Any]) -> str:
    mib = (case["newcomer_loaded_bytes"] or 0) / 2**20
    return (
        f"  {label:<44} {_f(case['itl_p50_ms'], '.1f'):>10} {_f(case['itl_p99_ms'], '.1f'):>8} "
        f"{_f(case['itl_max_ms'], '.1f'):>8} {mib:>10.2f} {_f(case['newcomer_loaded_experts']):>8}"
    )
