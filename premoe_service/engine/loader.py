"""The loader: copies experts into reserved slots on its own thread while the engine loop keeps decoding."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..experts import ExpertReader
from ..runtime import PatternedModel
from ..runtime.slots import bytes_view, expert_params, write_slot

log = logging.getLogger(__name__)


@dataclass
class LoadJob:
    """One request's missing experts: `(layer, expert, slot)` copies into slots reserved for them.

    Filled in by the loader: experts per tier, bytes, seconds, and the error if a read failed.
    """

    request_id: int
    copies: list[tuple[int, int, int]]
    tiers: dict[str, int] = field(default_factory=lambda: {"cache": 0, "disk": 0})
    nbytes: int = 0
    seconds: float = 0.0
    error: BaseException | None = None
    event: Any = None  # CUDA: recorded on the copy stream after the last copy

    @property
    def ready(self) -> bool:
        """Whether the copies are complete (on CUDA: the copy stream passed the job's event)."""
        return self.event is None or bool(self.event.query())


class Loader:
    """Reads experts (one cache round trip per job, then disk) into slot memory beside the engine loop.

    It only writes slots the residency reserved: free slots, or slots of evicted experts that no running
    request pins, so no token routes there while they are written. The loop commits a job (makes its
    experts routable) at the first step boundary after the copy completed. On the CPU the store reads
    straight into slot memory; on CUDA each expert goes through a pinned staging buffer and a copy on a
    dedicated stream, and the job records an event that the loop polls.

    Args:
        engine: The model whose slots are written.
        source: A `Store` (or any source with `read(layer, expert)`).
        gate: Copies start only while this event is set (tests hold it shut); default always open.
        wake: Called when a job completes (wakes the loop).
        staging_buffers: Pinned buffers in the CUDA ring.
    """

    def __init__(
        self,
        patterned: PatternedModel,
        source: Any,
        *,
        gate: threading.Event | None = None,
        wake: Any = None,
        staging_buffers: int = 4,
    ) -> None:
        self.patterned = patterned
        self.source = source
        self.gate = gate or _open_event()
        self.wake = wake or (lambda: None)
        self._jobs: queue.SimpleQueue[LoadJob | None] = queue.SimpleQueue()
        self._done: deque[LoadJob] = deque()
        self._lock = threading.Lock()
        self.backlog = 0  # jobs submitted and not yet handed back
        self.bytes_in_flight = 0
        self.cuda = patterned.device.type == "cuda"
        self._stream: Any = None
        self._staging: list[tuple[torch.Tensor, Any]] = []
        self._next_staging = 0
        if self.cuda:
            nbytes = _expert_nbytes(patterned)
            self._stream = torch.cuda.Stream(device=patterned.device)
            self._staging = [
                (torch.empty(nbytes, dtype=torch.uint8).pin_memory(), None) for _ in range(staging_buffers)
            ]
        self._thread = threading.Thread(target=self._run, name="premoe-loader", daemon=True)
        self._thread.start()

    def submit(self, job: LoadJob) -> None:
        with self._lock:
            self.backlog += 1
            self.bytes_in_flight += len(job.copies) * _expert_nbytes(self.patterned)
        self._jobs.put(job)

    def completed(self) -> list[LoadJob]:
        """Jobs whose copies are complete, in completion order (call from the loop at a step boundary)."""
        out: list[LoadJob] = []
        with self._lock:
            while self._done and self._done[0].ready:
                job = self._done.popleft()
                self.backlog -= 1
                self.bytes_in_flight -= len(job.copies) * _expert_nbytes(self.patterned)
                out.append(job)
        return out

    def close(self) -> None:
        self.gate.set()
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self.gate.wait()
            start = time.perf_counter()
            try:
                self._copy(job)
            except BaseException as exc:  # handed to the requests that wait on these experts
                log.error("loading experts %s failed: %s", job.copies[:4], exc)
                job.error = exc
            job.seconds = time.perf_counter() - start
            with self._lock:
                self._done.append(job)
            self.wake()

    def _copy(self, job: LoadJob) -> None:
        copies, lowered = job.copies, 0
        if self.patterned.quantized is not None or self.patterned.channels is not None:
            # experts held below full precision or in part go into their banks' slots
            rows, capacity = self.patterned.rows, self.patterned.book.capacity
            copies = [c for c in job.copies if c[2] < capacity[rows[c[0]]]]
            for layer, expert, slot in job.copies:
                if slot >= capacity[rows[layer]]:
                    tier, nbytes = self.patterned.read_into_bank(layer, expert, slot)
                    job.tiers[tier] += 1
                    lowered += nbytes
        job.nbytes = lowered + len(copies) * _expert_nbytes(self.patterned)
        if not copies:
            return
        if not isinstance(self.source, ExpertReader):  # a plain expert source (tests, in-memory models)
            for layer, expert, slot in copies:
                write_slot(self.patterned.experts_module(layer), slot, self.source.read(layer, expert))
                job.tiers["cache"] += 1
            return
        read_many, names = self.source.read_many_into, self.source.part_names
        if not self.cuda:
            items = []
            for layer, expert, slot in copies:
                params = expert_params(self.patterned.experts_module(layer))
                views = [memoryview(bytes_view(params[name][slot])) for name in names]  # type: ignore[arg-type]
                items.append((layer, expert, views))
            for tier in read_many(items):
                job.tiers[tier] += 1
            return
        assert self._stream is not None
        for layer, expert, slot in copies:
            staging = self._staging_buffer()
            tier = read_many([(layer, expert, _part_views(staging, self.patterned, layer, names))])[0]
            job.tiers[tier] += 1
            params = expert_params(self.patterned.experts_module(layer))
            with torch.cuda.stream(self._stream):
                offset = 0
                for name in names:
                    target = params[name][slot].reshape(-1).view(torch.uint8)
                    target.copy_(staging[offset : offset + target.numel()], non_blocking=True)
                    offset += target.numel()
                event = torch.cuda.Event()
                event.record(self._stream)
            self._staging[self._next_staging - 1] = (staging, event)
            job.event = event

    def _staging_buffer(self) -> torch.Tensor:
        """The next pinned buffer of the ring, once the copy that last used it has finished."""
        buffer, event = self._staging[self._next_staging]
        if event is not None:
            event.synchronize()
        self._next_staging = (self._next_staging + 1) % len(self._staging)
        return buffer


def _part_views(staging: torch.Tensor, patterned: PatternedModel, layer: int, names: list[str]) -> list[memoryview]:
    params = expert_params(patterned.experts_module(layer))
    views, offset = [], 0
    array = staging.numpy()
    for name in names:
        size = params[name][0].numel() * params[name].element_size()
        views.append(memoryview(array[offset : offset + size]))  # type: ignore[arg-type]
        offset += size
    return views


def _expert_nbytes(patterned: PatternedModel) -> int:
    layer = patterned.spec.moe_layers[0]
    params = expert_params(patterned.experts_module(layer))
    return sum(p[0].numel() * p.element_size() for p in params.values())


def _open_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event
