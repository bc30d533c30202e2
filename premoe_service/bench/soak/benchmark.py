"""`premoe bench soak`: a server in its own process under many clients for minutes, with a mix of good, bad,
cancelled, slow and deadline-bound requests and task registrations, while its Redis is killed and restarted empty
once. Counts every outcome against what it should be, and samples the server's resident memory.

A good request must succeed whatever Redis does (the expert cache is optional); a bad one must be refused with its
documented code; a registration may be refused as UNAVAILABLE only while Redis is down (a shared registry needs it).
Anything else is an unintended error."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ...client import PreMoeClient
from ...loopback import ServerProcess, premoe_server
from .parts import RestartableRedis, prompts_by_task

OK = grpc.StatusCode.OK
TOKEN = "soak-admin-token"
# What each kind of request may end with; anything else is unintended.
INTENDED: dict[str, set[grpc.StatusCode]] = {
    "generate": {OK},
    "stream": {OK},
    "route": {OK},
    "slow": {OK},
    "cancelled": {grpc.StatusCode.CANCELLED, OK},  # OK: it finished before the cancel arrived
    "deadline": {grpc.StatusCode.DEADLINE_EXCEEDED, OK},
    "bad": {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND},
    "register": {OK},
}
WEIGHTS = {
    "generate": 30,
    "stream": 15,
    "route": 15,
    "slow": 5,
    "cancelled": 10,
    "deadline": 5,
    "bad": 18,
    "register": 2,
}


@dataclass
class Tally:
    """Outcomes per kind, unintended ones with their messages, and latencies of good requests."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    unintended: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, code: grpc.StatusCode, seconds: float, detail: str, redis_down: bool) -> None:
        intended = code in INTENDED[kind] or (kind == "register" and redis_down and code is grpc.StatusCode.UNAVAILABLE)
        with self.lock:
            self.outcomes[(kind, code.name)] += 1
            if not intended:
                self.unintended.append(f"{kind}: {code.name} {detail[:200]}")
            elif code is OK and kind in ("generate", "route"):
                self.latencies.append(seconds)


def _bad_request(client: PreMoeClient, rng: random.Random, limit: int) -> None:
    case = rng.randrange(6)
    if case == 0:
        client.generate("   ", max_new_tokens=4)
    elif case == 1:
        client.generate("hello", max_new_tokens=4, temperature=-1.0)
    elif case == 2:
        client.generate("hello", max_new_tokens=10**7)
    elif case == 3:
        client.generate("x" * (limit + 1 + rng.randrange(1 << 16)), max_new_tokens=4)
    elif case == 4:
        client.route("y" * (limit + 1))
    else:
        client.generate("hello", task=f"no-such-task-{rng.randrange(1000)}", max_new_tokens=4)


def _one(kind: str, client: PreMoeClient, admin: PreMoeClient, rng: random.Random, prompt: str, options: dict) -> None:
    if kind == "generate":
        client.generate(prompt, **options)
    elif kind == "route":
        client.route(prompt)
    elif kind in ("stream", "slow"):
        for _ in client.stream(prompt, **options):
            if kind == "slow":
                time.sleep(0.05 + rng.random() * 0.15)
    elif kind == "cancelled":
        call = client.stub.GenerateStream(client.request(prompt, **options), timeout=60)
        next(call)
        call.cancel()
        for _ in call:  # raises CANCELLED
            pass
    elif kind == "deadline":
        client.generate(prompt, timeout=0.02 + rng.random() * 0.1, max_new_tokens=options["max_new_tokens"] * 4)
    elif kind == "register":
        name = f"soak-{rng.randrange(1 << 30):x}"
        admin.register(name, [prompt, prompt[::-1] or "x"], experts_per_layer=None, timeout=120)
        admin.delete_task(name)


def _client_loop(
    target: str,
    seed: int,
    end: float,
    prompts: list[str],
    options: dict[str, Any],
    limit: int,
    tally: Tally,
    redis_down: Callable[[], bool],
) -> None:
    rng = random.Random(seed)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    with PreMoeClient(target, timeout=120) as client, PreMoeClient(target, admin_token=TOKEN, timeout=120) as admin:
        while time.monotonic() < end:
            kind = rng.choices(kinds, weights)[0]
            prompt = rng.choice(prompts)
            start, code, detail = time.perf_counter(), OK, ""
            try:
                if kind == "bad":
                    _bad_request(client, rng, limit)
                    code, detail = grpc.StatusCode.UNKNOWN, "a bad request was served"
                else:
                    _one(kind, client, admin, rng, prompt, options)
            except grpc.RpcError as exc:
                code, detail = exc.code(), exc.details() or ""
            tally.record(kind, code, time.perf_counter() - start, detail, redis_down())


