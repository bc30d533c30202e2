"""Evaluation: how much of each task's quality a pattern keeps, per criterion and budget."""

from .metrics import EvalItem, exact_match, greedy_answers, mean_nll
from .report import markdown, write_reports
from .run import EVAL_CRITERIA, RANDOM, EvalResult, evaluate_grid, load_eval_items, load_task_data, retention

__all__ = [
    "EVAL_CRITERIA",
    "RANDOM",
    "EvalItem",
    "EvalResult",
    "evaluate_grid",
    "exact_match",
    "greedy_answers",
    "load_eval_items",
    "load_task_data",
    "markdown",
    "mean_nll",
    "retention",
    "write_reports",
]
