"""Client verbs: `route`, `generate`, `register`, `tasks`, `load`, `unload`, `stats`, `health`; they import grpc,
never torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .params import CRITERION, OPEN_SHARE, POSITIVE, CommaList, option, verb
from .route_eval import route_evaluate, route_evaluate_options, route_evaluate_server
from .shared import client_options, connect, embedder_option


@verb("route", short_help="ask the server which task and pattern a prompt gets; or calibrate offline")
@click.argument("prompt", required=False)
# An action rather than a setting, so no environment twin: it would turn every `premoe route PROMPT` into a calibration.
@click.option(
    "--evaluate",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL of labelled queries: measured on --profiles offline, or without --profiles through --server's Route",
)
@option(
    "--profiles", type=click.Path(exists=True, file_okay=False, path_type=Path), help="profiles folder for --evaluate"
)
@embedder_option("for --evaluate")
@route_evaluate_options
@client_options()
def route(
    prompt: str | None,
    evaluate: Path | None,
    profiles: Path | None,
    embedder: str | None,
    store: Path | None,
    background: Path | None,
    calibration_queries: Path | None,
    calibrate_out: Path | None,
    save_routing: bool,
    server: str,
    timeout: float,
    api_key: str | None,
) -> int:
    """Without --evaluate: the server's routing decision for PROMPT. With --evaluate FILE.jsonl ({"query": ...,
    "task": name or null} per line) and --profiles DIR: top-1 accuracy overall and per task, the confusion matrix,
    no-match precision/recall, on-task rejection, and a suggested threshold overall and per task, computed locally.
    With --store, routing uses the model's router signal too, and the folder's routing record (routing.json: the
    none-class and calibrated leads, as `premoe serve --profiles` routes); with --background another off-topic
    none-class: the embedding alone is reported beside, and per-task leads are calibrated from the demos, the
    background and --calibration-queries (--calibrate-out writes them, --save-routing makes them the folder's
    record). Without --profiles, --evaluate asks the server at --server (Route) and measures its decisions."""
    if evaluate is not None and profiles is None:
        if store is not None or background is not None or save_routing:
            raise click.UsageError("--store, --background and --save-routing need --profiles (offline evaluation)")
        with connect(server, timeout, api_key) as client:
            return route_evaluate_server(evaluate, client, server)
    if evaluate is not None:
        return route_evaluate(
            evaluate, profiles, embedder, store, background, calibration_queries, calibrate_out, save_routing
        )
    if not prompt:
        raise click.UsageError("give a PROMPT, or --evaluate FILE")
    with connect(server, timeout, api_key) as client:
        reply = client.route(prompt)
    click.echo(
        f"decision {reply.decision}: {reply.task or ', '.join(reply.fallback_tasks) or '(general)'} "
        f"({reply.pattern_experts} experts) - {reply.reason}"
    )
    for item in reply.ranked:
        click.echo(f"  {item.score:6.3f}  {item.task}")
    return 0


@verb("generate", short_help="generate from a prompt, streaming to the terminal")
@click.argument("prompt")
@option("--task", help="use this task's pattern, skipping retrieval")
@option("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate")
@option("--temperature", type=click.FloatRange(0), default=0.0, help="0 for greedy")
@option("--top-p", type=OPEN_SHARE, default=1.0, help="nucleus sampling mass")
@option("--seed", type=int, help="sampling seed")
@option("--stop", multiple=True, help="stop string (repeatable; the twin holds space-separated strings)")
@option(
    "--expert-skip-threshold",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.0,
    help="while decoding, skip a routed expert below this share of the token's routing weights (never the top one; "
    "0: off)",
)
@client_options()
def generate(
    prompt: str,
    task: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: tuple[str, ...],
    expert_skip_threshold: float,
    server: str,
    timeout: float,
    api_key: str | None,
) -> int:
    """Stream the completion of PROMPT to stdout; the stats line goes to stderr."""
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stop": stop,
        "task": task,
        "seed": seed,
        "expert_skip_threshold": expert_skip_threshold,
    }
    last = None
    with connect(server, timeout, api_key) as client:
        for chunk in client.stream(prompt, **options):
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
            last = chunk
    if last is not None:
        s = last.stats
        click.echo(
            f"\n[{last.finish_reason}] task {s.task or '(fallback)'} ({s.decision}, score {s.score:.3f}); "
            f"{s.pattern_experts}/{s.total_experts} experts, loaded device {s.loads.device} cache {s.loads.cache} "
            f"disk {s.loads.disk}; coverage {s.coverage:.3f}{' (widened)' if s.widened else ''}; "
            f"{s.timings.total_ms:.0f} ms"
            + (f"; {s.expert_calls_skipped}/{s.expert_calls} expert calls skipped" if s.expert_calls_skipped else ""),
            err=True,
        )
    return 0


@verb("register", short_help="profile and register a task on the server from a demo file")
@click.argument("name")
@option("--demos", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="JSONL demo file")
@option(
    "--examples",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSONL of prompts the way users send them ({"text": ...} per line), indexed for retrieval only',
)
@option("--description", default="", show_default=False, help="free text")
@option("--criterion", type=CRITERION, help="criterion of the task's pattern (default: the server's)")
@option("--experts-per-layer", type=POSITIVE, help="keep this many experts per layer")
@option("--fraction", type=OPEN_SHARE, help="keep this fraction of all routed experts")
@option("--bytes", "bytes_", type=POSITIVE, help="byte budget of the task's experts")
# Names checked by the server (the store decides which it holds), so this verb loads no torch.
@option(
    "--precisions",
    type=CommaList(),
    default=(),
    show_default=False,
    help="let the plan hold experts at these lower precisions the store holds (e.g. int4,int2) under the "
    "--bytes or --fraction budget (the store's expert bytes)",
)
@option("--replace", is_flag=True, help="replace a task of the same name")
@option("--dry-run", is_flag=True, help="profile and report only")
@client_options(admin=True)
def register(
    name: str,
    demos: Path,
    examples: Path | None,
    description: str,
    criterion: str | None,
    experts_per_layer: int | None,
    fraction: float | None,
    bytes_: int | None,
    precisions: tuple[str, ...],
    replace: bool,
    dry_run: bool,
    server: str,
    timeout: float,
    api_key: str | None,
    admin_token: str | None,
) -> int:
    """Send the demos (JSONL) to RegisterTask; the server profiles them without blocking other requests and
    registers task NAME. Without a selection option the server's default selection applies."""
    from ..profiler.demos import load_demos, load_examples

    given = {"experts_per_layer": experts_per_layer, "fraction": fraction, "bytes": bytes_}
    selection = {key: value for key, value in given.items() if value is not None}
    if len(selection) > 1:
        raise click.UsageError("give at most one of --experts-per-layer, --fraction, --bytes")
    texts = [d.text for d in load_demos(demos)]
    with connect(server, timeout, api_key, admin_token) as client:
        info = client.register(
            name,
            texts,
            description=description,
            criterion=criterion or "",
            replace=replace,
            dry_run=dry_run,
            precisions=precisions,
            examples=load_examples(examples) if examples is not None else (),
            **selection,
        )
    state = "profiled (dry run)" if dry_run else "registered"
    lowered = sum(len(layer.precisions) for layer in info.layers)
    below = f", {lowered} below full precision" if lowered else ""
    click.echo(
        f"task {info.name} {state}: {info.pattern_experts} experts{below} ({info.pattern_bytes / 2**20:.2f} MiB), "
        f"criterion {info.criterion}, demo coverage {info.demo_coverage:.3f}"
    )
    return 0


