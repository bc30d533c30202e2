"""Quantized slots: per MoE layer and precision, slots that hold experts' packed bytes, dequantized in the forward.

Slot ids of a layer form one space: `[0, C)` are the full-precision slots (the experts module's own fused
parameters), then each precision's bank in turn (then any channel banks, `runtime.channel_slots`). The masked
router hands out these ids as it always does. The experts module keeps transformers' forward: a thin wrapper
around it (`runtime.banks`) dequantizes, for each forward pass, only the quantized slots its tokens hit (group-wise,
in torch ops, so the same code runs on CPU and CUDA; every hit slot of a bank in one call over their stacked
tensors, since at these sizes a dequantization costs its operations' dispatch more than its arithmetic) and
computes their pairs slot by slot beside the full-precision slots. Resident memory is the packed tensors; a
dequantized weight lives for one layer call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import FailedPrecondition, InvalidArgument, PatternError
from ..experts import bytes_view
from ..pattern import FULL, Pattern
from ..store.manifest import DTYPES
from ..store.quant import QuantizedWeight, dequantize
from ..store.quantized_copies import QuantizedCopy
from .banks import install_banks
from .slot_book import RESIDENT, SlotBook
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
        slots: LayerSlots,
    ) -> None:
        self.copy, self.offset, self.dtype = copy, offset, dtype
        self.shapes = dict(shapes)  # part -> one expert's runtime shape
        self.slots = slots  # a row of the precision's slot book
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
        return self._weights(part, lambda kind: self.tensors[(part, kind)][slot])

    def weights(self, part: str, slots: list[int]) -> Tensor:
        """Slots' parameter `part` stacked `[n, *runtime shape]`, dequantized in one pass (the same values as
        `weight` slot by slot: dequantization is element-wise)."""

        index: Tensor | None = None

        def stacked(kind: str) -> Tensor:
            nonlocal index
            tensor = self.tensors[(part, kind)]
            if not isinstance(tensor, Tensor):  # a lent bank's sub-slots lie in several tensors
                return torch.stack([tensor[slot] for slot in slots])
            if index is None:
                index = torch.tensor(slots, device=tensor.device)
            return tensor.index_select(0, index)

        return self._weights(part, stacked)

    def _weights(self, part: str, read: Callable[[str], Tensor]) -> Tensor:
        if (part, "raw") in self.tensors:  # a bias, or a float copy's tensor (bf16): computed in the model's dtype
            return read("raw").to(self.dtype)
        copy, shape = self.copy, self.shapes[part]
        qw = QuantizedWeight(read("weight_packed"), read("weight_scale"), read("weight_zero_point"))
        if copy.transposed:
            return dequantize(qw, copy.bits, copy.group_size, (shape[1], shape[0]), self.dtype).transpose(-2, -1)
        return dequantize(qw, copy.bits, copy.group_size, (shape[0], shape[1]), self.dtype)


@dataclass(frozen=True)
class LentPrecision:
    """A precision whose bank in every layer is built by `bank` (`runtime.lending.LentBank`), `per_slot` sub-slots
    to each full-precision slot."""

    precision: str
    per_slot: int
    bank: Callable[..., QuantizedBank]


class QuantizedSlots:
    """Quantized slots of every MoE layer of a patterned model, one bank per precision.

    Args:
        engine: The patterned model (its full-precision slots are already installed).
        sources: Precision -> where its experts come from (a `PrecisionReader`).
        capacity: Precision -> slots per layer (one number, or per layer).
    """

    def __init__(
        self,
        patterned: Any,
        sources: Mapping[str, QuantizedSource],
        capacity: Mapping[str, Any],
        lent: LentPrecision | None = None,
    ) -> None:
        self.patterned, self.sources = patterned, dict(sources)
        self.banks: dict[int, dict[str, QuantizedBank]] = {}
        layers = patterned.spec.moe_layers
        capacity = dict(capacity)
        if lent is not None:  # its bank lies in the full slots' memory (`runtime.lending`): C x k sub-slots
            capacity[lent.precision] = {layer: lent.per_slot * patterned.slots[layer].capacity for layer in layers}
        counts = {p: [c if isinstance(c, int) else c[layer] for layer in layers] for p, c in capacity.items()}
        self.books = {  # one slot book per precision over all MoE layers (`runtime.slot_book`)
            p: SlotBook([max(c, 0) if isinstance(c, int) else 0 for c in counts[p]], patterned.spec.num_experts, layers)
            for p in self.sources
        }
        self.lent = None if lent is None else lent.precision
        self._offsets: dict[str, np.ndarray] = {p: np.zeros(len(layers), dtype=np.int64) for p in self.sources}
        dtype = next(iter(expert_params(patterned.experts_module(layers[0])).values())).dtype
        for row, layer in enumerate(layers):
            experts = patterned.experts_module(layer)
            params = expert_params(experts)
            shapes = {name: tuple(p.shape[1:]) for name, p in params.items()}
            offset = next(iter(params.values())).shape[0]
            banks: dict[str, QuantizedBank] = {}
            for precision, source in self.sources.items():
                if lent is not None and precision == lent.precision:
                    count = counts[precision][row]
                    slots = LayerSlots(book=self.books[precision], row=row)
                    banks[precision] = lent.bank(source.copy, experts, offset, dtype, slots)
                    self.books[precision].block(row, np.arange(count))
                    self._offsets[precision][row] = offset
                    offset += count
                    continue
                count = capacity[precision] if isinstance(capacity[precision], int) else capacity[precision][layer]
                if not (isinstance(count, int) and 0 <= count <= patterned.spec.num_experts):
                    raise InvalidArgument(
                        f"{count!r} {precision} slots: give 0..{patterned.spec.num_experts} per layer",
                        field=f"capacity.{precision}",
                    )
                slots = LayerSlots(book=self.books[precision], row=row)
                banks[precision] = QuantizedBank(source.copy, count, offset, shapes, dtype, patterned.device, slots)
                self._offsets[precision][row] = offset
                offset += count
            self.banks[layer] = banks
            patterned.routers[layer].skip_id = offset  # one past every bank: the wrapped forward skips it
            install_banks(experts, "quantized", list(banks.values()), patterned.spec.family)

    def load(self, pattern: Pattern, layer_reports: list[tuple[int, int]], tick: int) -> None:
        """Write the pattern's missing quantized experts into their banks (planned for all layers first)."""
        plans = []
        for layer in self.patterned.spec.moe_layers:
            for precision, wanted in _by_precision(pattern, layer).items():
                bank = self._bank(layer, precision)
                plans.append((layer, precision, bank, bank.slots.assign(wanted)))
        for layer, precision, bank, plan in plans:
            for expert, slot in plan:
                bank.slots.evict_slot(slot)
                bank.write(slot, self.sources[precision].read(layer, expert))
                bank.slots.place(expert, slot)
                layer_reports.append((layer, expert))
        for layer in self.patterned.spec.moe_layers:
            for precision, wanted in _by_precision(pattern, layer).items():
                self._bank(layer, precision).slots.touch(wanted, tick)

    def table(self, layer: int, pattern: Pattern, full_table: Tensor) -> Tensor:
        """Long [E]: each expert's slot id for `pattern` (its quantized slot where the pattern lowers it)."""
        table = full_table.clone()
        for precision, wanted in _by_precision(pattern, layer).items():
            bank = self._bank(layer, precision)
            book, row = bank.slots.book, bank.slots.row
            experts = np.asarray(wanted, dtype=np.int64)
            resident = book.state[row, experts] == RESIDENT
            if not resident.all():
                missing = experts[~resident].tolist()
                raise PatternError(
                    f"{precision} experts {missing} are not resident; load the pattern first", field=f"layer {layer}"
                )
            slots = torch.from_numpy(book.slot[row, experts] + bank.offset).to(table.dtype)
            table[torch.from_numpy(experts).to(table.device)] = slots.to(table.device)
        return table

    @property
    def nbytes(self) -> int:
        return sum(bank.nbytes for banks in self.banks.values() for bank in banks.values())

    @property
    def precisions(self) -> list[str]:
        return list(self.sources)

    def book(self, precision: str) -> SlotBook:
        """The slot book of one precision's banks over all MoE layers (rows in layer order)."""
        self._bank(self.patterned.spec.moe_layers[0], precision)  # refuses a precision without slots
        return self.books[precision]

    def offsets(self, precision: str) -> np.ndarray:
        """`[L]`: where each layer's bank of `precision` starts in the layer's slot id space."""
        return self._offsets[precision]

    def bank_of(self, layer: int, slot: int) -> QuantizedBank | None:
        """The bank holding slot id `slot` of `layer` (None: a full-precision slot)."""
        for bank in self.banks[layer].values():
            if bank.offset <= slot < bank.offset + bank.capacity:
                return bank
        return None

    def read_into(self, layer: int, expert: int, slot: int) -> tuple[str, int]:
        """Copy one expert from its precision's store copy into quantized slot id `slot` (the loader thread);
        returns the tier it came from and its bytes."""
        bank = self.bank_of(layer, slot)
        if bank is None:
            raise FailedPrecondition(f"slot {slot} of layer {layer} is not a quantized slot", field="slot")
        source = self.sources[bank.copy.precision]
        read_blob = getattr(source, "read_blob", None)
        if read_blob is None:  # a plain source (tests): tensors, no tier
            bank.write(slot - bank.offset, source.read(layer, expert))
            return "cache", bank.copy.expert_nbytes
        data, tier = read_blob(layer, expert)
        bank.write(slot - bank.offset, source.decode(data))  # type: ignore[attr-defined]
        return tier, len(data)

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
    """Precision -> the experts `pattern` holds whole at it below full precision in `layer`."""
    groups: dict[str, list[int]] = {}
    sliced = pattern.channels.get(layer, {})  # experts held in part sit in channel slots
    for expert, precision in pattern.precisions.get(layer, {}).items():
        if precision != FULL and expert not in sliced:
            groups.setdefault(precision, []).append(expert)
    return groups


def attach_precisions(
    patterned: Any, store: Any, capacity: Mapping[str, Any], lent: LentPrecision | None = None
) -> QuantizedSlots:
    """Give a patterned model built from `store` slots for the store's quantized copies (precision -> slots
    per layer, one number or per layer); its patterns may then hold experts at those precisions. `lent`: one more
    precision whose slots lie in the full-precision slots' memory (`runtime.lending.attach_lending`)."""
    from ..store.quantized_copies import PrecisionReader

    names = [*capacity, *([lent.precision] if lent is not None else [])]
    sources = {precision: PrecisionReader(store, precision) for precision in names}
    patterned.quantized = QuantizedSlots(patterned, sources, capacity, lent=lent)
    return patterned.quantized
