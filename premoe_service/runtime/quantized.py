"""Quantized slots: per MoE layer and precision, slots that hold experts' packed bytes, dequantized in the forward.

Slot ids of a layer form one space: `[0, C)` are the full-precision slots (the experts module's own fused
parameters), then each precision's bank in turn. The masked router hands out these ids as it always does.
The experts module keeps transformers' forward: a thin wrapper around it dequantizes, for each forward pass,
only the quantized slots its tokens hit (group-wise, in torch ops, so the same code runs on CPU and CUDA),
stacks them with the hit full-precision slots, and calls transformers' forward on that stack with the slot
ids renumbered. Resident memory is the packed tensors; the dequantized weights live for one layer's call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import FailedPrecondition, InvalidArgument, PatternError
from ..experts import bytes_view
from ..pattern import FULL, Pattern
from ..store.manifest import DTYPES
from ..store.precisions import QuantizedCopy
from ..store.quant import QuantizedWeight, dequantize
from .slots import LayerSlots, expert_params

QuantizedTensors = dict[str, dict[str, Tensor]]  # part -> tensor kind -> one expert's tensor


class QuantizedSource(Protocol):
    """One precision's experts (a `PrecisionReader` over a store)."""

    copy: QuantizedCopy

    def read(self, layer: int, expert: int) -> QuantizedTensors: ...


