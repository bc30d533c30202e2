"""The `premoe` command line: each verb parses its options (with PREMOE_* environment twins) and calls one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidArgument, PreMoeError

Handler = Callable[[argparse.Namespace], int]


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"PREMOE_{name}", default)


def opt(parser: argparse.ArgumentParser, flag: str, *, help: str, env: str | None = None, **kwargs: Any) -> None:
    """Add an option whose default comes from its PREMOE_<NAME> environment twin."""
    env = env or flag.lstrip("-").replace("-", "_").upper()
    default = _env(env, kwargs.pop("default", None))
    if kwargs.get("action") == "store_true":
        default = str(default).lower() in ("1", "true", "yes") if default is not None else False
    parser.add_argument(flag, default=default, help=f"{help} [env PREMOE_{env}]", **kwargs)


# --- verbs ------------------------------------------------------------------------------------------


def cmd_shard(args: argparse.Namespace) -> int:
    from .store import shard

    result = shard(args.model_dir, args.out, progress=not args.quiet)
    m = result.manifest
    state = "written" if result.created else "already up to date"
    print(
        f"store {args.out} {state}: {m.family}, {len(m.moe_layers)} MoE layers x {m.num_experts} experts, "
        f"{m.expert_nbytes / 2**20:.2f} MiB per expert, {m.total_expert_bytes / 2**20:.1f} MiB of experts, "
        f"fingerprint {m.fingerprint}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .pattern import Pattern
    from .store import Store
    from .store.export import export_pruned

    store = Store(args.store)
    spec = _store_spec(store)
    pattern = Pattern.load(spec, args.pattern)
    out = export_pruned(store, pattern, args.out, progress=not args.quiet)
    print(f"pruned checkpoint with {pattern.size} routed experts written to {out}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .profiler import Selection, load_demos, profile_store
    from .store import Store

    demos = load_demos(args.demos)
    selection = Selection(criterion=args.criterion, policy=args.policy, value=float(args.value), unit=args.unit)
    embedder = None
    if not args.no_embed:
        from .retrieval import Embedder

        embedder = Embedder(args.embedder)
    profile, run = profile_store(
        Store(args.store),
        args.task,
        demos,
        description=args.description or "",
        selection=selection,
        embedder=embedder,
        tcess_threshold=float(args.tcess_threshold),
        device=args.device,
        progress=not args.quiet,
    )
    profile.save(args.out)
    note = f", {len(run.truncated)} demos truncated to the context" if run.truncated else ""
    print(
        f"profile {args.out}: task {profile.name}, {len(demos)} demos, {run.token_count} tokens{note}; "
        f"peak expert memory {run.peak_slot_bytes / 2**20:.2f} MiB (one layer)"
    )
    return 0


def cmd_profile_show(args: argparse.Namespace) -> int:
    from .profiler import Profile
    from .profiler.report import heatmap, summary

    profile = Profile.load(args.file)
    print(summary(profile, top=args.top))
    if args.png:
        print(f"heatmap written to {heatmap(profile, args.png)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .profiler import Selection
    from .server import serve
    from .serving import ServiceConfig

    config = ServiceConfig(
        store=args.store,
        profiles=args.profiles,
        redis_url=args.redis_url or None,
        budget=str(args.budget),
        device=args.device,
        embedder=args.embedder,
        host=args.host,
        port=int(args.port),
        metrics_port=_port(args.metrics_port, "--metrics-port"),
        http_port=_port(args.http_port, "--http-port"),
        admin_token=args.admin_token or None,
        api_key=args.api_key or None,
        selection=Selection(criterion=args.criterion, policy=args.policy, value=float(args.value), unit=args.unit),
        route_threshold=float(args.route_threshold) if args.route_threshold not in (None, "") else None,
        coverage_floor=float(args.coverage_floor),
        max_new_tokens_limit=int(args.max_new_tokens_limit),
        max_batch_rows=_positive(args.max_batch_rows, "--max-batch-rows"),
        max_batch_tokens=_positive(args.max_batch_tokens, "--max-batch-tokens"),
        max_queue=_positive(args.max_queue, "--max-queue"),
        lease_timeout_s=float(args.lease_timeout),
    )
    serve(config)
    return 0


def _port(value: Any, flag: str) -> int | None:
    """An optional port option: None when unset, else 0..65535 (0: any free port)."""
    if value in (None, ""):
        return None
    if not str(value).isdigit() or int(value) > 65535:
        raise InvalidArgument(f"must be a port number 0..65535, got {value!r}", field=flag)
    return int(value)


def _positive(value: Any, flag: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise InvalidArgument(f"must be a positive integer, got {value!r}", field=flag)
    return number


def _client(args: argparse.Namespace) -> Any:
    from .client import PreMoeClient

    return PreMoeClient(
        args.server, admin_token=getattr(args, "admin_token", None) or None, timeout=float(args.timeout)
    )


def cmd_route(args: argparse.Namespace) -> int:
    if args.evaluate:
        return _route_evaluate(args)
    if not args.prompt:
        raise InvalidArgument("give a prompt, or --evaluate FILE", field="prompt")
    with _client(args) as client:
        reply = client.route(args.prompt)
    print(
        f"decision {reply.decision}: {reply.task or ', '.join(reply.fallback_tasks) or '(general)'} "
        f"({reply.pattern_experts} experts) - {reply.reason}"
    )
    for item in reply.ranked:
        print(f"  {item.score:6.3f}  {item.task}")
    return 0


def _route_evaluate(args: argparse.Namespace) -> int:
    from .retrieval import Embedder, LocalProfileStore, Registry, evaluate, load_route_records

    if not args.profiles:
        raise InvalidArgument("--evaluate needs --profiles (a folder of profile files)", field="profiles")
    registry = Registry(LocalProfileStore(args.profiles), embedder=Embedder(args.embedder))
    result = evaluate(registry, load_route_records(args.evaluate))
    threshold = "n/a" if result.suggested_threshold is None else f"{result.suggested_threshold:.3f}"
    print(f"queries {result.records} ({result.labelled} labelled), threshold {registry.policy.threshold:.3f}")
    print(f"top-1 accuracy      {result.top1_accuracy:.3f}")
    print(f"match accuracy      {result.match_accuracy:.3f}")
    print(f"no-match precision  {result.no_match_precision:.3f}")
    print(f"no-match recall     {result.no_match_recall:.3f}")
    print(f"suggested threshold {threshold}")
    for query, expected, decided in result.misses[:10]:
        print(f"  miss: {query[:60]!r}: expected {expected}, got {decided}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {
        "max_new_tokens": int(args.max_new_tokens),
        "temperature": float(args.temperature),
        "top_p": float(args.top_p),
        "stop": args.stop or (),
        "task": args.task or None,
        "seed": int(args.seed) if args.seed is not None else None,
    }
    with _client(args) as client:
        last = None
        for chunk in client.stream(args.prompt, **options):
            print(chunk.text, end="", flush=True)
            last = chunk
    if last is not None:
        s = last.stats
        print(
            f"\n[{last.finish_reason}] task {s.task or '(fallback)'} ({s.decision}, score {s.score:.3f}); "
            f"{s.pattern_experts}/{s.total_experts} experts, loaded device {s.loads.device} cache {s.loads.cache} "
            f"disk {s.loads.disk}; coverage {s.coverage:.3f}{' (widened)' if s.widened else ''}; "
            f"{s.timings.total_ms:.0f} ms",
            file=sys.stderr,
        )
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from .profiler import load_demos

    demos = [d.text for d in load_demos(args.demos)]
    selection: dict[str, Any] = {}
    if args.experts_per_layer is not None:
        selection["experts_per_layer"] = int(args.experts_per_layer)
    if args.fraction is not None:
        selection["fraction"] = float(args.fraction)
    if args.bytes is not None:
        selection["bytes"] = int(args.bytes)
    if len(selection) > 1:
        raise InvalidArgument("give at most one of --experts-per-layer, --fraction, --bytes", field="selection")
    with _client(args) as client:
        info = client.register(
            args.name,
            demos,
            description=args.description or "",
            criterion=args.criterion or "",
            replace=args.replace,
            dry_run=args.dry_run,
            **selection,
        )
    state = "profiled (dry run)" if args.dry_run else "registered"
    print(
        f"task {info.name} {state}: {info.pattern_experts} experts ({info.pattern_bytes / 2**20:.2f} MiB), "
        f"criterion {info.criterion}, demo coverage {info.demo_coverage:.3f}"
    )
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.delete:
            client.delete_task(args.delete)
            print(f"task {args.delete} deleted")
            return 0
        if args.name:
            info = client.get_task(args.name)
            print(
                f"{info.name}: {info.description}\n  {info.demos} demos, criterion {info.criterion}, "
                f"{info.pattern_experts} experts, demo coverage {info.demo_coverage:.3f}, created {info.created}"
            )
            for layer in info.layers:
                print(f"  layer {layer.layer:>3}: {list(layer.experts)}")
            return 0
        tasks = client.tasks()
    print(f"{'task':<24} {'experts':>8} {'MiB':>8} {'coverage':>9}  description")
    for info in tasks:
        print(
            f"{info.name:<24} {info.pattern_experts:>8} {info.pattern_bytes / 2**20:>8.2f} "
            f"{info.demo_coverage:>9.3f}  {info.description}"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_grid, load_task_data, markdown, write_reports
    from .profiler import Profile
    from .store import Store

    store = Store(args.store)
    profiles_dir = Path(args.profiles)
    names = args.tasks.split(",") if args.tasks else sorted(p.stem for p in profiles_dir.glob("*.safetensors"))
    profiles = {n: Profile.load(profiles_dir / f"{n}.safetensors", fingerprint=store.fingerprint) for n in names}
    data = load_task_data(Path(args.data), names, int(args.limit) if args.limit else None)
    router = None
    if not args.no_retrieval:
        from .retrieval import Embedder, MemoryProfileStore, Registry

        registry = Registry(MemoryProfileStore(), embedder=Embedder(args.embedder))
        for profile in profiles.values():
            registry.register(profile)

        def router(prompt: str) -> str | None:
            ranked = registry.route(prompt).ranked
            return ranked[0][0] if ranked else None

    result = evaluate_grid(
        store,
        profiles,
        data,
        criteria=args.criteria.split(","),
        budgets=[float(b) for b in args.budgets.split(",")],
        cross_criterion=args.cross_criterion,
        cross_budget=float(args.cross_budget),
        device=args.device,
        progress=not args.quiet,
        router=router,
    )
    for path in write_reports(result, Path(args.out)):
        print(f"wrote {path}")
    print(markdown(result))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_bench_load(args: argparse.Namespace) -> int:
    from .bench.load import main as bench_load

    bench_load(args.store, args.redis_url, args.hidden, args.experts, args.layers, args.rounds, args.device)
    return 0


def cmd_bench_profile(args: argparse.Namespace) -> int:
    from .bench.profile import main as bench_profile

    bench_profile(args.hidden, args.layers, args.experts, args.demos, args.tokens, args.rounds)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench.serve import ServeBenchOptions, run

    report = run(
        ServeBenchOptions(
            store=args.store or None,
            model=args.model,
            profiles=args.profiles,
            data=args.data,
            tasks=args.tasks or None,
            per_task=int(args.per_task),
            text_chars=int(args.text_chars),
            clients=args.clients,
            rounds=int(args.rounds),
            max_new_tokens=args.max_new_tokens,
            seed=int(args.seed),
            device=args.device,
            budget=str(args.budget),
            embedder=args.embedder or None,
            out=args.out or None,
            baselines=not args.no_baselines,
            continuous=not args.no_continuous,
            stall=not args.no_stall,
            throttle_mbps=float(args.throttle_mbps),
            stall_budget=str(args.stall_budget),
            stall_tokens=int(args.stall_tokens),
            stall_newcomers=int(args.stall_newcomers),
            stall_newcomer_tokens=int(args.stall_newcomer_tokens),
            stall_rounds=int(args.stall_rounds),
            serve_opts=list(args.serve_opt or ()),
            quiet=args.quiet,
            clients_apart=not args.clients_in_process,
        )
    )
    return 0 if report["errors"] == 0 and report["mismatches"] == 0 else 1


def _store_spec(store: Any) -> Any:
    from transformers import AutoConfig

    from .families import adapter_for

    config = AutoConfig.from_pretrained(store.dir, local_files_only=True)
    return adapter_for(config).spec(config)


# --- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="premoe",
        description="Serve Mixture-of-Experts models with only a task's experts resident.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every option has an environment twin PREMOE_<OPTION>; `premoe VERB --help` explains a verb.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser(
        "shard",
        help="split a transformers MoE checkpoint into a store",
        description="Read a safetensors checkpoint (single or sharded, per-expert or fused expert "
        "keys) tensor by tensor and write a store: manifest.json, dense.safetensors and one "
        "contiguous blob per expert. A rerun for the same checkpoint is a no-op.",
    )
    p.add_argument("model_dir", help="folder with config.json and *.safetensors")
    opt(p, "--out", help="store folder to write", required=_env("OUT") is None)
    opt(p, "--quiet", help="no progress bar", action="store_true")
    p.set_defaults(handler=cmd_shard)

    p = verbs.add_parser(
        "export",
        help="write a pruned transformers checkpoint for one pattern",
        description="Slice expert tensors and router rows to a pattern and write a checkpoint that "
        "AutoModelForCausalLM (and so vLLM or SGLang) loads. Pattern file: "
        '{"format": 1, "layers": {"<layer>": [expert ids]}}, the same count in every layer.',
    )
    opt(p, "--store", help="store folder", required=_env("STORE") is None)
    p.add_argument("--pattern", required=True, help="pattern JSON file")
    p.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    opt(p, "--quiet", help="no progress bar", action="store_true")
    p.set_defaults(handler=cmd_export)

    p = verbs.add_parser(
        "profile",
        help="score every expert for a task from its demos (`profile show FILE` to view)",
        description="Run the demos through the model layer by layer over the store (dense part "
        "resident, one layer of experts at a time) and write a profile file with all four "
        'criteria (frequency, tcess, easyep, reap). Demos: JSONL, one {"text": ...} or '
        '{"prompt": ..., "answer": ...} per line; demos longer than the model\'s context are '
        "cut with a warning. View a profile with `premoe profile show FILE [--png heat.png]`.",
    )
    opt(p, "--store", help="store folder", required=_env("STORE") is None)
    p.add_argument("--task", required=True, help="task name (^[a-z0-9][a-z0-9_.-]{0,63}$)")
    p.add_argument("--demos", required=True, help="JSONL demo file")
    p.add_argument("--out", required=True, help="profile file to write (.safetensors)")
    p.add_argument("--description", help="free text shown to operators")
    opt(
        p,
        "--criterion",
        help="criterion the task's pattern uses",
        default="easyep",
        choices=["frequency", "tcess", "easyep", "reap"],
    )
    opt(p, "--policy", help="selection policy", default="budget", choices=["top_k", "coverage", "budget"])
    opt(p, "--value", help="policy value: per-layer count or fraction, coverage share, or budget", default="0.5")
    opt(p, "--unit", help="unit of --value", default="fraction", choices=["fraction", "experts", "bytes"])
    opt(p, "--tcess-threshold", help="PreMoe's r: probabilities below it do not count", default="0.0")
    opt(p, "--embedder", help="local sentence-transformers model for the demo embeddings (default: all-MiniLM-L6-v2)")
    p.add_argument("--no-embed", action="store_true", help="store no demo embeddings")
    opt(p, "--device", help="cpu or cuda (default: cuda if available)")
    opt(p, "--quiet", help="no progress bar", action="store_true")
    p.set_defaults(handler=cmd_profile)

    p = verbs.add_parser(
        "profile-show",
        help="print a profile's summary (also as `premoe profile show FILE`)",
        description="Print provenance and, per criterion and layer, the experts with the most "
        "score mass; optionally write a PNG heatmap (layers x experts).",
    )
    p.add_argument("file", help="profile file")
    p.add_argument("--png", help="write a heatmap PNG here")
    p.add_argument("--top", type=int, default=5, help="experts listed per layer")
    p.set_defaults(handler=cmd_profile_show)

    p = verbs.add_parser(
        "serve",
        help="serve the gRPC API (and the OpenAI-compatible HTTP API with --http-port)",
        description="Load the store's dense part, allocate expert slots for the budget, rebuild the "
        "task registry from the profiles, and serve premoe.v1.PreMoe (with grpc.health.v1 and "
        "reflection) until SIGINT/SIGTERM, then drain in-flight requests.",
    )
    opt(p, "--store", help="store folder", required=_env("STORE") is None)
    opt(p, "--profiles", help="folder of task profiles (the registry without Redis; seeds Redis with it)")
    opt(p, "--redis-url", help="Redis for the expert cache and the shared registry (default: embedded cache)")
    opt(p, "--budget", help="device memory for routed experts: 0.5, 50%%, 512MiB", default="1.0")
    opt(p, "--device", help="auto, cpu or cuda", default="auto")
    opt(p, "--embedder", help="local sentence-transformers model (default: all-MiniLM-L6-v2)")
    opt(p, "--host", help="address to bind", default="127.0.0.1")
    opt(p, "--port", help="gRPC port (0: any free port)", default="50051")
    opt(p, "--metrics-port", help="Prometheus metrics port (default: off)")
    opt(p, "--http-port", help="OpenAI-compatible HTTP API port on --host (0: any free port; default: off)")
    opt(p, "--admin-token", help="token required by RegisterTask and DeleteTask")
    opt(p, "--api-key", help="key required (Authorization: Bearer KEY) by inference calls over gRPC and HTTP")
    opt(
        p,
        "--criterion",
        help="default criterion of registered tasks",
        default="easyep",
        choices=["frequency", "tcess", "easyep", "reap"],
    )
    opt(p, "--policy", help="default selection policy", default="budget", choices=["top_k", "coverage", "budget"])
    opt(p, "--value", help="default selection value", default="0.5")
    opt(p, "--unit", help="unit of --value", default="fraction", choices=["fraction", "experts", "bytes"])
    opt(p, "--route-threshold", help="retrieval score needed for a task match (default: calibrated)")
    opt(p, "--coverage-floor", help="widen a pattern whose prefill coverage is below this (0: off)", default="0.0")
    opt(p, "--max-new-tokens-limit", help="largest max_new_tokens accepted", default="1024")
    opt(p, "--max-batch-rows", help="requests decoding together in one forward pass", default="32")
    opt(
        p,
        "--max-batch-tokens",
        help="padded prompt tokens prefilled in one forward pass (rows x longest prompt)",
        default="4096",
    )
    opt(p, "--max-queue", help="requests waiting for experts or a row before new ones are refused", default="256")
    opt(p, "--lease-timeout", help="seconds a request waits for slots pinned by others", default="30")
    p.set_defaults(handler=cmd_serve)

    def client_options(p: argparse.ArgumentParser) -> None:
        opt(p, "--server", help="server address host:port", default="127.0.0.1:50051")
        opt(p, "--timeout", help="deadline in seconds", default="300")

    p = verbs.add_parser(
        "route",
        help="ask the server which task and pattern a prompt gets; or calibrate offline",
        description="Without --evaluate: the server's routing decision for PROMPT. With --evaluate "
        'FILE.jsonl ({"query": ..., "task": name or null} per line) and --profiles DIR: top-1 '
        "accuracy, no-match precision/recall and a suggested threshold, computed locally.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt")
    p.add_argument("--evaluate", help="JSONL of labelled queries (offline calibration)")
    opt(p, "--profiles", help="profiles folder for --evaluate")
    opt(p, "--embedder", help="local sentence-transformers model for --evaluate")
    client_options(p)
    p.set_defaults(handler=cmd_route)

    p = verbs.add_parser(
        "generate",
        help="generate from a prompt, streaming to the terminal",
        description="Streams the completion to stdout; the stats line goes to stderr.",
    )
    p.add_argument("prompt", help="the prompt")
    p.add_argument("--task", help="use this task's pattern, skipping retrieval")
    p.add_argument("--max-new-tokens", default="64", help="tokens to generate")
    p.add_argument("--temperature", default="0", help="0 for greedy")
    p.add_argument("--top-p", default="1.0", help="nucleus sampling mass")
    p.add_argument("--seed", help="sampling seed")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    client_options(p)
    p.set_defaults(handler=cmd_generate)

    p = verbs.add_parser(
        "register",
        help="profile and register a task on the server from a demo file",
        description="Sends the demos (JSONL) to RegisterTask; the server profiles them without "
        "blocking other requests and registers the task.",
    )
    p.add_argument("name", help="task name")
    p.add_argument("--demos", required=True, help="JSONL demo file")
    p.add_argument("--description", help="free text")
    p.add_argument("--criterion", help="frequency, tcess, easyep or reap (default: the server's)")
    p.add_argument("--experts-per-layer", help="keep this many experts per layer")
    p.add_argument("--fraction", help="keep this fraction of all routed experts")
    p.add_argument("--bytes", help="byte budget of the task's experts")
    p.add_argument("--replace", action="store_true", help="replace a task of the same name")
    p.add_argument("--dry-run", action="store_true", help="profile and report only")
    opt(p, "--admin-token", help="admin token of the server")
    client_options(p)
    p.set_defaults(handler=cmd_register)

    p = verbs.add_parser("tasks", help="list tasks, show one (with its per-layer experts) or delete one")
    p.add_argument("name", nargs="?", help="show this task")
    p.add_argument("--delete", help="delete this task")
    opt(p, "--admin-token", help="admin token of the server (for --delete)")
    client_options(p)
    p.set_defaults(handler=cmd_tasks)

    p = verbs.add_parser(
        "eval",
        help="quality kept per task, criterion and budget (JSON, Markdown, PNG)",
        description="For each task and criterion (and a random floor) and each budget (share of "
        "routed experts, spread over layers by the global budget policy): the task metric with "
        "the pattern, the full model's, and the retention. Also task A's pattern on task B's "
        "data, and retrieval top-1 accuracy of the held-out prompts. Exact-match tasks: greedy "
        "answer == expected; text tasks: per-token NLL (retention = full / pruned perplexity).",
    )
    opt(p, "--store", help="store folder", required=_env("STORE") is None)
    opt(p, "--profiles", help="folder of task profiles", default="profiles")
    p.add_argument("--data", default="reference/tasks", help="folder with <task>/eval.jsonl")
    p.add_argument("--tasks", help="comma-separated tasks (default: every profile)")
    p.add_argument("--criteria", default="frequency,tcess,easyep,reap,random", help="comma-separated")
    p.add_argument("--budgets", default="0.75,0.5,0.25,0.125", help="comma-separated shares of routed experts")
    p.add_argument("--cross-criterion", default="easyep", help="criterion of the cross-task matrix")
    p.add_argument("--cross-budget", default="0.5", help="budget of the cross-task matrix")
    p.add_argument("--limit", help="items per task (default: all)")
    p.add_argument("--out", default="var/eval", help="folder for eval.json, eval.md, retention.png")
    p.add_argument("--no-retrieval", action="store_true", help="skip the retrieval accuracy")
    opt(p, "--embedder", help="local sentence-transformers model (default: all-MiniLM-L6-v2)")
    opt(p, "--device", help="cpu or cuda (default: cuda if available)")
    opt(p, "--quiet", help="no progress bar", action="store_true")
    p.set_defaults(handler=cmd_eval)

    p = verbs.add_parser("health", help="ask a server's grpc.health.v1 status (exit 0 when SERVING)")
    p.add_argument("--service", default="", help="service name ('' for the server as a whole)")
    client_options(p)
    p.set_defaults(handler=cmd_health)

    bench = verbs.add_parser("bench", help="benchmarks with a raw baseline measured in the same run")
    bench_verbs = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    p = bench_verbs.add_parser(
        "load",
        help="expert-load throughput per tier vs raw reads of the same bytes",
        description="Reads every expert through each tier (disk, in-process cache, Redis, "
        "Redis into device slots) and the same bytes the raw way (os.pread, redis-py GET), "
        "interleaved, and prints GB/s and the ratio ours/raw.",
    )
    opt(p, "--store", help="store to read (default: build a throwaway Qwen3-MoE store)")
    opt(p, "--redis-url", help="Redis to use (default: start a throwaway redis-server if installed)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the throwaway model")
    p.add_argument("--experts", type=int, default=8, help="experts per layer of the throwaway model")
    p.add_argument("--layers", type=int, default=4, help="MoE layers of the throwaway model")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    opt(p, "--device", help="device for the slot benchmark (default: cuda if available, else cpu)")
    p.set_defaults(handler=cmd_bench_load)

    p = bench_verbs.add_parser(
        "profile",
        help="layer-streamed profiling vs one plain transformers forward",
        description="Times a profile pass (all four criteria, one layer of experts resident "
        "at a time, loaded from the store) against one plain transformers forward of the "
        "full model over the same tokens, and compares the weights resident.",
    )
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the throwaway model")
    p.add_argument("--layers", type=int, default=6, help="MoE layers")
    p.add_argument("--experts", type=int, default=32, help="experts per layer")
    p.add_argument("--demos", type=int, default=16, help="demos in the batch")
    p.add_argument("--tokens", type=int, default=128, help="tokens per demo")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.set_defaults(handler=cmd_bench_profile)

    p = bench_verbs.add_parser(
        "serve",
        help="the gRPC server under 1, 4, 16 concurrent clients vs transformers, and the expert-load stall check",
        description="One fixed list of greedy requests (per task, prompts from <data>/<task>/eval.jsonl; text "
        "tasks: a prefix) goes through the real server with N concurrent gRPC clients and through transformers "
        "with all experts in-process (generate alone, on left-padded batches of N, continuous batching with N in "
        "flight), each baseline generating the real tokens of the server's lone reply (EOS included). Medians of "
        "interleaved rounds: tokens/s, requests/s, TTFT and inter-token latency, errors, replies different from "
        "alone. Then the stall check: a long stream's inter-token latency while newcomers load experts from a "
        "Redis behind a throttled proxy, against the same newcomers with experts resident. Exit 1 on any error "
        "or reply different from alone.",
    )
    opt(p, "--store", help="store folder (default: var/reference-store, built from --model when missing)")
    opt(
        p,
        "--model",
        help="the store's transformers checkpoint (baselines)",
        default="models/reference-moe",
        env="BENCH_MODEL",
    )
    opt(p, "--profiles", help="folder of task profiles", default="profiles")
    p.add_argument("--data", default="reference/tasks", help="folder with <task>/eval.jsonl")
    p.add_argument("--tasks", help="comma-separated tasks (default: every profile with data)")
    p.add_argument("--per-task", default="2", help="prompts per task")
    p.add_argument("--text-chars", default="60", help="prefix length of text-task prompts")
    opt(p, "--clients", help="comma-separated concurrent client counts", default="1,4,16", env="BENCH_CLIENTS")
    opt(p, "--rounds", help="interleaved rounds (median reported)", default="5", env="BENCH_ROUNDS")
    opt(p, "--max-new-tokens", help="range of max_new_tokens, LO-HI", default="3-32", env="BENCH_MAX_NEW_TOKENS")
    p.add_argument("--seed", default="0", help="seed of the max_new_tokens draw")
    opt(p, "--device", help="auto, cpu or cuda (server and baselines)", default="auto")
    opt(p, "--budget", help="the server's expert budget", default="1.0")
    opt(p, "--embedder", help="local sentence-transformers model (default: all-MiniLM-L6-v2)")
    opt(p, "--out", help="JSON report", default="var/bench-serve.json", env="BENCH_OUT")
    p.add_argument("--serve-opt", action="append", help="extra ServiceConfig field NAME=VALUE (repeatable)")
    p.add_argument("--no-baselines", action="store_true", help="skip the transformers baselines")
    p.add_argument("--no-continuous", action="store_true", help="skip transformers continuous batching")
    p.add_argument("--no-stall", action="store_true", help="skip the stall check")
    p.add_argument(
        "--clients-in-process",
        action="store_true",
        help="run the clients as threads of the benchmark process (default: a process of their own)",
    )
    opt(
        p,
        "--throttle-mbps",
        help="stall check: proxy bandwidth to Redis, MB/s",
        default="20",
        env="BENCH_THROTTLE_MBPS",
    )
    p.add_argument(
        "--stall-budget",
        default="auto",
        help="stall check: budget of the server that loads (auto: the stream's experts fit beside each "
        "newcomer's, not beside both newcomers', so that every newcomer loads)",
    )
    p.add_argument("--stall-tokens", default="200", help="stall check: tokens of the long stream")
    p.add_argument("--stall-newcomers", default="6", help="stall check: newcomer requests")
    p.add_argument("--stall-newcomer-tokens", default="8", help="stall check: max_new_tokens of each newcomer")
    p.add_argument("--stall-rounds", default="3", help="stall check: rounds (median reported)")
    opt(p, "--quiet", help="no progress bars", action="store_true")
    p.set_defaults(handler=cmd_bench_serve)
    return parser


def _rpc_message(exc: BaseException) -> str:
    code: Any = getattr(exc, "code", None)
    details: Any = getattr(exc, "details", None)
    name = getattr(code(), "name", "error") if callable(code) else "error"
    return f"{name}: {details() if callable(details) else exc}"


def grpc_error() -> type[BaseException]:
    """grpc.RpcError, imported only when a client verb may have raised it."""
    if "grpc" in sys.modules:
        return sys.modules["grpc"].RpcError  # type: ignore[no-any-return, unused-ignore]
    return type("NoGrpcError", (Exception,), {})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["profile", "show"]:
        argv = ["profile-show", *argv[2:]]
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args))
    except PreMoeError as exc:
        print(f"premoe {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except grpc_error() as exc:
        print(f"premoe {args.verb}: {_rpc_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
