"""`premoe bench soak` in brief: a real `premoe serve` process, a few clients with every kind of request, and its
Redis killed and restarted empty halfway; every outcome is the documented one."""

from __future__ import annotations

from pathlib import Path

import pytest

from premoe_service.bench.soak.benchmark import INTENDED, run


@pytest.fixture(scope="module")
def store(tiny_store: Path) -> Path:
    return tiny_store


def test_a_short_soak_has_no_unintended_outcome(store: Path) -> None:
    report = run(store, None, seconds=16, clients=3, max_new_tokens=4, queries=None)
    assert report["unintended"] == 0, report["unintended_examples"]
    assert report["redis_restarts"] == 1 and report["health_after"] == "SERVING"
    kinds = {name.split()[0] for name in report["outcomes"]}
    assert kinds >= set(INTENDED) - {"register", "deadline", "slow"}  # the rarer kinds may not come up in 16 s
    assert report["outcomes"].get("bad INVALID_ARGUMENT", 0) > 0 and report["rss_end_mib"] > 0
