"""The routing policy and its decisions: the embedding's alone (`decide`), and the combined one (`decide_combined`):
the embedding shortlist and the router evidence as one score per task, against a none-class.

Each signal's scores are z-normalised across the candidates of the prompt (the shortlisted tasks and, with a
background set, the none-class), so that signals on different scales add up: a task's combined score says how
far above the other candidates each signal puts it. The weights were chosen by measurement on the demos
(leave-one-out, whole demos and their lines; `premoe_service.bench.route.signal`): the router input carries
most of the router's evidence, the router distribution (16 numbers on the reference model) adds nothing once it
is in, so its default weight is 0.

The match rule has two parts. The embedding similarity of the top task must reach the task's threshold (the
global threshold is the floor; `RoutePolicy.task_thresholds` overrides it per task). With a background set the
top task must also lead the none-class by the task's margin (`RoutePolicy.min_lead`, per task in
`task_leads`): a prompt that looks more like the off-topic background than like any task gets no match. The
none-class then does the rejecting, and the floor is the lower `RoutePolicy.background_floor`: measured on the
demos and the background, the global threshold (made for the embedding alone) refused demo lines that the
none-class accepts and almost no background prompt that it does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import InvalidArgument
from ..names import check_task_name
from .evidence import NONE_CLASS, PromptEvidence

if TYPE_CHECKING:
    from ..profiler.profile import Profile
from .scoring import DEFAULT_TOP_M

Fallback = Literal["union", "general"]

# Calibrated with `python -m premoe_service.bench.route` (6 tasks x 8 demos, 30 held-out on-topic queries,
# 12 off-topic or nonsense ones, all-MiniLM-L6-v2, top-3 mean): right top-1 tasks scored 0.17-0.44, off-topic tops
# 0.07-0.22 (the worst: "Write a haiku about the sea at night." -> gardening, 0.216). `evaluate()` puts the
# balanced-accuracy optimum (0.94: 29/30 on-topic matched, 11/12 off-topic rejected) at 0.183. MiniLM
# similarities are low in absolute terms; recalibrate with `premoe route --evaluate` for another embedder.
DEFAULT_THRESHOLD = 0.18
# Similarity window for the union fallback: tasks this close to the best score are unioned.
DEFAULT_UNION_MARGIN = 0.05
# Weights of the router signals in the combined score and the none-class lead a match needs; measured on the
# demos (leave-one-out) and the shipped background set: `python -m premoe_service.bench.route.signal`.
DEFAULT_INPUT_WEIGHT = 2.0
DEFAULT_DISTRIBUTION_WEIGHT = 0.0
DEFAULT_MIN_LEAD = -1.0
# The similarity floor when an off-topic none-class decides no-match: the none-class does the rejecting, the floor
# only refuses prompts like no demo at all. Measured on the demos, their lines and the background alone (leave-one-
# out, lead -1.0; `python -m premoe_service.bench.route.classifier`): floors from 0.00 to 0.15 reject the same
# 91.3% of the background and lose the same 6.9% of positives; from 0.16 up losses rise (0.18: 8.9%, one more
# background prompt refused). 0.10 keeps a margin below that, since users' prompts are less like the demos.
DEFAULT_BACKGROUND_FLOOR = 0.10


@dataclass(frozen=True)
class RoutePolicy:
    """How scores become a decision.

    Attributes:
        threshold: Minimum score of the top task for a match.
        task_thresholds: Per-task thresholds that replace `threshold` (and `background_floor`) for those tasks.
        background_floor: With an off-topic none-class, the similarity floor that replaces `threshold`: the
            none-class lead decides no-match, the floor only refuses prompts like no demo at all.
        fallback: Below the threshold, "union" names the tasks within `union_margin` of the top
            score (the caller unions their patterns); "general" names `general_task`.
        union_margin: Score window of the union fallback.
        union_max: At most this many tasks in a union: a union of everything is the full model.
        general_task: The task (or pattern) name of the "general" fallback.
        top_m: Demos averaged per task score (see `task_scores`).
        neighbours: Nearest demos fetched per query; it bounds which tasks can be ranked at all.
        ranked_limit: Tasks reported in `RouteDecision.ranked`.
        embedding_weight: Weight of the embedding similarity in the combined score (with a router signal).
        input_weight: Weight of the router-input score in the combined score.
        distribution_weight: Weight of the router-distribution score in the combined score.
        min_lead: With a background set, the combined score by which the top task must lead the none-class.
        task_leads: Per-task leads that replace `min_lead` for those tasks.
    """

    threshold: float = DEFAULT_THRESHOLD
    task_thresholds: Mapping[str, float] = field(default_factory=dict)
    background_floor: float = DEFAULT_BACKGROUND_FLOOR
    fallback: Fallback = "union"
    union_margin: float = DEFAULT_UNION_MARGIN
    union_max: int = 3
    general_task: str | None = None
    top_m: int = DEFAULT_TOP_M
    neighbours: int = 64
    ranked_limit: int = 10
    embedding_weight: float = 1.0
    input_weight: float = DEFAULT_INPUT_WEIGHT
    distribution_weight: float = DEFAULT_DISTRIBUTION_WEIGHT
    min_lead: float = DEFAULT_MIN_LEAD
    task_leads: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        thresholds = [("threshold", self.threshold), ("background_floor", self.background_floor)]
        for name, value in [*thresholds, *self.task_thresholds.items()]:
            if not -1.0 <= value <= 1.0:
                raise InvalidArgument(f"a cosine threshold lies in [-1, 1], got {value}", field=f"threshold {name}")
        for task in self.task_thresholds:
            check_task_name(task, field="task_thresholds")
        weights = [("embedding_weight", self.embedding_weight), ("input_weight", self.input_weight)]
        for name, value in [*weights, ("distribution_weight", self.distribution_weight)]:
            if not 0.0 <= value <= 100.0:
                raise InvalidArgument(f"a signal weight lies in [0, 100], got {value}", field=name)
        for name, value in [("min_lead", self.min_lead), *self.task_leads.items()]:
            if not -100.0 <= value <= 100.0:
                raise InvalidArgument(f"a lead lies in [-100, 100], got {value}", field=f"lead {name}")
        for task in self.task_leads:
            check_task_name(task, field="task_leads")
        if self.fallback not in ("union", "general"):
            raise InvalidArgument(f"fallback must be 'union' or 'general', got {self.fallback!r}", field="fallback")
        if self.fallback == "general" and self.general_task is None:
            raise InvalidArgument("fallback 'general' needs general_task: name the general task", field="general_task")
        if self.general_task is not None:
            check_task_name(self.general_task, field="general_task")
        if self.union_margin < 0:
            raise InvalidArgument(f"union margin must be >= 0, got {self.union_margin}", field="union_margin")
        for name, count in [
            ("union_max", self.union_max),
            ("top_m", self.top_m),
            ("neighbours", self.neighbours),
            ("ranked_limit", self.ranked_limit),
        ]:
            if count < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {count}", field=name)

    def threshold_for(self, task: str, *, background: bool = False) -> float:
        """The similarity `task` needs for a match: its own threshold, else the floor that applies.

        Args:
            task: The top task.
            background: Whether an off-topic none-class takes part in the decision (then `background_floor`).
        """
        return self.task_thresholds.get(task, self.background_floor if background else self.threshold)

    def lead_for(self, task: str) -> float:
        return self.task_leads.get(task, self.min_lead)


@dataclass
class RouteDecision:
    """What retrieval decided for one prompt.

    Attributes:
        ranked: (task, score) best first: the embedding similarity, or with a router signal the combined score.
        task: The matched task, or None below the threshold.
        matched: Whether the top task cleared its threshold.
        fallback_tasks: Without a match, the tasks whose patterns serve the prompt (empty on a match).
        reason: One line on why, for logs and replies.
        similarity: The top task's embedding similarity (what the thresholds apply to), None without tasks.
        lead: With a background set, the top task's combined score minus the none-class's; else None.
        profiles: The profiles of `task` and `fallback_tasks` as the registry held them when it decided (read
            under the same lock as the search, so a task deleted since is still served from them); a bare
            `Router` knows no profiles.
    """

    ranked: list[tuple[str, float]]
    task: str | None
    matched: bool
    fallback_tasks: list[str]
    reason: str
    similarity: float | None = None
    lead: float | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        """The top task's score, or None when no task is registered."""
        return self.ranked[0][1] if self.ranked else None


