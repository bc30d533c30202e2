"""The slot book: who sits in which slot of every MoE layer, as arrays, so that planning a task switch is a
few array operations over all layers at once instead of a loop over experts.

At DeepSeek-V3's shape (58 MoE layers x 256 experts) a task switch moves thousands of experts; planning it
expert by expert in Python costs milliseconds, while the same decisions over `[L, E]` arrays take tens of
microseconds per operation. Rows are MoE layers in model order; `LayerSlots` (`runtime.slots`) is one row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ResourceExhausted

ABSENT, LOADING, RESIDENT = 0, 1, 2  # an expert's state in its layer
# `expert_in_slot` entries: a free slot, a slot past the row's capacity, a slot that holds no expert of this book
# for now (a full slot lent to a lower precision's experts, or such a slot's share not lent; `runtime.lending`)
FREE, NO_SLOT, BLOCKED = -1, -2, -3
_NEVER = np.iinfo(np.int64).max  # the sort key of experts that may not be evicted


@dataclass(frozen=True)
class SlotPlan:
    """Copies to make (`rows[i]`, `experts[i]` into `slots[i]`) and the experts evicted for them."""

    rows: np.ndarray  # [N] int64
    experts: np.ndarray  # [N] int64, ascending within a row
    slots: np.ndarray  # [N] int64
    victim_rows: np.ndarray  # [V] int64
    victim_experts: np.ndarray  # [V] int64

    @property
    def size(self) -> int:
        return int(self.rows.size)


NO_INDEX = np.zeros(0, dtype=np.int64)
EMPTY_PLAN = SlotPlan(NO_INDEX, NO_INDEX, NO_INDEX, NO_INDEX, NO_INDEX)


class SlotBook:
    """Slot bookkeeping of several MoE layers, one row each.

    Attributes:
        names: A name per row for error messages (the layer ids).
        capacity: Slots per row. [R]
        expert_in_slot: The expert in each slot, `FREE` or `NO_SLOT` (past the row's capacity). [R, Cmax]
        slot: The slot of each resident or loading expert, -1 otherwise. [R, E]
        state: `ABSENT`, `LOADING` (slot reserved, bytes being copied: not routable) or `RESIDENT`. [R, E]
        pins: Leases holding each expert; pinned experts are never evicted. [R, E]
        last_used: Recency stamp of each expert, -1 when never used (first in line for eviction). [R, E]
        version: Bumped per row whenever an expert becomes or stops being routable. [R]
        use: When set, the primary eviction key (lowest first; `runtime.eviction`), recency breaks ties. [R, E]
    """

    def __init__(self, capacities: Sequence[int], num_experts: int, names: Sequence[object] | None = None) -> None:
        rows = len(capacities)
        self.names = list(names) if names is not None else list(range(rows))
        self.capacity = np.array(capacities, dtype=np.int64)
        self.expert_in_slot = np.full((rows, 0), NO_SLOT, dtype=np.int64)
        self.slot = np.full((rows, num_experts), -1, dtype=np.int64)
        self.state = np.zeros((rows, num_experts), dtype=np.int8)
        self.pins = np.zeros((rows, num_experts), dtype=np.int64)
        self.last_used = np.full((rows, num_experts), -1, dtype=np.int64)
        self.version = np.zeros(rows, dtype=np.int64)
        self.use: np.ndarray | None = None
        for row, capacity in enumerate(capacities):
            self.resize(row, capacity)

    @property
    def num_experts(self) -> int:
        return int(self.slot.shape[1])

    def resize(self, row: int, capacity: int) -> None:
        """Give `row` `capacity` empty slots (everything in it is dropped)."""
        if capacity > self.expert_in_slot.shape[1]:
            grown = np.full((len(self.capacity), capacity), NO_SLOT, dtype=np.int64)
            grown[:, : self.expert_in_slot.shape[1]] = self.expert_in_slot
            self.expert_in_slot = grown
        self.capacity[row] = capacity
        self.expert_in_slot[row] = NO_SLOT
        self.expert_in_slot[row, :capacity] = FREE
        self.slot[row], self.state[row], self.pins[row], self.last_used[row] = -1, ABSENT, 0, -1
        self.version[row] += 1

    def plan(self, wanted: np.ndarray, rows: np.ndarray | None = None) -> SlotPlan:
        """Slots for the wanted experts that are neither resident nor loading: free slots first (ascending),
        then the slots of victims (unpinned, unwanted residents; lowest `use`, then least recently used, then
        lowest id first). Changes nothing; raises `ResourceExhausted` naming the layer when they cannot fit.

        Args:
            wanted: Bool `[R, E]`, or `[len(rows), E]` for the given rows only.
            rows: Rows `wanted` covers (default: all, in order).
        """
        index = np.arange(len(self.capacity)) if rows is None else np.asarray(rows, dtype=np.int64)
        state = self.state if rows is None else self.state[index]
        missing = wanted & (state == ABSENT)  # [R', E]
        need = np.count_nonzero(missing, axis=1)
        if not need.any():
            return EMPTY_PLAN
        short = need - np.count_nonzero(self.expert_in_slot[index] == FREE, axis=1)
        victim_rows, victim_experts = NO_INDEX, NO_INDEX
        tight = np.flatnonzero(short > 0)
        if tight.size:
            rows_tight, state_tight, count = index[tight], state[tight], short[tight]
            evictable = (state_tight == RESIDENT) & ~wanted[tight] & (self.pins[rows_tight] == 0)  # [V, E]
            room = np.count_nonzero(evictable, axis=1)
            if (count > room).any():
                bad = int(np.argmax(count > room))
                row_of = int(rows_tight[bad])
                capacity = int(self.capacity[row_of])
                free = int(np.count_nonzero(self.expert_in_slot[row_of] == FREE))
                blocked = int(np.count_nonzero(self.expert_in_slot[row_of] == BLOCKED))
                lent = f", {blocked} lent to lower precisions" if blocked else ""
                raise ResourceExhausted(
                    f"needs {int(need[tight][bad])} more slots but only {free + int(room[bad])} of "
                    f"{capacity} are free or evictable (the rest hold wanted or pinned experts{lent})",
                    field=f"layer {self.names[int(rows_tight[bad])]}",
                )
            victim_rows, victim_experts = self.victims(rows_tight, evictable, count)
        busy = np.flatnonzero(need)
        free_rows, free_slots = _nonzero(self.expert_in_slot[index[busy]] == FREE)  # row-major: slots ascending
        target_rows = np.concatenate([index[busy][free_rows], victim_rows])
        target_slots = np.concatenate([free_slots, self.slot[victim_rows, victim_experts]])
        order = np.argsort(target_rows, kind="stable")  # per row: free slots, then victims in eviction order
        target_rows, target_slots = target_rows[order], target_slots[order]
        need_of = np.zeros(len(self.capacity), dtype=np.int64)
        need_of[index] = need
        place = np.arange(target_rows.size) - np.searchsorted(target_rows, target_rows)
        chosen = place < need_of[target_rows]
        missing_rows, missing_experts = _nonzero(missing)
        return SlotPlan(index[missing_rows], missing_experts, target_slots[chosen], victim_rows, victim_experts)

    def victims(self, rows: np.ndarray, evictable: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The `count[i]` experts to evict among the `evictable[i]` ones of each of `rows`, in eviction order
        (lowest `use` when set, then least recently used, then lowest id); as (rows, experts)."""
        experts = self.num_experts
        if self.use is None:
            # One unique key per expert, recency then id, so a plain sort gives the eviction order (several
            # times faster than a stable argsort); the expert id is the key's remainder.
            key = np.where(evictable, (self.last_used[rows] + 1) * experts + np.arange(experts), _NEVER)
            key.sort(axis=1)
            take_rows, take_rank = _nonzero(np.arange(experts) < count[:, None])
            return rows[take_rows], key[take_rows, take_rank] % experts
        recency = np.where(evictable, self.last_used[rows], _NEVER)
        order = np.lexsort((recency, np.where(evictable, self.use[rows], np.inf)), axis=-1)  # stable: ids ascending
        take_rows, take_rank = _nonzero(np.arange(experts) < count[:, None])
        return rows[take_rows], order[take_rows, take_rank]

    def reserve(self, plan: SlotPlan) -> int:
        """Evict the plan's victims and reserve its slots (experts LOADING); returns the experts evicted."""
        if plan.victim_rows.size:
            self._drop(plan.victim_rows, plan.victim_experts)
        self.expert_in_slot[plan.rows, plan.slots] = plan.experts
        self.slot[plan.rows, plan.experts] = plan.slots
        self.state[plan.rows, plan.experts] = LOADING
        return int(plan.victim_rows.size)

    def commit(self, rows: np.ndarray, experts: np.ndarray) -> None:
        """Their copies completed: the experts are resident and routable."""
        self.state[rows, experts] = RESIDENT
        self._bump(rows)

    def abort(self, rows: np.ndarray, experts: np.ndarray) -> None:
        """Their copies failed: free the reserved slots."""
        self.expert_in_slot[rows, self.slot[rows, experts]] = FREE
        self.slot[rows, experts] = -1
        self.state[rows, experts] = ABSENT

    def evict(self, rows: np.ndarray, experts: np.ndarray) -> None:
        """Take resident experts out of their slots (the slots become free)."""
        self.expert_in_slot[rows, self.slot[rows, experts]] = FREE
        self._drop(rows, experts)

    def block(self, row: int, slots: np.ndarray) -> None:
        """Take free slots of `row` out of use (`BLOCKED`): no expert of this book may sit there."""
        assert (self.expert_in_slot[row, slots] == FREE).all(), "only free slots are blocked"
        self.expert_in_slot[row, slots] = BLOCKED

    def unblock(self, row: int, slots: np.ndarray) -> None:
        """Give blocked slots of `row` back to use, free."""
        assert (self.expert_in_slot[row, slots] == BLOCKED).all(), "only blocked slots are unblocked"
        self.expert_in_slot[row, slots] = FREE

    def pin(self, wanted: np.ndarray) -> None:
        self.pins += wanted

    def unpin(self, wanted: np.ndarray, tick: int) -> None:
        """Drop one pin of each wanted expert and stamp them as used at `tick`."""
        self.pins -= wanted
        self.last_used[wanted] = tick

    def all_resident(self, wanted: np.ndarray) -> bool:
        return not (wanted & (self.state != RESIDENT)).any()

    def table(self, row: int) -> np.ndarray:
        """The slot of each expert of `row`, -1 where not routable. [E]"""
        return np.where(self.state[row] == RESIDENT, self.slot[row], -1)

    def _drop(self, rows: np.ndarray, experts: np.ndarray) -> None:
        self.slot[rows, experts] = -1
        self.state[rows, experts] = ABSENT
        self.last_used[rows, experts] = -1
        self._bump(rows)

    def _bump(self, rows: np.ndarray) -> None:
        if rows.size:
            self.version += np.bincount(rows, minlength=len(self.version))


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.nonzero` of a 2-D mask, row-major, through the flat index (several times faster)."""
    flat = np.flatnonzero(mask)
    return flat // mask.shape[1], flat % mask.shape[1]


def wanted_mask(rows: int, num_experts: int, kept: Sequence[Sequence[int]]) -> np.ndarray:
    """Bool `[rows, E]`: True where row i keeps the expert (`kept[i]` lists row i's experts)."""
    mask = np.zeros((rows, num_experts), dtype=bool)
    lengths = [len(k) for k in kept]
    if sum(lengths):
        mask[np.repeat(np.arange(rows), lengths), np.fromiter((e for k in kept for e in k), np.int64)] = True
    return mask
