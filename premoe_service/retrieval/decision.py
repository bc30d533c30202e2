"""The combined decision: the embedding shortlist and the router evidence as one score per task, against a none-class.

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

import numpy as np

from .evidence import NONE_CLASS, PromptEvidence
from .router import RouteDecision, RoutePolicy


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
