"""A thread's own intra-op thread count, apart from the rest of the process, and the OpenMP threads it leaves.

`torch.set_num_threads` sets the calling thread's OpenMP count (which ATen's parallel loops and oneDNN read), but
also torch's process-wide count, which every thread takes at its first parallel work (the engine's loader, the
doors' relay threads), and MKL's process-wide count (Intel documents `mkl_set_num_threads` as global). A thread
that set it for each of its own passes, as the embedder does, would move other threads' counts with it.
`intra_op_threads(n)` sets the calling thread's alone: OpenMP's `omp_set_num_threads` (a per-thread setting) and
MKL's `MKL_Set_Num_Threads_Local`, from the OpenMP runtime and the libtorch_cpu this process loaded (the runtime
whose setting torch reads: other wheels, faiss's, bring their own). Where either is missing (another platform, a
torch built otherwise) it changes nothing: work runs at the thread's present count.

Each thread that runs a parallel region at n threads keeps n - 1 OpenMP workers parked for its next one, and GNU
OpenMP counts them all: once they outnumber the cores it spins ~100 times, not ~300,000, before a worker sleeps,
so every parallel region of every thread waits for the kernel to wake its workers. `release_teams` ends the
calling thread's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

log = logging.getLogger(__name__)

_OPENMP = re.compile(r"(/\S*/lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*)$")
_TORCH_CPU = re.compile(r"(/\S*/libtorch_cpu\.so[^/\s]*)$")


class _Runtime:
    """The two per-thread setters, read from the libraries this process loaded."""

    def __init__(self, openmp: ctypes.CDLL, mkl: ctypes.CDLL | None) -> None:
        self.get_omp = openmp.omp_get_max_threads
        self.get_omp.restype, self.get_omp.argtypes = ctypes.c_int, []
        self.set_omp = openmp.omp_set_num_threads
        self.set_omp.restype, self.set_omp.argtypes = None, [ctypes.c_int]
        self.pause = getattr(openmp, "omp_pause_resource_all", None)  # OpenMP 5.0
        if self.pause is not None:
            self.pause.restype, self.pause.argtypes = ctypes.c_int, [ctypes.c_int]
        self.set_mkl_local = self.get_mkl = None
        if mkl is not None:
            # The C names: MKL's lower-case symbols are its Fortran interface, which takes a pointer.
            self.set_mkl_local = mkl.MKL_Set_Num_Threads_Local
            self.set_mkl_local.restype, self.set_mkl_local.argtypes = ctypes.c_int, [ctypes.c_int]
            self.get_mkl = mkl.MKL_Get_Max_Threads
            self.get_mkl.restype, self.get_mkl.argtypes = ctypes.c_int, []


@cache
def _runtime() -> _Runtime | None:
    import torch

    torch.get_num_threads()  # torch (and its OpenMP runtime) loaded
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = list(dict.fromkeys(line.split(None, 5)[-1].strip() for line in maps if "/" in line))
    except OSError:
        return None
    torch_cpu = next((p for p in paths if _TORCH_CPU.search(p)), None)
    home = os.path.dirname(torch_cpu) if torch_cpu else None
    # Other wheels bring OpenMP runtimes of their own (faiss does): torch's own sits beside libtorch_cpu.
    runtimes = sorted((p for p in paths if _OPENMP.search(p)), key=lambda p: os.path.dirname(p) != home)
    mkl = None
    try:
        if torch_cpu is not None and torch.backends.mkl.is_available():
            mkl = ctypes.CDLL(torch_cpu)  # already loaded: the same handle
            if not hasattr(mkl, "MKL_Set_Num_Threads_Local"):
                log.info("torch's MKL does not export its per-thread setter: per-thread intra-op counts are off")
                return None
        for path in runtimes:
            runtime = _Runtime(ctypes.CDLL(path), mkl)
            if _moves_torch(runtime):
                return runtime
    except (OSError, AttributeError) as exc:
        log.info("per-thread intra-op counts are off: %s", exc)
        return None
    log.info("no OpenMP runtime that torch reads was found: per-thread intra-op counts are off")
    return None


def _moves_torch(runtime: _Runtime) -> bool:
    """Whether setting `runtime`'s count on a thread moves torch's reading there (it is torch's runtime)."""
    import torch

    def check() -> None:
        torch.get_num_threads()
        before = int(runtime.get_omp())
        runtime.set_omp(before + 1)
        result.append(torch.get_num_threads() == before + 1)
        runtime.set_omp(before)

    result: list[bool] = []
    probe = threading.Thread(target=check, name="intra-op-probe")
    probe.start()
    probe.join()
    return bool(result and result[0])


def available() -> bool:
    """Whether `intra_op_threads` can set a thread's count apart from the process's."""
    return _runtime() is not None


def thread_counts() -> tuple[int, int | None]:
    """The calling thread's (OpenMP, MKL) intra-op counts; MKL's None without MKL or without the runtime."""
    import torch

    runtime = _runtime()
    if runtime is None:
        return torch.get_num_threads(), None
    torch.get_num_threads()  # the thread's first call sets its OpenMP count from torch's
    return int(runtime.get_omp()), None if runtime.get_mkl is None else int(runtime.get_mkl())


def hold_threads(threads: int) -> None:
    """Set the calling thread's intra-op count for good (the engine's thread keeps its own this way); without the
    per-thread setters, torch's process-wide `set_num_threads`."""
    import torch

    runtime = _runtime()
    if runtime is None:
        torch.set_num_threads(threads)
        return
    _set_counts(runtime, threads)


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op threads on the calling thread only (None: as it is), restoring the
    thread's counts after it. Other threads keep theirs, MKL's included."""
    runtime = _runtime()
    if threads is None or runtime is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    before, mkl_before = _set_counts(runtime, threads)
    try:
        yield
    finally:
        runtime.set_omp(before)
        if runtime.set_mkl_local is not None:
            runtime.set_mkl_local(mkl_before)


def _set_counts(runtime: _Runtime, threads: int) -> tuple[int, int]:
    """Set the calling thread's OpenMP and MKL counts; returns the OpenMP count and MKL's thread-local setting
    (0: none) they replace."""
    import torch

    torch.get_num_threads()  # torch's lazy per-thread set-up runs now, not after ours (it would undo them)
    before = int(runtime.get_omp())
    runtime.set_omp(threads)
    mkl_before = int(runtime.set_mkl_local(threads) or 0) if runtime.set_mkl_local is not None else 0
    return before, mkl_before


OMP_PAUSE_HARD = 2  # omp_pause_resource_t's omp_pause_hard: the thread's OpenMP threads end


def release_teams() -> bool:
    """End the OpenMP worker threads that the calling thread's parallel regions left parked (they return when it
    next runs one at more than one thread). GNU OpenMP counts every parked worker of every thread: once they
    outnumber the cores, it spins only ~100 times before a worker sleeps, and each parallel region of every thread
    then waits for the kernel to wake its workers (a 2-thread embedding pass 15-16 ms instead of 8-9). The thread
    that loaded the model calls this when it hands the work to others. Returns whether they were released."""
    runtime = _runtime()
    if runtime is None or runtime.pause is None:
        return False
    return int(runtime.pause(OMP_PAUSE_HARD)) == 0