@contextmanager
def _server(store: Path, profiles: Path, redis_url: str, extra: list[str]) -> Iterator[ServerProcess]:
    args = ["--redis-url", redis_url, "--admin-token", TOKEN, "--device", "cpu", *extra]
    with premoe_server(store, profiles, args) as server:
        yield server


def run(
    store: Path,
    profiles: Path | None,
    seconds: float,
    clients: int,
    max_new_tokens: int,
    queries: Path | None,
    server_args: list[str] | None = None,
) -> dict[str, Any]:
    """Run the soak; returns the report (also what `--json` writes)."""
    prompt_limit = 256 * 1024  # the server's default --max-prompt-bytes
    prompts = [p for ps in prompts_by_task(queries).values() for p in ps]
    options = {"max_new_tokens": max_new_tokens}
    tally = Tally()
    memory: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as work, RestartableRedis() as redis:
        folder = Path(work) / "profiles"
        if profiles is not None:
            shutil.copytree(profiles, folder)  # registrations and deletions go to a copy
        else:
            folder.mkdir()
        with _server(store, folder, redis.url, server_args or []) as server:
            target = server.target
            start = time.monotonic()
            end = start + seconds
            threads = [
                threading.Thread(
                    target=_client_loop,
                    args=(target, i, end, prompts, options, prompt_limit, tally, redis.is_down),
                    daemon=True,
                )
                for i in range(clients)
            ]
            for thread in threads:
                thread.start()
            restarted = False
            while any(t.is_alive() for t in threads):
                now = time.monotonic() - start
                memory.append((now, server.rss_mib()))
                if not restarted and now >= seconds / 2:
                    redis.restart_empty()
                    restarted = True
                time.sleep(1.0)
            for thread in threads:
                thread.join()
            with PreMoeClient(target, timeout=30) as client:
                health = client.health()
            memory.append((time.monotonic() - start, server.rss_mib()))
    warm_at = max(30.0, seconds * 0.2)
    warm = next((m for t, m in memory if t >= warm_at), memory[0][1])
    latencies = sorted(tally.latencies)
    return {
        "seconds": seconds,
        "clients": clients,
        "outcomes": {f"{kind} {code}": n for (kind, code), n in sorted(tally.outcomes.items())},
        "requests": sum(tally.outcomes.values()),
        "unintended": len(tally.unintended),
        "unintended_examples": tally.unintended[:10],
        "redis_restarts": redis.restarts,
        "health_after": health,
        "rss_after_warmup_mib": warm,
        "rss_end_mib": memory[-1][1],
        "rss_end_over_warmup": memory[-1][1] / warm if warm else float("nan"),
        "good_latency_p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else None,
        "good_latency_p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)] if latencies else None,
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"soak: {report['clients']} clients for {report['seconds']:.0f} s, {report['requests']} requests"]
    lines += [f"  {name:<28} {count:>7}" for name, count in report["outcomes"].items()]
    lines.append(f"unintended errors: {report['unintended']}")
    lines += [f"  {example}" for example in report["unintended_examples"]]
    lines.append(f"redis restarted empty: {report['redis_restarts']}x; health after: {report['health_after']}")
    lines.append(
        f"server RSS: {report['rss_after_warmup_mib']:.0f} MiB after warm-up, {report['rss_end_mib']:.0f} MiB at the "
        f"end ({report['rss_end_over_warmup']:.3f}x)"
    )
    if report["good_latency_p50_ms"] is not None:
        lines.append(
            f"good generate/route latency: p50 {report['good_latency_p50_ms']:.0f} ms, "
            f"p99 {report['good_latency_p99_ms']:.0f} ms"
        )
    return "\n".join(lines)


def main(
    store: Path,
    profiles: Path | None,
    seconds: float,
    clients: int,
    max_new_tokens: int,
    queries: Path | None,
    out: Path | None,
) -> int:
    report = run(store, profiles, seconds, clients, max_new_tokens, queries)
    print(render(report))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["unintended"] else 0
