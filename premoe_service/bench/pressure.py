"""`premoe bench pressure`: many clients asking for random tasks while the expert budget shrinks; each budget is a
`premoe serve` process of its own, the budget 1.0 run (every task fits) the baseline measured in the same run.

Per budget: tokens/s and its ratio to budget 1.0, failed requests, per-task p99 of per-request end-to-end latency
(and the worst task's ratio to budget 1.0), expert bytes moved (the server's loads from cache and disk) and
evictions. Every request names its task, so retrieval plays no part: only residency is under test. Each budget
runs once per `--under-pressure` mode (`wait`, `demote`); a `demote` run also reports the share of tokens served
by requests that had experts demoted, and the share of expert calls at each precision.

Every server is started first and stays up; then `rounds` rounds run the same requests against each server in
turn (the others idle meanwhile), and each figure is the median over the rounds. On a small shared machine one
run of a few seconds swings by 10-20% from one server to the next; interleaving the rounds spreads what the
machine does meanwhile over every server alike.
"""

from __future__ import annotations

import json
import random
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from ..loopback import premoe_server
from .common import percentiles
from .serve.clients import Req, run_clients_apart


@dataclass
class PressureOptions:
    store: str | None = None  # None: var/reference-store, built from `model` when missing
    model: str = "models/reference-moe"
    profiles: str = "profiles"
    data: str = "reference/tasks"
    budgets: str = "1.0,0.75,0.5,0.25"
    clients: int = 16
    requests: int = 160
    rounds: int = 3  # interleaved rounds over every server, medians reported
    max_new_tokens: int = 24
    text_chars: int = 60
    seed: int = 0
    device: str = "cpu"
    serve_opts: str = ""  # extra `premoe serve` flags, e.g. "--lease-timeout 60"
    # Per budget, a run per precision: "full", or LoadTask every task at that precision first (the server needs slots
    # for it: --precision-slots in serve_opts; the store, the copies).
    precisions: str = "full"
    under_pressure: str = "wait,demote"  # per budget, a server per mode (premoe serve --under-pressure)
    out: str | None = "var/bench-pressure.json"
    quiet: bool = False


def build_requests(data: Path, tasks: list[str], count: int, new_tokens: int, text_chars: int, seed: int) -> list[Req]:
    """`count` requests, each of a task drawn at random (seeded) with the task's next eval prompt (text tasks:
    their first `text_chars` characters), greedy, `new_tokens` new tokens each."""
    from ..evaluation.run import load_eval_items

    prompts = {}
    for task in tasks:
        items = load_eval_items(data / task / "eval.jsonl", 64)
        prompts[task] = [item.prompt if item.exact else item.text[:text_chars] for item in items]
    rng = random.Random(seed)
    used = dict.fromkeys(tasks, 0)
    requests = []
    for index in range(count):
        task = rng.choice(tasks)
        prompt = prompts[task][used[task] % len(prompts[task])]
        used[task] += 1
        requests.append(Req(index, task, prompt, new_tokens))
    return requests


@contextmanager
def serving(store: Path, profiles: Path, budget: str, device: str, extra: list[str]) -> Iterator[str]:
    """`premoe serve` at `budget` in its own process, as a user starts it; yields its address once SERVING."""
    with premoe_server(store, profiles, ["--budget", budget, "--device", device, *extra]) as server:
        yield server.target


