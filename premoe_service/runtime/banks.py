"""Slot banks beside an experts module's own slots, and the forward that computes with them.

Slot ids of a layer form one space: `[0, C)` are the full-precision slots (the experts module's own fused
parameters), then each bank in turn: the quantized banks (`runtime.quantized`), then the channel banks
(`runtime.channel_slots`). The masked router hands out these ids as it always does. A thin wrapper around the
experts module's forward handles a pass that hits bank slots: for modules of transformers' experts interface (every
family here), slot by slot (`hit_bank_slots`): each hit bank slot's weights are read once (a quantized bank
dequantizes all its hit slots in one call, a channel slot is read at its own width) and multiplied in place, full
slots are views of the module's parameters, and a wide pass sends its full-slot pairs through transformers' grouped
kernel. Nothing is padded. For other modules, it gathers the hit slots' weights, stacks them with the hit
full-precision slots and calls transformers' forward on that stack with the slot ids renumbered; slots of different
widths (a channel slot holds `k` of the expert's `I` intermediate channels) are then padded to the widest hit one
with zero channels, which add nothing in every family's activation (`families.channels.pad_channels`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from ..errors import FailedPrecondition
from ..families.channels import pad_channels
from .experts_forward import (
    HIT_PAIRS_PER_EXPERT,
    Weights,
    eager_forward,
    follows_interface,
    grouped_dtype,
    grouped_with_skips,
    replace_forward,
    run_hit,
)
from .slots import expert_params

_TRANSPOSED = frozenset({"gpt_oss"})  # families whose down projection is [I, H] (families.channels)


class Bank(Protocol):
    """Slots of one kind in one layer, at slot ids `[offset, offset + capacity)` of the layer's id space."""

    offset: int

    @property
    def capacity(self) -> int: ...

    def weight(self, part: str, slot: int) -> Tensor:
        """One slot's parameter `part` in the runtime layout and the model's dtype (`slot` counts from 0)."""
        ...


def banks_end(experts: nn.Module) -> int:
    """One past the last slot id of every bank of the module (its own capacity when it has none)."""
    banks = [b for kind in getattr(experts, "_premoe_banks", {}).values() for b in kind]
    if banks:
        return max(b.offset + b.capacity for b in banks)
    first = next(iter(expert_params(experts).values()))
    return int(first.shape[0])


