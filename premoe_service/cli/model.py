"""Verbs on a model's files: `shard` a checkpoint into a store, `export` a pruned checkpoint, `eval` quality kept."""

from __future__ import annotations

from pathlib import Path

import click

from .params import (
    BUDGET,
    CRITERION,
    GROUP_SIZE,
    OPEN_SHARE,
    POSITIVE,
    PRECISIONS,
    CommaList,
    Lazy,
    LazyChoice,
    option,
    verb,
)
from .shared import device_option, embedder_option, quiet_option, store_option, store_spec


@verb("shard", short_help="split a transformers MoE checkpoint into a store")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="store folder to write")
@option(
    "--precisions",
    type=PRECISIONS,
    default="",
    help="also write the experts at these lower precisions (bf16: each tensor cast; intN: group-wise, "
    "compressed-tensors' packed layout)",
)
@option("--group-size", type=POSITIVE, default=GROUP_SIZE, help="weights per scale and zero point of quantized experts")
@option(
    "--channel-major",
    type=CommaList(),
    default="",
    help="also write channel-major copies at these precisions (full, or integer ones the store holds), from which "
    "channel slots read only an expert's kept channels (docs/atomic-experts.md)",
)
@quiet_option
def shard(
    model_dir: Path,
    out: Path,
    precisions: tuple[str, ...],
    group_size: int,
    channel_major: tuple[str, ...],
    quiet: bool,
) -> int:
    """Read a safetensors checkpoint in MODEL_DIR (single or sharded, per-expert or fused expert keys) tensor by tensor
    and write a store: manifest.json, dense.safetensors and one contiguous blob per expert. A rerun for the same
    checkpoint is a no-op, except that it adds the --precisions the store lacks."""
    from ..store import shard as shard_checkpoint
    from ..store.quantized_copies import add_precisions, quantized_copies

    result = shard_checkpoint(model_dir, out, progress=not quiet)
    m = result.manifest
    state = "written" if result.created else "already up to date"
    click.echo(
        f"store {out} {state}: {m.family}, {len(m.moe_layers)} MoE layers x {m.num_experts} experts, "
        f"{m.expert_nbytes / 2**20:.2f} MiB per expert, {m.total_expert_bytes / 2**20:.1f} MiB of experts, "
        f"fingerprint {m.fingerprint}"
    )
    if precisions:
        m = add_precisions(out, precisions, group_size, progress=not quiet)
        for name, copy in quantized_copies(m).items():
            how = f"groups of {copy.group_size}, scales and zero points included" if copy.group_size else "no scales"
            click.echo(
                f"  {name}: {copy.expert_nbytes / 2**20:.3f} MiB per expert ({how}), "
                f"{copy.expert_nbytes / m.expert_nbytes:.1%} of the store's expert bytes"
            )
    if channel_major:
        from ..store.channel_major import add_channel_major

        for folder, written in add_channel_major(out, channel_major, progress=not quiet):
            click.echo(f"  channel-major {folder.name}: {folder} {'written' if written else 'already up to date'}")
    return 0


@verb("export", short_help="write a pruned transformers checkpoint for one pattern")
@store_option()
@option(
    "--pattern",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="pattern JSON file (`premoe pattern --policy top_k` writes one)",
)
@option("--out", env="EXPORT_OUT", required=True, type=click.Path(path_type=Path), help="folder for the checkpoint")
@quiet_option
def export(store: Path, pattern: Path, out: Path, quiet: bool) -> int:
    """Slice expert tensors and router rows to a pattern and write a checkpoint that AutoModelForCausalLM (and so
    vLLM or SGLang) loads. Pattern file: {"format": 1, "layers": {"<layer>": [expert ids]}}, the same count in every
    layer. A channel plan (`premoe pattern --channels`) also cuts experts to their kept channels
    ("channels": {"<layer>": {"<expert>": [channel ids]}}): the checkpoint's intermediate size is the widest kept
    expert's, narrower ones padded with zero channels."""
    from ..profiler.channel_plan import ChannelPlan, ExpertShape
    from ..store import Store
    from ..store.export import export_pruned

    opened = Store(store)
    plan = ChannelPlan.load(store_spec(opened), ExpertShape.of(opened.manifest).intermediate, pattern)
    loaded = plan.pattern
    written = export_pruned(opened, loaded, out, progress=not quiet, channels=plan.channels or None)
    click.echo(f"pruned checkpoint with {loaded.size} routed experts written to {written}")
    if plan.channels:
        cut = sum(len(by_expert) for by_expert in plan.channels.values())
        click.echo(f"  {cut} experts cut to their kept channels (zero channels pad them to one intermediate size)")
    lowered = sum(len(v) for v in loaded.precisions.values())
    if lowered:
        click.echo(
            f"  {lowered} experts the pattern holds below full precision are written dequantized, in the store's "
            f"{opened.manifest.dtype}: a checkpoint holds each layer's experts as one fused tensor under one scheme, "
            "so a mixed layer becomes the weights our engine computes with (same logits), not smaller files"
        )
    return 0


