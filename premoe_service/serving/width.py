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
    all_fit: bool = True,
) -> Width:
    """Whether `decision`'s prompt is served wide, and why.

    Args:
        decision: The routing decision (a match, or a no-match with its fallback tasks).
        task_retention: Per task, the measured mean retention of its pattern on its own prompts.
        min_retention: Tasks below it are served wide.
        all_fit: Whether the budget holds every routed expert; without it nothing is served wide.
    """
    if not all_fit:
        return Width(False, "the budget does not hold every expert")
    if not decision.matched or decision.task is None:
        return Width(True, "no task matched: every expert, as the budget holds them")
    kept = task_retention.get(decision.task)
    if kept is not None and kept < min_retention:
        return Width(True, f"task {decision.task}'s pattern keeps {kept:.3f} < {min_retention:.2f} of the quality")
    return Width(False, "")
