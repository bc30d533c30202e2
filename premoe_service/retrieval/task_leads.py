"""Per-task calibration of the combined decision: each task's lead over the none-class, from its own demos.

Positives are a task's demos, each scored against the other demos (leave-one-out), and the lines of its longer
demos, each scored with its own demo left out: whole demos are easier than the one-line prompts users send,
lines are harder, so both count. Negatives are the registry's off-topic background, each prompt left out of the
none-class it is scored against. Labelled prompts a user provides (`RouteRecord`s) join either side. A task's
lead is the `loss` quantile of its positives' leads (at most that share of them would be refused), but never
above the policy's `min_lead`: calibration only relaxes a task. Demos of one task can be near copies of each
other (the generated tasks': one format, other numbers); their leads are then all high, and a lead taken from
them refuses every prompt that varies the format (measured: 44% of the held-out on-task prompts lost).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FailedPrecondition, InvalidArgument
from ..runtime.router_signal import RouterFeatures
from .accuracy import RouteRecord
from .decision import RouteDecision, RoutePolicy, decide_combined
from .evidence import PromptEvidence, RouterEvidence
from .registry import Registry
from .scoring import task_scores

MAX_LINES_PER_TASK = 30
_SENTENCE = re.compile(r"(?<=[.;!?])\s+")


@dataclass
class Calibration:
    """Per-task leads (what `RoutePolicy.task_leads` takes) and the figures behind them.

    Attributes:
        task_leads: The lead over the none-class each task's match needs.
        positives: Per task, its positives scored (demos, lines, labelled prompts).
        top1: Per task, the share of its positives ranked first for it.
        background_rejected: Share of the negatives refused under `task_leads`.
        positives_lost: Share of the positives refused under `task_leads`.
    """

    task_leads: dict[str, float] = field(default_factory=dict)
    positives: dict[str, int] = field(default_factory=dict)
    top1: dict[str, float] = field(default_factory=dict)
    background_rejected: float = float("nan")
    positives_lost: float = float("nan")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": 1, "task_leads": self.task_leads}, indent=1, sort_keys=True))


def load_task_leads(path: str | Path) -> dict[str, float]:
    """The `task_leads` of a calibration file `Calibration.save` wrote; errors name the file."""
    try:
        leads = json.loads(Path(path).read_text(encoding="utf-8"))["task_leads"]
        return {str(task): float(value) for task, value in leads.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidArgument(f"not a calibration file ({exc})", field=str(path)) from exc


def demo_lines(text: str) -> list[str]:
    """The lines (and three-line windows) of a longer demo, or its sentences when it is one long line."""
    if len(text) < 80:
        return []
    lines = text.split("\n")
    pieces = [] if len(lines) > 2 else [s.strip() for s in _SENTENCE.split(text)]
    for size in (1, 3):
        pieces += ["\n".join(lines[i : i + size]).strip() for i in range(0, len(lines), size)]
    return list(dict.fromkeys(p for p in pieces if len(p.replace(" ", "")) >= 12 and p != text.strip()))


class _LeaveOneOut:
    """Decisions of a registry's policy with one demo, or one background prompt, left out."""

    def __init__(self, registry: Registry, evidence: RouterEvidence) -> None:
        self.evidence = evidence
        self.policy: RoutePolicy = registry.policy
        profiles = [registry.get(name) for name in registry.names()]
        self.vectors = np.concatenate([p.demo_embeddings.numpy() for p in profiles if p.demo_embeddings is not None])
        self.owners = [(p.name, i) for p in profiles for i in range(len(p.route_texts))]
        self.counts = {p.name: len(p.route_texts) for p in profiles}

    def decide(
        self, query: np.ndarray, features: RouterFeatures, leave_out: tuple[str, int] | None, background: int | None
    ) -> RouteDecision:
        return decide_combined(*self.signals(query, features, leave_out, background), self.policy)

    def signals(
        self, query: np.ndarray, features: RouterFeatures, leave_out: tuple[str, int] | None, background: int | None
    ) -> tuple[list[tuple[str, float]], PromptEvidence]:
        """The embedding shortlist and the router evidence of one prompt, with the items left out."""
        similarities = self.vectors @ query  # [n]
        order = np.argsort(-similarities)
        neighbours = [(self.owners[j][0], float(similarities[j])) for j in order if self.owners[j] != leave_out]
        counts = dict(self.counts)
        if leave_out is not None:
            counts[leave_out[0]] -= 1
        ranked = task_scores(neighbours, counts.__getitem__, self.policy.top_m)
        tasks = [task for task, _ in ranked]
        found = self.evidence.score(query, features, tasks, leave_out=leave_out, leave_out_background=background)
        return ranked, found


