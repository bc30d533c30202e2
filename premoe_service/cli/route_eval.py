"""`premoe route --evaluate`: routing measured offline on labelled prompts, per task, on one or both signals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .params import option
from .shared import store_option

if TYPE_CHECKING:
    from ..retrieval import Registry, RouteDecision, RouteEvaluation

F = TypeVar("F", bound=Callable[..., Any])


def route_evaluate_options(fn: F) -> F:
    """--store, --background, --calibration-queries, --calibrate-out and --save-routing of `premoe route --evaluate`."""
    declared = (
        store_option(required=False, help="store of the model: route on its router signal too (for --evaluate)"),
        option(
            "--background",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="JSONL of off-topic prompts: a none-class (with --store; e.g. reference/offtopic/background.jsonl)",
        ),
        option(
            "--calibration-queries",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="JSONL of labelled prompts of your own that calibration uses too (not the --evaluate file)",
        ),
        option(
            "--calibrate-out",
            type=click.Path(dir_okay=False, path_type=Path),
            help="write the per-task leads calibrated from the demos and the background here (JSON)",
        ),
        option(
            "--save-routing",
            is_flag=True,
            help="write --background and the leads calibrated with it into the profiles folder (routing.json), "
            "where `premoe serve --profiles` and later evaluations take them from",
        ),
    )
    for decorator in reversed(declared):
        fn = decorator(fn)
    return fn


def route_evaluate(
    queries: Path,
    profiles: Path | None,
    embedder: str | None,
    store: Path | None,
    background: Path | None,
    calibration_queries: Path | None,
    calibrate_out: Path | None,
    save_routing: bool = False,
) -> int:
    """Print the figures of `premoe route --evaluate` on the profiles folder; see the `route` verb's help."""
    import dataclasses

    from ..retrieval import Embedder, LocalProfileStore, Registry, evaluate, load_route_records

    if profiles is None:
        raise click.UsageError("--evaluate needs --profiles (a folder of profile files)")
    if (background is not None or calibrate_out is not None) and store is None:
        raise click.UsageError("--background and --calibrate-out need --store (the router signal)")
    if (calibrate_out is not None or calibration_queries is not None or save_routing) and background is None:
        raise click.UsageError(
            "--calibrate-out, --calibration-queries and --save-routing need --background (calibration's negatives)"
        )
    records = load_route_records(queries)
    model = Embedder(embedder)
    plain = Registry(LocalProfileStore(profiles), embedder=model)
    if store is None:
        _echo_result(plain, evaluate(plain, records))
        return 0
    from ..retrieval.routing_record import ROUTING_FILE, RoutingRecord
    from ..retrieval.task_leads import calibrate
    from ..runtime.router_signal import RouterSignal
    from ..store import Store

    prompts = [r.query for r in load_route_records(background)] if background is not None else []
    signal = RouterSignal.from_store(Store(store))
    registry = Registry(LocalProfileStore(profiles), embedder=model, signal=signal, background=prompts)
    record = registry.routing_record
    if not prompts and record is not None:
        click.echo(
            f"routing record {profiles / ROUTING_FILE}: {len(record.background)} background prompts, "
            f"{len(record.task_leads)} calibrated leads (as `premoe serve --profiles {profiles}` routes)"
        )
    alone = evaluate(plain, records)
    click.echo(
        f"embedding alone: top-1 {alone.top1_accuracy:.3f}, off-topic rejected {alone.no_match_recall:.3f}, "
        f"on-task rejected {alone.on_task_rejected:.3f} (threshold {plain.policy.threshold:.3f})"
    )
    leads: dict[str, float] = {}
    if prompts:
        labelled = load_route_records(calibration_queries) if calibration_queries is not None else []
        calibration = calibrate(registry, labelled=labelled)
        leads = calibration.task_leads
        click.echo(
            f"calibrated leads (demos, their lines, {len(labelled)} labelled and {len(prompts)} background prompts; "
            "positives lost "
            f"{calibration.positives_lost:.3f}, background rejected {calibration.background_rejected:.3f})"
        )
        if calibrate_out is not None:
            calibration.save(calibrate_out)
            click.echo(f"wrote {calibrate_out} (serve it with --route-calibration)")
        if save_routing and background is not None:
            saved = RoutingRecord(tuple(prompts), leads, source=background.name).save(profiles)
            click.echo(f"wrote {saved}: `premoe serve --profiles {profiles}` routes with it from now on")
        registry.policy = dataclasses.replace(registry.policy, task_leads=leads)
    elif record is not None:
        leads = dict(registry.policy.task_leads)
    with_none = registry.evidence is not None and registry.evidence.has_background
    click.echo("embedding + router signal" + (", none-class and calibrated leads:" if with_none else ":"))
    _echo_result(registry, evaluate(registry, records), leads if with_none else None)
    return 0


