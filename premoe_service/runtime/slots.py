"""Slots: fused expert parameters sized for C resident experts, and the bookkeeping of who sits where."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import FailedPrecondition
from ..experts import bytes_view
from .slot_book import LOADING, NO_INDEX, RESIDENT, SlotBook, SlotPlan


def expert_params(experts: nn.Module) -> dict[str, nn.Parameter]:
    """The fused per-expert parameters of an experts module (leading dim = experts or slots)."""
    return dict(experts.named_parameters(recurse=False))


def install_slots(experts: nn.Module, capacity: int, device: torch.device | str | None = None) -> None:
    """Resize a transformers experts module to `capacity` slots, in place, keeping its class and forward.

    The module's own forward indexes its fused parameters by the ids the router hands it, and bounds
    them by `num_experts`; with slot ids from a masked router it computes over the slots. New slots are
    zero until an expert is written into them.
    """
    for name, param in expert_params(experts).items():
        target = device if device is not None else param.device
        slots = torch.zeros((capacity, *param.shape[1:]), dtype=param.dtype, device=target)
        setattr(experts, name, nn.Parameter(slots, requires_grad=False))
    setattr(experts, "num_experts", capacity)  # noqa: B010 - typed as Module attribute


@torch.no_grad()
def write_slot(experts: nn.Module, slot: int, tensors: Mapping[str, Tensor]) -> None:
    """Copy one expert's tensors into slot `slot` of the experts module."""
    params = expert_params(experts)
    if set(tensors) != set(params):
        odd = sorted(set(tensors) ^ set(params))
        raise FailedPrecondition(
            f"expert tensors {sorted(tensors)} do not match the slot parameters {sorted(params)}: the expert source "
            "holds another model's experts",
            field=odd[0],
        )
    for name, tensor in tensors.items():
        target = params[name][slot]
        if target.device.type == "cpu" and tensor.device.type == "cpu" and target.dtype == tensor.dtype:
            # A plain single-threaded memcpy: torch's copy_ fans out over OpenMP threads, which stalls
            # badly when the cores are busy (a serving process always is) and buys nothing for memory-bound work.
            np.copyto(bytes_view(target), bytes_view(tensor))
        else:
            target.copy_(tensor, non_blocking=True)


def slot_buffers(experts: nn.Module, slot: int, names: Sequence[str]) -> list[memoryview]:
    """The memory of slot `slot`, one writable buffer per expert part in `names` order (CPU slots only)."""
    params = expert_params(experts)
    return [memoryview(bytes_view(params[name][slot])) for name in names]  # type: ignore[arg-type]


class LayerSlots:
    """Which expert sits in which slot of one MoE layer, with recency and pins for eviction: one row of a
    `SlotBook` (the engine's book of all layers, or a book of its own).

    Planning for many layers at once goes through the book (`Residency`); these per-layer methods serve
    single layers (quantized banks, layer-streamed profiling) and read like the decisions they make.

    Args:
        capacity: Slots in this layer (a layer of its own; ignored with `book`).
        num_experts: Experts of the layer (a layer of its own).
        book: The book this layer is a row of.
        row: Its row.
    """

    def __init__(self, capacity: int = 0, num_experts: int = 0, *, book: SlotBook | None = None, row: int = 0) -> None:
        self.book = book if book is not None else SlotBook([capacity], num_experts)
        self.row = row

    @property
    def capacity(self) -> int:
        return int(self.book.capacity[self.row])

    @property
    def version(self) -> int:
        return int(self.book.version[self.row])

    @property
    def slot_of(self) -> dict[int, int]:
        """Expert id -> slot, for routable (resident) experts."""
        experts = np.flatnonzero(self.book.state[self.row] == RESIDENT)
        return dict(zip(experts.tolist(), self.book.slot[self.row, experts].tolist(), strict=True))

    @property
    def loading(self) -> dict[int, int]:
        """Expert id -> slot reserved for it while its bytes are being copied (not routable until `commit`)."""
        experts = np.flatnonzero(self.book.state[self.row] == LOADING)
        return dict(zip(experts.tolist(), self.book.slot[self.row, experts].tolist(), strict=True))

    @property
    def pins(self) -> dict[int, int]:
        """Expert id -> leases holding it, for pinned experts only."""
        pins = self.book.pins[self.row]
        experts = np.flatnonzero(pins)
        return dict(zip(experts.tolist(), pins[experts].tolist(), strict=True))

    @property
    def expert_in_slot(self) -> list[int | None]:
        """Slot -> expert, None when free."""
        row = self.book.expert_in_slot[self.row, : self.capacity].tolist()
        return [None if expert < 0 else expert for expert in row]

    def resident(self) -> set[int]:
        return set(np.flatnonzero(self.book.state[self.row] == RESIDENT).tolist())

    def assign(self, wanted: Iterable[int]) -> list[tuple[int, int]]:
        """Slots for the wanted experts not yet resident nor loading: free slots first, then the slots of
        victims (least recently used unpinned experts outside `wanted`). Returns (expert, slot) pairs in
        expert order; raises naming the layer (the book's name of the row) when they cannot fit. Changes nothing."""
        plan = self.book.plan(self._mask(wanted)[None], np.array([self.row]))
        return list(zip(plan.experts.tolist(), plan.slots.tolist(), strict=True))

    def victims(self, evictable: Collection[int], count: int) -> list[int]:
        """The `count` experts to evict among `evictable` ones (resident, unpinned, not wanted), in eviction
        order: least recently used first, ties to the lower expert id."""
        mask = self._mask(evictable)[None]
        return self.book.victims(np.array([self.row]), mask, np.array([count]))[1].tolist()

    def pin(self, experts: Iterable[int]) -> None:
        self.book.pins[self.row] += self._mask(experts)

    def evict_slot(self, slot: int) -> int | None:
        """Free a slot; returns the expert that was there."""
        expert = int(self.book.expert_in_slot[self.row, slot])
        if expert < 0:
            return None
        self.book.evict(np.array([self.row]), np.array([expert]))
        return expert

    def reserve(self, expert: int, slot: int) -> int | None:
        """Give `slot` to `expert`, whose bytes are about to be copied in; returns the expert evicted from it.
        The expert becomes routable only at `commit`."""
        evicted = self.evict_slot(slot)
        one = np.array([self.row]), np.array([expert]), np.array([slot])
        self.book.reserve(SlotPlan(*one, victim_rows=NO_INDEX, victim_experts=NO_INDEX))
        return evicted

    def commit(self, expert: int) -> None:
        """The copy into the reserved slot completed: the expert is resident and routable."""
        self.book.commit(np.array([self.row]), np.array([expert]))

    def abort(self, expert: int) -> None:
        """The copy failed: free the reserved slot."""
        self.book.abort(np.array([self.row]), np.array([expert]))

    def place(self, expert: int, slot: int) -> None:
        """Put `expert` into `slot` (free or just evicted), resident at once."""
        self.reserve(expert, slot)
        self.commit(expert)

    def touch(self, experts: Iterable[int], tick: int) -> None:
        self.book.last_used[self.row, list(experts)] = tick

    def slot_table(self, num_experts: int) -> Tensor:
        """Long [E]: the slot of each expert, -1 where not resident."""
        return torch.from_numpy(self.book.table(self.row)[:num_experts].copy())

    def _mask(self, experts: Iterable[int]) -> np.ndarray:
        ids = np.fromiter(experts, dtype=np.int64)
        mask = np.zeros(self.book.num_experts, dtype=bool)
        mask[ids] = True
        return mask
