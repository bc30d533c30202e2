"""`premoe bench load|profile|serve|step|route|switch|scale|soak`: benchmarks printing ratios against a raw baseline
measured in the same run (the soak counts outcomes instead).

Options that only a benchmark has carry BENCH in their twin's name (PREMOE_BENCH_ROUNDS); the store, device, budget
and the like keep the twins every verb shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .params import BUDGET, GROUP_SIZE, POSITIVE, PRECISIONS, BudgetType, VerbGroup, option
from .shared import device_option, embedder_option, quiet_option


def bench_option(*decls: str, **kwargs: Any) -> Any:
    """An option only benchmarks have: its twin is PREMOE_BENCH_<FLAG>."""
    flag = next(d for d in decls if d.startswith("--"))
    return option(*decls, env="BENCH_" + flag[2:].replace("-", "_").upper(), **kwargs)


@click.group("bench", cls=VerbGroup, short_help="benchmarks with a raw baseline measured in the same run")
def bench() -> None:
    """Benchmarks: each prints our figure, the raw baseline's, measured interleaved in the same run, and the ratio."""


@bench.command("load", short_help="expert-load throughput per tier vs raw reads of the same bytes")
@option("--store", type=click.Path(exists=True, file_okay=False), help="store to read (default: a throwaway one)")
@option("--redis-url", help="Redis to use (default: start a throwaway Redis-protocol server)")
@bench_option("--hidden", type=POSITIVE, default=512, help="hidden size of the throwaway model")
@bench_option("--experts", type=POSITIVE, default=8, help="experts per layer of the throwaway model")
@bench_option("--layers", type=POSITIVE, default=4, help="MoE layers of the throwaway model")
@bench_option("--rounds", type=POSITIVE, default=7, help="interleaved rounds (median reported)")
@bench_option(
    "--precisions",
    type=PRECISIONS,
    default="",
    help="also quantized experts at these precisions (added to the store when it lacks them)",
)
@bench_option(
    "--group-size", type=POSITIVE, default=GROUP_SIZE, help="group size of quantized copies the benchmark adds"
)
@device_option
def bench_load(
    store: str | None,
    redis_url: str | None,
    hidden: int,
    experts: int,
    layers: int,
    rounds: int,
    precisions: tuple[str, ...],
    group_size: int,
    device: str,
) -> int:
    """Read every expert through each tier (disk, in-process cache, Redis, Redis into device slots) and the same
    bytes the raw way (os.pread, redis-py GET), interleaved, and print GB/s and the ratio ours/raw."""
    from ..bench.load import main

    main(store, redis_url, hidden, experts, layers, rounds, device, precisions, group_size)
    return 0


@bench.command("profile", short_help="layer-streamed profiling vs one plain transformers forward")
@bench_option("--hidden", type=POSITIVE, default=256, help="hidden size of the throwaway model")
@bench_option("--layers", type=POSITIVE, default=6, help="MoE layers")
@bench_option("--experts", type=POSITIVE, default=32, help="experts per layer")
@bench_option("--demos", type=POSITIVE, default=16, help="demos in the batch")
@bench_option("--tokens", type=POSITIVE, default=128, help="tokens per demo")
@bench_option("--rounds", type=POSITIVE, default=3, help="interleaved rounds (median reported)")
def bench_profile(hidden: int, layers: int, experts: int, demos: int, tokens: int, rounds: int) -> int:
    """Time a profile pass (all criteria, one layer of experts resident at a time, loaded from the store) against
    one plain transformers forward of the full model over the same tokens, and compare the weights resident."""
    from ..bench.profile import main

    main(hidden, layers, experts, demos, tokens, rounds)
    return 0


@bench.command("route", short_help="routing accuracy and latency vs a raw embedding search, per registry size")
@bench_option("--quick", is_flag=True, help="1, 100 and 1,000 tasks and fewer repeats (~1 min)")
@bench_option("--repeats", type=POSITIVE, help="passes over the labelled queries per size")
@bench_option("--index-sweep", is_flag=True, help="also exact against HNSW search")
def bench_route(quick: bool, repeats: int | None, index_sweep: bool) -> int:
    """Print the accuracy on the labelled queries, then route latency against the raw baseline per registry size."""
    from ..bench.route.benchmark import main

    main(quick, repeats, index_sweep)
    return 0