class RemoteRouter:
    """Routes prompts through a running server's Route RPC, as `evaluate` asks a `Router` to."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def route(self, prompt: str) -> RouteDecision:
        from ..retrieval import RouteDecision

        reply = self.client.route(prompt)
        ranked = [(item.task, float(item.score)) for item in reply.ranked]
        matched = reply.decision == "match"
        return RouteDecision(ranked, reply.task or None, matched, list(reply.fallback_tasks), reply.reason)


def route_evaluate_server(queries: Path, client: Any, server: str) -> int:
    """Print the figures of `premoe route --evaluate` through a running server's Route (its own defaults)."""
    from ..retrieval import evaluate, load_route_records

    result = evaluate(RemoteRouter(client), load_route_records(queries))
    click.echo(f"through the Route RPC of the server at {server} (its own configuration):")
    threshold = "n/a" if result.suggested_threshold is None else f"{result.suggested_threshold:.3f}"
    click.echo(f"queries {result.records} ({result.labelled} labelled)")
    click.echo(f"top-1 accuracy      {result.top1_accuracy:.3f}")
    click.echo(f"match accuracy      {result.match_accuracy:.3f}")
    click.echo(f"no-match precision  {result.no_match_precision:.3f}")
    click.echo(f"no-match recall     {result.no_match_recall:.3f}")
    click.echo(f"suggested threshold {threshold}")
    click.echo(f"on-task rejected    {result.on_task_rejected:.3f}")
    click.echo(f"off-topic rejected  {result.no_match_recall:.3f}")
    _echo_per_task(result, None, None)
    _echo_confusion(result.confusion)
    for query, expected, decided in result.misses[:10]:
        click.echo(f"  miss: {query[:60]!r}: expected {expected}, got {decided}")
    return 0


def _echo_result(registry: Registry, result: RouteEvaluation, leads: dict[str, float] | None = None) -> None:
    threshold = "n/a" if result.suggested_threshold is None else f"{result.suggested_threshold:.3f}"
    policy, background = registry.policy, registry.evidence is not None and registry.evidence.has_background
    floor = f"similarity floor {policy.background_floor:.3f} (with the none-class)" if background else ""
    click.echo(f"queries {result.records} ({result.labelled} labelled), {floor or f'threshold {policy.threshold:.3f}'}")
    click.echo(f"top-1 accuracy      {result.top1_accuracy:.3f}")
    click.echo(f"match accuracy      {result.match_accuracy:.3f}")
    click.echo(f"no-match precision  {result.no_match_precision:.3f}")
    click.echo(f"no-match recall     {result.no_match_recall:.3f}")
    click.echo(f"suggested threshold {threshold}")
    click.echo(f"on-task rejected    {result.on_task_rejected:.3f}")
    click.echo(f"off-topic rejected  {result.no_match_recall:.3f}")
    _echo_per_task(result, lambda task: policy.threshold_for(task, background=background), leads)
    _echo_confusion(result.confusion)
    for query, expected, decided in result.misses[:10]:
        click.echo(f"  miss: {query[:60]!r}: expected {expected}, got {decided}")


def _echo_per_task(
    result: RouteEvaluation, threshold_for: Callable[[str], float] | None, leads: dict[str, float] | None
) -> None:
    """Per task: its queries, top-1, matched right, queries ranked first for it, its threshold, the suggested one,
    and with a none-class its calibrated lead."""
    click.echo("per task (top-1 ignores the threshold; 'first': queries of any label ranked first for the task)")
    lead_head = f" {'lead':>7}" if leads is not None else ""
    click.echo(
        f"  {'task':<16} {'n':>4} {'top-1':>6} {'match':>6} {'first':>6} {'thresh':>7} {'suggest':>8}{lead_head}"
    )
    for task, item in result.per_task.items():
        value = result.suggested_thresholds.get(task)
        suggested = "n/a" if value is None else f"{value:.3f}"
        lead = "" if leads is None else f" {leads[task]:>7.2f}" if task in leads else f" {'n/a':>7}"
        threshold = "n/a" if threshold_for is None else f"{threshold_for(task):.3f}"
        click.echo(
            f"  {task:<16} {item.queries:>4} {item.top1_accuracy:>6.3f} {item.match_accuracy:>6.3f} "
            f"{item.ranked_first:>6} {threshold:>7} {suggested:>8}{lead}"
        )


def _echo_confusion(confusion: dict[str | None, dict[str | None, int]]) -> None:
    """Rows: the label (off-topic as '(none)'); columns: the decision at the current threshold ('(none)': no match)."""
    labels = sorted({t for t in confusion if t is not None} | {t for row in confusion.values() for t in row if t})
    cols: list[str | None] = [*labels, None]
    rows = cols if None in confusion else cols[:-1]
    name: dict[str | None, str] = {t: t for t in labels}
    name[None] = "(none)"
    width = max(6, *(len(name[c][:11]) for c in cols))
    click.echo("confusion (rows: label, columns: decision at the current threshold)")
    click.echo(f"  {'':<16}" + "".join(f" {name[c][:11]:>{width}}" for c in cols))
    for row in rows:
        counts = confusion.get(row, {})
        click.echo(f"  {name[row]:<16}" + "".join(f" {counts.get(c, 0) or '.':>{width}}" for c in cols))
