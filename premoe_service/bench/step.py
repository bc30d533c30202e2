"""`premoe bench step`: where one engine step's time goes, against transformers' own forward pass plus argmax.

The engine loop alone (no doors) decodes B rows whose caches hold L tokens; each step is split into the loop's
phases (`engine.stats.PHASES`: scheduling, inputs and routing context, forward, sampling, coverage, text, events).
transformers runs the same rows (the same token ids, no padding) in a clean process of its own: one forward pass
and an argmax per step, at the same torch thread count. Rounds are interleaved and medians reported, of wall time
and of the process's CPU time per step (on a machine other jobs share, CPU time moves less than wall time).

A round (`--round-data`, on by default) then puts `premoe bench serve`'s request list (the same prompts and order;
each ends at its max_new_tokens or the model's EOS) into the engine at once and times it to its last token, against
transformers' left-padded batch of the same requests in a clean process of its own: the server's 16-client figure
without the doors, the clients and their arrival, so that a reader can tell the engine's share of that figure from
the server's.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import InvalidArgument
from .serve.benchmark import baseline_threads

PROMPTS = [
    "The river ran past the old mill, and the children followed it down to the sea.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Question: what is 17 + 25? Answer: 42. Question: what is 9 * 8? Answer:",
    "Translate to French: the cat sleeps on the warm windowsill in the afternoon sun.",
]


@dataclass
class StepBenchOptions:
    store: str | None = None  # None: var/reference-store, built from `model` when missing
    model: str = "models/reference-moe"
    rows: str = "1,4,16,32"
    kv_len: int = 24
    steps: int = 16
    rounds: int = 5
    threads: str | None = None  # "1,2"; None: 1 and all cores
    device: str = "auto"
    out: str | None = "var/bench-step.json"
    compile_step: bool = True
    quiet: bool = False
    round_data: str | None = "reference/tasks"  # <task>/eval.jsonl folders, as `bench serve --data`; None: no round
    round_per_task: int = 2
    round_max_new_tokens: str = "3-32"
    round_seed: int = 0


def _rows(text: str) -> list[int]:
    try:
        rows = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        rows = []
    if not rows or rows[0] < 1:
        raise InvalidArgument(f"give row counts >= 1, e.g. 1,4,16,32; got {text!r}", field="rows")
    return rows


class EngineSteps:
    """The engine loop on the store, every expert resident, driven step by step on this thread."""

    def __init__(self, store_dir: Path, device: str, max_rows: int, compiled: bool = False) -> None:
        from transformers import AutoTokenizer

        from ..engine import BatchLimits, EngineLoop
        from ..pattern import Pattern
        from ..runtime.build import load_model
        from ..runtime.residency import Budget
        from ..store import Store, open_cache

        store = Store(store_dir, open_cache(None))
        patterned, residency = load_model(store, Budget(fraction=1.0), device=None if device == "auto" else device)
        limits = BatchLimits(max_rows=max_rows, max_prefill_tokens=1 << 20, max_join_wait_steps=0)
        self.loop = EngineLoop(patterned, residency, store, eos=set(), limits=limits, compiled=compiled)
        self.loop.batch.warm_up()  # the loop is driven on this thread, without `start()`
        self.pattern = Pattern.full(patterned.spec)
        self.tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
        self.device = patterned.device

    def ids(self, rows: int, kv_len: int) -> list[list[int]]:
        """The rows' prompts: the built-in prompts' tokens repeated to `kv_len` (what the baseline uses too)."""
        prompts = [list(self.tokenizer(p)["input_ids"]) for p in PROMPTS]
        return [(prompts[row % len(prompts)] * kv_len)[:kv_len] for row in range(rows)]

    def measure(self, rows: int, kv_len: int, steps: int, threads: int) -> dict[str, Any]:
        """Prefill `rows` requests of `kv_len` tokens, then time `steps` decode steps (phases per step, in ms)."""
        from ..engine import Request, SamplingParams, Status

        loop = self.loop
        loop.threads = threads
        params = SamplingParams(max_new_tokens=steps + 2)
        requests = [loop.submit(Request(ids, self.pattern, params, self.tokenizer)) for ids in self.ids(rows, kv_len)]
        _step_until(loop, requests, Status.RUNNING, "the rows did not start")
        before = dict(loop.stats.phase_seconds)
        walls, cpus = [], []
        for _ in range(steps):
            start, cpu = time.perf_counter(), time.process_time()
            loop.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        phases = {k: (v - before[k]) / steps * 1e3 for k, v in loop.stats.phase_seconds.items()}
        loop.run_until_idle()
        return {
            "rows": rows,
            "kv_len": kv_len,
            "step_ms": statistics.median(walls) * 1e3,
            "cpu_ms": statistics.median(cpus) * 1e3,
            "phases_ms": phases,
        }

    def round(self, prompts: Sequence[list[int]], lengths: Sequence[int], threads: int) -> dict[str, Any]:
        """Submit every prompt at once (request i generates up to `lengths[i]` tokens, greedy, and stops at the
        model's EOS as the server's requests do) and step until the last has finished: the wall seconds of the whole,
        and each request's tokens."""
        from ..engine import Request, SamplingParams, Status
        from ..serving.core import eos_ids

        loop = self.loop
        loop.threads = threads
        stop = tuple(sorted(eos_ids(loop.patterned.model)))
        start = time.perf_counter()
        requests = [
            loop.submit(
                Request(list(ids), self.pattern, SamplingParams(max_new_tokens=n, stop_token_ids=stop), self.tokenizer)
            )
            for ids, n in zip(prompts, lengths, strict=True)
        ]
        _step_until(loop, requests, Status.FINISHED, "the round did not finish")
        return {"wall_s": time.perf_counter() - start, "generated": [len(r.generated) for r in requests]}

    def close(self) -> None:
        self.loop.close()


