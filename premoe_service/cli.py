"""The `premoe` command line: each verb parses its options (with PREMOE_* environment twins) and calls one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import PreMoeError

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


def cmd_bench_load(args: argparse.Namespace) -> int:
    from .bench.load import main as bench_load

    bench_load(args.store, args.redis_url, args.hidden, args.experts, args.layers, args.rounds, args.device)
    return 0


def cmd_bench_profile(args: argparse.Namespace) -> int:
    from .bench.profile import main as bench_profile

    bench_profile(args.hidden, args.layers, args.experts, args.demos, args.tokens, args.rounds)
    return 0


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

    p = verbs.add_parser("profile", help="score every expert for a task from its demos (`profile show FILE` to view)",
                         description="Run the demos through the model layer by layer over the store (dense part "
                         "resident, one layer of experts at a time) and write a profile file with all four "
                         "criteria (frequency, tcess, easyep, reap). Demos: JSONL, one {\"text\": ...} or "
                         "{\"prompt\": ..., \"answer\": ...} per line; demos longer than the model's context are "
                         "cut with a warning. View a profile with `premoe profile show FILE [--png heat.png]`.")
    opt(p, "--store", help="store folder", required=_env("STORE") is None)
    p.add_argument("--task", required=True, help="task name (^[a-z0-9][a-z0-9_.-]{0,63}$)")
    p.add_argument("--demos", required=True, help="JSONL demo file")
    p.add_argument("--out", required=True, help="profile file to write (.safetensors)")
    p.add_argument("--description", help="free text shown to operators")
    opt(p, "--criterion", help="criterion the task's pattern uses", default="tcess",
        choices=["frequency", "tcess", "easyep", "reap"])
    opt(p, "--policy", help="selection policy", default="top_k", choices=["top_k", "coverage", "budget"])
    opt(p, "--value", help="policy value: per-layer count or fraction, coverage share, or budget", default="0.5")
    opt(p, "--unit", help="unit of --value", default="fraction", choices=["fraction", "experts", "bytes"])
    opt(p, "--tcess-threshold", help="PreMoe's r: probabilities below it do not count", default="0.0")
    opt(p, "--embedder", help="local sentence-transformers model for the demo embeddings (default: all-MiniLM-L6-v2)")
    p.add_argument("--no-embed", action="store_true", help="store no demo embeddings")
    opt(p, "--device", help="cpu or cuda (default: cuda if available)")
    opt(p, "--quiet", help="no progress bar", action="store_true")
    p.set_defaults(handler=cmd_profile)

    p = verbs.add_parser("profile-show", help="print a profile's summary (also as `premoe profile show FILE`)",
                         description="Print provenance and, per criterion and layer, the experts with the most "
                         "score mass; optionally write a PNG heatmap (layers x experts).")
    p.add_argument("file", help="profile file")
    p.add_argument("--png", help="write a heatmap PNG here")
    p.add_argument("--top", type=int, default=5, help="experts listed per layer")
    p.set_defaults(handler=cmd_profile_show)

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

    p = bench_verbs.add_parser("profile", help="layer-streamed profiling vs one plain transformers forward",
                               description="Times a profile pass (all four criteria, one layer of experts resident "
                               "at a time, loaded from the store) against one plain transformers forward of the "
                               "full model over the same tokens, and compares the weights resident.")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the throwaway model")
    p.add_argument("--layers", type=int, default=6, help="MoE layers")
    p.add_argument("--experts", type=int, default=32, help="experts per layer")
    p.add_argument("--demos", type=int, default=16, help="demos in the batch")
    p.add_argument("--tokens", type=int, default=128, help="tokens per demo")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.set_defaults(handler=cmd_bench_profile)
    return parser


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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
