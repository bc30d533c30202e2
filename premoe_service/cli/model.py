"""Verbs on a model's files: `shard` a checkpoint into a store, `export` a pruned checkpoint, `eval` quality kept."""

from __future__ import annotations

from pathlib import Path

import click

from .params import BUDGET, CRITERION, POSITIVE, CommaList, Lazy, LazyChoice, option, verb
from .shared import device_option, embedder_option, quiet_option, store_option, store_spec


@verb("shard", short_help="split a transformers MoE checkpoint into a store")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="store folder to write")
@quiet_option
def shard(model_dir: Path, out: Path, quiet: bool) -> int:
    """Read a safetensors checkpoint in MODEL_DIR (single or sharded, per-expert or fused expert keys) tensor by tensor
    and write a store: manifest.json, dense.safetensors and one contiguous blob per expert. A rerun for the same
    checkpoint is a no-op."""
    from ..store import shard as shard_checkpoint

    result = shard_checkpoint(model_dir, out, progress=not quiet)
    m = result.manifest
    state = "written" if result.created else "already up to date"
    click.echo(
        f"store {out} {state}: {m.family}, {len(m.moe_layers)} MoE layers x {m.num_experts} experts, "
        f"{m.expert_nbytes / 2**20:.2f} MiB per expert, {m.total_expert_bytes / 2**20:.1f} MiB of experts, "
        f"fingerprint {m.fingerprint}"
    )
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
    layer."""
    from ..pattern import Pattern
    from ..store import Store
    from ..store.export import export_pruned

    opened = Store(store)
    loaded = Pattern.load(store_spec(opened), pattern)
    written = export_pruned(opened, loaded, out, progress=not quiet)
    click.echo(f"pruned checkpoint with {loaded.size} routed experts written to {written}")
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
@option("--budgets", type=CommaList(BUDGET), default="0.75,0.5,0.25,0.125", help="budgets, as for `serve --budget`")
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
    embedder: str | None,
    device: str,
    quiet: bool,
) -> int:
    """For each task and criterion (and a random floor) and each budget: the task metric with the pattern, the full
    model's, and the retention. Also task A's pattern on task B's data, and retrieval top-1 accuracy of the held-out
    prompts. Exact-match tasks: greedy answer == expected; text tasks: per-token NLL (retention = full / pruned
    perplexity).

    A budget is read as for `premoe serve --budget`: a share of the routed experts' bytes (0.5, 50%) or bytes (8GiB).
    All experts have the same size, so a share of their bytes is the same share of the routed experts; the pattern
    spreads it over layers by score (the `budget` selection policy)."""
    from ..evaluation import evaluate_grid, load_task_data, markdown, write_reports
    from ..profiler import Profile
    from ..runtime.residency import Budget
    from ..store import Store

    opened = Store(store)
    total = opened.manifest.total_expert_bytes

    def share(text: str) -> float:
        parsed = Budget.parse(text)
        return parsed.fraction if parsed.fraction is not None else min(1.0, (parsed.bytes or 0) / total)

    names = list(tasks) if tasks else sorted(p.stem for p in profiles.glob("*.safetensors"))
    loaded = {n: Profile.load(profiles / f"{n}.safetensors", fingerprint=opened.fingerprint) for n in names}
    task_data = load_task_data(data, names, limit)
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
