"""`premoe bench serve`: the gRPC server under N concurrent clients against transformers in the same run.

One fixed list of greedy requests (prompts of several tasks, sent as a user sends a prompt: the server embeds and
routes each; with `name_tasks` each names its task, and retrieval is skipped) goes through `premoe serve` as
shipped (its own process, default flags) with N = 1, 4, 16 ... concurrent gRPC clients in a process of their own
(a closed loop: each client sends its next request when the last one is done), and through transformers with
every expert in a clean process of its own, at 1 thread and at all cores (the best is compared): `generate` on
each prompt alone, on left-padded batches of N prompts, and continuous batching with N requests in flight. Every
baseline generates exactly the real tokens of the server's lone reply to each request (up to and including EOS).
Rounds are interleaved and medians reported. Every reply is checked equal to the same request sent alone. A stall
check follows (see `serve_stall`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ...cores import usable_cores
from ...errors import InvalidArgument
from .clients import Req, build_requests, parse_range, run_clients, run_clients_apart, summarize
from .report import assemble, table


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
    name_tasks: bool = False  # each request names its task (the server skips retrieval); False: routed, as users send
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
    serve_opts: list[str] = field(default_factory=list)  # stall check: extra ServiceConfig fields, NAME=VALUE
    serve_args: list[str] = field(default_factory=list)  # extra `premoe serve` flags of the measured server
    baseline_threads: str | None = None  # "1,2": torch threads of the baselines; None: 1 and all cores
    quiet: bool = False
    clients_apart: bool = True  # clients in their own process (as real clients are), else threads of this one
    llama_server: str | None = None  # llama.cpp's llama-server binary: adds its baseline (with `llama_gguf`)
    llama_gguf: str | None = None  # the same model as a GGUF file


def _store(options: ServeBenchOptions) -> Path:
    store = Path(options.store or "var/reference-store")
    if not (store / "manifest.json").exists():
        if options.store is not None and not Path(options.model).exists():
            raise InvalidArgument(f"no store at {store}", field="store")
        from ...store import shard

        shard(options.model, store, progress=not options.quiet)
    return store


def _config_factory(options: ServeBenchOptions, store: Path, max_clients: int, token_limit: int) -> Any:
    """`make(budget, redis_url) -> ServiceConfig`, with only fields this ServiceConfig has set beyond the basics."""
    from ...serving import ServiceConfig

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


def baseline_threads(text: str | None) -> list[int]:
    """The torch thread counts the baselines are measured at: `"1,4"`, or None for 1 and all cores."""
    if not text:
        return sorted({1, usable_cores()})
    try:
        counts = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise InvalidArgument(f"give thread counts >= 1, e.g. 1,2; got {text!r}", field="baseline_threads")
    return counts


def run(options: ServeBenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to `options.out` as JSON and printed as a table).

    Three kinds of process, as a user would run them: `premoe serve` as shipped (default flags), the clients
    (a process per run), and transformers (a worker process that holds only the model). Each waits while another
    is measured; the benchmark's own process only drives them.
    """
    from ...retrieval import Embedder
    from ...runtime.build import resolve_device
    from .baselines import BaselineProcess
    from .process import server_process

    counts = sorted({int(n) for n in str(options.clients).split(",") if n.strip()})
    if not counts or counts[0] < 1:
        raise InvalidArgument("give client counts >= 1, e.g. 1,4,16", field="clients")
    threads = baseline_threads(options.baseline_threads)
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
        options.name_tasks,
    )
    token_limit = max(options.stall_tokens, max(r.max_new_tokens for r in requests))
    kinds = ["padded", *(["continuous"] if options.continuous else [])]
    use_llama = _llama_wanted(options)
    prompt_ids = _prompt_ids(store, requests) if use_llama else []
    per_round = len(counts) * (1 + options.baselines * len(threads) * len(kinds)) + options.baselines * len(threads)
    per_round += len(counts) * len(threads) * use_llama
    bar = tqdm(total=options.rounds * per_round + 2, disable=options.quiet, desc="bench serve", unit="run")

    def tick(desc: str) -> None:
        bar.set_description(desc)
        bar.update(1)

    loadavg = [os.getloadavg()]
    ours: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    base: dict[str, dict[int, dict[int, list[dict[str, Any]]]]] = {
        k: {n: {t: [] for t in threads} for n in counts} for k in ("padded", "continuous")
    }
    base_alone: dict[int, list[dict[str, Any]]] = {t: [] for t in threads}
    llama: dict[int, dict[int, list[dict[str, Any]]]] = {n: {t: [] for t in threads} for n in counts}
    processes: dict[str, Any] = {"bench": os.getpid()}
    send = run_clients_apart if options.clients_apart else run_clients
    serving = server_process(
        store,
        profiles,
        device=options.device,
        budget=options.budget,
        embedder=options.embedder,
        token_limit=token_limit,
        extra=options.serve_args,
    )
    with serving as server, ExitStack() as stack:
        processes.update(server=server.pid, server_command=server.command[1:], clients=set())
        tick("lone replies")
        lone = summarize(single := send(server.target, requests, 1), None)
        alone = {r.req.index: r.token_ids for r in single.replies if r.error is None}
        lengths = [len(alone.get(r.index, [])) or r.max_new_tokens for r in requests]
        hf = None
        if options.baselines:
            prompts = [r.prompt for r in requests]
            hf = stack.enter_context(BaselineProcess(Path(options.model), prompts, lengths, device))
            processes["baseline"] = hf.pid
            tick("baseline warm-up")
            for t in threads:
                for kind in kinds:
                    hf.run(kind, t, n=counts[-1])
        llama_servers = {}
        if use_llama:  # idle processes of their own while the others are measured, as the transformers worker
            from .llama import llama_server

            context = max(len(ids) for ids in prompt_ids) + max(lengths) + 8
            for t in threads:
                llama_servers[t] = stack.enter_context(
                    llama_server(options.llama_server, options.llama_gguf, slots=counts[-1], context=context, threads=t)  # type: ignore[arg-type]
                )
            processes["llama_server"] = sorted(s.pid for s in llama_servers.values())
        for r in range(options.rounds):  # interleaved: every configuration once per round
            for n in counts:
                tick(f"round {r + 1}/{options.rounds}: ours, {n} clients")
                before = server.cpu_seconds()
                ours[n].append(summarize(send(server.target, requests, n), alone))
                ours[n][-1]["cpu_s"] = _spent(before, server.cpu_seconds())
                ours[n][-1]["tokens_per_cpu_s"] = _per(ours[n][-1]["tokens"], ours[n][-1]["cpu_s"])
                processes["clients"].add(ours[n][-1]["client_pid"])
                for t in threads if hf is not None else []:
                    for kind in kinds:
                        tick(f"round {r + 1}/{options.rounds}: transformers {kind}, {n} rows, {t} threads")
                        base[kind][n][t].append(hf.run(kind, t, n=n))  # type: ignore[union-attr]
                for t, llama_proc in llama_servers.items():
                    tick(f"round {r + 1}/{options.rounds}: llama.cpp, {n} clients, {t} threads")
                    llama[n][t].append(_llama_round(llama_proc, prompt_ids, lengths, n, requests, alone))
            for t in threads if hf is not None else []:
                tick(f"round {r + 1}/{options.rounds}: transformers alone, {t} threads")
                base_alone[t].append(hf.run("alone", t))  # type: ignore[union-attr]
    bar.close()
    loadavg.append(os.getloadavg())
    processes["clients"] = sorted(processes["clients"])
    stall = None
    if options.stall:
        stall_bar = tqdm(total=4 + 2 * options.stall_rounds, disable=options.quiet, desc="stall check", unit="step")

        def stall_tick(desc: str) -> None:
            stall_bar.set_description(desc)
            stall_bar.update(1)

        make_config = _config_factory(options, store, counts[-1], token_limit)
        stall = _stall(options, make_config, Embedder(options.embedder), requests, stall_tick)
        stall_bar.close()
    config = dataclasses.asdict(options)
    report = assemble(config, device, requests, lengths, lone, ours, base, base_alone, stall)
    report["processes"] = processes
    if use_llama:
        report["llama_cpp"] = _llama_summary(llama, report)
    report["machine"]["loadavg"] = {"start": loadavg[0], "end": loadavg[1]}
    print(table(report))
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {options.out}")
    return report


