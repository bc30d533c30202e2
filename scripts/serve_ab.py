"""Two servers side by side, the same clients alternating rounds between them: an A/B of two checkouts (or two
flag sets) that the machine's swings do not decide. While one server answers a round, the other is idle, so each
round is measured on a quiet machine at nearly the same moment; the per-round ratio B/A cancels the drift that
separate `premoe bench serve` runs minutes apart carry (on this project's 2-core VM, 20-50% within minutes).

    python -m scripts.serve_ab --a /tmp/old-checkout --b . --rounds 10 --clients 1,16
    python -m scripts.serve_ab --a . --b . --b-arg=--engine-threads --b-arg=2

Each side runs `python -m premoe_service.cli serve` from its checkout (its own `premoe_service`, imported first),
on the same store and profiles, with `premoe bench serve`'s requests (routed by the server, as users send them)
and its gRPC streaming clients, in this process. Prints each side's median tokens/s and route p50, and the median
of the per-round ratios B/A.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(checkout: Path, store: Path, profiles: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-m", "premoe_service.cli", "serve", "--store", str(store)]
    command += ["--profiles", str(profiles), "--port", str(port), *extra]
    process = subprocess.Popen(command, cwd=checkout, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return process, f"127.0.0.1:{port}"


def _wait(target: str, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    import grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server for {target} exited with {process.returncode}")
        try:
            grpc.channel_ready_future(grpc.insecure_channel(target)).result(timeout=1)
            return
        except grpc.FutureTimeoutError:
            continue
    raise SystemExit(f"no server answered at {target} within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="checkout of side A")
    parser.add_argument("--b", type=Path, required=True, help="checkout of side B")
    parser.add_argument("--a-arg", action="append", default=[], help="extra `premoe serve` flag of A (repeatable)")
    parser.add_argument("--b-arg", action="append", default=[], help="extra `premoe serve` flag of B (repeatable)")
    parser.add_argument("--store", type=Path, default=Path("var/reference-store"))
    parser.add_argument("--profiles", type=Path, default=Path("profiles"))
    parser.add_argument("--data", type=Path, default=Path("reference/tasks"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", default="1,16", help="comma-separated concurrent client counts")
    args = parser.parse_args()

    from premoe_service.bench.serve.clients import build_requests, parse_range, run_clients

    tasks = [
        p.stem for p in sorted(args.profiles.glob("*.safetensors")) if (args.data / p.stem / "eval.jsonl").exists()
    ]
    if not tasks:
        raise SystemExit(f"no task has both a profile in {args.profiles} and data in {args.data}")
    requests = build_requests(args.data, tasks, 2, parse_range("3-32"), name_tasks=False)
    clients = [int(c) for c in args.clients.split(",")]
    store, profiles = args.store.resolve(), args.profiles.resolve()
    sides = {}
    for name, checkout, extra in (("A", args.a, args.a_arg), ("B", args.b, args.b_arg)):
        sides[name] = _serve(checkout.resolve(), store, profiles, extra, Path(f"/tmp/serve_ab_{name}.log"))
    try:
        for process, target in sides.values():
            _wait(target, process)
            run_clients(target, requests, 1)  # warm: every task's experts and graphs once
        results: dict[tuple[str, int], list[tuple[float, float]]] = {(s, c): [] for s in sides for c in clients}
        for i in range(args.rounds):
            for count in clients:
                for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    run = run_clients(sides[name][1], requests, count)
                    failed = [r.error for r in run.replies if r.error]
                    if failed:
                        raise SystemExit(f"side {name}, {count} clients: {len(failed)} errors, first: {failed[0]}")
                    tokens = sum(len(r.token_ids) for r in run.replies)
                    route = statistics.median(r.route_ms or 0.0 for r in run.replies)
                    results[(name, count)].append((tokens / run.wall_s, route))
        for count in clients:
            line = [f"{count:>2} clients"]
            for name in sides:
                rates = [r for r, _ in results[(name, count)]]
                routes = [t for _, t in results[(name, count)]]
                line.append(
                    f"{name} {statistics.median(rates):6.0f} tok/s (route p50 {statistics.median(routes):5.1f} ms)"
                )
            ratios = [b[0] / a[0] for a, b in zip(results[("A", count)], results[("B", count)], strict=True)]
            line.append(f"B/A per round: median {statistics.median(ratios):.3f}")
            print(" | ".join(line))
    finally:
        for process, _ in sides.values():
            process.terminate()
        for process, _ in sides.values():
            process.wait(30)


if __name__ == "__main__":
    main()