def measure(
    target: str,
    requests: list[Req],
    clients: int,
    tasks: list[str],
    load_precision: str = "",
    demote_to: str = "",
    warm: bool = True,
) -> dict[str, Any]:
    """One budget's figures: warm the process with one request per task (not counted; `warm`), then the closed
    loop. With `load_precision`, every task is first loaded at that precision (LoadTask), so that its requests are
    served so. `demote_to`: the precision a demoting server serves from (its tokens are counted as demoted)."""
    from ..client import PreMoeClient

    with PreMoeClient(target, timeout=600) as client:
        for task in tasks if load_precision else ():
            client.load_task(task, precision=load_precision)
        for task in tasks if warm else ():
            client.generate("warm up", task=task, max_new_tokens=1)
        before = client.stats()
        run = run_clients_apart(target, requests, clients)
        after = client.stats()
    ok = [r for r in run.replies if r.error is None]
    latency: dict[str, list[float]] = {}
    for reply in ok:
        latency.setdefault(reply.req.task, []).append(reply.done - reply.sent)
    p99 = {task: percentiles(values, (99,))[0] * 1e3 for task, values in sorted(latency.items())}  # type: ignore[operator]
    tokens = sum(len(r.token_ids) for r in ok)
    served: dict[str, int] = {}  # experts per precision over the requests, each weighted by its tokens
    demoted_tokens = 0
    for reply in ok:
        for precision, count in reply.precisions.items():
            served[precision] = served.get(precision, 0) + count * len(reply.token_ids)
        if demote_to and reply.precisions.get(demote_to) and not load_precision:
            demoted_tokens += len(reply.token_ids)
    return {
        "requests": len(run.replies),
        "failures": len(run.replies) - len(ok),
        "failure_messages": sorted({r.error for r in run.replies if r.error is not None})[:5],
        "tokens": tokens,
        "wall_s": run.wall_s,
        "tokens_per_s": tokens / run.wall_s if run.wall_s > 0 else 0.0,
        "p99_ms": p99,
        "worst_p99_ms": max(p99.values(), default=0.0),
        "worst_p99_task": max(p99, key=lambda t: p99[t]) if p99 else "",
        "bytes_moved": int(after.loads.bytes - before.loads.bytes),
        "experts_loaded": int(after.loads.cache + after.loads.disk - before.loads.cache - before.loads.disk),
        "evictions": int(after.evictions - before.evictions),
        "capacity_experts": int(after.capacity_experts),
        "demoted_token_share": demoted_tokens / tokens if tokens else 0.0,
        "precision_share": {p: n / sum(served.values()) for p, n in sorted(served.items())} if served else {},
    }


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's figures over its rounds (`measure`'s dicts): the median of tokens/s, of each task's p99 and of
    the bytes moved and evictions per round; failures and tokens summed; shares weighted by each round's tokens.
    The worst task is the one with the highest median p99. `rounds` keeps each round's tokens/s and worst p99."""
    tokens = sum(r["tokens"] for r in rounds)
    p99 = {
        task: statistics.median(r["p99_ms"][task] for r in rounds if task in r["p99_ms"])
        for task in sorted({t for r in rounds for t in r["p99_ms"]})
    }
    precisions = sorted({p for r in rounds for p in r["precision_share"]})
    weight = [r["tokens"] / tokens if tokens else 1 / len(rounds) for r in rounds]
    return {
        "requests": sum(r["requests"] for r in rounds),
        "failures": sum(r["failures"] for r in rounds),
        "failure_messages": sorted({m for r in rounds for m in r["failure_messages"]})[:5],
        "tokens": tokens,
        "wall_s": sum(r["wall_s"] for r in rounds),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
        "p99_ms": p99,
        "worst_p99_ms": max(p99.values(), default=0.0),
        "worst_p99_task": max(p99, key=lambda t: p99[t]) if p99 else "",
        "bytes_moved": int(statistics.median(r["bytes_moved"] for r in rounds)),
        "experts_loaded": int(statistics.median(r["experts_loaded"] for r in rounds)),
        "evictions": int(statistics.median(r["evictions"] for r in rounds)),
        "capacity_experts": rounds[-1]["capacity_experts"],
        "demoted_token_share": sum(w * r["demoted_token_share"] for w, r in zip(weight, rounds, strict=True)),
        "precision_share": {
            p: sum(w * r["precision_share"].get(p, 0.0) for w, r in zip(weight, rounds, strict=True))
            for p in precisions
        },
        "rounds": [{"tokens_per_s": r["tokens_per_s"], "worst_p99_ms": r["worst_p99_ms"]} for r in rounds],
    }


