"""`premoe bench serve`, stall check: a long stream decodes while newcomers need experts that are not resident,
read from a real Redis-protocol server behind a bandwidth-throttling proxy; the baseline is the same newcomers
with their experts already resident (a budget that holds every expert, warmed), so that only the loads differ."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from ...loopback import redis_server
from ..common import median, percentiles
from .clients import Reply, Req, stream_one
from .proxy import ThrottledProxy


def stream_with_newcomers(
    target: str, stream: Req, newcomers: list[Req], after_chunks: int = 5, timeout: float = 600.0
) -> tuple[Reply, list[Reply]]:
    """Client A streams `stream`; once it has seen `after_chunks` text chunks, client B sends the newcomers one
    after another (each on its own stream) until they are done or the long stream has finished."""
    import grpc

    from ...server.gen import premoe_pb2 as pb
    from ...server.gen import premoe_pb2_grpc as pb_grpc

    channels = [grpc.insecure_channel(target) for _ in range(2)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=60)
    started, finished = threading.Event(), threading.Event()
    done: dict[str, Reply] = {}
    arrivals: list[Reply] = []

    def long_stream() -> None:
        stub = _Watched(pb_grpc.PreMoeStub(channels[0]), started, after_chunks)
        try:
            done["stream"] = stream_one(stub, pb, stream, timeout)
        finally:
            started.set()
            finished.set()

    def newcomer_client() -> None:
        stub = pb_grpc.PreMoeStub(channels[1])
        started.wait()
        for req in newcomers:
            if finished.is_set():
                break
            arrivals.append(stream_one(stub, pb, req, timeout))

    threads = [threading.Thread(target=long_stream, daemon=True), threading.Thread(target=newcomer_client, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for channel in channels:
        channel.close()
    return done["stream"], arrivals


class _Watched:
    """A stub wrapper that sets `started` once the long stream has delivered `after` text chunks."""

    def __init__(self, stub: Any, started: threading.Event, after: int) -> None:
        self.stub, self.started, self.after = stub, started, after

    def GenerateStream(self, request: Any, timeout: float) -> Iterator[Any]:
        seen = 0
        for chunk in self.stub.GenerateStream(request, timeout=timeout):
            if chunk.text:
                seen += 1
                if seen >= self.after:
                    self.started.set()
            yield chunk


def summarize_stall(stream: Reply, newcomers: list[Reply]) -> dict[str, Any]:
    gaps = stream.gaps
    p50, p99 = percentiles(gaps)
    ok = [r for r in newcomers if r.error is None]
    return {
        "stream_tokens": len(stream.token_ids),
        "stream_error": stream.error,
        "itl_p50_ms": None if p50 is None else p50 * 1e3,
        "itl_p99_ms": None if p99 is None else p99 * 1e3,
        "itl_max_ms": max(gaps) * 1e3 if gaps else None,
        "newcomers": len(newcomers),
        "newcomer_errors": [f"{r.req.task}: {r.error}" for r in newcomers if r.error is not None],
        "newcomer_loaded_experts": sum(r.loaded_experts for r in ok),
        "newcomer_loaded_bytes": sum(r.loaded_bytes for r in ok),
        "newcomer_ttft_ms": [None if r.ttft is None else r.ttft * 1e3 for r in ok],
    }


Patterns = dict[str, dict[int, set[int]]]


def _patterns(target: str) -> tuple[Patterns, int, int]:
    """Every task's pattern as the server derived it, its slots per layer, and the layer count (public API)."""
    from ...client import PreMoeClient

    with PreMoeClient(target, timeout=60) as client:
        patterns = {
            t.name: {layer.layer: set(layer.experts) for layer in client.get_task(t.name).layers}
            for t in client.tasks()
        }
        capacity = client.stats().capacity_experts
    layers = max((len(p) for p in patterns.values()), default=1) or 1
    return patterns, capacity // layers, layers


def pick_newcomers(patterns: Patterns, stream: str, cap: int | None) -> tuple[list[str], int, int]:
    """Two tasks A, B to alternate as newcomers beside the stream's pattern S, and the slots per layer C they
    need: each of S+A and S+B fits in C, and S+A+B does not, so that every newcomer must load experts the
    other evicted. `cap` given: only pairs that fit it. Returns (tasks, C, experts forced to load per newcomer)."""
    from itertools import combinations

    s = patterns[stream]
    layers = sorted({layer for p in patterns.values() for layer in p})
    others = sorted(t for t in patterns if t != stream)
    best: tuple[tuple[int, int], list[str], int] | None = None
    for pair in [*combinations(others, 2), *((t,) for t in others)]:
        sets = [patterns[t] for t in pair]
        need = max(len(s.get(layer, set()) | p.get(layer, set())) for p in sets for layer in layers)
        if cap is not None and need > cap:
            continue
        slots = cap if cap is not None else need
        union = [set().union(s.get(layer, set()), *(p.get(layer, set()) for p in sets)) for layer in layers]
        forced = sum(max(0, len(u) - slots) for u in union) if len(pair) == 2 else 0
        missing = sum(len(p.get(layer, set()) - s.get(layer, set())) for p in sets for layer in layers)
        key = (forced, missing)
        if best is None or key > best[0]:
            best = (key, list(pair), slots)
    if best is None:
        return [], cap or 0, 0
    return best[1], best[2], best[0][0]