@bench.command("route-quality", short_help="what routing keeps of the full model's quality, per task and off-topic")
@option("--store", default="var/reference-store", help="store folder")
@option("--profiles", default="profiles", help="folder of task profiles (with its routing record)")
@bench_option(
    "--queries",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    multiple=True,
    help='JSONL of labelled prompts ({"query": ..., "task": name or null}); repeat it to measure several files '
    "together",
)
@option("--budget", type=BUDGET, default="1.0", help="the server's --budget")
@option("--coverage-floor", type=click.FloatRange(0, 1), help="the server's --coverage-floor (default: its own)")
@bench_option("--continuation", type=POSITIVE, default=24, help="greedy tokens of the full model scored at most")
@bench_option("--rows-out", type=click.Path(dir_okay=False, path_type=Path), help="write each prompt's row here (JSON)")
@bench_option(
    "--save-retention",
    is_flag=True,
    help="write each task's measured retention into the profiles' routing record (the server serves a task that "
    "keeps too little with every expert); measure on training prompts, never on a held-out set",
)
def bench_route_quality(
    store: str,
    profiles: str,
    queries: tuple[Path, ...],
    budget: str,
    coverage_floor: float | None,
    continuation: int,
    rows_out: Path | None,
    save_retention: bool,
) -> int:
    """Serve each prompt as `premoe serve --store --profiles` does with its defaults (one greedy token; the reply
    names the final pattern), score the full model's greedy continuation under that pattern and under all experts,
    and print retention per task and for off-topic prompts with the mean share of experts kept."""
    from ..bench.route.quality import main

    main(Path(store), Path(profiles), queries, budget, coverage_floor, continuation, rows_out, save_retention)
    return 0