def _step_until(loop: Any, requests: Sequence[Any], status: Any, failure: str, timeout_s: float = 600.0) -> None:
    """Step `loop` on this thread until every request has `status`; `failure` (with the loop's figures) past
    `timeout_s`. While no pass runs, the loader thread may be copying experts in: wait a little."""
    deadline = time.monotonic() + timeout_s
    while not all(r.status is status for r in requests):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{failure}: {loop.stats}")
        if not loop.step():
            time.sleep(0.001)


def run(options: StepBenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to `options.out` as JSON and printed as a table)."""
    from ..runtime.build import resolve_device
    from .common import machine
    from .serve.baselines import BaselineProcess
    from .serve.benchmark import ServeBenchOptions, _store

    rows, threads = _rows(options.rows), baseline_threads(options.threads)
    if options.kv_len < 1 or options.steps < 1 or options.rounds < 1:
        raise InvalidArgument("kv_len, steps and rounds must be at least 1", field="steps")
    round_requests = _round_requests(options)
    device = resolve_device(None if options.device == "auto" else options.device)
    store = _store(ServeBenchOptions(store=options.store, model=options.model, quiet=options.quiet))
    patterned = EngineSteps(store, options.device, rows[-1], options.compile_step)
    ours: dict[tuple[int, int], list[dict[str, Any]]] = {(t, n): [] for t in threads for n in rows}
    theirs: dict[tuple[int, int], list[dict[str, Any]]] = {(t, n): [] for t in threads for n in rows}
    loadavg = [os.getloadavg()]
    total = (options.rounds + 1) * (len(ours) + (len(threads) if round_requests else 0))
    bar = tqdm(total=total, disable=options.quiet, desc="bench step", unit="run")
    round_report = None
    try:
        with BaselineProcess(Path(options.model), PROMPTS, [1], device) as hf:
            for r in range(options.rounds + 1):  # round 0 warms both sides up and is not counted
                for t in threads:
                    for n in rows:
                        bar.set_description(f"round {r}/{options.rounds}: {n} rows, {t} threads")
                        mine = patterned.measure(n, options.kv_len, options.steps, t)
                        base = hf.run("forward_step", t, rows=n, kv_len=options.kv_len, steps=options.steps)
                        if "error" in base:
                            raise RuntimeError(f"transformers baseline: {base['error']}")
                        if r:
                            ours[(t, n)].append(mine)
                            theirs[(t, n)].append(base)
                        bar.update(1)
            baseline_pid = hf.pid
        if round_requests:
            round_report = _round(options, patterned, round_requests, threads, device, bar)
    finally:
        bar.close()
        patterned.close()
    loadavg.append(os.getloadavg())
    results = []
    for (t, n), runs in ours.items():
        step = statistics.median(run["step_ms"] for run in runs)
        cpu = statistics.median(run["cpu_ms"] for run in runs)
        phases = {k: statistics.median(run["phases_ms"][k] for run in runs) for k in runs[0]["phases_ms"]}
        base = statistics.median(run["step_ms"] for run in theirs[(t, n)])
        base_cpu = statistics.median(run["cpu_ms"] for run in theirs[(t, n)])
        results.append(
            {
                "threads": t,
                "rows": n,
                "ours_step_ms": step,
                "phases_ms": phases,
                "hf_step_ms": base,
                "ratio": step / base,
                "ours_cpu_ms": cpu,
                "hf_cpu_ms": base_cpu,
                "cpu_ratio": cpu / base_cpu if base_cpu > 0 else None,
            }
        )
    report = {
        "machine": {**machine(device), "loadavg": {"start": loadavg[0], "end": loadavg[1]}},
        "config": asdict(options),
        "processes": {"engine": os.getpid(), "baseline": baseline_pid},
        "stack": patterned.loop.batch.stack_state(),
        "results": results,
        "round": round_report,
    }
    print(render(report))
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {options.out}")
    return report


def _round_requests(options: StepBenchOptions) -> list[Any]:
    """`bench serve`'s request list from `options.round_data` (every task folder with an eval.jsonl)."""
    from .serve.clients import build_requests, parse_range

    if not options.round_data:
        return []
    data = Path(options.round_data)
    names = sorted(p.parent.name for p in data.glob("*/eval.jsonl"))
    if not names:
        raise InvalidArgument(f"no <task>/eval.jsonl under {data}", field="round_data")
    if options.round_per_task < 1:
        raise InvalidArgument("must be at least 1", field="round_per_task")
    try:
        span = parse_range(options.round_max_new_tokens)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc), field="round_max_new_tokens") from exc
    return build_requests(data, names, options.round_per_task, span, seed=options.round_seed)