def positive_items(
    registry: Registry, evidence: RouterEvidence
) -> Iterator[tuple[str, int, np.ndarray, RouterFeatures]]:
    """Each task's training items: its route texts (demos, then examples) and a sample of their lines, as (task,
    index of the route text it comes from, embedding, router features)."""
    rng = np.random.default_rng(0)  # the lines drawn are the same on every call
    for name in registry.names():
        profile = registry.get(name)
        embeddings, scores, inputs = profile.demo_embeddings, profile.router_scores, profile.router_inputs
        if embeddings is None or scores is None or inputs is None:
            raise FailedPrecondition(f"task {name!r} has no embeddings or router signal", field=name)
        for i in range(len(profile.route_texts)):
            yield name, i, embeddings.numpy()[i], RouterFeatures(scores.numpy()[i : i + 1], inputs.numpy()[i : i + 1])
        lines = [(i, line) for i, demo in enumerate(profile.route_texts) for line in demo_lines(demo)]
        if len(lines) > MAX_LINES_PER_TASK:
            lines = [lines[k] for k in sorted(rng.choice(len(lines), MAX_LINES_PER_TASK, replace=False))]
        if lines:
            vectors = registry.embedder.encode([text for _, text in lines])
            found = evidence.signal.features([text for _, text in lines])
            for k, (i, _) in enumerate(lines):
                yield name, i, vectors[k], RouterFeatures(found.scores[k : k + 1], found.inputs[k : k + 1])


def calibrate(registry: Registry, *, labelled: Sequence[RouteRecord] = (), loss: float = 0.05) -> Calibration:
    """Per-task leads for `registry` (router signal and background required) at `loss` of each task's positives.

    Raises:
        FailedPrecondition: The registry has no router signal or no background set.
        InvalidArgument: `loss` is not a share in [0, 0.5].
    """
    if not 0.0 <= loss <= 0.5:
        raise InvalidArgument(f"loss is a share in [0, 0.5], got {loss}", field="loss")
    evidence = registry.evidence
    background = None if evidence is None else evidence.background()
    if evidence is None or background is None:
        raise FailedPrecondition("calibration needs the router signal and an off-topic background", field="background")
    scorer = _LeaveOneOut(registry, evidence)
    positives = [
        (name, scorer.decide(vector, features, (name, i), None))
        for name, i, vector, features in positive_items(registry, evidence)
    ]
    bg_vectors, bg_features = background
    negatives = [
        scorer.decide(
            bg_vectors[b], RouterFeatures(bg_features.scores[b : b + 1], bg_features.inputs[b : b + 1]), None, b
        )
        for b in range(bg_vectors.shape[0])
    ]
    for record in labelled:
        decision = registry.route(record.query)
        if record.task is None:
            negatives.append(decision)
        else:
            positives.append((record.task, decision))
    return _choose_leads(positives, negatives, loss, registry.policy)


def _choose_leads(
    positives: list[tuple[str, RouteDecision]], negatives: list[RouteDecision], loss: float, policy: RoutePolicy
) -> Calibration:
    result = Calibration()
    by_task: dict[str, list[RouteDecision]] = {}
    for task, decision in positives:
        by_task.setdefault(task, []).append(decision)
    for task, decisions in sorted(by_task.items()):
        right = [d.lead for d in decisions if d.ranked and d.ranked[0][0] == task and d.lead is not None]
        result.positives[task] = len(decisions)
        result.top1[task] = sum(1 for d in decisions if d.ranked and d.ranked[0][0] == task) / len(decisions)
        if right:
            quantile = float(np.quantile(np.asarray(right), loss, method="lower"))
            result.task_leads[task] = round(min(policy.min_lead, quantile), 4)

    def refused(decision: RouteDecision) -> bool:
        if not decision.ranked:
            return True
        top = decision.ranked[0][0]
        if decision.similarity is not None and decision.similarity < policy.threshold_for(top, background=True):
            return True  # below the similarity floor, whatever the lead
        lead = result.task_leads.get(top, policy.min_lead)
        return decision.lead is not None and decision.lead < lead

    result.positives_lost = sum(refused(d) for _, d in positives) / max(1, len(positives))
    result.background_rejected = sum(refused(d) for d in negatives) / max(1, len(negatives))
    return result