@verb("eval", short_help="quality kept per task, criterion and budget (JSON, Markdown, PNG)")
@store_option()
@option(
    "--profiles",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default="profiles",
    help="folder of task profiles",
)
@option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default="reference/tasks",
    help="folder with <task>/eval.jsonl",
)
@option("--tasks", type=CommaList(), help="tasks (default: every profile)")
@option(
    "--criteria",
    type=CommaList(LazyChoice(Lazy("premoe_service.evaluation.run", "EVAL_CRITERIA"))),
    default=Lazy("premoe_service.evaluation.run", "EVAL_CRITERIA"),
    help="criteria, and `random` for the random floor",
)
@option(
    "--budgets",
    type=CommaList(BUDGET),
    default="0.75,0.5,0.25,0.125",
    help="budgets: shares of the experts' bytes at 16 bits per parameter (0.5, 50%) or such bytes (8GiB)",
)
@option(
    "--cross-criterion",
    type=CRITERION,
    default=Lazy("premoe_service.profiler.criteria", "DEFAULT_CRITERION"),
    help="criterion of the cross-task matrix",
)
@option("--cross-budget", type=BUDGET, default="0.5", help="budget of the cross-task matrix")
@option("--limit", type=POSITIVE, help="items per task (default: all)")
@option(
    "--out",
    env="EVAL_OUT",
    type=click.Path(file_okay=False, path_type=Path),
    default="var/eval",
    help="folder for eval.json, eval.md, retention.png",
)
@option("--no-retrieval", is_flag=True, help="skip the retrieval accuracy")
@option(
    "--precisions",
    type=PRECISIONS,
    default="",
    help="compare drop-only, uniform and mixed precision with these quantized copies of the store instead of the "
    "criteria (precision.json, precision.md, precision.png)",
)
@option(
    "--objectives",
    type=CommaList(LazyChoice(Lazy("premoe_service.profiler.precision_plan", "OBJECTIVES"))),
    default=Lazy("premoe_service.profiler.precision_plan", "OBJECTIVES"),
    help="mixed-precision objectives to compare (with --precisions)",
)
@option(
    "--channels",
    type=CommaList(LazyChoice(Lazy("premoe_service.profiler.channels", "CHANNEL_CRITERIA"))),
    default="",
    help="with --precisions: compare expert-level mixed precision with channel-level plans ranking channels by these "
    "channel criteria (channels.json, channels.md, channels.png)",
)
@option(
    "--channel-fractions",
    type=CommaList(OPEN_SHARE),
    default=Lazy("premoe_service.profiler.channel_plan", "DEFAULT_FRACTIONS"),
    help="with --channels: the channel counts a plan may hold per expert, as shares of the intermediate size",
)
@embedder_option()
@device_option
@quiet_option
def evaluate(
    store: Path,
    profiles: Path,
    data: Path,
    tasks: tuple[str, ...] | None,
    criteria: tuple[str, ...],
    budgets: tuple[str, ...],
    cross_criterion: str,
    cross_budget: str,
    limit: int | None,
    out: Path,
    no_retrieval: bool,
    precisions: tuple[str, ...],
    objectives: tuple[str, ...],
    channels: tuple[str, ...],
    channel_fractions: tuple[float, ...],
    embedder: str | None,
    device: str,
    quiet: bool,
) -> int:
    """For each task and criterion (and a random floor) and each budget: the task metric with the pattern, the full
    model's, and the retention. Also task A's pattern on task B's data, and retrieval top-1 accuracy of the held-out
    prompts. Exact-match tasks: greedy answer == expected; text tasks: per-token NLL (retention = full / pruned
    perplexity).

    A budget is a share of the routed experts' bytes counted at 16 bits per parameter (bf16, what MoE checkpoints
    ship in), whatever the store's dtype (0.5, 50%), or such bytes (8GiB). Dropping experts, each counts 16 bits per
    parameter, so the share is the share of routed experts kept; the pattern spreads it over layers by score (the
    `budget` selection policy). For a bf16 store this is `serve --budget`'s share; for an fp32 store eval's 50% is
    `serve --budget 25%`. With --precisions, quantized experts count their packed bytes, scales included; with
    --channels too, experts may also hold only their best channels (docs/atomic-experts.md)."""
    from ..evaluation import evaluate_grid, load_task_data, markdown, write_reports
    from ..profiler import Profile
    from ..profiler.precision_plan import bf16_nbytes
    from ..runtime.residency import Budget
    from ..store import Store

    opened = Store(store)
    manifest = opened.manifest
    total = bf16_nbytes(manifest) * manifest.num_experts * len(manifest.moe_layers)

    def share(text: str) -> float:
        parsed = Budget.parse(text)
        return parsed.fraction if parsed.fraction is not None else min(1.0, (parsed.bytes or 0) / total)

    names = list(tasks) if tasks else sorted(p.stem for p in profiles.glob("*.safetensors"))
    loaded = {n: Profile.load(profiles / f"{n}.safetensors", fingerprint=opened.fingerprint) for n in names}
    task_data = load_task_data(data, names, limit)
    if channels and not precisions:
        raise click.UsageError("--channels compares plans over quantized copies: give --precisions too")
    if precisions:
        from ..evaluation.precision_eval import evaluate_precisions, write_precision_reports
        from ..evaluation.precision_eval import markdown as precision_markdown
        from ..profiler.demos import load_demos

        # The demos `make profiles` keeps beside each profile: mixed plans weigh precisions by their error on them.
        demos = {
            n: load_demos(profiles / f"{n}.demos.jsonl") for n in names if (profiles / f"{n}.demos.jsonl").exists()
        }
        if channels:
            from ..evaluation.channel_eval import evaluate_channels, write_channel_reports
            from ..evaluation.channel_eval import markdown as channel_markdown

            by_channel = evaluate_channels(
                opened,
                loaded,
                task_data,
                budgets=[share(b) for b in budgets],
                precisions=precisions,
                criteria=channels,
                fractions=[float(f) for f in channel_fractions],
                demos=demos,
                device=device,
                progress=not quiet,
            )
            for path in write_channel_reports(by_channel, out):
                click.echo(f"wrote {path}")
            click.echo(channel_markdown(by_channel))
            return 0
        compared = evaluate_precisions(
            opened,
            loaded,
            task_data,
            budgets=[share(b) for b in budgets],
            precisions=precisions,
            objectives=objectives,
            demos=demos,
            device=device,
            progress=not quiet,
        )
        for path in write_precision_reports(compared, out):
            click.echo(f"wrote {path}")
        click.echo(precision_markdown(compared))
        return 0
    router = None
    if not no_retrieval:
        from ..retrieval import Embedder, MemoryProfileStore, Registry

        registry = Registry(MemoryProfileStore(), embedder=Embedder(embedder))
        for one in loaded.values():
            registry.register(one)

        def router(prompt: str) -> str | None:
            ranked = registry.route(prompt).ranked
            return ranked[0][0] if ranked else None

    result = evaluate_grid(
        opened,
        loaded,
        task_data,
        criteria=list(criteria),
        budgets=[share(b) for b in budgets],
        cross_criterion=cross_criterion,
        cross_budget=share(cross_budget),
        device=device,
        progress=not quiet,
        router=router,
    )
    for path in write_reports(result, out):
        click.echo(f"wrote {path}")
    click.echo(markdown(result))
    return 0