def run(options: PressureOptions) -> dict[str, Any]:
    """Every budget and mode in a server process of its own, all started first, then `options.rounds` interleaved
    rounds over them; returns the report (written to `options.out`)."""
    budgets = [b.strip() for b in options.budgets.split(",") if b.strip()]
    if not budgets:
        raise InvalidArgument("give at least one budget, e.g. 1.0,0.5", field="budgets")
    if options.clients < 1 or options.requests < 1 or options.max_new_tokens < 1:
        raise InvalidArgument("clients, requests and max_new_tokens must be positive", field="clients")
    store = Path(options.store or "var/reference-store")
    if not (store / "manifest.json").exists():
        if options.store is not None:
            raise InvalidArgument(f"no store at {store}", field="store")
        from ..store import shard

        shard(options.model, store, progress=not options.quiet)
    data = Path(options.data)
    tasks = sorted(
        p.stem for p in Path(options.profiles).glob("*.safetensors") if (data / p.stem / "eval.jsonl").exists()
    )
    if not tasks:
        raise InvalidArgument(f"no task has both a profile in {options.profiles} and data in {data}", field="profiles")
    requests = build_requests(data, tasks, options.requests, options.max_new_tokens, options.text_chars, options.seed)
    precisions = [p.strip() for p in options.precisions.split(",") if p.strip()] or ["full"]
    modes = [m.strip() for m in options.under_pressure.split(",") if m.strip()] or ["wait"]
    for mode in modes:
        if mode not in ("wait", "demote"):
            raise InvalidArgument(f"unknown mode {mode!r} (use wait, demote)", field="under_pressure")
    extra = shlex.split(options.serve_opts)
    demote_to = extra[extra.index("--demote-to") + 1] if "--demote-to" in extra[:-1] else "int8"
    if "demote" in modes:
        from ..store import Store
        from ..store.copies import quantized_copies
        from ..store.quant import DEFAULT_GROUP_SIZE
        from ..store.quantized_copies import add_precisions

        if demote_to not in quantized_copies(Store(store).manifest):
            if options.store is not None:
                raise InvalidArgument(
                    f"the store has no {demote_to} copy to demote to (premoe shard --precisions {demote_to})",
                    field="store",
                )
            add_precisions(store, (demote_to,), DEFAULT_GROUP_SIZE, progress=not options.quiet)
    if options.rounds < 1:
        raise InvalidArgument("rounds must be positive", field="rounds")
    runs = [(budget, mode, precision) for budget in budgets for mode in modes for precision in precisions]
    measured: list[list[dict[str, Any]]] = [[] for _ in runs]
    with tempfile.TemporaryDirectory(prefix="premoe-pressure-") as scratch, ExitStack() as servers:
        profiles = Path(scratch) / "profiles"  # a copy: the server may write beside its profiles
        shutil.copytree(options.profiles, profiles)
        targets = []
        for budget, mode, _ in runs:
            flags = [*extra, "--under-pressure", mode]
            targets.append(servers.enter_context(serving(store, profiles, budget, options.device, flags)))
        for round_ in range(options.rounds):
            for (budget, mode, precision), target, figures in zip(runs, targets, measured, strict=True):
                if not options.quiet:
                    print(
                        f"round {round_ + 1}/{options.rounds}, budget {budget}, {mode}, {precision}: "
                        f"{len(requests)} requests, {options.clients} clients",
                        file=sys.stderr,
                    )
                lowered = "" if precision == "full" else precision
                demoting = demote_to if mode == "demote" else ""
                # Warmed in the first round only: a request alone takes its own pattern at full precision, so
                # warming again would undo what the previous round left under pressure (lent slots, demotions).
                warm = round_ == 0
                figures.append(measure(target, requests, options.clients, tasks, lowered, demoting, warm))
    rows = [
        {"budget": budget, "mode": mode, "precision": precision, **combine(figures)}
        for (budget, mode, precision), figures in zip(runs, measured, strict=True)
    ]
    base = rows[0]
    for row in rows:
        row["tokens_per_s_ratio"] = row["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
        row["worst_p99_ratio"] = row["worst_p99_ms"] / base["worst_p99_ms"] if base["worst_p99_ms"] else None
    report = {
        "tasks": tasks,
        "clients": options.clients,
        "requests": options.requests,
        "rounds": options.rounds,
        "max_new_tokens": options.max_new_tokens,
        "device": options.device,
        "serve_opts": options.serve_opts,
        "precisions": precisions,
        "modes": modes,
        "baseline": f"budget {base['budget']} ({base['mode']}) at {base['precision']} precision, measured in the same "
        "run",
        "rows": rows,
    }
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=1))
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a text table, ratios against the first budget."""
    lines = [
        f"{report['clients']} clients, {report['requests']} requests of random tasks ({len(report['tasks'])}), greedy, "
        f"{report['max_new_tokens']} new tokens; median of {report.get('rounds', 1)} interleaved rounds (MiB moved and "
        f"evictions: per round); baseline: {report['baseline']}",
        f"{'budget':>7} {'mode':>7} {'served at':>9} {'tok/s':>8} {'x base':>7} {'failed':>7} {'worst p99 ms':>13} "
        f"{'x base':>7} {'worst task':<12} {'MiB moved':>10} {'evictions':>10} {'demoted':>8}",
    ]
    for row in report["rows"]:
        ratio = row["tokens_per_s_ratio"]
        p99_ratio = row["worst_p99_ratio"]
        lines.append(
            f"{row['budget']:>7} {row['mode']:>7} {row['precision']:>9} {row['tokens_per_s']:>8.1f} "
            f"{ratio or 0:>6.2f}x {row['failures']:>7} {row['worst_p99_ms']:>13.0f} {p99_ratio or 0:>6.2f}x "
            f"{row['worst_p99_task']:<12} "
            f"{row['bytes_moved'] / 2**20:>10.1f} {row['evictions']:>10} {row['demoted_token_share']:>7.0%}"
        )
    for row in report["rows"]:
        per_task = ", ".join(f"{task} {ms:.0f}" for task, ms in row["p99_ms"].items())
        lines.append(f"p99 ms per task at budget {row['budget']}, {row['mode']}, {row['precision']}: {per_task}")
        shares = ", ".join(f"{p} {share:.1%}" for p, share in row["precision_share"].items())
        lines.append(f"  expert calls by precision (token-weighted): {shares}")
        if row["failure_messages"]:
            lines.append(f"  failures: {'; '.join(row['failure_messages'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from .common import parse_options

    options = parse_options(PressureOptions, argv, "python -m premoe_service.bench.pressure", __doc__ or "")
    print(table(run(options)))


if __name__ == "__main__":
    main()