@bench.command(
    "serve",
    short_help="the gRPC server under 1, 4, 16 concurrent clients vs transformers, and the expert-load stall check",
)
@option("--store", help="store folder (default: var/reference-store, built from --model when missing)")
@bench_option("--model", default="models/reference-moe", help="the store's transformers checkpoint (baselines)")
@option("--profiles", default="profiles", help="folder of task profiles")
@option("--data", default="reference/tasks", help="folder with <task>/eval.jsonl")
@option("--tasks", help="comma-separated tasks (default: every profile with data)")
@bench_option("--per-task", type=POSITIVE, default=2, help="prompts per task")
@bench_option("--text-chars", type=POSITIVE, default=60, help="prefix length of text-task prompts")
@bench_option("--clients", default="1,4,16", help="comma-separated concurrent client counts")
@bench_option(
    "--name-tasks",
    is_flag=True,
    help="each request names its task, so the server skips retrieval (the engine's view; by default requests are "
    "sent as users send them, and the server embeds and routes each prompt)",
)
@bench_option("--rounds", type=POSITIVE, default=5, help="interleaved rounds (median reported)")
@bench_option("--max-new-tokens", default="3-32", help="range of max_new_tokens, LO-HI")
@bench_option("--seed", type=int, default=0, help="seed of the max_new_tokens draw")
@device_option
@option("--budget", type=BUDGET, default="1.0", help="the server's expert budget")
@embedder_option()
@bench_option("--out", type=click.Path(dir_okay=False), default="var/bench-serve.json", help="JSON report")
@bench_option(
    "--serve-arg",
    multiple=True,
    help="extra flag of the measured `premoe serve` (repeatable, one word each: --serve-arg=--engine-threads "
    "--serve-arg=2); by default it runs with its default flags",
)
@bench_option(
    "--baseline-threads",
    help="comma-separated torch thread counts of the transformers baselines, the best is compared (default: 1 and "
    "all cores)",
)
@bench_option(
    "--llama-server",
    help="llama.cpp's llama-server binary: adds llama.cpp as a baseline (with --llama-gguf; see docs/serving.md)",
)
@bench_option("--llama-gguf", help="the same model converted to GGUF, for --llama-server")
@bench_option("--serve-opt", multiple=True, help="stall check: extra ServiceConfig field NAME=VALUE (repeatable)")
@bench_option("--no-baselines", is_flag=True, help="skip the transformers baselines")
@bench_option("--no-continuous", is_flag=True, help="skip transformers continuous batching")
@bench_option("--no-stall", is_flag=True, help="skip the stall check")
@bench_option(
    "--clients-in-process",
    is_flag=True,
    help="run the clients as threads of the benchmark process (default: a process of their own)",
)
@bench_option(
    "--throttle-mbps", type=click.FloatRange(0, min_open=True), default=20.0, help="stall check: MB/s to Redis"
)
@bench_option(
    "--stall-budget",
    type=BudgetType(allow_auto=True),
    default="auto",
    help="stall check: budget of the server that loads (auto: the stream's experts fit beside each newcomer's, "
    "not beside both newcomers', so that every newcomer loads)",
)
@bench_option("--stall-tokens", type=POSITIVE, default=200, help="stall check: tokens of the long stream")
@bench_option("--stall-newcomers", type=POSITIVE, default=6, help="stall check: newcomer requests")
@bench_option("--stall-newcomer-tokens", type=POSITIVE, default=8, help="stall check: max_new_tokens of a newcomer")
@bench_option("--stall-rounds", type=POSITIVE, default=3, help="stall check: rounds (median reported)")
@quiet_option
def bench_serve(**opts: Any) -> int:
    """One fixed list of greedy requests (per task, prompts from <data>/<task>/eval.jsonl; text tasks: a prefix) goes
    through `premoe serve` as shipped (its own process, default flags) with N concurrent gRPC clients (a process
    of their own) and through transformers with all experts in a clean process of its own, at 1 thread and all
    cores, the best compared (generate alone, on left-padded batches of N, continuous batching with N in flight),
    each baseline generating the real tokens of the server's lone reply (EOS included). Medians of interleaved
    rounds: tokens/s, requests/s, TTFT and inter-token latency, errors, replies different from alone. Then the stall
    check: a long stream's inter-token latency while newcomers load experts from a Redis behind a throttled proxy,
    against the same newcomers with experts resident. Exit 1 on any error or reply different from alone."""
    from ..bench.serve.benchmark import ServeBenchOptions, run

    report = run(
        ServeBenchOptions(
            store=opts["store"],
            model=opts["model"],
            profiles=opts["profiles"],
            data=opts["data"],
            tasks=opts["tasks"],
            per_task=opts["per_task"],
            text_chars=opts["text_chars"],
            clients=opts["clients"],
            name_tasks=opts["name_tasks"],
            rounds=opts["rounds"],
            max_new_tokens=opts["max_new_tokens"],
            seed=opts["seed"],
            device=opts["device"],
            budget=opts["budget"],
            embedder=opts["embedder"],
            out=opts["out"],
            baselines=not opts["no_baselines"],
            continuous=not opts["no_continuous"],
            stall=not opts["no_stall"],
            throttle_mbps=opts["throttle_mbps"],
            stall_budget=opts["stall_budget"],
            stall_tokens=opts["stall_tokens"],
            stall_newcomers=opts["stall_newcomers"],
            stall_newcomer_tokens=opts["stall_newcomer_tokens"],
            stall_rounds=opts["stall_rounds"],
            serve_opts=list(opts["serve_opt"]),
            serve_args=list(opts["serve_arg"]),
            baseline_threads=opts["baseline_threads"],
            quiet=opts["quiet"],
            clients_apart=not opts["clients_in_process"],
            llama_server=opts["llama_server"],
            llama_gguf=opts["llama_gguf"],
        )
    )
    return 0 if report["errors"] == 0 and report["mismatches"] == 0 else 1


