"""Slots: fused expert parameters sized for C resident experts, and the bookkeeping of who sits where."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import FailedPrecondition, ResourceExhausted
from ..experts import bytes_view


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


@dataclass
class LayerSlots:
    """Which expert sits in which slot of one MoE layer, with recency and pins for eviction.

    Attributes:
        capacity: Slots in this layer.
        expert_in_slot: Slot -> expert id, None when free.
        slot_of: Expert id -> slot, for resident experts.
        last_used: Expert id -> tick of its last use (for least-recently-used eviction).
        pins: Expert id -> number of leases holding it (always >= 1: an expert without pins has no entry);
            pinned experts are never evicted.
        loading: Expert id -> slot reserved for it while its bytes are being copied; such an expert is not
            routable (absent from `slot_of`) until `commit`.
    """

    capacity: int
    expert_in_slot: list[int | None] = field(default_factory=list)
    slot_of: dict[int, int] = field(default_factory=dict)
    last_used: dict[int, int] = field(default_factory=dict)
    pins: dict[int, int] = field(default_factory=dict)
    loading: dict[int, int] = field(default_factory=dict)
    version: int = 0  # bumped whenever an expert moves in or out, so derived tables can be cached

    def __post_init__(self) -> None:
        if not self.expert_in_slot:
            self.expert_in_slot = [None] * self.capacity

    def resident(self) -> set[int]:
        return set(self.slot_of)

    def assign(self, wanted: Iterable[int], layer: int) -> list[tuple[int, int]]:
        """Slots for the wanted experts not yet resident: free slots first, then the slots of `victims`
        (least recently used unpinned experts outside `wanted`). Returns (expert, slot) pairs in expert
        order; raises when they cannot fit."""
        # Runs for every MoE layer of every request (58 per request on DeepSeek-V3), so the common paths are
        # set operations in C: nothing missing, or victims from resident - wanted - pinned.
        wanted = wanted if isinstance(wanted, set | frozenset) else set(wanted)
        missing = wanted - self.slot_of.keys()
        if self.loading:
            missing -= self.loading.keys()
        if not missing:
            return []
        full = len(self.slot_of) + len(self.loading) >= self.capacity  # every slot holds or awaits an expert
        free = [] if full else [slot for slot, expert in enumerate(self.expert_in_slot) if expert is None]
        short = len(missing) - len(free)
        if short > 0:
            evictable = self.slot_of.keys() - wanted - self.pins.keys()
            if short > len(evictable):
                raise ResourceExhausted(
                    f"needs {len(missing)} more slots but only {len(free) + len(evictable)} of {self.capacity} are "
                    "free or evictable (the rest hold wanted or pinned experts)",
                    field=f"layer {layer}",
                )
            slot_of = self.slot_of
            free += [slot_of[e] for e in self.victims(evictable, short)]
        return list(zip(sorted(missing), free[: len(missing)], strict=True))

    def victims(self, evictable: Collection[int], count: int) -> list[int]:
        """The `count` experts to evict among `evictable` ones (resident, unpinned, not wanted), in eviction
        order: least recently used first, ties to the lower expert id."""
        last_used = self.last_used
        order = sorted(evictable)  # ids ascending, then a stable sort by recency: ties stay in id order
        try:
            order.sort(key=last_used.__getitem__)  # `place` gives every resident expert a stamp
        except KeyError:
            order = sorted(sorted(evictable), key=lambda e: last_used.get(e, -1))
        return order[:count]

    def reserve_all(self, plan: Iterable[tuple[int, int]]) -> int:
        """`reserve` for each (expert, slot) pair of an assignment; returns how many experts were evicted."""
        expert_in_slot, slot_of, last_used, loading = self.expert_in_slot, self.slot_of, self.last_used, self.loading
        evicted = 0
        for expert, slot in plan:  # `reserve` inlined: a switch at DeepSeek-V3 scale reserves thousands
            old = expert_in_slot[slot]
            if old is not None:
                del slot_of[old]
                last_used.pop(old, None)
                evicted += 1
            expert_in_slot[slot] = expert
            loading[expert] = slot
        self.version += evicted
        return evicted

    def evict_slot(self, slot: int) -> int | None:
        """Free a slot; returns the expert that was there."""
        expert = self.expert_in_slot[slot]
        if expert is not None:
            self.version += 1
            del self.slot_of[expert]
            self.last_used.pop(expert, None)
            self.expert_in_slot[slot] = None
        return expert

    def reserve(self, expert: int, slot: int) -> int | None:
        """Give `slot` to `expert`, whose bytes are about to be copied in; returns the expert evicted from it.
        The expert becomes routable only at `commit`."""
        evicted = self.evict_slot(slot)
        self.expert_in_slot[slot] = expert
        self.loading[expert] = slot
        return evicted

    def commit(self, expert: int) -> None:
        """The copy into the reserved slot completed: the expert is resident and routable."""
        self.place(expert, self.loading.pop(expert))

    def abort(self, expert: int) -> None:
        """The copy failed: free the reserved slot."""
        slot = self.loading.pop(expert)
        self.expert_in_slot[slot] = None

    def place(self, expert: int, slot: int) -> None:
        self.version += 1
        self.expert_in_slot[slot] = expert
        self.slot_of[expert] = slot
        self.last_used.setdefault(expert, -1)  # never used yet: first in line for eviction

    def touch(self, experts: Iterable[int], tick: int) -> None:
        self.last_used.update(dict.fromkeys(experts, tick))

    def slot_table(self, num_experts: int) -> Tensor:
        """Long [E]: the slot of each expert, -1 where not resident."""
        table = torch.full((num_experts,), -1, dtype=torch.long)
        for expert, slot in self.slot_of.items():
            table[expert] = slot
        return table
