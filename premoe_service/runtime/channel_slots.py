"""Channel slots: per MoE layer, the channel banks (`runtime.channel_banks`) that hold the kept channels of experts
a channel plan holds in part (docs/atomic-experts.md, "Served in slots"), which variant sits in which slot, and
their loading.

An expert a pattern holds at `k` channels sits in the narrowest bank of its precision whose width is at least `k`.
Slot ids continue the layer's one id space after the full-precision slots and the quantized banks
(`runtime.banks`), so the masked router and the batched routing tables serve them as they serve quantized slots,
and the experts module's wrapped forward computes each hit slot at its width (padded to the widest slot hit in
that call).

Two tasks may hold the same expert at the same width with different channels. So a bank's slot book does not
count experts but *variants*: each distinct (expert, channel ids) a pattern names gets a column of the bank's
book, per layer, for the life of the engine (a fixed number of columns per layer, `variants`); pins, leases,
recency and eviction then work on variants exactly as they work on experts in the other books. Copies
(`Residency.reserve`) name the variant's column where other copies name the expert.

Float copies (`bf16`) have no channel banks. A slot is filled from the store's channel-major copy of its precision
when the store has one (`premoe shard --channel-major`: through the cache tier, the expert's kept runs from its
cached block, or one disk read per run without a cache; `store.channel_major_reader.ChannelMajorReader`), else from
the expert's whole blob (through the cache tiers as any expert; a quantized bank also reads the expert's copy at
its precision), cut in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import FailedPrecondition, InvalidArgument, PatternError, ResourceExhausted
from ..experts import ExpertSource
from ..families.channels import pad_channels, slice_channels
from ..pattern import FULL, Pattern
from ..store.quant import (
    BITS,
    FLOAT_PRECISIONS,
)
from .banks import banks_end, install_banks
from .channel_banks import (
    TRANSPOSED,
    ChannelBank,
    ChannelKey,
    QuantizedChannelBank,
    full_rows,
    key_name,
    parse_key,
    quantized_rows,
    record_biases,
)
from .pattern_masks import _ByPattern
from .slot_book import RESIDENT, SlotBook
from .slots import LayerSlots, expert_params


class ChannelSlots:
    """Channel banks of every MoE layer of a patterned model.

    Args:
        engine: The patterned model (full-precision slots installed; quantized banks, if any, attached first).
        source: Where experts come from (a `Store`, read whole and cut; or any expert source).
        capacity: Bank (`full@24`, `int4@24`, or a (precision, width) pair) -> slots per layer (one number, or per
            layer). An integer bank needs the store's copy at that precision.
        variants: Distinct (expert, channel ids) per layer each bank can name over the engine's life.
    """

    def __init__(
        self, patterned: Any, source: ExpertSource, capacity: Mapping[Any, Any], variants: int | None = None
    ) -> None:
        self.patterned, self.source = patterned, source
        spec, layers = patterned.spec, patterned.spec.moe_layers
        self.family = spec.family
        first = expert_params(patterned.experts_module(layers[0]))
        down = first["down_proj"]
        self.intermediate = int(down.shape[1] if self.family in TRANSPOSED else down.shape[2])
        self.hidden = int(down.shape[2] if self.family in TRANSPOSED else down.shape[1])
        self.group_size, self.store_dtype = 64, down.dtype  # set from the store when a quantized bank is asked for
        keys: dict[ChannelKey, Any] = {}
        self.readers: dict[str, Any] = {}  # integer precision -> its store copy's reader
        for raw, count in capacity.items():
            key = parse_key(raw) if isinstance(raw, str) else (str(raw[0]), int(raw[1]))
            if key[0] != FULL and (key[0] not in BITS or key[0] in FLOAT_PRECISIONS):
                raise FailedPrecondition(
                    f"channel slots at {key[0]!r} are not built: channel banks hold full precision or integers "
                    f"({', '.join(p for p in BITS if p not in FLOAT_PRECISIONS)})",
                    field="channel_slots",
                )
            if key[0] != FULL and key[0] not in self.readers:
                self.readers[key[0]] = self._reader(key[0])
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
        self.banks: dict[int, dict[ChannelKey, ChannelBank | QuantizedChannelBank]] = {}
        for row, layer in enumerate(layers):
            experts = patterned.experts_module(layer)
            params = expert_params(experts)
            meta = {name: torch.empty(tuple(p.shape[1:]), device="meta") for name, p in params.items()}
            dtype = next(iter(params.values())).dtype
            offset = banks_end(experts)
            banks: dict[ChannelKey, ChannelBank | QuantizedChannelBank] = {}
            for key in self.keys:
                slots = LayerSlots(book=self.books[key], row=row)
                if key[0] != FULL:
                    biases = {"gate_up_proj_bias": (2 * key[1],), "down_proj_bias": (self.hidden,)}
                    copy = self.readers[key[0]].copy
                    banks[key] = QuantizedChannelBank(
                        self.family,
                        key,
                        offset,
                        self.hidden,
                        self.intermediate,
                        copy.bits,
                        self.group_size,
                        {name: shape for name, shape in biases.items() if name in params},
                        dtype,
                        self.store_dtype,
                        patterned.device,
                        slots,
                    )
                    self._offsets[key][row] = offset
                    offset += slots.capacity
                    continue
                shapes = {
                    name: tuple(t.shape)
                    for name, t in pad_channels(
                        self.family, slice_channels(self.family, meta, torch.arange(key[1])), key[1]
                    ).items()
                }
                banks[key] = ChannelBank(self.family, key, offset, shapes, dtype, patterned.device, slots)
                self._offsets[key][row] = offset
                offset += slots.capacity
            self.banks[layer] = banks
            patterned.routers[layer].skip_id = offset  # one past every bank: the wrapped forward skips it
            install_banks(experts, "channels", list(banks.values()), self.family)
        self.index = _ByPattern(self._index)
        self._wanted = _ByPattern(self._masks)
        self.channel_major: dict[str, Any] = {}  # precision -> the store's channel-major copy, when it has one
        self._open_channel_major()

    def _reader(self, precision: str) -> Any:
        """The store copy at `precision` that a quantized channel bank reads gate and up rows from."""
        from ..store.copies import quantized_copies
        from ..store.quantized_copies import PrecisionReader

        manifest = getattr(self.source, "manifest", None)
        if manifest is None:
            raise FailedPrecondition(
                f"{precision} channel slots read the store's {precision} copy: give them a store", field="channel_slots"
            )
        if precision not in quantized_copies(manifest):
            raise FailedPrecondition(
                f"the store holds no {precision} copy of the experts for {precision} channel slots: add it with "
                f"`premoe shard MODEL --out STORE --precisions {precision}`",
                field="channel_slots",
            )
        sizes = {c.group_size for c in quantized_copies(manifest).values() if c.group_size}
        # what store.channels.ChannelReader (premoe export, premoe eval) quantizes down columns with
        self.group_size = sizes.pop() if len(sizes) == 1 else 64
        self.store_dtype = manifest.torch_dtype
        return PrecisionReader(self.source, precision)  # type: ignore[arg-type]

    def _fill(self, layer: int, bank: ChannelBank | QuantizedChannelBank, slot: int, expert: int, ids: tuple[int, ...]):
        """Read one expert's kept channels and write them into `slot` of `bank`: from the store's channel-major
        copy at the bank's precision when it has one (one read per run of consecutive ids), else from the expert's
        blob (and, for a quantized bank, its copy's) cut in memory. Returns the tier and the bytes read."""
        major = self.channel_major.get(bank.key[0])
        if major is not None:
            records, nbytes, tier = major.read(layer, expert, ids)
            if isinstance(bank, QuantizedChannelBank):
                gate, up, down = quantized_rows(records, bank)
                bank.write_rows(slot, gate, up, down, record_biases(records))
            else:
                bank.write_cut(slot, full_rows(records, self.family))
            return tier, nbytes
        read_blob = getattr(self.source, "read_blob", None)
        if read_blob is None:  # a plain source (tests, in-memory models): tensors, no tier
            full, tier, nbytes = self.source.read(layer, expert), "cache", 0
        else:
            data, tier = read_blob(layer, expert)
            full, nbytes = self.source.decode(data), len(data)  # type: ignore[attr-defined]
        channels = torch.tensor(ids, dtype=torch.long)
        if isinstance(bank, QuantizedChannelBank):
            copy_blob, _ = self.readers[bank.key[0]].read_blob(layer, expert)
            bank.write(slot, full, self.readers[bank.key[0]].decode(copy_blob), channels)
            nbytes += len(copy_blob)
        else:
            bank.write(slot, full, channels)
        return tier, nbytes

    def _open_channel_major(self) -> None:
        """Use the store's channel-major copies of the banks' precisions whose layout fits these banks."""
        from ..store.channel_major import FOLDER
        from ..store.channel_major_reader import ChannelMajorReader

        folder = getattr(self.source, "dir", None)
        if folder is None:
            return
        for precision in {key[0] for key in self.keys}:
            if not (Path(folder) / FOLDER / precision).is_dir():
                continue
            reader = ChannelMajorReader(self.source, precision)  # type: ignore[arg-type]
            layout = reader.layout
            fits = (layout.hidden, layout.intermediate) == (self.hidden, self.intermediate) and (
                precision == FULL or layout.group_size == self.group_size
            )
            if fits:
                self.channel_major[precision] = reader
            else:
                reader.close()

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
        rows_of = self.patterned.rows
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
        """Bank -> bool `[L, variants]`: the variants `pattern` holds in that bank (kept for the patterns used
        last: a variant's column never changes)."""
        return self._wanted(pattern)

    def _masks(self, pattern: Pattern) -> dict[ChannelKey, np.ndarray]:
        out = {}
        for key, (rows, columns, _) in self.index(pattern).items():
            mask = np.zeros((len(self.patterned.spec.moe_layers), self.variants), dtype=bool)
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
        layers = self.patterned.spec.moe_layers
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
                    self._fill(layers[row], self.banks[layers[row]][key], slot, expert, ids)
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
        expert, ids = self.variant(bank.key, self.patterned.rows[layer], column)
        return self._fill(layer, bank, slot - bank.offset, expert, ids)

    def table(self, layer: int, pattern: Pattern, full_table: Tensor) -> Tensor:
        """Long [E]: each expert's slot id for `pattern` (its channel slot where the pattern holds it in part)."""
        table = full_table.clone()
        row = self.patterned.rows[layer]
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

    def bank_of(self, layer: int, slot: int) -> ChannelBank | QuantizedChannelBank | None:
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
    patterned: Any, source: ExpertSource, capacity: Mapping[Any, Any], variants: int | None = None
) -> ChannelSlots:
    """Give a patterned model channel slots (bank `full@WIDTH` -> slots per layer); its patterns may then hold
    experts in part (`Pattern.channels`). Attach quantized slots (`attach_precisions`) first, if any."""
    if patterned.channels is not None:
        raise FailedPrecondition("the engine already has channel slots", field="channel_slots")
    patterned.channels = ChannelSlots(patterned, source, capacity, variants)
    return patterned.channels