@bench.command("step", short_help="one engine step split into its parts vs transformers' forward plus argmax")
@option("--store", help="store folder (default: var/reference-store, built from --model when missing)")
@bench_option("--model", default="models/reference-moe", help="the store's transformers checkpoint (baseline)")
@bench_option("--rows", default="1,4,16,32", help="comma-separated batch rows")
@bench_option("--kv-len", type=POSITIVE, default=24, help="tokens in each row's cache before the timed steps")
@bench_option("--steps", type=POSITIVE, default=16, help="timed decode steps per run")
@bench_option("--rounds", type=POSITIVE, default=5, help="interleaved rounds (median reported)")
@bench_option("--threads", help="comma-separated torch thread counts, both sides (default: 1 and all cores)")
@bench_option("--out", type=click.Path(dir_okay=False), default="var/bench-step.json", help="JSON report")
@option(
    "--compile-step/--no-compile-step",
    default=True,
    help="the engine's decoder stack compiled, as `premoe serve` runs it (its shapes compile before timing)",
)
@option(
    "--round/--no-round",
    default=True,
    help="also time a round: bench serve's requests at once through the engine vs transformers' padded batch",
)
@option("--round-data", default="reference/tasks", help="the round's prompts: folder with <task>/eval.jsonl")
@bench_option("--round-per-task", type=POSITIVE, default=2, help="the round's prompts per task")
@bench_option("--round-max-new-tokens", default="3-32", help="range of the round's max_new_tokens, LO-HI")
@bench_option("--round-seed", type=int, default=0, help="seed of the round's max_new_tokens draw")
@device_option
@quiet_option
def bench_step(**opts: Any) -> int:
    """The engine loop alone (no doors) decodes B rows whose caches hold KV-LEN tokens, every expert allowed; each
    step's time is split into scheduling, inputs and routing context, forward, sampling, coverage, text and events.
    transformers runs the same rows in a clean process of its own (one forward pass and an argmax per step) at the
    same thread count. Prints both sides' milliseconds per step and the ratio.

    Then a round: `premoe bench serve`'s request list (the same defaults: two prompts per task of --round-data,
    3 to 32 new tokens each) goes into the engine at once and is timed to its last token, against transformers'
    left-padded batch of the same requests in its clean process: the server's 16-client figure without its doors,
    clients and arrivals."""
    from ..bench.step import StepBenchOptions, run

    if not opts.pop("round"):
        opts["round_data"] = None
    run(StepBenchOptions(**opts))
    return 0


@bench.command("switch", short_help="task switches: bytes moved by delta residency vs full reloads and Belady")
@bench_option("--budgets", default="0.5,0.625,0.75", help="residency capacities, shares of all routed expert bytes")
@bench_option("--requests", type=POSITIVE, default=4000, help="requests in the stream (Zipf over tasks, bursts)")
@bench_option("--out", type=click.Path(dir_okay=False), default="var/bench-switch.json", help="JSON report")
@quiet_option
def bench_switch(budgets: str, requests: int, out: str, quiet: bool) -> int:
    """Replay a task-local request stream on the reference model through the real residency and store code; print
    bytes moved, loads per tier, hit rates, evictions and switch latency against a full reload at every task
    change (PreMoe's way) and Belady's oracle, per budget; write the JSON report and a PNG beside it."""
    from ..bench.switch.benchmark import SwitchOptions, run, table

    plot = out.rsplit(".", 1)[0] + ".png"
    print(table(run(SwitchOptions(budgets=budgets, requests=requests, out=out, plot=plot, quiet=quiet))))
    return 0


@bench.command("scale", short_help="residency, selection and registry at DeepSeek-V3's shape (58 x 256 experts)")
@bench_option("--tasks", type=POSITIVE, default=1000, help="synthetic task profiles in the request stream")
@bench_option("--registry-tasks", type=int, default=10000, help="profiles for the registry start-up and route test")
@bench_option("--budgets", default="0.1,0.2,0.3,0.4,0.5,0.6", help="residency capacities, shares of expert bytes")
@bench_option("--out", type=click.Path(dir_okay=False), default="var/bench-scale.json", help="JSON report")
@quiet_option
def bench_scale(tasks: int, registry_tasks: int, budgets: str, out: str, quiet: bool) -> int:
    """Planning time, bytes moved and hit rates per request as the budget varies, route latency and registry
    start-up at thousands of tasks, on DeepSeek-V3-shaped metadata (real expert byte sizes in the accounting)."""
    from ..bench.scale.benchmark import ScaleOptions, run, table

    plot = out.rsplit(".", 1)[0] + ".png"
    options = ScaleOptions(tasks=tasks, registry_tasks=registry_tasks, budgets=budgets, out=out, plot=plot, quiet=quiet)
    print(table(run(options)))
    return 0


