"""Residency: a device-memory budget of expert slots, delta loads per task switch, and leases that pin."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from ..families import MoESpec
from ..pattern import Pattern
from ..store.reader import Store
from .engine import PatternedModel
from .slot_book import RESIDENT


@dataclass(frozen=True)
class Budget:
    """Device memory for routed experts: bytes, or a fraction of all routed-expert bytes."""

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.fraction is None):
            raise InvalidArgument("give a budget in bytes or as a fraction, not both or neither", field="budget")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise InvalidArgument(f"budget fraction {self.fraction} must lie in (0, 1]", field="budget")
        if self.bytes is not None and self.bytes <= 0:
            raise InvalidArgument(f"budget of {self.bytes} bytes must be positive", field="budget")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """A share of all routed-expert bytes (`0.5`, `50%`) or bytes with a unit (`512MiB`, `8GiB`, `2e9B`).

        A bare number above 1 is refused: it would silently be read as bytes where a share was meant."""
        value = text.strip()
        try:
            if value.endswith("%"):
                return cls(fraction=float(value[:-1]) / 100)
            units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
            for unit, scale in units.items():
                if value.endswith(unit):
                    return cls(bytes=int(float(value[: -len(unit)]) * scale))
            number = float(value)
        except ValueError as exc:
            raise InvalidArgument(f"cannot read budget {text!r} (e.g. 0.5, 50%, 512MiB)", field="budget") from exc
        if number > 1:
            raise InvalidArgument(
                f"budget {text!r} has no unit: give a share (0.5, 50%) or bytes with a unit (8GiB, 2e9B)",
                field="budget",
            )
        return cls(fraction=number)

    def slots_per_layer(self, spec: MoESpec, expert_nbytes: int) -> int:
        """Slots per MoE layer that fit the budget (at least top-k, at most every expert)."""
        total = spec.num_experts * len(spec.moe_layers)
        slots = int(total * self.fraction) if self.fraction is not None else int(self.bytes or 0) // expert_nbytes
        per_layer = slots // len(spec.moe_layers)
        if per_layer < spec.top_k:
            raise ResourceExhausted(
                f"budget holds {per_layer} experts per layer, fewer than top-k {spec.top_k}", field="budget"
            )
        return min(per_layer, spec.num_experts)


@dataclass
class ResidencyStats:
    """Counters across all leases: device hits, evictions, load time."""

    device_hits: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    waits: int = 0


@dataclass
class Lease:
    """A request's hold on its pattern's slots, from routing to its last token.

    Attributes:
        pattern: The pattern whose experts are pinned.
        loaded: Experts loaded per tier for this lease (`device` counts experts already resident).
        load_seconds: Time spent loading.
    """

    pattern: Pattern
    loaded: dict[str, int] = field(default_factory=dict)
    loaded_bytes: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0
    evicted: int = 0


class Residency:
    """Decides which experts occupy the engine's slots.

    A lease loads only the experts of its pattern that are not resident (delta), evicting least recently
    used experts that no lease pins. When the pattern cannot fit next to pinned slots, the lease waits up
    to `wait_timeout_s` for other leases to end, then fails with `ResourceExhausted`.

    Args:
        engine: The patterned model whose slots are managed.
        store: The expert source with tier counters (a `Store`).
        wait_timeout_s: Default bound on waiting for pinned slots to free up.
    """

    def __init__(self, engine: PatternedModel, store: Store, wait_timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.store = store
        self.wait_timeout_s = wait_timeout_s
        self.stats = ResidencyStats()
        self._cond = threading.Condition()
        self._valid: dict[int, weakref.ref[Pattern]] = {}  # patterns checked against the model, while they live
        layers = engine.spec.moe_layers
        self._layers = np.array(layers, dtype=np.int64)  # book row -> layer id
        self._row_of = np.full(max(layers, default=0) + 1, -1, dtype=np.int64)  # layer id -> book row
        self._row_of[self._layers] = np.arange(len(layers))
        self.model_lock = threading.RLock()  # held around forward passes: routers hold one pattern at a time

    @contextmanager
    def lease(self, pattern: Pattern, timeout_s: float | None = None) -> Iterator[Lease]:
        """Pin `pattern`'s experts for the duration of the block, loading the missing ones first."""
        lease = self._acquire(pattern, self.wait_timeout_s if timeout_s is None else timeout_s)
        try:
            yield lease
        finally:
            self._release(pattern)

    def _acquire(self, pattern: Pattern, timeout_s: float) -> Lease:
        wanted = self._prepare(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                try:
                    self.engine.book.plan(wanted)  # fits next to the pinned experts?
                    break
                except ResourceExhausted:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ResourceExhausted(
                            f"pattern of {pattern.size} experts does not fit next to the pinned slots of running "
                            f"requests (waited {timeout_s:.1f}s)",
                            field="budget",
                        ) from None
                    self.stats.waits += 1
                    self._cond.wait(remaining)
            before = (dict(self.store.stats.loads), dict(self.store.stats.bytes))
            start = time.perf_counter()
            with self.model_lock:
                report = self.engine.load(pattern, self.store)
            lease = Lease(pattern=pattern, load_seconds=time.perf_counter() - start, evicted=len(report.evicted))
            for tier in ("cache", "disk"):
                lease.loaded[tier] = self.store.stats.loads[tier] - before[0][tier]
                lease.loaded_bytes[tier] = self.store.stats.bytes[tier] - before[1][tier]
            lease.loaded["device"] = pattern.size - len(report.loaded)
            self.store.stats.record("device", 0, count=lease.loaded["device"])
            self.stats.device_hits += lease.loaded["device"]
            self.stats.evictions += len(report.evicted)
            self.stats.load_seconds += lease.load_seconds
            self.engine.book.pin(wanted)
            return lease

    def _release(self, pattern: Pattern) -> None:
        self.unpin(pattern)

    # --- asynchronous loads (the engine loop): reserve slots, copy beside the loop, commit at a step boundary

    def reserve(self, pattern: Pattern) -> list[tuple[int, int, int]] | None:
        """Pin `pattern` and reserve slots for its experts that are neither resident nor already loading.

        Returns the `(layer, expert, slot)` copies to make, or None (and changes nothing) when they do not
        fit next to the pinned experts now. Evicted experts leave the routing tables at once; they were
        unpinned, so no running request can route to them. Each copy ends with `commit` or `abort`.
        """
        wanted = self._prepare(pattern)
        book = self.engine.book
        with self._cond:
            try:
                plan = book.plan(wanted)
            except ResourceExhausted:
                self.stats.waits += 1
                return None
            self.stats.evictions += book.reserve(plan)
            book.pin(wanted)
            layers = self._layers[plan.rows].tolist()
            return list(zip(layers, plan.experts.tolist(), plan.slots.tolist(), strict=True))

    def commit(self, layer: int, expert: int) -> None:
        """An expert's copy completed: make it routable (call at a step boundary, never during a forward)."""
        self.commit_all([(layer, expert, -1)])

    def commit_all(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """`commit` for each `(layer, expert, slot)` copy of a completed job."""
        rows, experts = self._rows_of(copies)
        with self._cond:
            self.engine.book.commit(rows, experts)

    def abort(self, layer: int, expert: int) -> None:
        """An expert's copy failed: free its slot."""
        self.abort_all([(layer, expert, -1)])

    def abort_all(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """`abort` for each `(layer, expert, slot)` copy of a failed job."""
        rows, experts = self._rows_of(copies)
        with self._cond:
            self.engine.book.abort(rows, experts)

    def store_hits(self, count: int) -> None:
        """Count experts a request found already resident (the device tier)."""
        self.store.stats.record("device", 0, count=count)
        with self._cond:
            self.stats.device_hits += count

    def is_resident(self, pattern: Pattern) -> bool:
        """Whether every expert of `pattern` is routable now."""
        wanted = self.engine.full_mask(pattern)
        with self._cond:
            return self.engine.book.all_resident(wanted)

    def unpin(self, pattern: Pattern) -> None:
        """Drop one pin of each expert of `pattern` and mark them recently used."""
        wanted = self.engine.full_mask(pattern)
        with self._cond:
            self.engine.book.unpin(wanted, self.engine.next_tick())
            self._cond.notify_all()

    def _prepare(self, pattern: Pattern) -> np.ndarray:
        """The pattern's experts as a bool `[L, E]` mask, with the pattern checked against the model the first
        time it is seen (while it lives, it is not checked again) and against the slots per layer every time."""
        with self._cond:
            key = id(pattern)
            known = self._valid.get(key)
            if known is None or known() is not pattern:
                pattern.validate(self.engine.spec)
                if pattern.mixed:  # leases hold full-precision slots only (README, "Known limits")
                    raise FailedPrecondition(
                        "the serving engine holds experts at full precision only; this pattern lowers some",
                        field="precision",
                    )

                def forget(ref: weakref.ref[Pattern], key: int = key) -> None:  # the pattern is gone
                    if self._valid.get(key) is ref:
                        self._valid.pop(key, None)

                self._valid[key] = weakref.ref(pattern, forget)
            wanted = self.engine.full_mask(pattern)
            self._check_capacity(wanted)
            return wanted

    def _rows_of(self, copies: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        rows = self._row_of[np.fromiter((c[0] for c in copies), np.int64, len(copies))]
        return rows, np.fromiter((c[1] for c in copies), np.int64, len(copies))

    def _check_capacity(self, wanted: np.ndarray) -> None:
        over = wanted.sum(axis=1) > self.engine.book.capacity
        if over.any():
            row = int(np.argmax(over))
            capacity = int(self.engine.book.capacity[row])
            raise ResourceExhausted(
                f"pattern keeps {int(wanted[row].sum())} experts but the budget gives {capacity} slots per layer",
                field=f"layer {int(self._layers[row])}",
            )

    def activate(self, pattern: Pattern) -> None:
        """Point the routers at a leased pattern; call under `model_lock` right before a forward pass."""
        self.engine.activate(pattern)

    def resident_experts(self) -> int:
        return int(np.count_nonzero(self.engine.book.state == RESIDENT))

    def capacity(self) -> int:
        return int(self.engine.book.capacity.sum())
