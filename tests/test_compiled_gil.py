"""The engine's graphs compute without Python's GIL (`engine/compiled_stack.py`'s `INDUCTOR_OPTIONS`: inductor's C++
wrapper releases it for a whole graph): another Python thread runs while a graph compiled so computes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from premoe_service.engine.compiled_stack import INDUCTOR_OPTIONS

# One graph of ~0.1 s on one thread, far longer than Python's switch interval (5 ms).
ELEMENTS, STEPS = 16_000_000, 6


def _chain(x: Any) -> Any:
    for _ in range(STEPS):
        x = torch.sin(x) * 1.0001 + torch.cos(x)
    return x


def _progress_during_one_call(graph: Callable[[Any], Any], x: Any) -> int:
    """How far a Python thread counts while this thread is inside one call of `graph`."""
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        while count[0] == 0:  # the spinner runs
            pass
        before = count[0]
        graph(x)
        return count[0] - before  # read before this thread gives the GIL up again
    finally:
        stop.set()
        spinner.join()


@pytest.fixture
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_python_thread_runs_while_a_graph_compiled_as_the_engines_computes(one_thread: None) -> None:
    torch._dynamo.reset()
    try:
        x = torch.randn(ELEMENTS)
        graph = torch.compile(_chain, dynamic=False, options=INDUCTOR_OPTIONS)
        torch.testing.assert_close(graph(x), _chain(x))  # compiles; the same values as eager
        progress = _progress_during_one_call(graph, x)
    finally:
        torch._dynamo.reset()
    # Holding the GIL (inductor's Python wrapper), the spinner counts only while this thread is in Python around the
    # call, at most a switch interval (~180,000 here); released, through the whole graph (over 2,000,000 here).
    assert progress > 600_000, progress