class QuantizedBank:
    """The slots of one precision in one MoE layer: packed tensors `[C, ...]` and who sits where."""

    def __init__(
        self,
        copy: QuantizedCopy,
        capacity: int,
        offset: int,
        shapes: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.copy, self.offset, self.dtype = copy, offset, dtype
        self.shapes = dict(shapes)  # part -> one expert's runtime shape
        self.slots = LayerSlots(capacity)
        kinds = {**DTYPES, "int32": torch.int32}
        self.tensors = {
            (p.part, p.tensor): torch.zeros((capacity, *p.shape), dtype=kinds[p.dtype], device=device)
            for p in copy.layout
        }

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    @property
    def nbytes(self) -> int:
        """Bytes held, measured from the tensors themselves."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @torch.no_grad()
    def write(self, slot: int, expert: QuantizedTensors) -> None:
        for (part, kind), tensor in self.tensors.items():
            source, target = expert[part][kind], tensor[slot]
            if target.device.type == "cpu" and source.device.type == "cpu":
                # A plain memcpy, as `write_slot` does: torch's copy_ fans out over busy OpenMP threads.
                np.copyto(bytes_view(target), bytes_view(source))
            else:
                target.copy_(source, non_blocking=True)

    def weight(self, part: str, slot: int) -> Tensor:
        """One slot's parameter in the runtime layout and dtype (dequantized when it is a quantized weight)."""
        raw = self.tensors.get((part, "raw"))
        if raw is not None:  # a bias, or a float copy's tensor (bf16): computed in the model's dtype
            return raw[slot].to(self.dtype)
        copy, shape = self.copy, self.shapes[part]
        qw = QuantizedWeight(
            self.tensors[(part, "weight_packed")][slot],
            self.tensors[(part, "weight_scale")][slot],
            self.tensors[(part, "weight_zero_point")][slot],
        )
        if copy.transposed:
            return dequantize(qw, copy.bits, copy.group_size, (shape[1], shape[0]), self.dtype).t()
        return dequantize(qw, copy.bits, copy.group_size, (shape[0], shape[1]), self.dtype)


class QuantizedSlots:
    """Quantized slots of every MoE layer of a patterned model, one bank per precision.

    Args:
        engine: The patterned model (its full-precision slots are already installed).
        sources: Precision -> where its experts come from (a `PrecisionReader`).
        capacity: Precision -> slots per layer (one number, or per layer).
    """

    def __init__(self, engine: Any, sources: Mapping[str, QuantizedSource], capacity: Mapping[str, Any]) -> None:
        self.engine, self.sources = engine, dict(sources)
        self.banks: dict[int, dict[str, QuantizedBank]] = {}
        dtype = next(iter(expert_params(engine.experts_module(engine.spec.moe_layers[0])).values())).dtype
        for layer in engine.spec.moe_layers:
            experts = engine.experts_module(layer)
            params = expert_params(experts)
            shapes = {name: tuple(p.shape[1:]) for name, p in params.items()}
            offset = next(iter(params.values())).shape[0]
            banks = {}
            for precision, source in self.sources.items():
                count = capacity[precision] if isinstance(capacity[precision], int) else capacity[precision][layer]
                if not (isinstance(count, int) and 0 <= count <= engine.spec.num_experts):
                    raise InvalidArgument(
                        f"{count!r} {precision} slots: give 0..{engine.spec.num_experts} per layer",
                        field=f"capacity.{precision}",
                    )
                banks[precision] = QuantizedBank(source.copy, count, offset, shapes, dtype, engine.device)
                offset += count
            self.banks[layer] = banks
            _wrap_forward(experts, banks)

    def load(self, pattern: Pattern, layer_reports: list[tuple[int, int]], tick: int) -> None:
        """Write the pattern's missing quantized experts into their banks (planned for all layers first)."""
        plans = []
        for layer in self.engine.spec.moe_layers:
            for precision, wanted in _by_precision(pattern, layer).items():
                bank = self._bank(layer, precision)
                plans.append((layer, precision, bank, bank.slots.assign(wanted, layer)))
        for layer, precision, bank, plan in plans:
            for expert, slot in plan:
                bank.slots.evict_slot(slot)
                bank.write(slot, self.sources[precision].read(layer, expert))
                bank.slots.place(expert, slot)
                layer_reports.append((layer, expert))
        for layer in self.engine.spec.moe_layers:
            for precision, wanted in _by_precision(pattern, layer).items():
                self._bank(layer, precision).slots.touch(wanted, tick)

    def table(self, layer: int, pattern: Pattern, full_table: Tensor) -> Tensor:
        """Long [E]: each expert's slot id for `pattern` (its quantized slot where the pattern lowers it)."""
        table = full_table.clone()
        for precision, wanted in _by_precision(pattern, layer).items():
            bank = self._bank(layer, precision)
            missing = [e for e in wanted if e not in bank.slots.slot_of]
            if missing:
                raise PatternError(
                    f"{precision} experts {missing} are not resident; load the pattern first", field=f"layer {layer}"
                )
            for expert in wanted:
                table[expert] = bank.offset + bank.slots.slot_of[expert]
        return table

    @property
    def nbytes(self) -> int:
        return sum(bank.nbytes for banks in self.banks.values() for bank in banks.values())

    def versions(self) -> tuple[int, ...]:
        """Every bank's slot version: a change means some quantized expert moved."""
        return tuple(bank.slots.version for banks in self.banks.values() for bank in banks.values())

    def _bank(self, layer: int, precision: str) -> QuantizedBank:
        bank = self.banks[layer].get(precision)
        if bank is None:
            raise FailedPrecondition(
                f"the engine has no {precision} slots (it has {sorted(self.banks[layer]) or 'none'})",
                field="precision",
            )
        return bank


def _by_precision(pattern: Pattern, layer: int) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for expert, precision in pattern.precisions.get(layer, {}).items():
        if precision != FULL:
            groups.setdefault(precision, []).append(expert)
    return groups


def _wrap_forward(experts: nn.Module, banks: Mapping[str, QuantizedBank]) -> None:
    """Give the experts module a forward that also computes with its quantized slots (see the module doc)."""
    original: Callable[..., Tensor] = getattr(experts, "_premoe_forward", None) or experts.forward
    # A second wrap (new banks) wraps transformers' forward, not the first wrap.
    setattr(experts, "_premoe_forward", original)  # noqa: B010 - typed as Module attribute
    ordered = sorted(banks.values(), key=lambda b: b.offset)

    def weight(name: str, slot: int) -> Tensor:
        full = experts._parameters[name]
        if full is not None and slot < full.shape[0]:
            return full[slot]
        for bank in ordered:
            if bank.offset <= slot < bank.offset + bank.capacity:
                return bank.weight(name, slot - bank.offset)
        raise FailedPrecondition(f"slot {slot} is outside every slot bank", field="slot")

    def forward(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        names = list(expert_params(experts))
        full_capacity = experts._parameters[names[0]].shape[0]  # type: ignore[union-attr]
        if top_k_index.numel() == 0 or int(top_k_index.max()) < full_capacity:
            return original(hidden_states, top_k_index, top_k_weights)
        hit = torch.unique(top_k_index)  # [n] slot ids, ascending
        renumber = torch.zeros(int(hit.max()) + 1, dtype=top_k_index.dtype, device=top_k_index.device)
        renumber[hit] = torch.arange(hit.numel(), dtype=top_k_index.dtype, device=top_k_index.device)
        slots = hit.tolist()
        saved = {name: experts._parameters[name] for name in names}
        saved_count = experts.num_experts
        try:
            for name in names:  # transformers' forward reads these attributes; a plain tensor serves it
                experts._parameters[name] = torch.stack([weight(name, s) for s in slots])  # type: ignore[assignment]
            setattr(experts, "num_experts", len(slots))  # noqa: B010
            return original(hidden_states, renumber[top_k_index], top_k_weights)
        finally:
            experts._parameters.update(saved)
            setattr(experts, "num_experts", saved_count)  # noqa: B010

    setattr(experts, "forward", forward)  # noqa: B010 - this module's forward only


def attach_precisions(engine: Any, store: Any, capacity: Mapping[str, Any]) -> QuantizedSlots:
    """Give a patterned model built from `store` slots for the store's quantized copies (precision -> slots
    per layer, one number or per layer); its patterns may then hold experts at those precisions."""
    from ..store.precisions import PrecisionReader

    sources = {precision: PrecisionReader(store, precision) for precision in capacity}
    engine.quantized = QuantizedSlots(engine, sources, capacity)
    return engine.quantized
