"""`premoe bench route-quality`: what routing costs in quality, per task and for off-topic prompts, and the share of
experts it keeps.

For each labelled prompt the full model's own greedy continuation (to its EOS, at most `--continuation` tokens) is
the reference. The prompt goes through the server as configured (an in-process `ServingCore` with the defaults of
`premoe serve`, or the flags given): one greedy token, whose reply names the final pattern after any widening
(`GenerationResult.plan.pattern`, what the reply's stats report). The continuation is then scored under that pattern
and under all experts on a second engine; retention = exp(mean NLL all experts - mean NLL served). For on-task
prompts the true task's own pattern is scored too, the figure routing cannot beat without widening.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...hf_compat import cache_keyword, output_cache
from ...pattern import Pattern


@dataclass
class QualityRow:
    """One prompt's routing and the quality its pattern keeps.

    Attributes:
        query: The prompt.
        label: Its task, or None for an off-topic prompt.
        decision: The reply's decision (match, fallback).
        task: The matched task ("" on fallback).
        top: The router's first-ranked task.
        widened: Whether the pattern was widened after prefill (the guardrail).
        reason: The reply's reason.
        share: Share of all routed experts the final pattern keeps.
        retention: exp(NLL all experts - NLL served) of the continuation.
        own_retention: The same under the true task's pattern (on-task prompts), else NaN.
        mass: The prompt's first-MoE-layer router mass on the routed (pre-widening) pattern.
        coverage: The reply's coverage (prefill and decode, under the final pattern).
    """

    query: str
    label: str | None
    decision: str
    task: str
    top: str
    widened: bool
    reason: str
    share: float
    retention: float
    own_retention: float = float("nan")
    mass: float = float("nan")
    coverage: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)


class ContinuationScorer:
    """The full model's greedy continuations, scored under any pattern on an engine of its own (all experts fit)."""

    def __init__(self, store: Any, tokenizer: Any, max_new_tokens: int = 24) -> None:
        from ...runtime.build import load_model
        from ...runtime.residency import Budget

        self.store = store
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.patterned, _ = load_model(store, Budget(fraction=1.0), device="cpu")
        self.spec = self.patterned.spec
        self.full = Pattern.full(self.spec)
        model = self.patterned.model
        generation = getattr(model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._active: Pattern | None = None

    def _use(self, pattern: Pattern) -> None:
        if self._active != pattern:
            self.patterned.apply(pattern, self.store)
            self._active = pattern

    @torch.inference_mode()
    def continuation(self, prompt: str) -> tuple[list[int], list[int]]:
        """The prompt's ids and the full model's greedy continuation (ending with EOS when it came)."""
        self._use(self.full)
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        out: list[int] = []
        past = None
        step = torch.tensor([ids])
        keyword = cache_keyword(self.patterned.model)
        for _ in range(self.max_new_tokens):
            result = self.patterned.model(input_ids=step, use_cache=True, **{keyword: past})
            past = output_cache(result)
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            if token in self.eos:
                break
            step = torch.tensor([[token]])
        return ids, out

    @torch.inference_mode()
    def nll(self, ids: Sequence[int], continuation: Sequence[int], pattern: Pattern) -> float:
        """Mean NLL (nats per token) of `continuation` after `ids` under `pattern`."""
        self._use(pattern)
        tokens = torch.tensor([list(ids) + list(continuation)])
        logits = self.patterned.model(input_ids=tokens).logits[0].float()  # [S, V]
        start = len(ids) - 1
        predicted = logits[start : start + len(continuation)]
        target = torch.tensor(list(continuation))
        return float(torch.nn.functional.cross_entropy(predicted, target))


def measure(core: Any, scorer: ContinuationScorer, records: Sequence[Any]) -> list[QualityRow]:
    """Route and score every record (`RouteRecord`s) through `core` (a `ServingCore`)."""
    from ...engine import SamplingParams

    total = scorer.spec.num_experts * len(scorer.spec.moe_layers)
    signal = None if core.registry.evidence is None else core.registry.evidence.signal
    rows = []
    for record in records:
        ids, cont = scorer.continuation(record.query)
        full = scorer.nll(ids, cont, scorer.full)
        *_, result = core.generate(record.query, SamplingParams(max_new_tokens=1), stream=False)
        plan = result.plan
        served = scorer.nll(ids, cont, plan.pattern)
        row = QualityRow(
            query=record.query,
            label=record.task,
            decision=plan.decision,
            task=plan.task,
            top=plan.ranked[0][0] if plan.ranked else "",
            widened=result.widened,
            reason=plan.reason,
            share=plan.pattern.size / total,
            retention=math.exp(full - served),
            coverage=result.coverage,
        )
        if record.task is not None and record.task in core.registry.names():
            own = core.tasks.pattern(core.registry.get(record.task))
            row.own_retention = math.exp(full - scorer.nll(ids, cont, own))
        routed = core.route(record.query)  # the plan before any widening after prefill
        row.extra = {"similarity": routed.similarity or 0.0, "lead": 0.0 if routed.lead is None else routed.lead}
        if signal is not None:
            scores = signal.features([record.query]).scores[0]
            row.mass = float(scores[list(routed.pattern.kept(signal.layer))].sum() / max(scores.sum(), 1e-12))
        rows.append(row)
    return rows


@dataclass(frozen=True)
class QualitySummary:
    """Figures of one group of rows (a task, on-task, off-topic)."""

    n: int
    top1: float
    mean: float
    p5: float
    worst: float
    own_mean: float
    share: float
    widened: float

    @classmethod
    def of(cls, rows: Sequence[QualityRow]) -> QualitySummary:
        kept = np.array([r.retention for r in rows])
        own = np.array([r.own_retention for r in rows if not math.isnan(r.own_retention)])
        labelled = [r for r in rows if r.label is not None]
        return cls(
            n=len(rows),
            top1=sum(r.top == r.label for r in labelled) / len(labelled) if labelled else float("nan"),
            mean=float(kept.mean()),
            p5=float(np.quantile(kept, 0.05)),
            worst=float(kept.min()),
            own_mean=float(own.mean()) if own.size else float("nan"),
            share=float(np.mean([r.share for r in rows])),
            widened=float(np.mean([r.widened or r.decision == "fallback" or r.share >= 1.0 for r in rows])),
        )


def summarise(rows: Sequence[QualityRow]) -> dict[str, QualitySummary]:
    """Per task, then "on-task" and "off-topic" (each only when it has rows)."""
    groups: dict[str, list[QualityRow]] = {}
    for row in rows:
        groups.setdefault(row.label or "", []).append(row)
    out = {task: QualitySummary.of(group) for task, group in sorted(groups.items()) if task}
    on = [r for r in rows if r.label is not None]
    off = [r for r in rows if r.label is None]
    if on:
        out["on-task"] = QualitySummary.of(on)
    if off:
        out["off-topic"] = QualitySummary.of(off)
    return out


def table(summary: dict[str, QualitySummary]) -> list[str]:
    """The quality table: per group its prompts, top-1, retention mean / p5 / worst, the true task pattern's mean,
    the mean share of experts kept and the share served wider than a task pattern (widened or fallback)."""
    head = f"{'group':<12} {'n':>4} {'top-1':>6} {'mean':>6} {'p5':>6} {'worst':>6} {'own':>6} {'kept':>6} {'wider':>6}"
    lines = [head]
    for name, s in summary.items():
        lines.append(
            f"{name:<12} {s.n:>4} {s.top1:>6.3f} {s.mean:>6.3f} {s.p5:>6.3f} {s.worst:>6.3f} {s.own_mean:>6.3f} "
            f"{s.share:>6.3f} {s.widened:>6.3f}"
        )
    return lines


def main(
    store_dir: Path,
    profiles: Path,
    queries: Path | Sequence[Path],
    budget: str = "1.0",
    coverage_floor: float | None = None,
    continuation: int = 24,
    rows_out: Path | None = None,
    save_retention: bool = False,
) -> list[QualityRow]:
    """Run the benchmark and print its table (`premoe bench route-quality`)."""
    import dataclasses
    import json
    import time

    from transformers import AutoTokenizer

    from ...retrieval import load_route_records
    from ...serving import ServiceConfig, ServingCore
    from ...store import Store

    options: dict[str, Any] = {} if coverage_floor is None else {"coverage_floor": coverage_floor}
    config = ServiceConfig(store=store_dir, profiles=profiles, budget=budget, port=0, device="cpu", **options)
    start = time.perf_counter()
    core = ServingCore(config)
    try:
        store = Store(store_dir)
        tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
        files = [queries] if isinstance(queries, Path) else list(queries)
        records = [record for path in files for record in load_route_records(path)]
        rows = measure(core, ContinuationScorer(store, tokenizer, continuation), records)
    finally:
        core.close()
    print(
        f"route quality: {len(rows)} prompts of {', '.join(str(p) for p in files)}, budget {budget}, "
        f"coverage floor {config.coverage_floor}, continuations of at most {continuation} tokens "
        f"({time.perf_counter() - start:.0f} s)"
    )
    print("retention = exp(NLL all experts - NLL served); own: the true task's pattern; kept: share of experts;")
    print("wider: served wider than its task's pattern (every expert, the fallback, or widened after prefill)")
    for line in table(summarise(rows)):
        print(line)
    if rows_out is not None:
        rows_out.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    if save_retention:
        path = save_task_retention(profiles, rows)
        print(f"wrote the per-task retention of each task's own pattern into {path}")
    return rows


def task_retention(rows: Sequence[QualityRow]) -> dict[str, float]:
    """Per task, the mean retention of its own pattern over its labelled rows."""
    found: dict[str, list[float]] = {}
    for row in rows:
        if row.label is not None and not math.isnan(row.own_retention):
            found.setdefault(row.label, []).append(row.own_retention)
    return {task: round(float(np.mean(values)), 4) for task, values in sorted(found.items())}


def save_task_retention(profiles: Path, rows: Sequence[QualityRow]) -> Path:
    """Write `task_retention(rows)` into the profile folder's routing record (kept otherwise as it is)."""
    import dataclasses

    from ...retrieval import LocalProfileStore
    from ...retrieval.routing_record import ROUTING_FILE, RoutingRecord

    store = LocalProfileStore(profiles)
    held = store.routing()
    record = RoutingRecord() if held is None else RoutingRecord.from_bytes(held, source=str(profiles / ROUTING_FILE))
    store.write_routing(dataclasses.replace(record, task_retention=task_retention(rows)).to_bytes())
    return profiles / ROUTING_FILE
