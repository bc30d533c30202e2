"""Where a routed round's CPU goes: the server's core in this process (no doors), `premoe bench serve`'s 16 requests
sent at once from 16 threads, rounds routed by the server (as users send them) and rounds naming their task
alternating. Prints each kind's tokens/s, its process CPU a round, and the CPU a round of each of the process's
threads by name (the engine, the embedder, the router signal's), from the kernel's accounting, and the rest.

    python -m scripts.route_cpu --rounds 8
    python -m scripts.route_cpu --rounds 8 --no-compile-step

Rounds alternate inside one process, so the machine's swings fall on both kinds alike (two server processes side
by side, as `scripts/serve_ab` runs them, differed by up to ~5% with the same code on this project's 2-core VM).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of the process's live threads, summed by thread name (threads of no name count as "other")."""
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    found: dict[str, float] = {}
    for thread in psutil.Process().threads():
        name = names.get(thread.id, "other")
        name = "callers" if name.startswith("burst-") else name
        found[name] = found.get(name, 0.0) + thread.user_time + thread.system_time
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("var/reference-store"))
    parser.add_argument("--profiles", type=Path, default=Path("profiles"))
    parser.add_argument("--data", type=Path, default=Path("reference/tasks"))
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each kind, after 2 of warm-up")
    parser.add_argument("--compile-step", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    from premoe_service.bench.serve.clients import build_requests, parse_range
    from premoe_service.serving import SamplingParams, ServiceConfig, ServingCore

    tasks = [
        p.stem for p in sorted(args.profiles.glob("*.safetensors")) if (args.data / p.stem / "eval.jsonl").exists()
    ]
    if not tasks:
        raise SystemExit(f"no task has both a profile in {args.profiles} and data in {args.data}")
    config = ServiceConfig(store=args.store, profiles=args.profiles, compile_step=args.compile_step)
    core = ServingCore(config)
    kinds = {
        "routed": build_requests(args.data, tasks, 2, parse_range("3-32"), name_tasks=False),
        "named": build_requests(args.data, tasks, 2, parse_range("3-32"), name_tasks=True),
    }

    def burst(kind: str) -> tuple[float, float, dict[str, float]]:
        """One round of `kind`: (tokens/s, process CPU seconds, CPU seconds by thread name)."""
        requests = kinds[kind]
        barrier = threading.Barrier(len(requests) + 1)
        tokens = [0] * len(requests)
        done = threading.Barrier(len(requests) + 1)
        release = threading.Event()  # the callers' CPU is read before they end

        def send(i: int) -> None:
            request = requests[i]
            barrier.wait()
            params = SamplingParams(max_new_tokens=request.max_new_tokens, temperature=0.0)
            *_, result = core.generate(request.prompt, params, task=request.task if request.name_task else None)
            tokens[i] = len(result.token_ids)
            done.wait()
            release.wait()

        threads = [threading.Thread(target=send, args=(i,), name=f"burst-{i}") for i in range(len(requests))]
        for thread in threads:
            thread.start()
        before, cpu = _thread_cpu(), time.process_time()
        barrier.wait()
        start = time.perf_counter()
        done.wait()
        wall = time.perf_counter() - start
        after, cpu = _thread_cpu(), time.process_time() - cpu
        release.set()
        for thread in threads:
            thread.join()
        by_thread = {name: after[name] - before.get(name, 0.0) for name in after}
        return sum(tokens) / wall, cpu, by_thread

    try:
        for _ in range(2):
            for kind in kinds:
                burst(kind)
        results: dict[str, list[tuple[float, float, dict[str, float]]]] = {kind: [] for kind in kinds}
        for i in range(args.rounds):
            for kind in list(kinds) if i % 2 == 0 else list(kinds)[::-1]:
                results[kind].append(burst(kind))
        for kind, runs in results.items():
            rate = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            print(f"{kind}: {rate:.0f} tok/s, process CPU {cpu * 1e3:.1f} ms a round (medians of {len(runs)})")
            # Means, not medians: the kernel counts a thread's time in ticks (10 ms here), which a mean evens out.
            totals: dict[str, float] = {}
            for run in runs:
                for name, seconds in run[2].items():
                    totals[name] = totals.get(name, 0.0) + seconds
            for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
                ms = seconds / len(runs) * 1e3
                if ms >= 0.5:
                    print(f"    {name}: {ms:.1f} ms a round (mean)")
            # A thread that runs a millisecond a round is rarely charged a tick: the callers' CPU (tokenizing,
            # deciding) shows as what the threads above leave of the process's (which is counted exactly).
            rest = sum(r[1] for r in runs) - sum(totals.values())
            print(f"    the rest (the callers, threads that ended): {rest / len(runs) * 1e3:.1f} ms a round (mean)")
    finally:
        core.close()


if __name__ == "__main__":
    main()
