"""How wide a routed prompt is served: its task's pattern, or every routed expert where the budget holds them.

The decision asks what serving the prompt with the small pattern would cost. What the reference measurements say
(`premoe bench route-quality`, docs/routing.md): the prompt's router mass on the pattern at the first MoE layer and its
prefill coverage barely tell a prompt that keeps its quality from one that does not (a task's pattern can hold 85%
of the router mass and still lose a quarter of the likelihood); what does tell is the task itself (how much its
pattern keeps on the task's own prompts, measured and written into the routing record) and whether the prompt is
one of the task's at all (a no-match, which nobody measured a pattern for).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..retrieval import RouteDecision

#: A task whose pattern was measured to keep less than this share of the full model's likelihood (the mean retention
#: on its prompts, the routing record's `task_retention`) is served with every expert where the budget holds them.
DEFAULT_MIN_RETENTION = 0.9
#: A match that leads the off-topic none-class by less than this is unsure (off-topic prompts that match lead by
#: less than on-task ones): served with every expert too. Chosen with `DEFAULT_MIN_RETENTION` on training prompts
#: (reference/heldout, the first 20 eval items per task; docs/routing.md): 0.5 kept the on-task share of experts
#: under 0.6 with the best 5th-percentile retention; 0 gave off-topic p5 0.997 against 1.000, on-task p5 0.868.
DEFAULT_WIDE_LEAD = 0.5


@dataclass(frozen=True)
class Width:
    """The width decision for one prompt.

    Attributes:
        wide: Serve with every routed expert (when the budget holds them all).
        why: One line for the reply's reason.
    """

    wide: bool
    why: str


def choose_width(
    decision: RouteDecision,
    task_retention: Mapping[str, float],
    *,
    min_retention: float = DEFAULT_MIN_RETENTION,
    wide_lead: float = DEFAULT_WIDE_LEAD,
    all_fit: bool = True,
) -> Width:
    """Whether `decision`'s prompt is served wide, and why.

    Args:
        decision: The routing decision (a match, or a no-match with its fallback tasks).
        task_retention: Per task, the measured mean retention of its pattern on its own prompts.
        min_retention: Tasks below it are served wide.
        wide_lead: Matches leading the none-class by less are served wide (without a none-class, no lead: never).
        all_fit: Whether the budget holds every routed expert; without it nothing is served wide.
    """
    if not all_fit:
        return Width(False, "the budget does not hold every expert")
    if not decision.matched or decision.task is None:
        return Width(True, "no task matched: every expert, as the budget holds them")
    kept = task_retention.get(decision.task)
    if kept is not None and kept < min_retention:
        return Width(True, f"task {decision.task}'s pattern keeps {kept:.3f} < {min_retention:.2f} of the quality")
    if decision.lead is not None and decision.lead < wide_lead:
        return Width(True, f"an unsure match (lead {decision.lead:.2f} < {wide_lead:.2f}): every expert")
    return Width(False, "")