def _round(
    options: StepBenchOptions,
    engine: EngineSteps,
    requests: Sequence[Any],
    threads: Sequence[int],
    device: Any,
    bar: Any,
) -> dict[str, Any]:
    """The requests all at once through the engine, against transformers' padded batch of them (a clean process of
    its own), both sides at each thread count; rounds interleaved, medians reported (the first round warms up)."""
    from .serve.baselines import BaselineProcess

    prompts = [r.prompt for r in requests]
    ids = [list(engine.tokenizer(p)["input_ids"]) for p in prompts]
    # Each request's length as the server serves it (bench serve takes its lone replies'): its max_new_tokens, or
    # fewer where the model ends it with EOS. Batching changes no request's tokens, so one pass at once tells.
    lengths = engine.round(ids, [r.max_new_tokens for r in requests], threads[0])["generated"]
    ours: dict[int, list[dict[str, Any]]] = {t: [] for t in threads}
    theirs: dict[int, list[dict[str, Any]]] = {t: [] for t in threads}
    with BaselineProcess(Path(options.model), prompts, lengths, device) as hf:
        for r in range(options.rounds + 1):
            for t in threads:
                bar.set_description(f"round {r}/{options.rounds}: {len(ids)} requests at once, {t} threads")
                mine = engine.round(ids, lengths, t)
                base = hf.run("padded", t, n=len(prompts))
                if "error" in base:
                    raise RuntimeError(f"transformers baseline: {base['error']}")
                if r:
                    ours[t].append(mine)
                    theirs[t].append(base)
                bar.update(1)
        pid = hf.pid
    results = []
    for t in threads:
        wall = statistics.median(run["wall_s"] for run in ours[t])
        base = statistics.median(run["wall_s"] for run in theirs[t])
        results.append(
            {
                "threads": t,
                "ours_ms": wall * 1e3,
                "hf_padded_ms": base * 1e3,
                "ours_tokens_per_s": sum(lengths) / wall,
                "hf_tokens_per_s": sum(lengths) / base,
                "ratio": base / wall,  # ours over transformers, in tokens per second
                "generated": [sum(run["generated"]) for run in ours[t]],
            }
        )
    return {
        "requests": len(requests),
        "lengths": lengths,
        "tokens": sum(lengths),
        "baseline_pid": pid,
        "results": results,
    }


