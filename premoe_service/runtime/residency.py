"""Residency: a device-memory budget of expert slots, delta loads per task switch, and leases that pin."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..errors import FailedPrecondition, ResourceExhausted
from ..pattern import Pattern
from ..store.reader import Store
from .budget import Budget
from .channel_banks import key_name
from .model import PatternedModel
from .slot_book import ABSENT, LOADING, RESIDENT, SlotBook, SlotPlan

Book = tuple[SlotBook, np.ndarray, np.ndarray | None]  # see `Residency._books`


@dataclass
class ResidencyStats:
    """Counters across all leases: device hits, evictions, load time."""

    device_hits: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    waits: int = 0


@dataclass(frozen=True)
class PatternResidency:
    """How much of a pattern is in device slots now, at the precisions the pattern holds its experts.

    Attributes:
        experts: Experts of the pattern resident (routable) now.
        nbytes: Their bytes (lowered experts at their packed size).
        share: `experts` over the pattern's size (1.0 for an empty pattern).
        precisions: Resident experts per precision ("full" for the store's own dtype).
        loading: Some of the pattern's experts are being copied into reserved slots.
    """

    experts: int
    nbytes: int
    share: float
    precisions: dict[str, int]
    loading: bool


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

    def __init__(self, patterned: PatternedModel, store: Store, wait_timeout_s: float = 30.0) -> None:
        self.patterned = patterned
        self.store = store
        self.wait_timeout_s = wait_timeout_s
        self.stats = ResidencyStats()
        self._cond = threading.Condition()
        self._valid: dict[int, weakref.ref[Pattern]] = {}  # patterns checked against the model, while they live
        layers = patterned.spec.moe_layers
        self._layers = np.array(layers, dtype=np.int64)  # book row -> layer id
        self._row_of = np.full(max(layers, default=0) + 1, -1, dtype=np.int64)  # layer id -> book row
        self._row_of[self._layers] = np.arange(len(layers))
        self.model_lock = threading.RLock()  # held around forward passes: routers hold one pattern at a time
        self.task_pins: dict[str, Pattern] = {}  # pinned tasks (`LoadTask`) -> the pattern each pin holds
        # Bumped whenever slots may have freed (unpins, commits, aborts, releases): a request that found no room
        # need not look again before it moves (`engine.admission`).
        self.generation = 0

    @contextmanager
    def lease(self, pattern: Pattern, timeout_s: float | None = None) -> Iterator[Lease]:
        """Pin `pattern`'s experts for the duration of the block, loading the missing ones first."""
        lease = self._acquire(pattern, self.wait_timeout_s if timeout_s is None else timeout_s)
        try:
            yield lease
        finally:
            self._release(pattern)

    def _acquire(self, pattern: Pattern, timeout_s: float) -> Lease:
        books = self._prepare(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                try:
                    self._plans(books)  # fits next to the pinned experts?
                    break
                except ResourceExhausted:
                    if self._make_room(books):
                        continue
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
                report = self.patterned.load(pattern, self.store)
            lease = Lease(pattern=pattern, load_seconds=time.perf_counter() - start, evicted=len(report.evicted))
            for tier in ("cache", "disk"):
                lease.loaded[tier] = self.store.stats.loads[tier] - before[0][tier]
                lease.loaded_bytes[tier] = self.store.stats.bytes[tier] - before[1][tier]
            lease.loaded["device"] = pattern.size - len(report.loaded)
            self.store.stats.record("device", 0, count=lease.loaded["device"])
            self.stats.device_hits += lease.loaded["device"]
            self.stats.evictions += len(report.evicted)
            self.stats.load_seconds += lease.load_seconds
            for book, wanted, _ in books:
                book.pin(wanted)
            return lease

    def _release(self, pattern: Pattern) -> None:
        self.unpin(pattern)

    # --- asynchronous loads (the engine loop): reserve slots, copy beside the loop, commit at a step boundary

    def reserve(self, pattern: Pattern, evict: bool = True) -> list[tuple[int, int, int]] | None:
        """Pin `pattern` and reserve slots for its experts that are neither resident nor already loading.

        Returns the `(layer, expert, slot)` copies to make, or None (and changes nothing) when they do not
        fit next to the pinned experts now (or, with `evict=False`, when they would evict resident experts). Slot
        ids are a layer's one space: full-precision slots first, then each precision's quantized slots
        (`runtime.quantized`). Evicted experts leave the routing tables at once; they were unpinned, so no running
        request can route to them. Each copy ends with `commit` or `abort`.
        """
        books = self._prepare(pattern)
        with self._cond:
            try:
                plans = self._plans(books)
            except ResourceExhausted:
                try:
                    if not evict or not self._make_room(books):
                        raise
                    plans = self._plans(books)
                except ResourceExhausted:
                    self.stats.waits += 1
                    return None
            if not evict and any(plan.victim_rows.size for plan in plans):
                return None  # it would evict: the caller prefers another way first
            copies: list[tuple[int, int, int]] = []
            for (book, wanted, offsets), plan in zip(books, plans, strict=True):
                self.stats.evictions += book.reserve(plan)
                book.pin(wanted)
                slots = plan.slots if offsets is None else plan.slots + offsets[plan.rows]
                layers = self._layers[plan.rows].tolist()
                copies += zip(layers, plan.experts.tolist(), slots.tolist(), strict=True)
            return copies

    def commit(self, layer: int, expert: int, slot: int) -> None:
        """An expert's copy completed: make it routable (call at a step boundary, never during a forward)."""
        self.commit_all([(layer, expert, slot)])

    def commit_all(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """`commit` for each `(layer, expert, slot)` copy of a completed job."""
        with self._cond:
            for book, rows, experts in self._by_book(copies):
                book.commit(rows, experts)
            self.generation += 1
            self._cond.notify_all()  # `wait_until` callers (task loads) look again

    def abort(self, layer: int, expert: int, slot: int) -> None:
        """An expert's copy failed: free its slot."""
        self.abort_all([(layer, expert, slot)])

    def abort_all(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """`abort` for each `(layer, expert, slot)` copy of a failed job."""
        with self._cond:
            for book, rows, experts in self._by_book(copies):
                book.abort(rows, experts)
            self.generation += 1
            self._cond.notify_all()

    def store_hits(self, count: int) -> None:
        """Count experts a request found already resident (the device tier)."""
        self.store.stats.record("device", 0, count=count)
        with self._cond:
            self.stats.device_hits += count

    def is_resident(self, pattern: Pattern) -> bool:
        """Whether every expert of `pattern` is routable now (at the precision the pattern holds it)."""
        books = self._books(pattern)
        with self._cond:
            return all(book.all_resident(wanted) for book, wanted, _ in books)

    def unpin(self, pattern: Pattern) -> None:
        """Drop one pin of each expert of `pattern` and mark them recently used."""
        books = self._books(pattern)
        with self._cond:
            tick = self.patterned.next_tick()
            for book, wanted, _ in books:
                book.unpin(wanted, tick)
            self.generation += 1
            self._cond.notify_all()

    def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until `ready()` holds; it is checked again whenever copies commit or abort,
        or pins drop. Returns its last value."""
        with self._cond:
            return self._cond.wait_for(ready, timeout_s)

    # --- task pins (LoadTask / UnloadTask): a pinned task's experts are never evicted

    def check_task_pin(self, name: str, pattern: Pattern, nbytes_of: Callable[[Pattern], int]) -> None:
        """Refuse (`ResourceExhausted`) a pattern that cannot fit in some layer next to the experts of the other
        pinned tasks, naming them and the bytes they pin. Request pins are not counted: they end by themselves.

        Args:
            name: The task being loaded (its own pin, if any, is replaced and so not in the way).
            pattern: The task's pattern.
            nbytes_of: A pattern's bytes (quantized experts at their packed size), for the message.
        """
        books = self._prepare(pattern)
        with self._cond:
            others = {task: p for task, p in self.task_pins.items() if task != name}
            if not others:
                return
            pinned_books = {task: self._books(p) for task, p in others.items()}
            for index, (book, wanted, _) in enumerate(books):
                pinned = np.zeros_like(wanted)
                for task_books in pinned_books.values():
                    for other_book, other_wanted, _ in task_books:
                        if other_book is book:
                            pinned |= other_wanted
                over = np.count_nonzero(wanted | pinned, axis=1) > book.capacity
                if not over.any():
                    continue
                row = int(np.argmax(over))
                in_the_way = sorted(
                    task
                    for task, task_books in pinned_books.items()
                    if any(b is book and (w[row] & ~wanted[row]).any() for b, w, _ in task_books)
                )
                pinned_bytes = sum(nbytes_of(others[task]) for task in in_the_way)
                kind = self._kind(book)
                raise ResourceExhausted(
                    f"the task's {int(wanted[row].sum())} experts do not fit in the {int(book.capacity[row])} "
                    f"{kind}slots of layer {int(self._layers[row])} next to the "
                    f"{int(np.count_nonzero(pinned[row] & ~wanted[row]))} experts pinned there by tasks "
                    f"{', '.join(in_the_way)} ({pinned_bytes} bytes pinned by them in all); unload one of them "
                    "(UnloadTask) or raise the budget",
                    field=None if index == 0 else "channels" if "channel" in kind else "precision",
                )

    def adopt_task_pin(self, name: str, pattern: Pattern) -> None:
        """Make the pin a `reserve` of `pattern` took the task's pin (a pin the task held before is dropped)."""
        with self._cond:
            previous = self.task_pins.get(name)
            self.task_pins[name] = pattern
        if previous is not None:
            self.unpin(previous)

    def unpin_task(self, name: str) -> Pattern | None:
        """Drop the task's pin; returns the pattern it held, or None when the task was not pinned."""
        with self._cond:
            previous = self.task_pins.pop(name, None)
        if previous is not None:
            self.unpin(previous)
        return previous

    def release(self, patterns: Sequence[Pattern], keep: Sequence[Pattern], expert_nbytes: int) -> tuple[int, int]:
        """Take the experts of `patterns` out of their slots, except those pinned (by a task or a running request)
        and those `keep` holds; returns (experts, bytes) released. The freed slots are free at once; no running
        request routes to an unpinned expert, so the routing tables need no update before the next copy."""
        if not patterns:
            return 0, 0
        books = [b for p in patterns for b in self._held_books(p)]
        kept = [b for p in keep for b in self._held_books(p)]
        released = nbytes = 0
        with self._cond:
            for book, wanted, offsets in books:
                held = np.zeros_like(wanted)
                for other_book, other_wanted, _ in kept:
                    if other_book is book:
                        held |= other_wanted
                drop = wanted & ~held & (book.state == RESIDENT) & (book.pins == 0)
                rows, experts = np.nonzero(drop)
                if not rows.size:
                    continue
                book.evict(rows, experts)
                self.generation += 1
                self.stats.evictions += int(rows.size)
                released += int(rows.size)
                nbytes += int(rows.size) * self._expert_nbytes(book, offsets is not None, expert_nbytes)
            self._cond.notify_all()
        return released, nbytes

    def describe(self, pattern: Pattern, expert_nbytes: int) -> PatternResidency:
        """What of `pattern` is resident now (see `PatternResidency`). Experts at a precision the server has no
        slots for count as not resident; experts held in part count under their bank (`full@24`)."""
        quantized, channels = self.patterned.quantized, self.patterned.channels
        books = self._held_books(pattern)
        names = {id(quantized.book(p)): p for p in quantized.precisions} if quantized is not None else {}
        if channels is not None:
            names.update({id(channels.books[key]): key_name(key) for key in channels.keys})
        precisions: dict[str, int] = {}
        experts = nbytes = 0
        loading = False
        with self._cond:
            for book, wanted, offsets in books:
                count = int(np.count_nonzero(wanted & (book.state == RESIDENT)))
                loading = loading or bool((wanted & (book.state == LOADING)).any())
                if count:
                    precisions[names.get(id(book), "full")] = count
                experts += count
                nbytes += count * self._expert_nbytes(book, offsets is not None, expert_nbytes)
        share = experts / pattern.size if pattern.size else 1.0
        return PatternResidency(experts, nbytes, share, precisions, loading)

    def _expert_nbytes(self, book: SlotBook, lowered: bool, expert_nbytes: int) -> int:
        """Bytes of one slot of `book`: a full expert, a quantized copy's blob, or a channel bank's slot."""
        quantized, channels = self.patterned.quantized, self.patterned.channels
        if not lowered:
            return expert_nbytes
        if quantized is not None:
            for precision in quantized.precisions:
                if quantized.book(precision) is book:
                    return int(quantized.sources[precision].copy.expert_nbytes)
        if channels is not None:
            for key in channels.keys:
                if channels.books[key] is book:
                    return channels.slot_nbytes(key)
        return expert_nbytes

    def _prepare(self, pattern: Pattern) -> list[Book]:
        """`_books`, with the pattern checked against the model the first time it is seen (while it lives, it
        is not checked again) and against the slots per layer every time."""
        with self._cond:
            key = id(pattern)
            known = self._valid.get(key)
            if known is None or known() is not pattern:
                pattern.validate(self.patterned.spec)

                def forget(ref: weakref.ref[Pattern], key: int = key) -> None:  # the pattern is gone
                    if self._valid.get(key) is ref:
                        self._valid.pop(key, None)

                books = self._books(pattern)  # refuses precisions the engine has no slots for
                self._valid[key] = weakref.ref(pattern, forget)
            else:
                books = self._books(pattern)
            for book, wanted, _ in books:
                self._check_capacity(book, wanted)
            return books

    def _books(self, pattern: Pattern) -> list[Book]:
        """(slot book, wanted `[L, E]`, slot id offsets `[L]` or None) for the pattern's full-precision experts
        and for each precision it holds some experts at."""
        books: list[Book] = [(self.patterned.book, self.patterned.full_mask(pattern), None)]
        if pattern.mixed:
            lowered = self.patterned.masks.lowered(pattern)
            quantized = self.patterned.quantized
            if quantized is None and lowered:
                raise FailedPrecondition(
                    "the pattern holds experts below full precision but the server has no slots for them: start "
                    "it with --precision-slots (e.g. int4=4)",
                    field="precision",
                )
            for precision, wanted in lowered.items():
                books.append((quantized.book(precision), wanted, quantized.offsets(precision)))  # type: ignore[union-attr]
        if pattern.sliced:
            channels = self.patterned.channels
            if channels is None:
                raise FailedPrecondition(
                    "the pattern holds experts in part (a channel plan) but the server has no channel slots: start "
                    "it with --channel-slots (e.g. full@24=8)",
                    field="channels",
                )
            for key, wanted in channels.wanted(pattern).items():
                books.append((channels.books[key], wanted, channels.offsets(key)))
        return books

    def _held_books(self, pattern: Pattern) -> list[Book]:
        """`_books` for the precisions the engine has slots for (experts at others can be resident nowhere)."""
        quantized = self.patterned.quantized
        books: list[Book] = [(self.patterned.book, self.patterned.full_mask(pattern), None)]
        if pattern.mixed and quantized is not None:
            for precision, wanted in self.patterned.masks.lowered(pattern).items():
                if precision in quantized.precisions:
                    books.append((quantized.book(precision), wanted, quantized.offsets(precision)))
        channels = self.patterned.channels
        if pattern.sliced and channels is not None:
            try:
                wanted_by_key = channels.wanted(pattern)
            except (FailedPrecondition, ResourceExhausted):  # a bank the server lacks: resident nowhere
                wanted_by_key = {}
            for key, wanted in wanted_by_key.items():
                books.append((channels.books[key], wanted, channels.offsets(key)))
        return books

    def _make_room(self, books: list[Book]) -> bool:
        """With lending (`--under-pressure demote`): lend full slots to the lower precision, or take lent ones back,
        so that the books' experts fit; True when a slot moved (call under the lock)."""
        lending = self.patterned.lending
        return lending is not None and lending.make_room(books)

    def demoted(self, pattern: Pattern) -> Pattern | None:
        """`pattern` with the experts it holds whole at full precision that no running request holds at full
        precision now (absent, or resident but unpinned) held at the lending precision instead: it then pins no
        full slot that others could be lent; None when there are none, or without lending."""
        lending = self.patterned.lending
        if lending is None:
            return None
        with self._cond:
            book = self.patterned.book
            absent = self.patterned.full_mask(pattern) & ((book.state == ABSENT) | (book.pins == 0))
        if not absent.any():
            return None
        precisions = {layer: dict(pattern.precisions.get(layer, {})) for layer in pattern.layers}
        rows, experts = np.nonzero(absent)
        for row, expert in zip(rows.tolist(), experts.tolist(), strict=True):
            precisions[int(self._layers[row])][expert] = lending.precision
        return Pattern.build(self.patterned.spec, pattern.layers, precisions, pattern.channels)

    @staticmethod
    def _plans(books: list[Book]) -> list[SlotPlan]:
        return [book.plan(wanted) for book, wanted, _ in books]  # each raises before anything changes

    def _by_book(self, copies: Sequence[tuple[int, int, int]]) -> Iterator[tuple[SlotBook, np.ndarray, np.ndarray]]:
        """The copies' (rows, experts) grouped by the slot book their slot ids fall in."""
        count = len(copies)
        rows = self._row_of[np.fromiter((c[0] for c in copies), np.int64, count)]
        experts = np.fromiter((c[1] for c in copies), np.int64, count)
        slots = np.fromiter((c[2] for c in copies), np.int64, count)
        full = slots < self.patterned.book.capacity[rows]
        yield self.patterned.book, rows[full], experts[full]
        quantized, channels = self.patterned.quantized, self.patterned.channels
        if quantized is not None and not full.all():
            for precision in quantized.precisions:
                offsets, book = quantized.offsets(precision)[rows], quantized.book(precision)
                inside = (slots >= offsets) & (slots < offsets + book.capacity[rows])
                yield book, rows[inside], experts[inside]
        if channels is not None and not full.all():
            for key in channels.keys:  # a channel copy names the variant's column where others name the expert
                offsets, book = channels.offsets(key)[rows], channels.books[key]
                inside = (slots >= offsets) & (slots < offsets + book.capacity[rows])
                yield book, rows[inside], experts[inside]

    def _kind(self, book: SlotBook) -> str:
        """How messages name a book's slots: "" (full precision), "quantized " or "full@24 channel "."""
        if book is self.patterned.book:
            return ""
        channels = self.patterned.channels
        if channels is not None:
            for key in channels.keys:
                if channels.books[key] is book:
                    return f"{key_name(key)} channel "
        return "quantized "

    def _check_capacity(self, book: SlotBook, wanted: np.ndarray) -> None:
        over = wanted.sum(axis=1) > book.capacity
        if over.any():
            row = int(np.argmax(over))
            capacity, kind = int(book.capacity[row]), self._kind(book)
            raise ResourceExhausted(
                f"pattern keeps {int(wanted[row].sum())} experts but the budget gives {capacity} {kind}slots per layer",
                field=f"layer {int(self._layers[row])}",
            )

    def activate(self, pattern: Pattern) -> None:
        """Point the routers at a leased pattern; call under `model_lock` right before a forward pass."""
        self.patterned.activate(pattern)

    def lending_counts(self) -> dict[str, int]:
        """`lent_slots` (full slots lent now) and `demoted_experts` (experts resident in them), 0 without lending."""
        lending = self.patterned.lending
        if lending is None:
            return {"lent_slots": 0, "demoted_experts": 0}
        with self._cond:
            return lending.counts()

    def resident_experts(self) -> int:
        return int(np.count_nonzero(self.patterned.book.state == RESIDENT))

    def capacity(self) -> int:
        return int(self.patterned.book.capacity.sum())

    def resident_bytes(self, expert_nbytes: int) -> int:
        """Bytes of the experts resident now: full ones at `expert_nbytes`, lowered ones at their packed size."""
        return self._bytes(expert_nbytes, lambda book: int(np.count_nonzero(book.state == RESIDENT)))

    def capacity_bytes(self, expert_nbytes: int) -> int:
        """Bytes of all slots, full and quantized (lent slots count once, as the full slots they are)."""
        return self._bytes(expert_nbytes, lambda book: int(book.capacity.sum()), lent=False)

    def _bytes(self, expert_nbytes: int, count: Callable[[SlotBook], int], lent: bool = True) -> int:
        total = count(self.patterned.book) * expert_nbytes
        quantized, channels = self.patterned.quantized, self.patterned.channels
        if quantized is not None:
            total += sum(
                count(quantized.books[p]) * quantized.sources[p].copy.expert_nbytes
                for p in quantized.books
                if lent or p != quantized.lent
            )
        if channels is not None:
            total += sum(count(channels.books[key]) * channels.slot_nbytes(key) for key in channels.keys)
        return total


__all__ = ["Budget", "Lease", "PatternResidency", "Residency", "ResidencyStats"]