def decide(ranked: Sequence[tuple[str, float]], policy: RoutePolicy) -> RouteDecision:
    """Turn ranked task scores into a decision under `policy`."""
    ranked = list(ranked[: policy.ranked_limit])
    if not ranked:
        fallback = [policy.general_task] if policy.fallback == "general" and policy.general_task else []
        return RouteDecision(ranked, None, False, fallback, "no tasks are registered")
    top_task, top_score = ranked[0]
    threshold = policy.threshold_for(top_task)
    if top_score >= threshold:
        reason = f"{top_task} scored {top_score:.3f} >= {threshold:.3f}"
        return RouteDecision(ranked, top_task, True, [], reason, similarity=top_score)
    below = f"best task {top_task} scored {top_score:.3f} < {threshold:.3f}"
    if policy.fallback == "general" and policy.general_task is not None:
        return RouteDecision(ranked, None, False, [policy.general_task], f"{below}; general fallback", top_score)
    union = [task for task, score in ranked if score >= top_score - policy.union_margin][: policy.union_max]
    reason = f"{below}; union of {len(union)} within {policy.union_margin}"
    return RouteDecision(ranked, None, False, union, reason, similarity=top_score)


def combined_scores(
    ranked: Sequence[tuple[str, float]], evidence: PromptEvidence, policy: RoutePolicy
) -> tuple[list[tuple[str, float]], float | None]:
    """Combined scores of the shortlisted tasks, best first, and the none-class's (None without a background).

    Args:
        ranked: The embedding shortlist: (task, similarity), best first.
        evidence: The router evidence for the same prompt.
        policy: The signals' weights.
    """
    tasks = [task for task, _ in ranked if task in evidence.inputs]
    if not tasks:
        return list(ranked), None
    similarity = dict(ranked)
    columns: list[list[float]] = [
        [similarity[t] for t in tasks],
        [evidence.inputs[t] for t in tasks],
        [evidence.distribution[t] for t in tasks],
    ]
    with_none = evidence.none_similarity is not None
    if with_none:
        for column, value in zip(
            columns, (evidence.none_similarity, evidence.none_inputs, evidence.none_distribution), strict=True
        ):
            column.append(float(value or 0.0))
    weights = (policy.embedding_weight, policy.input_weight, policy.distribution_weight)
    total = np.zeros(len(columns[0]))
    for weight, column in zip(weights, columns, strict=True):
        total += weight * _z(np.asarray(column, dtype=np.float64))
    scores = [(task, float(total[i])) for i, task in enumerate(tasks)]
    scores.sort(key=lambda item: (-item[1], item[0]))
    return scores, float(total[-1]) if with_none else None


