"""Slots: fused expert parameters sized for C resident experts, and the bookkeeping of who sits where."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
        pins: Expert id -> number of leases holding it; pinned experts are never evicted.
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

    def plan(self, wanted: Iterable[int], layer: int) -> list[tuple[int, int]]:
        """Slots for the wanted experts not yet resident: free slots first, then the least recently used
        unpinned experts outside `wanted`. Returns (expert, slot) pairs; raises when they cannot fit."""
        wanted = set(wanted)
        missing = sorted(wanted - self.slot_of.keys() - self.loading.keys())
        if not missing:
            return []
        free = [slot for slot, expert in enumerate(self.expert_in_slot) if expert is None]
        victims = sorted(
            (e for e in self.slot_of if e not in wanted and not self.pins.get(e)),
            key=lambda e: (self.last_used.get(e, -1), e),
        )
        if len(missing) > len(free) + len(victims):
            raise ResourceExhausted(
                f"needs {len(missing)} more slots but only {len(free) + len(victims)} of {self.capacity} are "
                "free or evictable (the rest hold wanted or pinned experts)",
                field=f"layer {layer}",
            )
        slots = free + [self.slot_of[e] for e in victims]
        return list(zip(missing, slots[: len(missing)], strict=True))

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

    def touch(self, experts: Iterable[int], tick: int) -> None:
        for expert in experts:
            self.last_used[expert] = tick

    def slot_table(self, num_experts: int) -> Tensor:
        """Long [E]: the slot of each expert, -1 where not resident."""
        table = torch.full((num_experts,), -1, dtype=torch.long)
        for expert, slot in self.slot_of.items():
            table[expert] = slot
        return table