@verb("tasks", short_help="list tasks, show one (with its per-layer experts) or delete one")
@click.argument("name", required=False)
# An action, so no environment twin: a PREMOE_DELETE left in a shell would delete a task on every `premoe tasks`.
@click.option("--delete", metavar="NAME", help="delete this task (needs the admin token)")
@client_options(admin=True)
def tasks(
    name: str | None, delete: str | None, server: str, timeout: float, api_key: str | None, admin_token: str | None
) -> int:
    """List the server's tasks, show task NAME, or delete one."""
    with connect(server, timeout, api_key, admin_token) as client:
        if delete:
            client.delete_task(delete)
            click.echo(f"task {delete} deleted")
            return 0
        if name:
            info = client.get_task(name)
            click.echo(
                f"{info.name}: {info.description}\n  {info.demos} demos, criterion {info.criterion}, "
                f"{info.pattern_experts} experts, demo coverage {info.demo_coverage:.3f}, created {info.created}\n"
                f"  {_residency(info)}"
            )
            for layer in info.layers:
                click.echo(f"  layer {layer.layer:>3}: {_held(layer)}")
            return 0
        listed = client.tasks()
    click.echo(f"{'task':<24} {'experts':>8} {'MiB':>8} {'coverage':>9} {'resident':>9} {'state':<8}  description")
    for info in listed:
        r = info.residency
        state = "pinned" if r.pinned else "loading" if r.loading else ""
        click.echo(
            f"{info.name:<24} {info.pattern_experts:>8} {info.pattern_bytes / 2**20:>8.2f} "
            f"{info.demo_coverage:>9.3f} {r.resident_share:>9.0%} {state:<8}  {info.description}"
        )
    return 0


@verb("load", short_help="make a task's experts resident on the server now, optionally pinned")
@click.argument("name")
@option("--pin", is_flag=True, help="keep them resident until `premoe unload`: other tasks never evict them")
@option(
    "--wait",
    type=click.FloatRange(0),
    default=0.0,
    help="seconds to wait for slots that running requests hold (0: the server's lease timeout)",
)
@option(
    "--precision",
    default="",
    show_default=False,
    help="hold every expert of the task at this lower precision (int8, int4, ...: the server needs slots for it, "
    "--precision-slots) until `premoe unload`",
)
@client_options(admin=True)
def load(
    name: str,
    pin: bool,
    wait: float,
    precision: str,
    server: str,
    timeout: float,
    api_key: str | None,
    admin_token: str | None,
) -> int:
    """LoadTask: copy task NAME's missing experts into device slots and return once they are routable, so its next
    request loads nothing. A pinned task's experts stay until UnloadTask; a pin that cannot fit next to other
    pinned tasks is refused (RESOURCE_EXHAUSTED, naming them and their bytes)."""
    with connect(server, timeout, api_key, admin_token) as client:
        reply = client.load_task(name, pin=pin, timeout_s=wait, precision=precision)
    loads = reply.loads
    click.echo(
        f"task {name} loaded{' and pinned' if reply.task.residency.pinned else ''}: {_residency(reply.task)}; "
        f"this call: device {loads.device}, cache {loads.cache}, disk {loads.disk} ({loads.bytes / 2**20:.2f} MiB) "
        f"in {reply.load_ms:.0f} ms" + (f"; replicas {', '.join(reply.replicas)}" if reply.replicas else "")
    )
    return 0


