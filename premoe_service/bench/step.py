"""`premoe bench step`: where one engine step's time goes, against transformers' own forward pass plus argmax.

The engine loop alone (no doors) decodes B rows whose caches hold L tokens; each step is split into the loop's
phases (`engine.stats.PHASES`: scheduling, inputs and routing context, forward, sampling, coverage, text, events).
transformers runs the same rows (the same token ids, no padding) in a clean process of its own: one forward pass
and an argmax per step, at the same torch thread count. Rounds are interleaved and medians reported, of wall time
and of the process's CPU time per step (on a machine other jobs share, CPU time moves less than wall time).
"""

from __future__ import annotations

import json
import os
import statistics
import time
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
        deadline = time.monotonic() + 600
        while not all(r.status is Status.RUNNING for r in requests):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the rows did not start: {loop.stats}")
            if not loop.step():
                time.sleep(0.002)  # expert copies run on the loader thread
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

    def close(self) -> None:
        self.loop.close()


def run(options: StepBenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to `options.out` as JSON and printed as a table)."""
    from ..runtime.build import resolve_device
    from .common import machine
    from .serve.baselines import BaselineProcess
    from .serve.benchmark import ServeBenchOptions, _store

    rows, threads = _rows(options.rows), baseline_threads(options.threads)
    if options.kv_len < 1 or options.steps < 1 or options.rounds < 1:
        raise InvalidArgument("kv_len, steps and rounds must be at least 1", field="steps")
    device = resolve_device(None if options.device == "auto" else options.device)
    store = _store(ServeBenchOptions(store=options.store, model=options.model, quiet=options.quiet))
    patterned = EngineSteps(store, options.device, rows[-1], options.compile_step)
    ours: dict[tuple[int, int], list[dict[str, Any]]] = {(t, n): [] for t in threads for n in rows}
    theirs: dict[tuple[int, int], list[dict[str, Any]]] = {(t, n): [] for t in threads for n in rows}
    loadavg = [os.getloadavg()]
    bar = tqdm(total=(options.rounds + 1) * len(ours), disable=options.quiet, desc="bench step", unit="config")
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
    }
    print(render(report))
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {options.out}")
    return report


def render(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    load = m["loadavg"]
    phases = list(report["results"][0]["phases_ms"]) if report["results"] else []
    lines = [
        f"machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']}, transformers "
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
    return "\n".join(lines)