@bench.command("pressure", short_help="random tasks from many clients as the expert budget shrinks")
@option("--store", type=click.Path(file_okay=False), help="store folder (default: var/reference-store, built once)")
@option("--profiles", type=click.Path(exists=True, file_okay=False), default="profiles", help="task profiles")
@bench_option("--data", type=click.Path(exists=True, file_okay=False), default="reference/tasks", help="task prompts")
@bench_option("--budgets", default="1.0,0.75,0.5,0.25", help="budgets to serve at, each in its own server process")
@bench_option("--clients", type=POSITIVE, default=16, help="concurrent clients")
@bench_option("--requests", type=POSITIVE, default=160, help="requests, each of a random task")
@bench_option(
    "--rounds",
    type=POSITIVE,
    default=3,
    help="interleaved rounds: every server is started first, then each round runs the requests against each in turn "
    "(medians reported)",
)
@bench_option("--max-new-tokens", type=POSITIVE, default=24, help="new tokens of each request (greedy)")
@bench_option("--seed", type=int, default=0, help="seed of the task draw")
@bench_option("--serve-opts", default="", help='extra `premoe serve` flags, e.g. "--lease-timeout 60"')
@bench_option(
    "--served-at",
    default="full",
    help="per budget, a run per precision (comma-separated): full, or LoadTask every task at that lower "
    "precision first so that it is served at it (the server needs slots for it: --serve-opts "
    '"--precision-slots int8=16"; the store, the copies)',
)
@bench_option(
    "--under-pressure",
    default="wait,demote",
    help="per budget, a server per mode (comma-separated): wait, demote (premoe serve --under-pressure; demote "
    "needs the store's --demote-to copy, int8 unless --serve-opts names another: added to the default store)",
)
@bench_option("--out", type=click.Path(dir_okay=False), default="var/bench-pressure.json", help="JSON report")
@device_option
@quiet_option
def bench_pressure(
    store: str | None,
    profiles: str,
    data: str,
    budgets: str,
    clients: int,
    requests: int,
    rounds: int,
    max_new_tokens: int,
    seed: int,
    serve_opts: str,
    served_at: str,
    under_pressure: str,
    out: str,
    device: str,
    quiet: bool,
) -> int:
    """CLIENTS clients send REQUESTS requests, each of a task drawn at random among the profiles with data, to a
    `premoe serve` process of each budget and mode (all started first, then ROUNDS interleaved rounds over them,
    medians reported); print tokens/s and its ratio to the first budget (the baseline, 1.0: every task fits),
    failed requests, the worst task's p99 end-to-end latency and its ratio, the p99 of each task, the expert bytes
    moved and the evictions."""
    from ..bench.pressure import PressureOptions, run, table

    options = PressureOptions(
        store=store,
        profiles=profiles,
        data=data,
        budgets=budgets,
        clients=clients,
        requests=requests,
        rounds=rounds,
        max_new_tokens=max_new_tokens,
        seed=seed,
        device=device,
        serve_opts=serve_opts,
        precisions=served_at,
        under_pressure=under_pressure,
        out=out,
        quiet=quiet,
    )
    print(table(run(options)))
    return 0


@bench.command("soak", short_help="a server under many clients for minutes: good, bad, cancelled, slow; Redis restarts")
@option("--store", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="store folder")
@option(
    "--profiles",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="task profiles the server starts with (a copy is used: registrations do not touch them)",
)
@bench_option("--seconds", type=POSITIVE, default=600, help="how long the clients run")
@bench_option("--clients", type=POSITIVE, default=16, help="concurrent clients")
@bench_option("--max-new-tokens", type=POSITIVE, default=16, help="new tokens of each good request")
@bench_option(
    "--queries",
    type=click.Path(dir_okay=False, path_type=Path),
    default="reference/heldout/queries.jsonl",
    help="JSONL of {query, task}: the good requests' prompts (built-in ones when absent)",
)
@bench_option("--out", type=click.Path(dir_okay=False, path_type=Path), help="also write the report as JSON")
def bench_soak(
    store: Path, profiles: Path | None, seconds: int, clients: int, max_new_tokens: int, queries: Path, out: Path | None
) -> int:
    """Start `premoe serve` in its own process with a Redis of its own, run CLIENTS clients for SECONDS with a mix of
    good, malformed, cancelled, slow and deadline-bound requests and task registrations, kill Redis and restart it
    empty halfway, and print the count of each outcome, the unintended errors (exit 1 when there are any), and the
    server's resident memory after warm-up and at the end."""
    from ..bench.soak.benchmark import main

    return main(store, profiles, seconds, clients, max_new_tokens, queries, out)
