"""`premoe bench ray`: two engine replicas on Ray Serve, eight tasks, a budget per replica that holds about half of
them, one request stream with task locality; Serve's routing by task (the task as multiplexed model id) against
Serve's default routing of the same deployment (no model id). Bytes of experts moved into device slots, expert hit
rate, tokens/s and latency, measured through Serve's gRPC proxy with real clients; each mode starts cold (a fresh
deployment, an empty Redis re-seeded from the profile folder)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from ...client import PreMoeClient
from ...errors import InvalidArgument
from ...families import adapter_for
from ...loopback import redis_server
from ...pattern import Pattern
from ...profiler.profile import Profile
from ...ray_serve.calls import REPLICA_HEADER
from ...store import Store
from ..switch.benchmark import reference_store, task_pattern
from ..switch.streams import locality_stream
from .report import decompose, summarise_mode, table

ADMIN = "bench"


@dataclass
class RayBenchOptions:
    """Settings of `premoe bench ray` (defaults: the reference model, a few minutes on 2 cores)."""

    store: str | None = None  # None: var/reference-store, sharded from `model` when missing
    model: str = "models/reference-moe"
    profiles: str = "profiles"
    replicas: int = 2
    tasks_held: int = 4  # the budget per replica holds the union of about this many tasks' patterns
    requests: int = 400  # measured, after the warm-up
    warmup: int = 32
    clients: int = 4
    new_tokens: int = 16
    zipf: float = 0.0  # every task as popular: all eight stay in play, more than one replica's budget holds
    mean_burst: float = 4.0
    seed: int = 0
    out: str | None = "var/bench-ray.json"


def slots_for(patterns: dict[str, Pattern], layers: list[int], held: int) -> int:
    """Slots per layer that hold the union of `held` tasks' patterns, for the median choice of `held` tasks."""
    needs = sorted(
        max(len(set().union(*(patterns[t].kept(layer) for t in group))) for layer in layers)
        for group in combinations(sorted(patterns), held)
    )
    return needs[len(needs) // 2]


def plan_budget(store_dir: Path, profiles: list[Profile], held: int) -> tuple[float, dict[str, Pattern], int]:
    """The budget (share of routed experts) per replica, the task patterns under it, and the slots per layer."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(store_dir, local_files_only=True)
    spec = adapter_for(config).spec(config)
    nbytes = Store(store_dir).manifest.expert_nbytes
    slots = spec.num_experts
    for _ in range(4):  # patterns are capped at the slots: settle both
        patterns = {p.name: task_pattern(p, spec, slots, nbytes) for p in profiles}
        needed = slots_for(patterns, list(spec.moe_layers), held)
        if needed == slots:
            break
        slots = needed
    return slots / spec.num_experts, patterns, slots


def prompts_of(task: str, count: int) -> list[str]:
    """The task's held-out prompts (reference/tasks/<task>/eval.jsonl), cut to 200 characters."""
    path = Path("reference/tasks") / task / "eval.jsonl"
    texts = []
    for line in path.read_text().splitlines()[:count]:
        item = json.loads(line)
        texts.append(str(item.get("prompt") or item.get("text"))[:200])
    return texts


def run_stream(port: int, stream: list[str], prompts: dict[str, list[str]], options: RayBenchOptions) -> list[dict]:
    """Send the stream with `options.clients` concurrent clients, in order; one record per request."""
    records: list[dict[str, Any]] = [{} for _ in stream]
    position = iter(range(len(stream)))
    lock = threading.Lock()

    def client() -> None:
        with PreMoeClient(f"127.0.0.1:{port}", timeout=300) as c:
            while True:
                with lock:
                    i = next(position, None)
                if i is None:
                    return
                task = stream[i]
                request = c.request(prompts[task][i % len(prompts[task])], task=task, max_new_tokens=options.new_tokens)
                start = time.perf_counter()
                reply, call = c.stub.Generate.with_call(request)
                records[i] = {
                    "task": task,
                    "replica": dict(call.trailing_metadata())[REPLICA_HEADER],
                    "seconds": time.perf_counter() - start,
                    "start": start,
                    "tokens": reply.stats.generated_tokens,
                }

    threads = [threading.Thread(target=client) for _ in range(options.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def one_mode(affinity: bool, ctx: dict[str, Any], options: RayBenchOptions) -> dict[str, Any]:
    """Deploy cold, warm up (each task once, a moment apart, then the warm-up stream), measure the stream."""
    import redis
    from ray import serve

    from ...ray_serve import published_stats
    from ...ray_serve.app import start
    from ...ray_serve.settings import APP_NAME, RaySettings

    client = redis.Redis.from_url(ctx["config"].redis_url)
    client.flushall()  # a cold cache; the registry is re-seeded from the profile folder
    settings = RaySettings(
        replicas=options.replicas,
        replica_cpus=0.5,
        ingress_cpus=0.25,
        tasks_per_replica=options.tasks_held,
        affinity=affinity,
    )
    start(ctx["config"], settings, grpc_port=ctx["port"], http_port=ctx["http_port"])
    try:
        warm = []
        for task in sorted(set(ctx["stream"])):  # each task's first request alone, then a moment: Serve learns
            warm += run_stream(ctx["port"], [task], ctx["prompts"], options)  # which replica holds it (every 0.1 s)
            time.sleep(0.3)
        warm += run_stream(ctx["port"], ctx["stream"][: options.warmup], ctx["prompts"], options)
        before = {r["replica"]: r for r in published_stats.gather(client, APP_NAME)}
        started = time.perf_counter()
        records = run_stream(ctx["port"], ctx["stream"][options.warmup :], ctx["prompts"], options)
        wall = time.perf_counter() - started
        after = {r["replica"]: r for r in published_stats.gather(client, APP_NAME)}
    finally:
        serve.delete(APP_NAME)
    return summarise_mode(records, warm, before, after, wall, ctx["pattern_bytes"], options.tasks_held)


def run(options: RayBenchOptions) -> dict[str, Any]:
    """Run both modes on one local Ray instance; returns the report (also written to `options.out`)."""
    import ray
    import torch
    from ray import serve

    from ...loopback import free_port
    from ...serving import ServiceConfig
    from ..common import machine

    if options.requests < 1 or options.warmup < 0 or options.clients < 1:
        raise InvalidArgument("requests >= 1, warmup >= 0, clients >= 1", field="requests")
    begun, load_start = time.perf_counter(), os.getloadavg()
    store_dir = reference_store(options.store, options.model)
    profiles = [Profile.load(p) for p in sorted(Path(options.profiles).glob("*.safetensors"))]
    if len(profiles) <= options.tasks_held:
        raise InvalidArgument(f"needs more than {options.tasks_held} task profiles", field="profiles")
    budget, patterns, slots = plan_budget(store_dir, profiles, options.tasks_held)
    nbytes = Store(store_dir).manifest.expert_nbytes
    stream = locality_stream(
        sorted(patterns),
        options.warmup + options.requests,
        zipf=options.zipf,
        mean_burst=options.mean_burst,
        seed=options.seed,
    )
    with tempfile.TemporaryDirectory() as folder, redis_server() as redis_port:
        for path in Path(options.profiles).glob("*.safetensors"):
            shutil.copy(path, folder)  # the replicas' shared record (a deletion would write here, not in profiles/)
        config = ServiceConfig(
            store=store_dir.resolve(),
            profiles=Path(folder),
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            budget=f"{budget}",
            device="cpu",
            admin_token=ADMIN,
            engine_threads=1,
        )
        ctx = {
            "config": config,
            "port": free_port(),
            "http_port": free_port(),
            "stream": stream,
            "prompts": {t: prompts_of(t, 50) for t in patterns},
            "pattern_bytes": {t: p.size * nbytes for t, p in patterns.items()},
        }
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        try:
            modes = {"default": one_mode(False, ctx, options), "affinity": one_mode(True, ctx, options)}
        finally:
            serve.shutdown()
            ray.shutdown()
    report = {
        "benchmark": "ray",
        "machine": {**machine(torch.device("cpu")), "load_average": {"start": load_start, "end": os.getloadavg()}},
        "config": dataclasses.asdict(options),
        "budget": {"share": budget, "slots_per_layer": slots, "tasks_per_replica": options.tasks_held},
        "patterns": {"experts": {t: p.size for t, p in patterns.items()}, "expert_nbytes": nbytes},
        "stream": {"requests": options.requests, "warmup": options.warmup, "tasks": dict(Counter(stream))},
        "modes": modes,
        "decomposition": decompose(modes),
        "latency_p99_ratio": modes["affinity"]["latency_p99_s"] / max(modes["default"]["latency_p99_s"], 1e-9),
        "seconds": time.perf_counter() - begun,
    }
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2))
    return report


def main(options: RayBenchOptions) -> int:
    """Run, print the table, and say whether affinity moved at least 2x fewer expert bytes (the target)."""
    report = run(options)
    print(table(report))
    measured = report["decomposition"]["measured"]
    met = measured is None or measured >= 2.0
    print(f"target (affinity moves >= 2x fewer expert bytes): {'met' if met else 'NOT met'}")
    if options.out:
        print(f"report: {options.out}")
    return 0