def render(report: dict[str, Any]) -> str:
    from .common import cpus

    m, c = report["machine"], report["config"]
    load = m["loadavg"]
    phases = list(report["results"][0]["phases_ms"]) if report["results"] else []
    lines = [
        f"machine: {m['platform']}, {m['processor']}, {cpus(m)}, torch {m['torch']}, transformers "
        f"{m['transformers']}, device {m['device']}; load average {load['start'][0]:.2f} at the start, "
        f"{load['end'][0]:.2f} at the end",
        f"decode steps at KV length {c['kv_len']} (+{c['steps']} steps), every expert, greedy; median of "
        f"{c['rounds']} interleaved rounds; transformers in process {report['processes']['baseline']}, the engine in "
        f"{report['processes']['engine']} (decoder stack {report['stack']})",
        "",
        f"{'threads':>7} {'rows':>4} | {'ours ms':>7} "
        + " ".join(f"{p:>8}" for p in phases)
        + f" | {'hf fwd+argmax ms':>16} | {'ours/hf':>7} | {'CPU ms ours':>11} {'hf':>6} {'ratio':>6}",
    ]
    for row in report["results"]:
        cpu_ratio = "-" if row["cpu_ratio"] is None else f"{row['cpu_ratio']:.2f}"
        lines.append(
            f"{row['threads']:>7} {row['rows']:>4} | {row['ours_step_ms']:>7.2f} "
            + " ".join(f"{row['phases_ms'][p]:>8.2f}" for p in phases)
            + f" | {row['hf_step_ms']:>16.2f} | {row['ratio']:>7.2f} | {row['ours_cpu_ms']:>11.2f} "
            f"{row['hf_cpu_ms']:>6.2f} {cpu_ratio:>6}"
        )
    lines.append(
        "wall: median step; phases: mean per step (wall); CPU: the process's CPU seconds per step (all its threads), "
        "which a busy machine disturbs less than wall time"
    )
    rounds = report.get("round")
    if rounds:
        lines += [
            "",
            f"a round: bench serve's {rounds['requests']} requests ({rounds['tokens']} tokens) at once through the "
            f"engine, against transformers' left-padded batch of them in process {rounds['baseline_pid']}",
            f"{'threads':>7} | {'ours ms':>8} {'tok/s':>7} | {'hf padded ms':>12} {'tok/s':>7} | {'ours/hf':>7}",
        ]
        for row in rounds["results"]:
            lines.append(
                f"{row['threads']:>7} | {row['ours_ms']:>8.1f} {row['ours_tokens_per_s']:>7.0f} | "
                f"{row['hf_padded_ms']:>12.1f} {row['hf_tokens_per_s']:>7.0f} | {row['ratio']:>7.2f}"
            )
    return "\n".join(lines)
