"""Task scores from a query's nearest demos: the mean of each task's top-m demo similarities."""

from __future__ import annotations

from collections.abc import Callable, Sequence

DEFAULT_TOP_M = 3


def task_scores(
    neighbours: Sequence[tuple[str, float]],
    demo_count: Callable[[str], int],
    top_m: int = DEFAULT_TOP_M,
) -> list[tuple[str, float]]:
    """Rank the tasks that own a query's nearest demos.

    A task's score is the mean of its `m` best demo similarities, with `m = min(top_m, demos of
    the task)`. The maximum alone (m = 1) lets one demo that happens to share a phrase with the query
    win; the mean over all demos punishes a broad task whose demos cover several sub-topics. The
    top-m mean asks for a few demos agreeing, so it is robust to one outlier on either side and does
    not depend on how many demos a task has beyond m. A task with fewer than m demos is averaged over
    the demos it has, so that small tasks are not penalised for their size.

    When fewer than m of a task's demos are among the neighbours, each missing similarity is taken
    as the lowest similarity retrieved: every unseen demo is at most that similar, so this is an
    upper bound and a task is never dropped below a rival just because the search window was short.

    Args:
        neighbours: The query's nearest demos as (task, similarity), best first.
        demo_count: Number of demos each task has in the index.
        top_m: Demos averaged per task.

    Returns:
        (task, score) for every task among the neighbours, best first; ties in task-name order.
    """
    if not neighbours:
        return []
    floor = min(score for _, score in neighbours)
    best: dict[str, list[float]] = {}
    for task, score in neighbours:
        best.setdefault(task, []).append(score)
    ranked: list[tuple[str, float]] = []
    for task, scores in best.items():
        m = max(1, min(top_m, demo_count(task)))
        top = sorted(scores, reverse=True)[:m]
        top += [floor] * (m - len(top))
        ranked.append((task, sum(top) / m))
    ranked.sort(key=lambda item: (-item[1], item[0]))
    return ranked