def decide_combined(
    ranked: Sequence[tuple[str, float]], evidence: PromptEvidence, policy: RoutePolicy
) -> RouteDecision:
    """The decision for one prompt from its embedding shortlist and its router evidence."""
    if not ranked:
        fallback = [policy.general_task] if policy.fallback == "general" and policy.general_task else []
        return RouteDecision([], None, False, fallback, "no tasks are registered")
    scores, none_score = combined_scores(ranked, evidence, policy)
    similarity = dict(ranked)
    top_task, top_score = scores[0]
    top_similarity = similarity[top_task]
    lead = None if none_score is None else top_score - none_score
    shown = scores[: policy.ranked_limit]
    threshold = policy.threshold_for(top_task, background=none_score is not None)
    if top_similarity < threshold:
        why = f"best task {top_task} is {top_similarity:.3f} similar < {threshold:.3f}"
    elif lead is not None and lead < policy.lead_for(top_task):
        why = f"best task {top_task} leads the off-topic background by {lead:.2f} < {policy.lead_for(top_task):.2f}"
    else:
        lead_text = "" if lead is None else f", leads {NONE_CLASS} by {lead:.2f}"
        reason = f"{top_task} combined {top_score:.2f} (similarity {top_similarity:.3f} >= {threshold:.3f}{lead_text})"
        return RouteDecision(shown, top_task, True, [], reason, similarity=top_similarity, lead=lead)
    return RouteDecision(
        shown, None, False, _fallback(scores, similarity, policy), why, similarity=top_similarity, lead=lead
    )


def _fallback(scores: list[tuple[str, float]], similarity: Mapping[str, float], policy: RoutePolicy) -> list[str]:
    """The general task, or the tasks whose embedding similarity is within the union margin of the top task's."""
    if policy.fallback == "general" and policy.general_task is not None:
        return [policy.general_task]
    top = similarity[scores[0][0]]
    close = [task for task, _ in scores if similarity[task] >= top - policy.union_margin]
    return close[: policy.union_max]


def _z(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 1e-9 else np.zeros_like(values)
