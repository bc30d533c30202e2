"""Demotion under memory pressure: full-precision slots lent out as room for experts at a lower precision.

`premoe serve --under-pressure demote` serves a request whose experts do not fit at full precision next to the ones
running requests pin from a lower-precision copy of the store (`--demote-to`, int8 by default) instead of making it
wait. The room comes from the budget itself: a full-precision slot that is free (or holds an unpinned expert nobody
waits for) is *lent*: its memory holds `k` experts of the lower precision (`k` = how many of the copy's packed
tensors fit in a full slot's bytes: 3 int8 or 7 int4 experts of an fp32 model), written straight into the slot's
own tensors. No memory is allocated for them, so the resident bytes never exceed the budget.

- `LentBank` is the lower precision's bank of each MoE layer (`runtime.quantized`): `C x k` sub-slots, each a set of
  views into the bytes of one full slot (sub-slot `q` lies in full slot `q // k`). Its slot book starts with every
  sub-slot `BLOCKED`. `attach_lending` gives a patterned model these banks (beside any `--precision-slots` ones).
- `Lending` moves slots between the two books of a layer row: lending a full slot blocks it in the full book and
  unblocks its `k` sub-slots; taking it back evicts what the sub-slots hold (never a pinned expert) and does the
  reverse. `Residency` calls `make_room` when a pattern's plan is short: full slots are lent for the lower
  precision's experts, lent slots are taken back for full-precision ones (promotion: the next request of a
  demoted task gets its experts at full precision as soon as they fit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InvalidArgument
from ..store.manifest import DTYPES
from ..store.quantized_copies import QuantizedCopy
from .quantized import LentPrecision, QuantizedBank, QuantizedSlots, attach_precisions
from .slot_book import ABSENT, BLOCKED, FREE, RESIDENT, SlotBook
from .slots import LayerSlots, expert_params

_ALIGN = 16  # bytes: every view starts at a multiple (int32 and float views need their own alignment)


def _kinds() -> dict[str, torch.dtype]:
    return {**DTYPES, "int32": torch.int32}


def per_full_slot(copy: QuantizedCopy, experts: nn.Module) -> int:
    """How many experts of `copy` fit in the bytes of one full-precision slot of `experts`."""
    return len(_placements(copy, experts))


Placement = dict[tuple[str, str], tuple[str, int]]  # (part, tensor kind) -> (parameter, byte offset in its slot)


def _placements(copy: QuantizedCopy, experts: nn.Module) -> list[Placement]:
    """Where each sub-slot's tensors lie in one full slot: the copy's tensors of sub-slot 0, 1, ... placed in turn,
    each in the first of the slot's parameters (in their order) with room left, aligned; as many sub-slots as fit
    whole."""
    params = expert_params(experts)
    room = {name: p[0].numel() * p.element_size() for name, p in params.items()}
    cursor = dict.fromkeys(room, 0)
    kinds = _kinds()
    out: list[Placement] = []
    while True:
        place: Placement = {}
        for entry in copy.layout:
            nbytes = math.prod(entry.shape) * kinds[entry.dtype].itemsize
            home = next((name for name in room if cursor[name] + nbytes <= room[name]), None)
            if home is None:
                return out
            place[(entry.part, entry.tensor)] = (home, cursor[home])
            cursor[home] += -(-nbytes // _ALIGN) * _ALIGN
        out.append(place)


class _SubSlots:
    """One tensor kind of a lent bank: sub-slot `q` -> the view of its bytes in full slot `q // k`."""

    def __init__(self, views: list[Tensor]) -> None:
        self.views = views  # per position j within a full slot: `[C, *shape]`

    def __getitem__(self, q: int) -> Tensor:
        k = len(self.views)
        return self.views[q % k][q // k]


class LentBank(QuantizedBank):
    """A lower precision's slots of one MoE layer inside the memory of its full-precision slots (see the module
    doc). Reads and writes go through `QuantizedBank`; it holds no memory of its own (`nbytes` is 0)."""

    def __init__(
        self,
        copy: QuantizedCopy,
        experts: nn.Module,
        offset: int,
        dtype: torch.dtype,
        slots: LayerSlots,
        per_slot: int,
    ) -> None:
        params = expert_params(experts)
        self.copy, self.offset, self.dtype, self.slots = copy, offset, dtype, slots
        self.shapes = {name: tuple(p.shape[1:]) for name, p in params.items()}
        placements = _placements(copy, experts)[:per_slot]
        self.per_slot = per_slot
        kinds = _kinds()
        tensors: dict[tuple[str, str], Any] = {}
        for entry in copy.layout:
            kind = kinds[entry.dtype]
            nbytes = math.prod(entry.shape) * kind.itemsize
            views = []
            for place in placements:
                name, start = place[(entry.part, entry.tensor)]
                param = params[name]
                full = param.shape[0]
                raw = param.data.view(full, -1).view(torch.uint8)  # [C, bytes of one full slot]
                views.append(raw[:, start : start + nbytes].view(kind).view(full, *entry.shape))
            tensors[(entry.part, entry.tensor)] = _SubSlots(views)
        self.tensors = tensors

    @property
    def nbytes(self) -> int:
        return 0  # the full slots' memory


class Lending:
    """Lends full-precision slots to one lower precision's bank in every MoE layer (see the module doc).

    Args:
        full: The full-precision slot book.
        lent: The lower precision's slot book (`C x k` sub-slots per row, blocked until lent).
        per_slot: `k`, sub-slots per full slot.
        precision: The lower precision.
    """

    def __init__(self, full: SlotBook, lent: SlotBook, per_slot: int, precision: str) -> None:
        self.full, self.lent, self.k, self.precision = full, lent, per_slot, precision
        self.lends = 0  # full slots lent since start
        self.returns = 0  # lent slots given back

    def lent_slots(self, row: int) -> np.ndarray:
        """The full slots of `row` that are lent now."""
        return np.flatnonzero(self.full.expert_in_slot[row] == BLOCKED)

    def make_room(self, books: list[tuple[SlotBook, np.ndarray, Any]]) -> bool:
        """Lend or take back slots so that every book of `books` (a pattern's `(book, wanted [R, E], offsets)`)
        has room for its missing experts; True when something moved. Books other than these two are left
        alone; a book that still cannot fit makes the caller's plan fail as before."""
        moved = False
        full_wanted = next((w for b, w, _ in books if b is self.full), None)
        lent_wanted = next((w for b, w, _ in books if b is self.lent), None)
        if full_wanted is not None:
            moved |= self._take_back(full_wanted, lent_wanted)
        if lent_wanted is not None:
            moved |= self._lend(lent_wanted, full_wanted)
        return moved

    # --- moves

    def _lend(self, wanted: np.ndarray, full_wanted: np.ndarray | None) -> bool:
        """Lend full slots in the rows whose lower-precision experts are short of room: free full slots first, then
        slots of unpinned full experts that `full_wanted` does not hold (least recently used first). All rows or
        none: when some row cannot get enough, nothing moves."""
        short = self._short(self.lent, wanted)
        if not (short > 0).any():
            return False
        keep = full_wanted if full_wanted is not None else np.zeros_like(wanted)
        moves: list[tuple[int, list[int], np.ndarray]] = []
        for row in np.flatnonzero(short > 0).tolist():
            count = -(-int(short[row]) // self.k)
            free = np.flatnonzero(self.full.expert_in_slot[row] == FREE)[:count].tolist()
            evictable = (self.full.state[row] == RESIDENT) & (self.full.pins[row] == 0) & ~keep[row]
            more = count - len(free)
            victims = np.zeros(0, dtype=np.int64)
            if more > 0:
                if int(np.count_nonzero(evictable)) < more:
                    return False
                _, victims = self.full.victims(np.array([row]), evictable[None], np.array([more]))
            moves.append((row, free, victims))
        for row, free, victims in moves:
            slots = list(free)
            if victims.size:
                slots += self.full.slot[row, victims].tolist()
                self.full.evict(np.full(victims.size, row), victims)
            for slot in slots:
                self.full.block(row, np.array([slot]))
                self.lent.unblock(row, self._subs(slot))
                self.lends += 1
        return True

    def _take_back(self, wanted: np.ndarray, lent_wanted: np.ndarray | None) -> bool:
        """Take back lent slots in the rows whose full-precision experts are short of room: slots whose sub-slots
        are all free first, then those whose experts are all unpinned and not in `lent_wanted` (evicted)."""
        short = self._short(self.full, wanted)
        if not (short > 0).any():
            return False
        keep = lent_wanted if lent_wanted is not None else np.zeros_like(wanted)
        moved = False
        for row in np.flatnonzero(short > 0).tolist():
            candidates = []
            for slot in self.lent_slots(row).tolist():
                held = self.lent.expert_in_slot[row, self._subs(slot)]
                experts = held[held >= 0]
                if (self.lent.pins[row, experts] > 0).any() or keep[row, experts].any():
                    continue
                if (self.lent.state[row, experts] != RESIDENT).any():  # a copy in flight
                    continue
                recency = int(self.lent.last_used[row, experts].max()) if experts.size else -2
                candidates.append((recency, slot, experts))
            candidates.sort(key=lambda c: (c[0], c[1]))
            for _, slot, experts in candidates[: int(short[row])]:
                if experts.size:
                    self.lent.evict(np.full(experts.size, row), experts)
                self._return(row, slot)
                moved = True
        return moved

    def _return(self, row: int, slot: int) -> None:
        self.lent.block(row, self._subs(slot))
        self.full.unblock(row, np.array([slot]))
        self.returns += 1

    def _subs(self, slot: int) -> np.ndarray:
        return np.arange(slot * self.k, (slot + 1) * self.k)

    @staticmethod
    def _short(book: SlotBook, wanted: np.ndarray) -> np.ndarray:
        """Per row: missing wanted experts beyond the free slots and the slots of evictable experts."""
        need = np.count_nonzero(wanted & (book.state == ABSENT), axis=1)
        free = np.count_nonzero(book.expert_in_slot == FREE, axis=1)
        evictable = np.count_nonzero((book.state == RESIDENT) & ~wanted & (book.pins == 0), axis=1)
        return need - free - evictable

    def counts(self) -> dict[str, int]:
        """`lent_slots`: full slots lent now, over all layers; `demoted_experts`: experts resident in them."""
        return {
            "lent_slots": int(np.count_nonzero(self.full.expert_in_slot == BLOCKED)),
            "demoted_experts": int(np.count_nonzero(self.lent.state == RESIDENT)),
        }


def attach_lending(patterned: Any, store: Any, capacity: Mapping[str, Any], demote_to: str) -> QuantizedSlots:
    """`attach_precisions` for `capacity`, plus `demote_to` served from lent full-precision slots: its bank in every
    layer is a `LentBank`, and `patterned.lending` moves slots between the books."""
    from ..store.quantized_copies import PrecisionReader

    if demote_to in capacity:
        raise InvalidArgument(
            f"{demote_to} experts would have slots of their own and lent ones: drop {demote_to} from --precision-slots "
            "or demote to another precision",
            field="demote_to",
        )
    first = patterned.experts_module(patterned.spec.moe_layers[0])
    per_slot = per_full_slot(PrecisionReader(store, demote_to).copy, first)
    if per_slot < 2:
        raise InvalidArgument(
            f"a full-precision slot holds {per_slot} {demote_to} expert: demoting to it frees no room (choose a lower "
            "precision)",
            field="demote_to",
        )

    def bank(copy: QuantizedCopy, experts: nn.Module, offset: int, dtype: torch.dtype, slots: LayerSlots) -> LentBank:
        return LentBank(copy, experts, offset, dtype, slots, per_slot)

    quantized = attach_precisions(patterned, store, capacity, LentPrecision(demote_to, per_slot, bank))
    patterned.lending = Lending(patterned.book, quantized.book(demote_to), per_slot, demote_to)
    return quantized
