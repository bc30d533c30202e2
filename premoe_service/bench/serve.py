"""`premoe bench serve`: the gRPC server under N concurrent clients against transformers in the same run.

One fixed list of greedy requests (prompts of several tasks, each naming its task) goes through the real server
with N = 1, 4, 16 ... concurrent gRPC clients (a closed loop: each client sends its next request when the last
one is done), and through transformers with every expert, in-process: `generate` on each prompt alone, on
left-padded batches of N prompts, and continuous batching with N requests in flight. Every baseline generates
exactly the real tokens of the server's lone reply to each request (up to and including EOS). Rounds are
interleaved and medians reported. Every reply is checked equal to the same request sent alone. A stall check
follows (see `serve_stall`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import InvalidArgument
from .serve_clients import build_requests, parse_range, run_clients, run_clients_apart, summarize
from .serve_report import assemble, table


@dataclass
class ServeBenchOptions:
    store: str | None = None  # None: var/reference-store, built from `model` when missing
    model: str = "models/reference-moe"
    profiles: str = "profiles"
    data: str = "reference/tasks"
    tasks: str | None = None  # comma-separated; None: every profile with data
    per_task: int = 2
    text_chars: int = 60
    clients: str = "1,4,16"
    rounds: int = 5
    max_new_tokens: str = "3-32"
    seed: int = 0
    device: str = "auto"
    budget: str = "1.0"
    embedder: str | None = None
    out: str | None = "var/bench-serve.json"
    baselines: bool = True
    continuous: bool = True
    stall: bool = True
    throttle_mbps: float = 20.0
    stall_budget: str = "auto"
    stall_tokens: int = 200
    stall_newcomers: int = 6
    stall_newcomer_tokens: int = 8
    stall_rounds: int = 3
    serve_opts: list[str] = field(default_factory=list)  # extra ServiceConfig fields, NAME=VALUE
    quiet: bool = False
    clients_apart: bool = True  # clients in their own process (as real clients are), else threads of this one


def _store(options: ServeBenchOptions) -> Path:
    store = Path(options.store or "var/reference-store")
    if not (store / "manifest.json").exists():
        if options.store is not None and not Path(options.model).exists():
            raise InvalidArgument(f"no store at {store}", field="store")
        from ..store import shard

        shard(options.model, store, progress=not options.quiet)
    return store


def _config_factory(options: ServeBenchOptions, store: Path, max_clients: int, token_limit: int) -> Any:
    """`make(budget, redis_url) -> ServiceConfig`, with only fields this ServiceConfig has set beyond the basics."""
    from ..serving import ServiceConfig

    fields = {f.name: f for f in dataclasses.fields(ServiceConfig)}
    extra: dict[str, Any] = {}
    for item in options.serve_opts:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise InvalidArgument(f"expected NAME=VALUE with a ServiceConfig field, got {item!r}", field="serve_opt")
        default = fields[name].default
        kind = type(default) if default is not None and default is not dataclasses.MISSING else str
        extra[name] = text.lower() in ("1", "true", "yes") if kind is bool else kind(text)

    def make(budget: str, redis_url: str | None) -> Any:
        return ServiceConfig(
            store=store,
            profiles=Path(options.profiles),
            redis_url=redis_url,
            budget=budget,
            device=options.device,
            embedder=options.embedder,
            port=0,
            max_new_tokens_limit=max(1024, token_limit),
            **extra,
        )

    return make


def run(options: ServeBenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to `options.out` as JSON and printed as a table)."""
    from ..retrieval import Embedder
    from ..runtime.build import resolve_device
    from ..server import running_server
    from .serve_baselines import HFBaselines

    counts = sorted({int(n) for n in str(options.clients).split(",") if n.strip()})
    if not counts or counts[0] < 1:
        raise InvalidArgument("give client counts >= 1, e.g. 1,4,16", field="clients")
    device = resolve_device(None if options.device == "auto" else options.device)
    store = _store(options)
    profiles = Path(options.profiles)
    names = options.tasks.split(",") if options.tasks else sorted(p.stem for p in profiles.glob("*.safetensors"))
    names = [n for n in names if (Path(options.data) / n / "eval.jsonl").exists()]
    if not names:
        raise InvalidArgument(f"no task has both a profile in {profiles} and data in {options.data}", field="tasks")
    requests = build_requests(
        Path(options.data),
        names,
        options.per_task,
        parse_range(options.max_new_tokens),
        options.text_chars,
        options.seed,
    )
    make_config = _config_factory(
        options, store, counts[-1], max(options.stall_tokens, max(r.max_new_tokens for r in requests))
    )
    embedder = Embedder(options.embedder)
    steps = options.rounds * len(counts) * (1 + 2 * options.baselines) + options.rounds * options.baselines + 2
    bar = tqdm(total=steps, disable=options.quiet, desc="bench serve", unit="run")

    def tick(desc: str) -> None:
        bar.set_description(desc)
        bar.update(1)

    baseline_threads = torch.get_num_threads()  # transformers runs at torch's own setting, its best here

    def best(fn: Any, *args: Any) -> Any:
        torch.set_num_threads(baseline_threads)  # the engine loop sets its own again at its next step
        return fn(*args)

    ours: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    base: dict[str, dict[int, list[dict[str, Any]]]] = {k: {n: [] for n in counts} for k in ("padded", "continuous")}
    base_alone: list[dict[str, Any]] = []
    with running_server(make_config(options.budget, None), embedder=embedder) as (_, port):
        target = f"127.0.0.1:{port}"
        tick("lone replies")
        send = run_clients_apart if options.clients_apart else run_clients
        lone = summarize(single := send(target, requests, 1), None)
        alone = {r.req.index: r.token_ids for r in single.replies if r.error is None}
        lengths = [len(alone.get(r.index, [])) or r.max_new_tokens for r in requests]
        hf = HFBaselines(Path(options.model), requests, lengths, device) if options.baselines else None
        if hf is not None:
            tick("baseline warm-up")
            best(hf.padded, counts[-1])
            if options.continuous:
                best(hf.continuous, counts[-1])
        for r in range(options.rounds):  # interleaved: every configuration once per round
            for n in counts:
                tick(f"round {r + 1}/{options.rounds}: ours, {n} clients")
                ours[n].append(summarize(send(target, requests, n), alone))
                if hf is None:
                    continue
                tick(f"round {r + 1}/{options.rounds}: generate, batches of {n}")
                base["padded"][n].append(best(hf.padded, n))
                tick(f"round {r + 1}/{options.rounds}: continuous batching, {n} in flight")
                base["continuous"][n].append(best(hf.continuous, n) if options.continuous else {"error": "skipped"})
            if hf is not None:
                tick(f"round {r + 1}/{options.rounds}: generate alone")
                base_alone.append(best(hf.alone))
    bar.close()
    stall = None
    if options.stall:
        stall_bar = tqdm(total=4 + 2 * options.stall_rounds, disable=options.quiet, desc="stall check", unit="step")

        def stall_tick(desc: str) -> None:
            stall_bar.set_description(desc)
            stall_bar.update(1)

        stall = _stall(options, make_config, embedder, requests, stall_tick)
        stall_bar.close()
    config = dataclasses.asdict(options)
    report = assemble(config, device, requests, lengths, lone, ours, base, base_alone, stall)
    print(table(report))
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {options.out}")
    return report


def _stall(options: ServeBenchOptions, make_config: Any, embedder: Any, requests: Any, tick: Any) -> dict[str, Any]:
    from .serve_stall import stall_check

    try:
        return stall_check(
            make_config,
            embedder,
            requests,
            throttle_mbps=options.throttle_mbps,
            budget=options.stall_budget,
            stream_tokens=options.stall_tokens,
            newcomers=options.stall_newcomers,
            newcomer_tokens=options.stall_newcomer_tokens,
            rounds=options.stall_rounds,
            progress=tick,
        )
    except Exception as exc:  # reported, not fatal: the throughput figures stand on their own
        return {"error": f"{type(exc).__name__}: {exc}"}
