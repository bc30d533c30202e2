"""A thread's own intra-op thread count and the OpenMP workers it leaves: the embedder's passes run on a thread of
its own and take the idle cores for a lone prompt without moving the engine's count (OpenMP's or MKL's); the
thread that loaded the model ends its parked workers when the engine starts."""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from premoe_service import intra_op
from premoe_service.cores import usable_cores
from premoe_service.engine.params import SamplingParams
from premoe_service.engine.result import GenerationResult
from premoe_service.errors import InvalidArgument
from premoe_service.intra_op import intra_op_threads, release_teams, thread_counts
from premoe_service.retrieval import Embedder

TEXTS = ["add: 12+345=", "def parse(line): return line.split(':', 1)", "rev: k q a m =", "sort: 5391="]
LINUX_WHEEL = (
    "torch's Linux wheels carry the OpenMP runtime and MKL that it sets (the first test checks they are found)"
)
needs_runtime = pytest.mark.skipif(not intra_op.available(), reason=LINUX_WHEEL)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's count set the process's way for the block (this thread's and the process-wide default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread_here() -> Iterator[None]:
    with _torch_threads(1):
        yield


def _on_another_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


@contextmanager
def passes(embedder: Embedder) -> Iterator[list[tuple[str, int]]]:
    """(thread name, intra-op threads) of each forward pass of `embedder`, read from inside the pass."""
    seen: list[tuple[str, int]] = []

    def record(*_: Any) -> None:
        seen.append((threading.current_thread().name, torch.get_num_threads()))

    encoder = embedder._packed
    if encoder is not None:  # a packed pass is one call of its forward (`retrieval/packed.py`)
        forward = encoder._forward

        def recorded(*args: Any) -> Any:
            record()
            return forward(*args)

        encoder._forward = recorded
        try:
            yield seen
        finally:
            encoder._forward = forward
        return
    # through sentence-transformers: the embeddings' LayerNorm, called once a pass
    hook = embedder._model[0].auto_model.embeddings.LayerNorm.register_forward_pre_hook(record)
    try:
        yield seen
    finally:
        hook.remove()


@pytest.mark.skipif(sys.platform != "linux", reason="torch's Linux wheels carry the OpenMP runtime and MKL it sets")
def test_the_runtime_is_found_with_torchs_linux_wheel() -> None:
    assert intra_op.available()
    omp, mkl = thread_counts()
    assert omp == torch.get_num_threads()
    if torch.backends.mkl.is_available():
        assert mkl == omp


@pytest.fixture
def two_threads_here() -> Iterator[None]:
    with _torch_threads(2):
        yield


@needs_runtime
@pytest.mark.parametrize("asked", [1, 3])
def test_a_threads_count_moves_alone_and_comes_back(two_threads_here: None, asked: int) -> None:
    # This thread holds 2 (as a 2-thread engine would) while another takes fewer or more; neither this thread nor
    # one started meanwhile (which takes torch's process-wide count, as `torch.set_num_threads` would have set it)
    # may see the worker's count.
    inside, seen_beside = threading.Event(), threading.Event()
    counts: dict[str, tuple[int, int | None]] = {}

    def worker() -> None:
        counts["before"] = thread_counts()
        with intra_op_threads(asked):
            counts["inside"] = thread_counts()
            counts["torch"] = (torch.get_num_threads(), None)
            inside.set()
            seen_beside.wait(10)
        counts["after"] = thread_counts()

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(10)
    beside = thread_counts()  # this thread's counts while the worker holds its own
    started = _on_another_thread(thread_counts)  # a thread started meanwhile
    seen_beside.set()
    thread.join()
    mkl = torch.backends.mkl.is_available()
    assert counts["before"] == (2, 2 if mkl else None)
    assert counts["inside"] == (asked, asked if mkl else None)
    assert counts["torch"][0] == asked  # torch's own reading of the thread's count
    assert beside == (2, 2 if mkl else None)  # untouched: the engine keeps its count
    assert started == (2, 2 if mkl else None)  # the process's count is untouched too
    assert counts["after"] == counts["before"]
    assert torch.get_num_threads() == 2


def test_none_changes_nothing(one_thread_here: None) -> None:
    def inside() -> tuple[int, int | None]:
        with intra_op_threads(None):
            return thread_counts()

    assert _on_another_thread(inside) == thread_counts()


def _tasks_named(name: bytes) -> int:
    """This process's threads whose kernel name is `name`."""
    return sum(p.read_bytes().strip() == name for p in Path("/proc/self/task").glob("*/comm"))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts the process's threads in Linux's /proc")
@needs_runtime
def test_release_teams_ends_the_threads_parked_workers() -> None:
    name = b"omp-probe"
    counts: list[int] = []

    def probe() -> None:
        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME: its OpenMP workers inherit the name
        with intra_op_threads(2):
            torch.ones(1 << 22).add_(1)  # a parallel region of 2 threads: one worker, parked after it
        counts.append(_tasks_named(name))
        assert release_teams()
        deadline = time.monotonic() + 10
        while _tasks_named(name) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        counts.append(_tasks_named(name))

    _on_another_thread(probe)
    assert counts == [2, 1]


@needs_runtime
def test_the_embedders_passes_run_on_its_own_thread_at_the_threads_asked_for(
    embedder: Embedder, one_thread_here: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedder, "max_threads", None)  # a server of another test may have capped it
    monkeypatch.setattr(embedder, "pass_threads", None)  # and fixed it
    with passes(embedder) as seen:
        alone = embedder.encode(TEXTS)  # the caller's count: 1
        two = _on_another_thread(lambda: embedder.encode(TEXTS, threads=2))
        one = embedder.encode(TEXTS, threads=1)
    # one thread runs every pass, whoever calls: one OpenMP team, not one per calling thread
    assert seen == [("premoe-embedder", 1), ("premoe-embedder", 2), ("premoe-embedder", 1)]
    assert torch.get_num_threads() == 1
    np.testing.assert_allclose(two, alone, atol=1e-5)  # float32 rounding, as a shared pass moves it
    np.testing.assert_array_equal(one, alone)


def _record_releases(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[str]:
    """The names of the threads that call `module`'s `release_teams` (which still runs)."""
    released: list[str] = []

    def release() -> bool:
        released.append(threading.current_thread().name)
        return release_teams()

    monkeypatch.setattr(module, "release_teams", release)
    return released


@needs_runtime
def test_a_pass_takes_no_more_than_max_threads_and_a_lower_cap_ends_the_surplus_workers(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from premoe_service.retrieval import embedder as module

    released = _record_releases(monkeypatch, module)
    monkeypatch.setattr(embedder, "max_threads", None)
    monkeypatch.setattr(embedder, "pass_threads", None)  # a server of another test may have fixed it
    with passes(embedder) as seen:
        embedder.encode(TEXTS, threads=2)
        assert released == []
        embedder.max_threads = 1
        embedder.encode(TEXTS, threads=2)  # capped; the 2-thread pass's worker is ended first, on the pass's thread
        embedder.encode(TEXTS, threads=2)
    assert [t for _, t in seen] == [2, 1, 1]
    assert released == ["premoe-embedder"]  # once: the thread holds no surplus after it


@needs_runtime
def test_pass_threads_fixes_every_pass_whatever_its_calls_ask(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server's count: a prompt embedded beside a call that asks for fewer threads (a task's demos) keeps it.
    monkeypatch.setattr(embedder, "max_threads", None)
    monkeypatch.setattr(embedder, "pass_threads", 2)
    with passes(embedder) as seen:
        embedder.encode(TEXTS, threads=1)
        embedder.encode(TEXTS)
    assert [t for _, t in seen] == [2, 2]


def test_a_threads_count_below_one_is_refused_by_name(embedder: Embedder) -> None:
    with pytest.raises(InvalidArgument) as err:
        embedder.encode(TEXTS, threads=0)
    assert err.value.field == "threads"


def _route_together(service: Any, prompts: list[str]) -> None:
    """Route `prompts` on threads that all wait for the embedder (held busy), then let them run: one pass."""
    embedder = service.embedder
    with embedder._cond:
        embedder._busy = True
    threads = []
    for count, prompt in enumerate(prompts, 1):
        threads.append(threading.Thread(target=service.route, args=(prompt,)))
        threads[-1].start()
        deadline = time.monotonic() + 30
        while len(embedder._waiting) < count and time.monotonic() < deadline:  # in order: the first is alone
            time.sleep(0.005)
    with embedder._cond:
        embedder._busy = False
        embedder._cond.notify_all()
    for thread in threads:
        thread.join(60)


@needs_runtime
def test_the_server_embeds_every_prompt_at_the_cores_the_engine_leaves(
    tiny_store: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from premoe_service.engine import loop
    from premoe_service.profiler import Demo, Selection
    from premoe_service.serving import ServiceConfig, ServingCore

    released = _record_releases(monkeypatch, loop)
    service = ServingCore(ServiceConfig(store=tiny_store, device="cpu", engine_threads=1), embedder=embedder)
    stop = threading.Event()
    prompt = "def add(a, b): return a + b"
    try:
        # the thread that loaded the model (this one) ends its parked OpenMP workers as the engine starts
        assert released == [threading.current_thread().name]
        service.register_task("code", [Demo("def add(a, b):\n    return a + b\n")], selection=Selection())
        with passes(embedder) as alone:
            service.route(prompt)
        with passes(embedder) as together:
            _route_together(service, [prompt, "sort: 5391="])
        service.submit(
            "def add(a, b):", SamplingParams(max_new_tokens=200, ignore_eos=True), task="code", cancelled=stop.is_set
        )
        deadline = time.monotonic() + 60
        while not service.loop.running:  # until it decodes: the engine steps until it is cancelled
            assert time.monotonic() < deadline
            stop.wait(0.005)
        with passes(embedder) as stepping:
            service.route(prompt)
    finally:
        stop.set()
        service.close()
    # One count whatever else the server does (a prompt alone, two at once in one shared pass, beside a stepping
    # engine): a prompt's vector, and so its task, must not depend on the load (another count may round it apart).
    leaves = max(1, usable_cores() - 1)
    assert [t for _, t in alone] == [leaves]
    assert [t for _, t in together] == [leaves]
    assert [t for _, t in stepping] == [leaves]


@needs_runtime
def test_the_engines_thread_holds_its_own_count_and_the_others_take_one(tiny_store: Path, embedder: Embedder) -> None:
    from premoe_service.serving import ServiceConfig, ServingCore

    threads = torch.get_num_threads()
    service = ServingCore(ServiceConfig(store=tiny_store, device="cpu", engine_threads=2), embedder=embedder)
    seen: list[tuple[str, tuple[int, int | None]]] = []
    step = service.loop._forward_step

    def observed() -> bool:
        seen.append((threading.current_thread().name, thread_counts()))
        return step()

    try:
        service.loop._forward_step = observed  # type: ignore[method-assign]
        *_, result = service.generate(
            "def add(a, b):", SamplingParams(max_new_tokens=2), task=service.served_model_name
        )
        assert isinstance(result, GenerationResult) and len(result.token_ids) == 2
        started = _on_another_thread(thread_counts)  # a thread the process starts now (a door's, the loader's)
        here = thread_counts()
    finally:
        service.close()
        torch.set_num_threads(threads)
    mkl = torch.backends.mkl.is_available()
    assert seen and set(seen) == {("premoe-engine", (2, 2 if mkl else None))}
    assert started == here == (1, 1 if mkl else None)  # only the engine's thread takes 2


def test_without_the_runtime_nothing_is_set_per_thread_and_the_embedder_still_encodes(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch, one_thread_here: None
) -> None:
    # Another platform (no libgomp, or a torch built without MKL's per-thread setter): `_runtime` finds nothing.
    monkeypatch.setattr(intra_op, "_runtime", lambda: None)
    assert not intra_op.available() and not release_teams()

    def inside() -> tuple[int, int | None]:
        with intra_op_threads(2):
            return thread_counts()

    assert _on_another_thread(inside) == (1, None)  # the block runs at the thread's present count
    intra_op.hold_threads(2)  # falls back to torch's process-wide count, as the engine set it before
    assert torch.get_num_threads() == 2 and _on_another_thread(torch.get_num_threads) == 2
    torch.set_num_threads(1)
    np.testing.assert_allclose(embedder.encode(TEXTS, threads=2), embedder.encode(TEXTS), atol=1e-5)
