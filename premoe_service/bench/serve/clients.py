"""`premoe bench serve`, client side: the fixed request list and N concurrent gRPC clients going through it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InvalidArgument
from ..common import median, percentiles


@dataclass(frozen=True)
class Req:
    """One request of the fixed list: greedy, from `task`'s data. With `name_task` it names its task (the server then
    skips retrieval); without, it is sent as a user sends a prompt, and the server embeds and routes it."""

    index: int
    task: str
    prompt: str
    max_new_tokens: int
    name_task: bool = True


@dataclass
class Reply:
    """What one client saw of one request (times on `time.perf_counter`)."""

    req: Req
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks that carry text
    done: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str | None = None
    loaded_experts: int = 0  # experts this request loaded (cache + disk tiers), from its stats
    loaded_bytes: int = 0
    precisions: dict[str, int] = field(default_factory=dict)  # experts that served it per precision, from its stats
    decision: str = ""  # how the server chose its pattern: "match", "fallback" (retrieval ran) or "override" (named)
    route_ms: float | None = None  # the server's time to route it (retrieval, or looking up the named task)

    @property
    def ttft(self) -> float | None:
        first = self.chunk_times[0] if self.chunk_times else self.done
        return first - self.sent if first else None

    @property
    def gaps(self) -> list[float]:
        """Inter-token latency: time between consecutive text-carrying chunks."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def parse_range(text: str) -> tuple[int, int]:
    """`"3-32"` -> (3, 32); `"16"` -> (16, 16)."""
    lo, _, hi = str(text).partition("-")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError as exc:
        raise InvalidArgument(f"expected N or LO-HI, got {text!r}", field="max_new_tokens") from exc
    if not 1 <= low <= high:
        raise InvalidArgument(f"expected 1 <= LO <= HI, got {text!r}", field="max_new_tokens")
    return low, high


def build_requests(
    data: Path,
    tasks: Sequence[str],
    per_task: int,
    max_new: tuple[int, int],
    text_chars: int = 60,
    seed: int = 0,
    name_tasks: bool = True,
) -> list[Req]:
    """`per_task` prompts of each task from `<data>/<task>/eval.jsonl` (text tasks: the first `text_chars`
    characters), interleaved task by task so that neighbours differ, each with a seeded max_new_tokens; naming their
    task unless `name_tasks` is False (`Req`)."""
    from ...evaluation.run import load_eval_items

    rng = random.Random(seed)
    per: dict[str, list[str]] = {}
    for task in tasks:
        items = load_eval_items(Path(data) / task / "eval.jsonl", per_task)
        per[task] = [item.prompt if item.exact else item.text[:text_chars] for item in items]
    requests: list[Req] = []
    for i in range(per_task):
        for task in tasks:
            if i < len(per[task]):
                requests.append(Req(len(requests), task, per[task][i], rng.randint(*max_new), name_tasks))
    return requests


def stream_one(stub: Any, pb: Any, req: Req, timeout: float) -> Reply:
    """Send one request as a GenerateStream call and record what arrives when; errors are recorded, not raised."""
    reply = Reply(req)
    named = {"task": req.task} if req.name_task else {}
    request = pb.GenerateRequest(prompt=req.prompt, max_new_tokens=req.max_new_tokens, temperature=0.0, **named)
    reply.sent = time.perf_counter()
    try:
        for chunk in stub.GenerateStream(request, timeout=timeout):
            now = time.perf_counter()
            if chunk.text:
                reply.chunk_times.append(now)
            if chunk.finish_reason:
                reply.token_ids = list(chunk.token_ids)
                reply.finish_reason = chunk.finish_reason
                loads = chunk.stats.loads
                reply.loaded_experts = int(loads.cache + loads.disk)
                reply.loaded_bytes = int(loads.bytes)
                reply.precisions = {p: int(n) for p, n in chunk.stats.precisions.items()}
                reply.decision = chunk.stats.decision
                reply.route_ms = chunk.stats.timings.route_ms
    except Exception as exc:  # grpc.RpcError and anything else: counted as an error, the run goes on
        code = getattr(exc, "code", None)
        details = getattr(exc, "details", None)
        name = getattr(code(), "name", type(exc).__name__) if callable(code) else type(exc).__name__
        reply.error = f"{name}: {details() if callable(details) else exc}"
    reply.done = time.perf_counter()
    if reply.error is None and not reply.finish_reason:
        reply.error = "stream ended without a final chunk"
    return reply


@dataclass
class ClientRun:
    clients: int
    wall_s: float
    replies: list[Reply]
    pid: int = field(default_factory=os.getpid)  # the process the clients ran in
    cpu_s: float | None = None  # CPU seconds of that process (all its threads) over the run, connections made before