@verb("unload", short_help="unpin a task and release its experts' device slots")
@click.argument("name")
@client_options(admin=True)
def unload(name: str, server: str, timeout: float, api_key: str | None, admin_token: str | None) -> int:
    """UnloadTask: unpin task NAME and free the slots of its experts that no pinned task, running request or other
    loaded task holds."""
    with connect(server, timeout, api_key, admin_token) as client:
        reply = client.unload_task(name)
    click.echo(
        f"task {name} unloaded{' (was pinned)' if reply.was_pinned else ''}: released {reply.released_experts} "
        f"experts ({reply.released_bytes / 2**20:.2f} MiB); now {_residency(reply.task)}"
        + (f"; replicas {', '.join(reply.replicas)}" if reply.replicas else "")
    )
    return 0


def _residency(info: Any) -> str:
    """`62% resident (10/16 experts, full 8, int8 2), pinned, loading`."""
    r = info.residency
    held = ", ".join(f"{p} {n}" for p, n in sorted(r.precisions.items()))
    flags = "".join(f", {flag}" for flag in ("pinned", "loading") if getattr(r, flag))
    held = f", {held}" if held else ""
    return f"{r.resident_share:.0%} resident ({r.resident_experts}/{info.pattern_experts} experts{held}){flags}"


def _held(layer: Any) -> str:
    """`[0, 3, 5]`; with precisions `[0, 3:int4, 5:int2]` (experts without one are at full precision); an expert
    held in part (a channel-level plan) with its kept channel count: `[0@48, 3:int4@24, 5]`."""
    lowered, cut = dict(layer.precisions), dict(layer.channels)

    def one(e: int) -> str:
        return str(e) + (f":{lowered[e]}" if e in lowered else "") + (f"@{cut[e]}" if e in cut else "")

    return "[" + ", ".join(one(e) for e in layer.experts) + "]"


@verb("stats", short_help="the server's residency, expert loads by tier, tasks and coverage")
@option("--json", "as_json", is_flag=True, help="print GetStats as JSON (field names as in the proto)")
@client_options()
def stats(as_json: bool, server: str, timeout: float, api_key: str | None) -> int:
    """What GetStats reports: the experts resident on the device against the budget's slots, expert reads per tier
    since start (device hits, cache, disk), evictions, the cache's health, requests in flight where the server
    reports them, and per task its requests and mean prefill coverage."""
    from google.protobuf.json_format import MessageToDict

    with connect(server, timeout, api_key) as client:
        reply = client.stats()
    if as_json:
        data = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        click.echo(json.dumps(data, indent=1))
        return 0
    mib = 2**20
    loads = reply.loads
    click.echo(
        f"device   {reply.resident_experts}/{reply.capacity_experts} experts resident "
        f"({reply.resident_bytes / mib:.2f} of {reply.budget_bytes / mib:.2f} MiB budget), {reply.evictions} evictions"
    )
    if reply.lent_slots or reply.demoted_experts:
        click.echo(f"demoted  {reply.demoted_experts} experts in {reply.lent_slots} lent full-precision slots")
    click.echo(f"cache    {reply.cache_health}")
    click.echo(
        f"loads    device hits {loads.device}, cache {loads.cache}, disk {loads.disk} "
        f"({loads.bytes / mib:.2f} MiB loaded)"
    )
    fields = reply.DESCRIPTOR.fields_by_name
    flight = [f"{getattr(reply, n)} {n.replace('_', ' ')}" for n in ("in_flight", "queued") if n in fields]
    if flight:
        click.echo(f"requests {', '.join(flight)}")
    click.echo(f"{'task':<24} {'requests':>9} {'coverage':>9}")
    for task in reply.tasks:
        click.echo(f"{task.task:<24} {task.requests:>9} {task.mean_coverage:>9.3f}")
    return 0


@verb("health", short_help="ask a server's grpc.health.v1 status (exit 0 when SERVING)")
@option("--service", default="", help="service name ('' for the server as a whole)")
@client_options(timeout=5.0)
def health(service: str, server: str, timeout: float, api_key: str | None) -> int:
    """Print the server's health status; exit 0 when SERVING, 1 otherwise (a container healthcheck)."""
    with connect(server, timeout, api_key) as client:
        status = client.health(service)
    click.echo(status)
    return 0 if status == "SERVING" else 1