def stall_check(
    make_config: Any,
    embedder: Any,
    requests: list[Req],
    *,
    throttle_mbps: float,
    budget: str,
    stream_tokens: int,
    newcomers: int,
    newcomer_tokens: int,
    rounds: int,
    progress: Any = None,
) -> dict[str, Any]:
    """Run the stall check; `make_config(budget, redis_url)` builds a ServiceConfig. `budget="auto"`: the
    smallest budget that holds the stream's pattern beside each newcomer's (see `pick_newcomers`)."""
    from dataclasses import replace

    from ...server import running_server

    tick = progress or (lambda _desc: None)
    first: dict[str, Req] = {}
    for req in requests:
        first.setdefault(req.task, replace(req, name_task=True))  # the check serves chosen tasks' patterns
    with (
        redis_server() as redis_port,
        ThrottledProxy(redis_port, throttle_mbps * 1e6) as proxy,
        running_server(make_config("1.0", proxy.url), embedder=embedder) as (_, warm_port),
    ):
        warm = f"127.0.0.1:{warm_port}"
        tick("stall: choosing the stream")
        stream = _choose_stream(warm, list(first.values()), stream_tokens)
        natural, experts, _ = _patterns(warm)  # a budget of 1.0 holds every expert: patterns are uncapped
        if budget == "auto":
            _, slots, _ = pick_newcomers(natural, stream.task, None)
            budget = f"{(slots + 0.5) / experts:.6f}"
        with running_server(make_config(budget, proxy.url), embedder=embedder) as (_, cold_port):
            cold = f"127.0.0.1:{cold_port}"
            patterns, slots, _ = _patterns(cold)
            tasks, slots, forced = pick_newcomers(patterns, stream.task, slots)
            if not tasks:
                return {"error": f"no task's pattern fits beside {stream.task}'s in budget {budget}"}
            same = all(patterns[t] == natural[t] for t in [stream.task, *tasks])
            queue = [replace(first[tasks[i % len(tasks)]], max_new_tokens=newcomer_tokens) for i in range(newcomers)]
            tick("stall: warm-up (fills Redis, makes the warm server's experts resident)")
            for target in (cold, warm):
                stream_with_newcomers(target, replace(stream, max_new_tokens=8), [], after_chunks=1)
                for req in queue[:2]:
                    stream_with_newcomers(target, req, [], after_chunks=1)
            per_round: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
            outputs: list[list[int]] = []
            for r in range(rounds):
                for case, target in (("cold", cold), ("warm", warm)):
                    tick(f"stall: round {r + 1}/{rounds}, {case}")
                    before = proxy.forwarded
                    long, arrivals = stream_with_newcomers(target, stream, queue)
                    summary = summarize_stall(long, arrivals)
                    summary["proxy_bytes"] = proxy.forwarded - before
                    per_round[case].append(summary)
                    outputs.append(long.token_ids)
    keys = ("itl_p50_ms", "itl_p99_ms", "itl_max_ms", "newcomer_loaded_experts", "newcomer_loaded_bytes", "proxy_bytes")
    medians = {case: {k: median([s[k] for s in rows]) for k in keys} for case, rows in per_round.items()}
    cold_p99, warm_p99 = medians["cold"]["itl_p99_ms"], medians["warm"]["itl_p99_ms"]
    errors = sum(len(s["newcomer_errors"]) + (s["stream_error"] is not None) for v in per_round.values() for s in v)
    return {
        "throttle_mb_per_s": throttle_mbps,
        "budget": budget,
        "slots_per_layer": slots,
        "stream": {"task": stream.task, "prompt": stream.prompt, "max_new_tokens": stream.max_new_tokens},
        "newcomer_tasks": [q.task for q in queue],
        "newcomer_tokens": newcomer_tokens,
        "forced_loads_per_newcomer": forced,
        "patterns_equal_in_both_cases": same,
        "rounds": per_round,
        "cold": medians["cold"],
        "warm": medians["warm"],
        "p99_ratio": cold_p99 / warm_p99 if cold_p99 and warm_p99 else None,
        "stream_replies_equal": all(o == outputs[0] for o in outputs),
        "errors": errors,
    }


def _choose_stream(target: str, candidates: list[Req], tokens: int) -> Req:
    """The candidate (longest prompts first) whose lone reply runs longest, stopping at one that reaches `tokens`."""
    from dataclasses import replace

    best: tuple[int, Req] | None = None
    for req in sorted(candidates, key=lambda r: -len(r.prompt)):
        req = replace(req, index=-1, max_new_tokens=tokens)
        reply, _ = stream_with_newcomers(target, req, [], after_chunks=1)
        length = len(reply.token_ids) if reply.error is None else 0
        if best is None or length > best[0]:
            best = (length, req)
        if length >= tokens:
            break
    assert best is not None
    return best[1]
