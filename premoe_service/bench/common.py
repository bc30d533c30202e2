"""What every benchmark's report shares: medians, targets met or not, and the table cells of shares and times."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any


def median(values: Iterable[Any]) -> float | None:
    """The median of the values that are not None, or None when there are none."""
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def target(value: float | None, bound: float, *, above: bool = True, strict: bool = False) -> dict[str, Any]:
    """A target of a report: `value` against `bound` (at least it when `above`, else at most it, or below it when
    `strict`); `met` is None when there is no value to judge."""
    if value is None:
        met = None
    elif above:
        met = value >= bound
    else:
        met = value < bound if strict else value <= bound
    return {"value": value, "bound": bound, "met": met}


def pct(value: float | None) -> str:
    """A share as a table cell: `12.5%`, or `-` when unknown."""
    return "-" if value is None else f"{value:.1%}"


def ms(value: float | None) -> str:
    """Milliseconds as a table cell with three decimals, or `-` when unknown."""
    return "-" if value is None else f"{value:.3f}"


def interleaved(ours: Callable[[], None], raw: Callable[[], None], rounds: int) -> tuple[float, float]:
    """Median seconds of `ours` and of `raw` over `rounds` rounds, alternated so that both see the same machine."""
    ours_s: list[float] = []
    raw_s: list[float] = []
    for _ in range(rounds):
        for fn, times in ((ours, ours_s), (raw, raw_s)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ours_s), statistics.median(raw_s)
