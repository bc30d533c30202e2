"""Channel slots: per MoE layer, banks of slots of a reduced intermediate width that hold the kept channels of
experts a channel plan holds in part (docs/atomic-experts.md, "Served in slots").

A bank is keyed by (precision, width), written `full@24`: its slots hold up to `width` of an expert's `I`
intermediate channels (gate rows, up rows, down columns, the gate/up bias entries; the down bias whole), in the
runtime layout of the family at that width. An expert a pattern holds at `k` channels sits in the narrowest bank
of its precision whose width is at least `k`; the rest of the slot is zero channels, which add nothing
(`families.channels.pad_channels`). Slot ids continue the layer's one id space after the full-precision slots and
the quantized banks (`runtime.banks`), so the masked router and the batched routing tables serve them as they
serve quantized slots, and the experts module's wrapped forward computes each hit slot at its width (padded to
the widest slot hit in that call).

Two tasks may hold the same expert at the same width with different channels. So a bank's slot book does not
count experts but *variants*: each distinct (expert, channel ids) a pattern names gets a column of the bank's
book, per layer, for the life of the engine (a fixed number of columns per layer, `variants`); pins, leases,
recency and eviction then work on variants exactly as they work on experts in the other books. Copies
(`Residency.reserve`) name the variant's column where other copies name the expert.

Only full-precision channel banks are built: a pattern holding a quantized expert in part is refused with the
reason. The store is read whole per expert (one blob, through the cache tiers as any expert) and cut in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import FailedPrecondition, InvalidArgument, PatternError, ResourceExhausted
from ..experts import ExpertSource, bytes_view
from ..families.channels import pad_channels, slice_channels
from ..pattern import FULL, Pattern
from .banks import banks_end, install_banks
from .pattern_masks import _ByPattern
from .slot_book import RESIDENT, SlotBook
from .slots import LayerSlots, expert_params

ChannelKey = tuple[str, int]  # (precision, width)
_TRANSPOSED = frozenset({"gpt_oss"})


def parse_key(text: str) -> ChannelKey:
    """`full@24` -> ("full", 24)."""
    precision, sep, width = text.partition("@")
    if not sep or not width.isdigit() or int(width) < 1:
        raise InvalidArgument(
            f"channel slot bank {text!r} is not PRECISION@WIDTH (e.g. full@24)", field="channel_slots"
        )
    return precision, int(width)


def key_name(key: ChannelKey) -> str:
    return f"{key[0]}@{key[1]}"


class ChannelBank:
    """The slots of one (precision, width) in one MoE layer: the experts module's parameters at `width` channels."""

    def __init__(
        self,
        family: str,
        key: ChannelKey,
        offset: int,
        shapes: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
        slots: LayerSlots,
    ) -> None:
        self.family, self.key, self.offset, self.slots = family, key, offset, slots
        capacity = slots.capacity
        self.tensors = {
            name: torch.zeros((capacity, *shape), dtype=dtype, device=device) for name, shape in shapes.items()
        }

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    @property
    def width(self) -> int:
        return self.key[1]

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot, measured from the tensors."""
        return sum(t[0].numel() * t.element_size() for t in self.tensors.values()) if self.capacity else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @torch.no_grad()
    def write(self, slot: int, expert: Mapping[str, Tensor], channels: Tensor) -> None:
        """Write one expert's tensors (runtime layout, all channels) cut to `channels` into `slot`."""
        cut = pad_channels(self.family, slice_channels(self.family, expert, channels), self.width)
        for name, tensor in self.tensors.items():
            source, target = cut[name].to(tensor.dtype), tensor[slot]
            if target.device.type == "cpu" and source.device.type == "cpu":
                np.copyto(bytes_view(target), bytes_view(source.contiguous()))
            else:
                target.copy_(source, non_blocking=True)

    def weight(self, part: str, slot: int) -> Tensor:
        return self.tensors[part][slot]


