"""Verbs that score experts offline: `profile` (and `profile show`) and `pattern`, a pattern file from a profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .params import (
    BUDGET,
    CRITERION,
    OPEN_SHARE,
    POLICY,
    POSITIVE,
    PRECISIONS,
    Lazy,
    LazyChoice,
    VerbGroup,
    option,
    selection_default,
    verb,
)
from .shared import device_option, embedder_option, quiet_option, selection_options, store_option, store_spec


@click.group(
    "profile",
    cls=VerbGroup,
    invoke_without_command=True,
    subcommand_metavar="[show FILE]",
    short_help="score every expert for a task from its demos (`profile show FILE` to view)",
)
@store_option(required=False, help="store folder (written by `premoe shard`)  [required]")
@option("--task", help="task name (^[a-z0-9][a-z0-9_.-]{0,63}$)  [required]")
@option("--demos", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="JSONL demo file  [required]")
@option(
    "--examples",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSONL of prompts written the way users send them ({"text": ...} per line): retrieval indexes them beside '
    "the demos, but they score no expert",
)
@option("--out", env="PROFILE_OUT", type=click.Path(path_type=Path), help="profile file to write  [required]")
@option("--description", default="", show_default=False, help="free text shown to operators")
@selection_options("the task's pattern")
@option(
    "--tcess-threshold",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="PreMoe's r: probabilities below it do not count",
)
@embedder_option("for the demo embeddings")
@option("--no-embed", is_flag=True, help="store no demo embeddings")
@option(
    "--channels/--no-channels",
    default=True,
    help="also score every expert's intermediate channels (for channel-level plans, docs/atomic-experts.md)",
)
@device_option
@quiet_option
@click.pass_context
def profile(ctx: click.Context, **opts: Any) -> int:
    """Run the demos through the model layer by layer over the store (dense part resident, one layer of experts at a
    time) and write a profile file with every criterion's scores. Demos: JSONL, one {"text": ...} or {"prompt": ...,
    "answer": ...} per line; demos longer than the model's context are cut with a warning. View a profile with
    `premoe profile show FILE [--png heat.png]`."""
    if ctx.invoked_subcommand is not None:
        return 0
    for name in ("store", "task", "demos", "out"):
        if opts[name] is None:
            param = next(p for p in ctx.command.params if p.name == name)
            raise click.MissingParameter(ctx=ctx, param=param)
    from ..profiler import Selection, load_demos, profile_store
    from ..profiler.demos import load_examples
    from ..store import Store

    demos = load_demos(opts["demos"])
    examples = load_examples(opts["examples"]) if opts["examples"] is not None else []
    selection = Selection(criterion=opts["criterion"], policy=opts["policy"], value=opts["value"], unit=opts["unit"])
    embedder = None
    if not opts["no_embed"]:
        from ..retrieval import Embedder

        embedder = Embedder(opts["embedder"])
    result, run = profile_store(
        Store(opts["store"]),
        opts["task"],
        demos,
        description=opts["description"],
        selection=selection,
        embedder=embedder,
        tcess_threshold=opts["tcess_threshold"],
        device=opts["device"],
        progress=not opts["quiet"],
        examples=examples,
        channels=opts["channels"],
    )
    result.save(opts["out"])
    note = f", {len(run.truncated)} demos truncated to the context" if run.truncated else ""
    note += f", {len(examples)} route examples" if examples else ""
    click.echo(
        f"profile {opts['out']}: task {result.name}, {len(demos)} demos, {run.token_count} tokens{note}; "
        f"peak expert memory {run.peak_slot_bytes / 2**20:.2f} MiB (one layer)"
    )
    return 0


@profile.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@option("--png", type=click.Path(dir_okay=False, path_type=Path), help="write a heatmap PNG here")
@option("--top", type=POSITIVE, default=5, help="experts listed per layer")
def profile_show(file: Path, png: Path | None, top: int) -> int:
    """Print a profile's provenance and, per criterion and layer, the experts with the most score mass; optionally
    write a PNG heatmap (layers x experts)."""
    from ..profiler import Profile
    from ..profiler.report import heatmap, summary

    loaded = Profile.load(file)
    click.echo(summary(loaded, top=top))
    if png:
        click.echo(f"heatmap written to {heatmap(loaded, png)}")
    return 0


@verb("pattern", short_help="write a pattern file (for `premoe export --pattern`) from a profile and a budget")
@click.argument("profile_file", metavar="PROFILE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@store_option()
@option(
    "--out", env="PATTERN_OUT", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSON to write"
)
@option("--criterion", type=CRITERION, help="which scores (default: the criterion the profile was written with)")
@option("--policy", type=POLICY, default=selection_default("policy"), help="how the budget is spread over layers")
@option("--budget", type=BUDGET, default="0.5", help="the pattern's experts: 0.5, 50%, 8GiB")
@option("--coverage", type=OPEN_SHARE, help="with --policy coverage: share of each layer's score mass to keep")
@option(
    "--precisions",
    type=PRECISIONS,
    default="",
    help="choose each expert's precision (drop, these, full) under the budget's bytes (the store must hold them)",
)
@option(
    "--objective",
    type=LazyChoice(Lazy("premoe_service.profiler.precision_plan", "OBJECTIVES")),
    default="error",
    help="with --precisions: what a precision is worth (error: EASY-EP x measured error; mc: frequency x weight)",
)
@option(
    "--precision-demos",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="with --precisions: the task's demos (JSONL); each precision's error is measured on them (default: the "
    "relative weight error the store recorded)",
)
@option(
    "--channels",
    type=LazyChoice(Lazy("premoe_service.profiler.channels", "CHANNEL_CRITERIA")),
    help="with --precisions: a channel-level plan, experts may also hold only their best channels by this channel "
    "criterion (the profile's channel scores; `premoe export` writes the channel-pruned checkpoint)",
)
def pattern(
    profile_file: Path,
    store: Path,
    out: Path,
    criterion: str | None,
    policy: str,
    budget: str,
    coverage: float | None,
    precisions: tuple[str, ...],
    objective: str,
    precision_demos: Path | None,
    channels: str | None,
) -> int:
    """Select a pattern from a profile's scores and write it as {"format": 1, "layers": {"<layer>": [ids]}}.

    The budget is a share of the routed experts (0.5, 50%; the same share of their bytes) or bytes (8GiB). Policy
    `budget` spreads it over layers by score (layers compete); `top_k` keeps the same count in every layer (what
    `premoe export` needs: a checkpoint has one expert count); `coverage` keeps each layer's best experts up to
    --coverage of its score mass, at most the budget's share of each layer (the slots a server with that budget has).
    """
    from ..fsutil import atomic_write_bytes
    from ..profiler import Profile, Selection, select
    from ..runtime.residency import Budget
    from ..serving.tasks import demo_coverage
    from ..store import Store

    if (coverage is None) == (policy == "coverage"):
        raise click.UsageError("--coverage goes with --policy coverage, and only with it")
    opened = Store(store)
    loaded = Profile.load(profile_file, fingerprint=opened.fingerprint)
    if channels and not precisions:
        raise click.UsageError("--channels chooses among precisions too: give --precisions")
    if precisions:
        return _precision_pattern(
            opened, loaded, out, Budget.parse(budget), precisions, objective, precision_demos, channels
        )
    spec = store_spec(opened)
    nbytes = opened.manifest.expert_nbytes
    criterion = criterion or Selection.from_json(loaded.selection).criterion
    parsed = Budget.parse(budget)
    cap = None
    if policy == "budget":
        if parsed.fraction is not None:
            selection = Selection(criterion, "budget", parsed.fraction, "fraction")
        else:
            selection = Selection(criterion, "budget", float(parsed.bytes or 0), "bytes")
    elif policy == "top_k":
        selection = Selection(criterion, "top_k", parsed.slots_per_layer(spec, nbytes), "experts")
    else:
        selection = Selection(criterion, "coverage", float(coverage or 0), "fraction")
        cap = parsed.slots_per_layer(spec, nbytes)
    chosen = select(loaded.score(criterion), spec, selection, nbytes, max_per_layer=cap)
    atomic_write_bytes(out, (json.dumps(chosen.to_json(), indent=1) + "\n").encode())
    counts = [len(chosen.kept(layer)) for layer in spec.moe_layers]
    click.echo(
        f"pattern {out}: {chosen.size} experts ({chosen.size * nbytes / 2**20:.2f} MiB), {min(counts)}-{max(counts)} "
        f"per layer; {criterion} scores, policy {policy}; demo coverage {demo_coverage(loaded, chosen):.3f}"
    )
    return 0


def _precision_pattern(
    opened: Any,
    loaded: Any,
    out: Path,
    budget: Any,
    precisions: tuple[str, ...],
    objective: str,
    demos: Path | None,
    channels: str | None = None,
) -> int:
    """`premoe pattern --precisions`: a mixed-precision plan under the budget's bytes (full experts at the store's
    own bytes, quantized ones at their packed bytes), written with each kept expert's precision (and, with
    `channels`, the channels of experts held in part)."""
    from ..fsutil import atomic_write_bytes
    from ..pattern import FULL
    from ..profiler.precision_plan import OBJECTIVE_CRITERION, select_precisions, store_options

    manifest = opened.manifest
    nbytes = budget.bytes if budget.bytes is not None else int((budget.fraction or 0) * manifest.total_expert_bytes)
    options = store_options(opened, precisions=(FULL, *precisions))
    if demos is not None:
        from ..profiler.demo_error import demo_errors
        from ..profiler.demos import load_demos

        options = demo_errors(opened, load_demos(demos), options)
    spec = store_spec(opened)
    if channels:
        return _channel_pattern(opened, loaded, out, nbytes, options, channels, demos)
    plan = select_precisions(loaded.score(OBJECTIVE_CRITERION[objective]), spec, options, nbytes, objective)  # type: ignore[arg-type]
    atomic_write_bytes(out, (json.dumps(plan.pattern.to_json(), indent=1) + "\n").encode())
    held = ", ".join(f"{n} at {p}" for p, n in plan.counts.items() if n)
    click.echo(
        f"pattern {out}: {plan.pattern.size} experts ({held}), {plan.nbytes / 2**20:.2f} MiB "
        f"({plan.nbytes / manifest.total_expert_bytes:.1%} of the store's expert bytes); objective {objective}"
    )
    return 0


def _channel_pattern(
    opened: Any, loaded: Any, out: Path, nbytes: int, options: Any, criterion: str, demos: Path | None
) -> int:
    """`premoe pattern --precisions --channels`: a channel-level plan (`profiler.channel_plan`)."""
    from ..profiler.channel_plan import ExpertShape, channel_counts, channel_options, select_channels
    from ..profiler.precision_plan import OBJECTIVE_CRITERION
    from ..store.quantized_copies import quantized_copies

    manifest = opened.manifest
    shape = ExpertShape.of(manifest)
    counts = channel_counts(shape.intermediate)
    channel_scores = loaded.channel_score(criterion)
    kept = None
    if demos is not None:
        from ..profiler.demo_error import channel_kept
        from ..profiler.demos import load_demos

        kept = channel_kept(opened, load_demos(demos), {criterion: channel_scores}, counts)[criterion]
    groups = {c.group_size for c in quantized_copies(manifest).values() if c.group_size}
    sliced = channel_options(options, channel_scores, shape, counts, groups.pop() if len(groups) == 1 else 64, kept)
    plan = select_channels(
        loaded.score(OBJECTIVE_CRITERION["error"]), channel_scores, store_spec(opened), sliced, nbytes
    )
    plan.save(out)
    partial = sum(len(by_expert) for by_expert in plan.channels.values())
    click.echo(
        f"channel plan {out}: {plan.pattern.size} experts, {partial} of them holding part of their channels, "
        f"{plan.nbytes / 2**20:.2f} MiB ({plan.nbytes / manifest.total_expert_bytes:.1%} of the store's expert bytes); "
        f"{criterion} channel scores"
    )
    return 0
