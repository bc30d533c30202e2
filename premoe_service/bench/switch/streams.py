"""Request streams with task locality: Zipf popularity over tasks, each pick repeated as a burst, seeded."""

from __future__ import annotations

import numpy as np

from ...errors import InvalidArgument


def locality_stream(
    tasks: list[str], requests: int, *, zipf: float = 1.1, mean_burst: float = 4.0, seed: int = 0
) -> list[str]:
    """The task of each request in a stream of `requests`.

    Tasks get Zipf popularity (the task of rank r is drawn with weight 1 / r^zipf; ranks are a seeded shuffle, so
    the most popular task is not always the first named); each draw starts a burst of the same task whose length is
    geometric with mean `mean_burst`, as a user or a batch job sends several requests of one kind in a row. Two
    bursts of one task may follow each other. `zipf=0` gives uniform popularity, `mean_burst=1` no bursts.
    """
    if not tasks:
        raise InvalidArgument("a stream needs at least one task", field="tasks")
    if requests < 1 or zipf < 0 or mean_burst < 1:
        raise InvalidArgument("requests >= 1, zipf >= 0 and mean_burst >= 1", field="stream")
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(len(tasks)) + 1
    weights = 1.0 / ranks.astype(np.float64) ** zipf
    weights /= weights.sum()
    stream: list[str] = []
    while len(stream) < requests:
        task = tasks[int(rng.choice(len(tasks), p=weights))]
        stream.extend([task] * int(rng.geometric(1.0 / mean_burst)))
    return stream[:requests]


def switches(stream: list[str]) -> int:
    """Requests whose task differs from the one before (the first request counts as a switch)."""
    return sum(1 for i, task in enumerate(stream) if i == 0 or stream[i - 1] != task)