class ChannelSlots:
    """Channel banks of every MoE layer of a patterned model.

    Args:
        engine: The patterned model (full-precision slots installed; quantized banks, if any, attached first).
        source: Where experts come from (a `Store`, read whole and cut; or any expert source).
        capacity: Bank (`full@24`, or a (precision, width) pair) -> slots per layer (one number, or per layer).
        variants: Distinct (expert, channel ids) per layer each bank can name over the engine's life.
    """

    def __init__(
        self, engine: Any, source: ExpertSource, capacity: Mapping[Any, Any], variants: int | None = None
    ) -> None:
        self.engine, self.source = engine, source
        spec, layers = engine.spec, engine.spec.moe_layers
        self.family = spec.family
        first = expert_params(engine.experts_module(layers[0]))
        down = first["down_proj"]
        self.intermediate = int(down.shape[1] if self.family in _TRANSPOSED else down.shape[2])
        keys: dict[ChannelKey, Any] = {}
        for raw, count in capacity.items():
            key = parse_key(raw) if isinstance(raw, str) else (str(raw[0]), int(raw[1]))
            if key[0] != FULL:
                raise FailedPrecondition(
                    f"channel slots at {key[0]} are not built: only full-precision channel banks are (full@WIDTH)",
                    field="channel_slots",
                )
            if not 0 < key[1] < self.intermediate:
                raise InvalidArgument(
                    f"bank {key_name(key)}: a width in 1..{self.intermediate - 1} (the experts hold "
                    f"{self.intermediate} channels)",
                    field="channel_slots",
                )
            keys[key] = count
        self.keys = sorted(keys)
        self.variants = variants if variants is not None else 4 * spec.num_experts
        self.books: dict[ChannelKey, SlotBook] = {}
        self._offsets: dict[ChannelKey, np.ndarray] = {}
        for key in self.keys:
            counts = [keys[key] if isinstance(keys[key], int) else keys[key].get(layer, 0) for layer in layers]
            for layer, count in zip(layers, counts, strict=True):
                if not (isinstance(count, int) and count >= 0):
                    raise InvalidArgument(
                        f"{count!r} {key_name(key)} slots in layer {layer}: give a count >= 0",
                        field=f"capacity.{key_name(key)}",
                    )
            self.books[key] = SlotBook(counts, self.variants, names=layers)
            self._offsets[key] = np.zeros(len(layers), dtype=np.int64)
        # per bank and layer row: (expert, channel ids) -> column, and column -> (expert, channel ids)
        self._columns: dict[ChannelKey, list[dict[tuple[int, tuple[int, ...]], int]]] = {
            key: [{} for _ in layers] for key in self.keys
        }
        self._held: dict[ChannelKey, list[list[tuple[int, tuple[int, ...]]]]] = {
            key: [[] for _ in layers] for key in self.keys
        }
        self._lock = threading.Lock()
        self.banks: dict[int, dict[ChannelKey, ChannelBank]] = {}
        for row, layer in enumerate(layers):
            experts = engine.experts_module(layer)
            params = expert_params(experts)
            meta = {name: torch.empty(tuple(p.shape[1:]), device="meta") for name, p in params.items()}
            dtype = next(iter(params.values())).dtype
            offset = banks_end(experts)
            banks = {}
            for key in self.keys:
                shapes = {
                    name: tuple(t.shape)
                    for name, t in pad_channels(
                        self.family, slice_channels(self.family, meta, torch.arange(key[1])), key[1]
                    ).items()
                }
                slots = LayerSlots(book=self.books[key], row=row)
                banks[key] = ChannelBank(self.family, key, offset, shapes, dtype, engine.device, slots)
                self._offsets[key][row] = offset
                offset += slots.capacity
            self.banks[layer] = banks
            engine.routers[layer].skip_id = offset  # one past every bank: the wrapped forward skips it
            install_banks(experts, "channels", list(banks.values()), self.family)
        self.index = _ByPattern(self._index)

    # --- which bank and column each expert held in part takes

    def bank_key(self, precision: str, count: int, where: str) -> ChannelKey:
        """The narrowest bank of `precision` holding at least `count` channels."""
        fits = [key for key in self.keys if key[0] == precision and key[1] >= count]
        if not fits:
            have = ", ".join(key_name(k) for k in self.keys) or "none"
            raise FailedPrecondition(
                f"no channel slots hold a {precision} expert of {count} channels (banks: {have}); start the server "
                f"with --channel-slots {precision}@{count}=N or wider",
                field=where,
            )
        return min(fits, key=lambda k: k[1])

    def _index(self, pattern: Pattern) -> dict[ChannelKey, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Bank -> (rows, columns, experts) of the pattern's experts held in part, registering new variants."""
        rows_of = self.engine.rows
        found: dict[ChannelKey, list[tuple[int, int, int]]] = {}
        with self._lock:
            for layer, by_expert in pattern.channels.items():
                row = rows_of[layer]
                for expert, ids in by_expert.items():
                    where = f"channels.{layer}.{expert}"
                    if ids[-1] >= self.intermediate:
                        raise PatternError(f"channel id {ids[-1]} out of range 0..{self.intermediate - 1}", field=where)
                    key = self.bank_key(pattern.precision(layer, expert), len(ids), where)
                    columns = self._columns[key][row]
                    column = columns.get((expert, ids))
                    if column is None:
                        if len(columns) >= self.variants:
                            raise ResourceExhausted(
                                f"bank {key_name(key)} of layer {layer} already names {self.variants} distinct "
                                "channel sets (experts held in part by the tasks served so far); restart the server "
                                "with more --channel-variants",
                                field=where,
                            )
                        column = columns[(expert, ids)] = len(columns)
                        self._held[key][row].append((expert, ids))
                    found.setdefault(key, []).append((row, column, expert))
        out = {}
        for key, entries in found.items():
            array = np.array(entries, dtype=np.int64).reshape(-1, 3)
            out[key] = (array[:, 0], array[:, 1], array[:, 2])
        return out

    def wanted(self, pattern: Pattern) -> dict[ChannelKey, np.ndarray]:
        """Bank -> bool `[L, variants]`: the variants `pattern` holds in that bank."""
        out = {}
        for key, (rows, columns, _) in self.index(pattern).items():
            mask = np.zeros((len(self.engine.spec.moe_layers), self.variants), dtype=bool)
            mask[rows, columns] = True
            out[key] = mask
        return out

    def variant(self, key: ChannelKey, row: int, column: int) -> tuple[int, tuple[int, ...]]:
        """(expert, channel ids) of a bank's column in a layer row."""
        return self._held[key][row][column]

    # --- loading and routing

    def load(
        self,
        pattern: Pattern,
        layer_reports: list[tuple[int, int]],
        tick: int,
        evicted: list[tuple[int, int]] | None = None,
    ) -> None:
        """Write the pattern's missing variants into their banks (every bank planned before anything moves); the
        (layer, expert) of each variant written goes to `layer_reports`, of each variant evicted to `evicted`."""
        layers = self.engine.spec.moe_layers
        wanted = self.wanted(pattern)
        plans = [(key, mask, self.books[key].plan(mask)) for key, mask in wanted.items()]
        for key, mask, plan in plans:
            book = self.books[key]
            if evicted is not None:
                victims = zip(plan.victim_rows.tolist(), plan.victim_experts.tolist(), strict=True)
                evicted += [(layers[row], self.variant(key, row, column)[0]) for row, column in victims]
            book.reserve(plan)
            written = 0
            try:
                for row, column, slot in zip(
                    plan.rows.tolist(), plan.experts.tolist(), plan.slots.tolist(), strict=True
                ):
                    expert, ids = self.variant(key, row, column)
                    tensors = self.source.read(layers[row], expert)
                    self.banks[layers[row]][key].write(slot, tensors, torch.tensor(ids, dtype=torch.long))
                    layer_reports.append((layers[row], expert))
                    written += 1
            finally:
                book.commit(plan.rows[:written], plan.experts[:written])
                book.abort(plan.rows[written:], plan.experts[written:])
            book.last_used[mask] = tick

    def read_into(self, layer: int, column: int, slot: int) -> tuple[str, int]:
        """Copy one variant (a bank's column) into channel slot id `slot` (the loader thread); returns the tier it
        came from and the bytes read."""
        bank = self.bank_of(layer, slot)
        if bank is None:
            raise FailedPrecondition(f"slot {slot} of layer {layer} is not a channel slot", field="slot")
        expert, ids = self.variant(bank.key, self.engine.rows[layer], column)
        read_blob = getattr(self.source, "read_blob", None)
        if read_blob is None:  # a plain source (tests): tensors, no tier
            tensors, tier, nbytes = self.source.read(layer, expert), "cache", 0
        else:
            data, tier = read_blob(layer, expert)
            tensors, nbytes = self.source.decode(data), len(data)  # type: ignore[attr-defined]
        bank.write(slot - bank.offset, tensors, torch.tensor(ids, dtype=torch.long))
        return tier, nbytes

    def table(self, layer: int, pattern: Pattern, full_table: Tensor) -> Tensor:
        """Long [E]: each expert's slot id for `pattern` (its channel slot where the pattern holds it in part)."""
        table = full_table.clone()
        row = self.engine.rows[layer]
        for key, (rows, columns, experts) in self.index(pattern).items():
            book, here = self.books[key], rows == row
            for column, expert in zip(columns[here].tolist(), experts[here].tolist(), strict=True):
                if book.state[row, column] != RESIDENT:
                    raise PatternError(
                        f"expert {expert} held in part ({key_name(key)}) is not resident; load the pattern first",
                        field=f"layer {layer}",
                    )
                table[expert] = int(self._offsets[key][row] + book.slot[row, column])
        return table

    def bank_of(self, layer: int, slot: int) -> ChannelBank | None:
        for bank in self.banks[layer].values():
            if bank.offset <= slot < bank.offset + bank.capacity:
                return bank
        return None

    def offsets(self, key: ChannelKey) -> np.ndarray:
        """`[L]`: where each layer's bank `key` starts in the layer's slot id space."""
        return self._offsets[key]

    def slot_nbytes(self, key: ChannelKey) -> int:
        """Bytes of one slot of bank `key` (the same in every layer)."""
        return max(self.banks[layer][key].slot_nbytes for layer in self.banks)

    def versions(self) -> tuple[int, ...]:
        """Every bank's slot versions: a change means some variant moved."""
        return tuple(v for key in self.keys for v in self.books[key].version.tolist())

    @property
    def nbytes(self) -> int:
        return sum(bank.nbytes for banks in self.banks.values() for bank in banks.values())


def attach_channels(
    engine: Any, source: ExpertSource, capacity: Mapping[Any, Any], variants: int | None = None
) -> ChannelSlots:
    """Give a patterned model channel slots (bank `full@WIDTH` -> slots per layer); its patterns may then hold
    experts in part (`Pattern.channels`). Attach quantized slots (`attach_precisions`) first, if any."""
    if engine.channels is not None:
        raise FailedPrecondition("the engine already has channel slots", field="channel_slots")
    engine.channels = ChannelSlots(engine, source, capacity, variants)
    return engine.channels