def run_clients(target: str, requests: Sequence[Req], clients: int, timeout: float = 600.0) -> ClientRun:
    """`clients` threads, each with its own channel, take the next request of the list until none is left
    (a closed loop); the wall time runs from the common start to the last reply."""
    import grpc

    from ...server.gen import premoe_pb2 as pb
    from ...server.gen import premoe_pb2_grpc as pb_grpc

    channels = [grpc.insecure_channel(target) for _ in range(clients)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=60)
    replies: list[Reply | None] = [None] * len(requests)

    def worker(stub: Any) -> Callable[[int], None]:
        def send(i: int) -> None:
            replies[i] = stream_one(stub, pb, requests[i], timeout)

        return send

    cpu = time.process_time()
    wall = closed_loop(len(requests), [worker(pb_grpc.PreMoeStub(c)) for c in channels])
    cpu = time.process_time() - cpu
    for channel in channels:
        channel.close()
    return ClientRun(clients, wall, [r for r in replies if r is not None], cpu_s=cpu)


def closed_loop(count: int, workers: Sequence[Callable[[int], None]]) -> float:
    """One thread per worker takes the next of `count` items until none is left (a closed loop) and hands it to its
    worker (each a client with its own connection); returns the wall time from their common start to the last end."""
    lock = threading.Lock()
    cursor = iter(range(count))
    start = threading.Barrier(len(workers) + 1)

    def client(work: Callable[[int], None]) -> None:
        start.wait()
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            work(i)

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began


def run_clients_apart(target: str, requests: Sequence[Req], clients: int, timeout: float = 600.0) -> ClientRun:
    """`run_clients` in a separate Python process, as real clients are: they then do not share the server's
    interpreter lock. Requests go in and replies come back as JSON."""
    payload = {"target": target, "clients": clients, "timeout": timeout, "requests": [asdict(r) for r in requests]}
    done = subprocess.run(
        [sys.executable, "-m", "premoe_service.bench.serve.clients"],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=timeout + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"client process failed: {done.stderr.strip()[-2000:]}")
    data = json.loads(done.stdout)
    by_index = {r.index: r for r in requests}
    replies = []
    for item in data["replies"]:
        reply = Reply(by_index[item.pop("index")])
        for name, value in item.items():
            setattr(reply, name, value)
        replies.append(reply)
    return ClientRun(data["clients"], data["wall_s"], replies, data["pid"], data.get("cpu_s"))


def _main() -> None:
    """Client process of `run_clients_apart`: JSON request list on stdin, JSON replies on stdout."""
    payload = json.load(sys.stdin)
    requests = [Req(**r) for r in payload["requests"]]
    run = run_clients(payload["target"], requests, int(payload["clients"]), float(payload["timeout"]))
    replies = [{"index": r.req.index, **{k: v for k, v in asdict(r).items() if k != "req"}} for r in run.replies]
    json.dump(
        {"clients": run.clients, "wall_s": run.wall_s, "replies": replies, "pid": os.getpid(), "cpu_s": run.cpu_s},
        sys.stdout,
    )


def summarize(run: ClientRun, alone: dict[int, list[int]] | None) -> dict[str, Any]:
    """Aggregate figures of one run; `mismatches` counts replies whose tokens differ from the lone reply."""
    ok = [r for r in run.replies if r.error is None]
    tokens = sum(len(r.token_ids) for r in ok)
    ttft = [t for r in ok if (t := r.ttft) is not None]
    gaps = [g for r in ok for g in r.gaps]
    ttft50, ttft99 = percentiles(ttft)
    itl50, itl99 = percentiles(gaps)
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    mismatched = [r.req.index for r in ok if alone is not None and r.token_ids != alone.get(r.req.index)]
    errors = [f"#{r.req.index} {r.req.task}: {r.error}" for r in run.replies if r.error is not None]
    return {
        "clients": run.clients,
        "client_pid": run.pid,
        "client_cpu_s": run.cpu_s,
        "requests": len(run.replies),
        "tokens": tokens,
        "wall_s": run.wall_s,
        "tokens_per_s": tokens / run.wall_s if run.wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / run.wall_s if run.wall_s > 0 else 0.0,
        "ttft_p50_ms": ms(ttft50),
        "ttft_p99_ms": ms(ttft99),
        "itl_p50_ms": ms(itl50),
        "itl_p99_ms": ms(itl99),
        "route_p50_ms": median(r.route_ms for r in ok),
        "errors": len(errors),
        "error_messages": errors[:5],
        "mismatches": len(mismatched),
        "mismatched_requests": mismatched,
        "loaded_experts": sum(r.loaded_experts for r in ok),
    }


if __name__ == "__main__":
    _main()
