"""Calibration: route a labelled query set, measure accuracy and no-match quality, suggest a threshold."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgument
from ..jsonl import read_jsonl
from ..names import check_task_name
from .router import SupportsRoute, check_prompt


@dataclass(frozen=True)
class RouteRecord:
    """One labelled query: the task it belongs to, or None when it should match no task."""

    query: str
    task: str | None


@dataclass
class RouteEvaluation:
    """How a router does on labelled queries.

    Attributes:
        records: Queries evaluated.
        labelled: Queries with a task.
        top1_accuracy: Share of labelled queries whose top-ranked task is their task (ignores the threshold).
        match_accuracy: Share of labelled queries that matched, and matched their task.
        no_match_precision: Of the queries that matched nothing, the share that should match nothing.
        no_match_recall: Of the queries that should match nothing, the share that matched nothing.
        suggested_threshold: The threshold that best separates right top-1 scores from the rest
            (None when one side is empty).
        balanced_accuracy: Balanced accuracy of the decision match / no match at the suggested threshold.
        misses: (query, expected, decided) for every query decided wrongly at the current threshold.
        on_task_rejected: Share of labelled queries that matched no task at the current threshold.
        per_task: For each task (every label and every top-ranked task, sorted), its labelled queries'
            top-1 accuracy and the share of them that matched their task: `TaskEvaluation`s.
        confusion: confusion[expected][decided] counts queries by label (None: off-topic) and by the
            decision at the current threshold (None: no match); rows and columns hold only what occurred.
        suggested_thresholds: Per top-ranked task, the threshold that best separates the queries ranked
            first for it rightly from those ranked first for it wrongly (off-topic or another task's);
            None when one side is empty. The decision applies the top task's threshold, so these are
            what `RoutePolicy.task_thresholds` takes.
    """

    records: int
    labelled: int
    top1_accuracy: float
    match_accuracy: float
    no_match_precision: float
    no_match_recall: float
    suggested_threshold: float | None
    balanced_accuracy: float | None
    misses: list[tuple[str, str | None, str | None]]
    on_task_rejected: float = float("nan")
    per_task: dict[str, TaskEvaluation] = field(default_factory=dict)
    confusion: dict[str | None, dict[str | None, int]] = field(default_factory=dict)
    suggested_thresholds: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskEvaluation:
    """One task's figures in a `RouteEvaluation`.

    Attributes:
        queries: Labelled queries of this task.
        top1_accuracy: Share of them whose top-ranked task is this task (NaN when there are none).
        match_accuracy: Share of them that matched this task at the current threshold.
        ranked_first: Queries of any label (off-topic included) whose top-ranked task is this task.
    """

    queries: int
    top1_accuracy: float
    match_accuracy: float
    ranked_first: int


def load_route_records(path: str | Path) -> list[RouteRecord]:
    """Read a JSONL file of `{"query": str, "task": str | null}` lines (blank lines are skipped).

    Raises:
        NotFound: The file does not exist.
        InvalidArgument: A line is not such an object; `field` names the file and line number.
    """
    return [
        _record(item, where, f"line {where.rsplit(':', 1)[1]}")
        for item, where in read_jsonl(path, "route records", lambda file, number: f"{file}:{number}")
    ]


def evaluate(router: SupportsRoute, records: Iterable[RouteRecord | Mapping[str, object]]) -> RouteEvaluation:
    """Route every record's query and measure the decisions against the labels.

    Args:
        router: A `Router` or `Registry`; its current policy decides match / no match.
        records: `RouteRecord`s or `{"query": ..., "task": ...}` mappings.
    """
    items = [
        r if isinstance(r, RouteRecord) else _record(r, f"records[{i}]", f"records[{i}]") for i, r in enumerate(records)
    ]
    if not items:
        raise InvalidArgument("no records to evaluate", field="records")
    top1 = matched_right = labelled = 0
    no_match = no_match_right = should_not_match = 0
    should_match_scores: list[float] = []  # top scores where the top task is right
    should_not_scores: list[float] = []  # top scores of off-topic queries and of wrong top tasks
    misses: list[tuple[str, str | None, str | None]] = []
    rejected_on_task = 0
    confusion: dict[str | None, dict[str | None, int]] = {}
    task_counts: dict[str, list[int]] = {}  # task -> [queries, top-1 right, matched right, ranked first]
    by_top: dict[str, tuple[list[float], list[float]]] = {}  # top task -> (right top scores, wrong top scores)
    for record in items:
        decision = router.route(record.query)
        top = decision.ranked[0][0] if decision.ranked else None
        if record.task is not None:
            labelled += 1
            top1 += top == record.task
            matched_right += decision.task == record.task
            rejected_on_task += not decision.matched
            counts = task_counts.setdefault(record.task, [0, 0, 0, 0])
            counts[0] += 1
            counts[1] += top == record.task
            counts[2] += decision.task == record.task
        else:
            should_not_match += 1
        if not decision.matched:
            no_match += 1
            no_match_right += record.task is None
        if top is not None:
            task_counts.setdefault(top, [0, 0, 0, 0])[3] += 1
        # Thresholds apply to the embedding similarity (the combined score of a router-signal decision is not one).
        similarity = decision.similarity if decision.similarity is not None else decision.score
        if similarity is not None:
            right_top = record.task is not None and top == record.task
            (should_match_scores if right_top else should_not_scores).append(similarity)
            if top is not None:
                by_top.setdefault(top, ([], []))[0 if right_top else 1].append(similarity)
        row = confusion.setdefault(record.task, {})
        row[decision.task] = row.get(decision.task, 0) + 1
        if decision.task != record.task:
            misses.append((record.query, record.task, decision.task))
    threshold, balanced = suggest_threshold(should_match_scores, should_not_scores)
    per_task = {
        task: TaskEvaluation(
            queries=n, top1_accuracy=_share(right, n), match_accuracy=_share(matched, n), ranked_first=first
        )
        for task, (n, right, matched, first) in sorted(task_counts.items())
    }
    suggested = {task: suggest_threshold(*by_top.get(task, ([], [])))[0] for task in per_task}
    return RouteEvaluation(
        records=len(items),
        labelled=labelled,
        top1_accuracy=_share(top1, labelled),
        match_accuracy=_share(matched_right, labelled),
        no_match_precision=_share(no_match_right, no_match),
        no_match_recall=_share(no_match_right, should_not_match),
        suggested_threshold=threshold,
        balanced_accuracy=balanced,
        misses=misses,
        on_task_rejected=_share(rejected_on_task, labelled),
        per_task=per_task,
        confusion=confusion,
        suggested_thresholds=suggested,
    )


def suggest_threshold(
    should_match: Sequence[float], should_not_match: Sequence[float]
) -> tuple[float | None, float | None]:
    """The threshold (score >= threshold matches) with the best balanced accuracy, and that accuracy.

    Balanced accuracy weighs both kinds of error equally however unequal the two sets are. Among
    equally good thresholds it takes the midpoint of the widest gap between neighbouring scores,
    the choice most likely to hold on queries not in the set.

    Returns:
        (threshold, balanced accuracy), or (None, None) when either set is empty.
    """
    if not should_match or not should_not_match:
        return None, None
    labelled = sorted([(s, True) for s in should_match] + [(s, False) for s in should_not_match])
    positives, negatives = len(should_match), len(should_not_match)
    # Cutting before position i matches labelled[i:]: count what each cut gets right, left to right.
    scores = [score for score, _ in labelled]
    best = (-1.0, -1.0, scores[0] - 0.01)  # (balanced accuracy, gap, threshold)
    rejected_neg = rejected_pos = 0
    for i in range(len(labelled) + 1):
        if i > 0:
            rejected_neg += not labelled[i - 1][1]
            rejected_pos += labelled[i - 1][1]
            if i < len(labelled) and scores[i] == scores[i - 1]:
                continue  # no threshold separates equal scores
        balanced = ((positives - rejected_pos) / positives + rejected_neg / negatives) / 2
        if i == 0:
            gap, threshold = 0.0, scores[0] - 0.01
        elif i == len(labelled):
            gap, threshold = 0.0, scores[-1] + 0.01
        else:
            gap, threshold = scores[i] - scores[i - 1], (scores[i] + scores[i - 1]) / 2
        if (balanced, gap) > best[:2]:
            best = (balanced, gap, threshold)
    return round(best[2], 4), best[0]


def _record(item: object, field: str, label: str) -> RouteRecord:
    if not isinstance(item, Mapping):
        raise InvalidArgument(f"{label} must be an object with 'query' and 'task'", field=field)
    try:
        query = check_prompt(item.get("query"), field=field)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{label}: 'query': {exc.message}", field=field) from exc
    raw_task = item.get("task")
    task = None
    if raw_task is not None:
        try:
            task = check_task_name(raw_task, field=field)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{label}: 'task': {exc.message}", field=field) from exc
    return RouteRecord(query=query, task=task)


def _share(count: int, total: int) -> float:
    return count / total if total else float("nan")
