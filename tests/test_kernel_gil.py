"""Inductor's CPU kernels run without the GIL once the engine compiles (`engine/kernel_gil.py`): another Python
thread runs while a kernel computes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from premoe_service.engine import kernel_gil
from premoe_service.engine.kernel_gil import HOLDING, RELEASING, release_gil_in_kernels

# One fused kernel of ~0.1 s on one thread, far longer than Python's switch interval (5 ms).
ELEMENTS, STEPS = 16_000_000, 6


def _long_kernel() -> Callable[[Any], Any]:
    def chain(x: Any) -> Any:
        for _ in range(STEPS):
            x = torch.sin(x) * 1.0001 + torch.cos(x)
        return x

    return torch.compile(chain, dynamic=False)


def _progress_during_one_call(kernel: Callable[[Any], Any], x: Any) -> int:
    """How far a Python thread counts while this thread is inside one call of `kernel`."""
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
        kernel(x)
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


def test_the_binding_is_patched_once_and_only_when_known(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    assert CppPythonBindingsCodeCache.call_entry_function in (HOLDING, RELEASING)  # torch 2.13's binding
    monkeypatch.setattr(CppPythonBindingsCodeCache, "call_entry_function", HOLDING)
    assert release_gil_in_kernels() and release_gil_in_kernels()
    assert CppPythonBindingsCodeCache.call_entry_function == RELEASING
    monkeypatch.setattr(CppPythonBindingsCodeCache, "call_entry_function", "other({}); Py_RETURN_NONE;")
    assert not release_gil_in_kernels()  # another torch's binding: left as it is
    assert CppPythonBindingsCodeCache.call_entry_function == "other({}); Py_RETURN_NONE;"


def test_a_python_thread_runs_while_a_compiled_kernel_computes(
    monkeypatch: pytest.MonkeyPatch, one_thread: None, tmp_path: Any
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the kernel built here, with the patched binding
    monkeypatch.setattr(kernel_gil, "_lock", threading.Lock())
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    monkeypatch.setattr(CppPythonBindingsCodeCache, "call_entry_function", HOLDING)
    assert release_gil_in_kernels()
    torch._dynamo.reset()
    try:
        x = torch.randn(ELEMENTS)
        kernel = _long_kernel()
        eager = x
        for _ in range(STEPS):
            eager = torch.sin(eager) * 1.0001 + torch.cos(eager)
        torch.testing.assert_close(kernel(x), eager)  # compiles; the same values as eager
        progress = _progress_during_one_call(kernel, x)
    finally:
        torch._dynamo.reset()
    # Holding the GIL (inductor's own binding), the spinner counts only while this thread is in Python around the
    # call, at most a switch interval (~80,000 here); released, through the whole kernel (over 1,000,000 here).
    assert progress > 500_000, progress