def _llama_wanted(options: ServeBenchOptions) -> bool:
    """Whether the llama.cpp baseline runs: both its binary and its GGUF given (one alone is an error)."""
    if bool(options.llama_server) != bool(options.llama_gguf):
        missing = "llama_gguf" if options.llama_server else "llama_server"
        raise InvalidArgument("the llama.cpp baseline needs both --llama-server and --llama-gguf", field=missing)
    return bool(options.llama_server)


def _prompt_ids(store: Path, requests: Sequence[Req]) -> list[list[int]]:
    """Each request's prompt as our server tokenizes it (the llama.cpp baseline is sent these ids)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store, local_files_only=True)
    return [list(tokenizer(r.prompt)["input_ids"]) for r in requests]


def _llama_round(
    server: Any,
    prompt_ids: list[list[int]],
    lengths: list[int],
    clients: int,
    requests: Sequence[Req],
    alone: dict[int, list[int]],
) -> dict[str, Any]:
    from .llama import compare, run_llama_clients

    before = server.cpu_seconds()
    result = compare(
        run_llama_clients(server.url, prompt_ids, lengths, clients), [alone.get(r.index, []) for r in requests]
    )
    result["cpu_s"] = _spent(before, server.cpu_seconds())
    result["tokens_per_cpu_s"] = _per(result["tokens"], result["cpu_s"])
    result["pid"] = server.pid
    return result


def _llama_summary(llama: dict[int, dict[int, list[dict[str, Any]]]], report: dict[str, Any]) -> dict[str, Any]:
    """Per client count: llama.cpp's median tokens/s at each thread count, the best, and ours against it."""
    out: dict[str, Any] = {}
    for n, by_threads in llama.items():
        medians = {t: statistics.median(r["tokens_per_s"] for r in rows) for t, rows in by_threads.items() if rows}
        if not medians:
            continue
        top = max(medians, key=lambda t: medians[t])
        ours = report["results"][str(n)]["ours"]["tokens_per_s"]
        rows = by_threads[top]
        out[str(n)] = {
            "tokens_per_s": medians[top],
            "threads": top,
            "by_threads": {str(t): v for t, v in medians.items()},
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] or 0.0 for r in rows),
            "same_tokens_as_ours": min(r["same_tokens_as_ours"] for r in rows),
            "requests": rows[0]["requests"],
            "errors": sum(r["errors"] for r in rows),
            "ours_over_llama": None if ours is None else ours / medians[top],
            "rounds": {str(t): r for t, r in by_threads.items()},
        }
    return out


def _spent(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _per(tokens: int, seconds: float | None) -> float | None:
    return tokens / seconds if seconds else None


def _stall(options: ServeBenchOptions, make_config: Any, embedder: Any, requests: Any, tick: Any) -> dict[str, Any]:
    from .stall import stall_check

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