def install_banks(experts: nn.Module, kind: str, banks: Sequence[Bank], family: str) -> None:
    """Give the experts module `banks` of `kind` (replacing its earlier banks of that kind) and a forward that
    computes with every bank it holds (see the module doc)."""
    registry: dict[str, list[Bank]] = getattr(experts, "_premoe_banks", None) or {}
    registry[kind] = list(banks)
    setattr(experts, "_premoe_banks", registry)  # noqa: B010 - a plain attribute of this module
    original: Callable[..., Tensor] = getattr(experts, "_premoe_forward", None) or eager_forward(experts)
    # A second install wraps transformers' forward, not the first wrap.
    setattr(experts, "_premoe_forward", original)  # noqa: B010 - typed as Module attribute
    call: Callable[..., Tensor] = original.__func__  # type: ignore[attr-defined]  # the class forward, for a view
    transposed = family in _TRANSPOSED

    def ordered() -> list[Bank]:
        return sorted((b for kind in registry.values() for b in kind), key=lambda b: b.offset)

    def slot_weights(names: list[str], slot: int, full_capacity: int, banks: list[Bank]) -> dict[str, Tensor]:
        if slot < full_capacity:
            return {name: experts._parameters[name][slot] for name in names}  # type: ignore[index]
        for bank in banks:
            if bank.offset <= slot < bank.offset + bank.capacity:
                return {name: bank.weight(name, slot - bank.offset) for name in names}
        raise FailedPrecondition(f"slot {slot} is outside every slot bank", field="slot")

    def width(tensors: dict[str, Tensor]) -> int:
        down = tensors["down_proj"]
        return int(down.shape[0] if transposed else down.shape[1])

    def forward(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        names = list(expert_params(experts))
        full_capacity = experts._parameters[names[0]].shape[0]  # type: ignore[union-attr]
        down = experts._parameters["down_proj"]  # [C, H, I], or [C, I, H] transposed
        full_width = int(down.shape[1] if transposed else down.shape[2])  # type: ignore[union-attr]
        if top_k_index.numel() == 0 or int(top_k_index.max()) < full_capacity:  # full slots only, nothing skipped
            return original(hidden_states, top_k_index, top_k_weights)
        banks = ordered()
        skip = max((b.offset + b.capacity for b in banks), default=full_capacity)  # a skipped pair's id
        used = top_k_index[top_k_index < skip]
        if used.numel() == 0 or int(used.max()) < full_capacity:  # full slots and skipped pairs
            return original(hidden_states, top_k_index.clamp(max=full_capacity), top_k_weights)
        if follows_interface(experts):
            return hit_bank_slots(experts, hidden_states, top_k_index, top_k_weights, full_capacity, skip, banks, names)
        hit = torch.unique(used)  # [n] slot ids, ascending
        renumber = torch.full((skip + 1,), hit.numel(), dtype=top_k_index.dtype, device=top_k_index.device)
        renumber[hit] = torch.arange(hit.numel(), dtype=top_k_index.dtype, device=top_k_index.device)
        weights = [slot_weights(names, s, full_capacity, banks) for s in hit.tolist()]
        widths = [width(w) for w in weights]
        # Channel slots of other widths get zero channels up to the widest, rounded up to 16 bytes of channels
        # (grouped matmuls want 16-byte strides; a full slot's width is the model's own).
        align = max(1, 16 // weights[0]["down_proj"].element_size())
        widest = max(widths)
        widest = widest if widest == full_width else -(-widest // align) * align
        if min(widths) != widest:
            weights = [
                w if n == widest else pad_channels(family, w, widest) for w, n in zip(weights, widths, strict=True)
            ]
        # Transformers' forward runs on a shallow copy whose parameters are the hit slots' weights: the module
        # itself never changes, since the loader thread writes other slots of it meanwhile.
        view = copy.copy(experts)
        view._parameters = {name: torch.stack([w[name] for w in weights]) for name in names}  # type: ignore[misc]
        setattr(view, "num_experts", len(weights))  # noqa: B010
        for attr in ("intermediate_dim", "intermediate_size"):  # the view's width, should a forward read it
            if hasattr(view, attr):
                setattr(view, attr, widest)
        return call(view, hidden_states, renumber[top_k_index], top_k_weights)

    replace_forward(experts, forward)  # this module's forward only


def hit_bank_slots(
    experts: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    full_capacity: int,
    skip: int,
    banks: list[Bank],
    names: list[str],
) -> Tensor:
    """A pass that hits bank slots, computed slot by slot (`experts_forward.run_hit`): each hit bank slot's weights
    are read (dequantized) once and used at their own width, full slots are views of the module's parameters;
    nothing is stacked or padded. A wide pass (past `HIT_PAIRS_PER_EXPERT` pairs per full slot, in a dtype the
    grouped kernel takes) runs its full-slot pairs through transformers' grouped kernel over the module's slots and
    adds the bank pairs' outputs: each pair is counted once, in one of the two sums."""
    weights = Weights(experts)
    read = _read_hit(top_k_index, full_capacity, skip, banks, names)

    def bank_out(x: Tensor, slot: int) -> Tensor:
        if slot < full_capacity:
            return weights.expert(experts, x, slot)
        return weights.of(experts, x, read(slot))

    tokens, top_k = top_k_index.shape
    if tokens * top_k <= HIT_PAIRS_PER_EXPERT * full_capacity or not grouped_dtype(hidden_states):
        return run_hit(hidden_states, top_k_index, top_k_weights, skip, bank_out)
    in_full = top_k_index < full_capacity
    bank_ids = torch.where(in_full, skip, top_k_index)  # full pairs skipped here
    banked = run_hit(hidden_states, bank_ids, top_k_weights, skip, bank_out)
    if not bool(in_full.any()):
        return banked
    full_ids = torch.where(in_full, top_k_index, full_capacity)  # bank pairs skipped by the grouped kernel
    return grouped_with_skips(experts, hidden_states, full_ids, top_k_weights) + banked


def _read_hit(
    top_k_index: Tensor, full_capacity: int, skip: int, banks: list[Bank], names: list[str]
) -> Callable[[int], dict[str, Tensor]]:
    """Slot id -> the bank slot's weights by parameter name. A bank that reads several slots at once (`weights`:
    the quantized banks dequantize them in one pass, fewer and larger operations) reads every slot the pass hits in
    it now; the others are read when asked."""
    hit = top_k_index[(top_k_index >= full_capacity) & (top_k_index < skip)]
    slots = torch.unique(hit).tolist() if hit.numel() > 1 else hit.tolist()
    read: dict[int, dict[str, Tensor]] = {}
    for bank in banks:
        many = getattr(bank, "weights", None)
        mine = [s - bank.offset for s in slots if bank.offset <= s < bank.offset + bank.capacity]
        if many is None or len(mine) < 2:
            continue
        stacked = {name: many(name, mine) for name in names}
        for i, slot in enumerate(mine):
            read[slot + bank.offset] = {name: tensor[i] for name, tensor in stacked.items()}

    def weights(slot: int) -> dict[str, Tensor]:
        found = read.get(slot)
        if found is not None:
            return found
        for bank in banks:
            if bank.offset <= slot < bank.offset + bank.capacity:
                return {name: bank.weight(name, slot - bank.offset) for name in names}
        raise FailedPrecondition(f"slot {slot} is outside every slot bank", field="slot")

    return weights
