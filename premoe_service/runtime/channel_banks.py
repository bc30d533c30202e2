"""Channel banks: the slots of one (precision, width) in one MoE layer that hold experts cut to some of their
intermediate channels (docs/atomic-experts.md, "Served in slots"), and the cutting of an expert's channel records
into a bank's layout. Which variant sits in which slot, and the loading, are `runtime.channel_slots`'s.

A bank is keyed by (precision, width), written `full@24`: its slots hold up to `width` of an expert's `I`
intermediate channels (gate rows, up rows, down columns, the gate/up bias entries; the down bias whole), in the
runtime layout of the family at that width; the rest of a slot is zero channels, which add nothing
(`families.channels.pad_channels`). A bank at an integer precision (`int4@24`) holds its slots packed,
channel-major (`QuantizedChannelBank`): the bytes `profiler.channel_plan.channel_nbytes` counts for the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidArgument
from ..experts import bytes_view
from ..families.channels import gate_up_rows, pad_channels, slice_channels
from ..store.quant import (
    SCALE_DTYPE,
    QuantizedWeight,
    dequantize,
    pack_codes,
    packed_shapes,
    quantize,
    unpack_codes,
)
from .slots import LayerSlots

ChannelKey = tuple[str, int]  # (precision, width)
TRANSPOSED = frozenset({"gpt_oss"})


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


class _Bank:
    """What every channel bank answers from its slot book, key and tensors."""

    slots: LayerSlots
    key: ChannelKey
    tensors: Mapping[Any, Tensor]

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


class ChannelBank(_Bank):
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

    @torch.no_grad()
    def write(self, slot: int, expert: Mapping[str, Tensor], channels: Tensor) -> None:
        """Write one expert's tensors (runtime layout, all channels) cut to `channels` into `slot`."""
        self.write_cut(slot, slice_channels(self.family, expert, channels))

    @torch.no_grad()
    def write_cut(self, slot: int, tensors: Mapping[str, Tensor]) -> None:
        """Write an expert already cut to its `k` kept channels (runtime layout at width `k`) into `slot`."""
        cut = pad_channels(self.family, tensors, self.width)
        for name, tensor in self.tensors.items():
            source, target = cut[name].to(tensor.dtype), tensor[slot]
            if target.device.type == "cpu" and source.device.type == "cpu":
                np.copyto(bytes_view(target), bytes_view(source.contiguous()))
            else:
                target.copy_(source, non_blocking=True)

    def weight(self, part: str, slot: int) -> Tensor:
        return self.tensors[part][slot]


class QuantizedChannelBank(_Bank):
    """The slots of one integer precision and width in one MoE layer, packed channel-major: per slot, the gate and
    up rows and the down columns of up to `width` channels, each a row of the hidden size quantized in groups along
    it (`store.quant`'s packing: `gate_up` as one `[2 * width, H]` weight, `down` as one `[width, H]`), and the
    biases at the store's dtype (GPT-OSS). Gate and up rows are the store copy's own integers, scales and zero
    points (the copy groups them along the hidden size already); the down columns are quantized here from the
    full-precision expert, one channel a row (the copy groups the down projection along the channels): exactly
    what `store.channels.ChannelReader` computes, what `premoe export` writes. Unused channels of a slot are zero
    codes with zero scales: zero weights. Dequantized in the forward, for the hit slots only."""

    def __init__(
        self,
        family: str,
        key: ChannelKey,
        offset: int,
        hidden: int,
        intermediate: int,
        bits: int,
        group_size: int,
        biases: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype,
        store_dtype: torch.dtype,
        device: torch.device,
        slots: LayerSlots,
    ) -> None:
        self.family, self.key, self.offset, self.slots = family, key, offset, slots
        self.hidden, self.intermediate, self.bits, self.group_size = hidden, intermediate, bits, group_size
        self.dtype, self.transposed = dtype, family in TRANSPOSED
        capacity, width = slots.capacity, key[1]
        kinds = {"weight_packed": torch.int32, "weight_scale": SCALE_DTYPE, "weight_zero_point": torch.int32}
        self.tensors: dict[tuple[str, str], Tensor] = {}
        for part, rows in (("gate_up_proj", 2 * width), ("down_proj", width)):
            for kind, shape in packed_shapes(rows, hidden, bits, group_size).items():
                self.tensors[(part, kind)] = torch.zeros((capacity, *shape), dtype=kinds[kind], device=device)
        for name, bias_shape in biases.items():  # at the store's dtype, as quantized copies hold them
            self.tensors[(name, "raw")] = torch.zeros((capacity, *bias_shape), dtype=store_dtype, device=device)

    @torch.no_grad()
    def write(
        self, slot: int, full: Mapping[str, Tensor], copy: Mapping[str, Mapping[str, Tensor]], channels: Tensor
    ) -> None:
        """Write one expert's kept `channels` into `slot`, from its full-precision tensors (`full`, runtime layout)
        and its store copy at this bank's precision (`copy`: part -> tensor kind -> tensor)."""
        bits, group, hidden = self.bits, self.group_size, self.hidden
        count, groups = int(channels.numel()), hidden // group
        # Gate and up rows of the copy (stored [2I, H] in the family's channel order).
        kinds, rows = copy["gate_up_proj"], 2 * self.intermediate
        codes = unpack_codes(kinds["weight_packed"], bits, (rows, hidden), packed_dim=1)
        zeros = unpack_codes(kinds["weight_zero_point"], bits, (rows, groups), packed_dim=0)
        gate_at, up_at = gate_up_rows(self.family, channels, self.intermediate)
        gate = (codes[gate_at], zeros[gate_at], kinds["weight_scale"][gate_at])
        up = (codes[up_at], zeros[up_at], kinds["weight_scale"][up_at])
        # Down columns as rows of the hidden size, quantized one channel a row.
        down = full["down_proj"]
        columns = (down if self.transposed else down.t())[channels.long()].contiguous()  # [k, H]
        qw = quantize(columns, bits, group)
        down_q = (
            unpack_codes(qw.packed, bits, (count, hidden), packed_dim=1),
            unpack_codes(qw.zero, bits, (count, groups), packed_dim=0),
            qw.scale,
        )
        biases = {}
        if "gate_up_proj_bias" in copy:
            bias = copy["gate_up_proj_bias"]["raw"]
            biases = {"gate": bias[gate_at], "up": bias[up_at], "down": copy["down_proj_bias"]["raw"]}
        self.write_rows(slot, gate, up, down_q, biases)

    @torch.no_grad()
    def write_rows(
        self,
        slot: int,
        gate: tuple[Tensor, Tensor, Tensor],
        up: tuple[Tensor, Tensor, Tensor],
        down: tuple[Tensor, Tensor, Tensor],
        biases: Mapping[str, Tensor],
    ) -> None:
        """Write `k` channels into `slot`: their gate, up and down rows as (codes `[k, H]`, zero points `[k, G]`,
        scales `[k, G]`) in channel order, and (GPT-OSS) their `gate` and `up` biases `[k]` and the `down` bias."""
        count, width = int(gate[0].shape[0]), self.width
        gate_at, up_at = gate_up_rows(self.family, torch.arange(count), width)  # their places in the slot
        at = torch.cat([gate_at, up_at])
        gate_up = self._padded(2 * width, at, *(torch.cat([g, u]) for g, u in zip(gate, up, strict=True)))
        values = {"gate_up_proj": gate_up, "down_proj": self._padded(width, torch.arange(count), *down)}
        for (part, kind), tensor in self.tensors.items():
            if kind != "raw":
                tensor[slot].copy_(values[part][kind])
            elif part == "gate_up_proj_bias":
                cut = torch.zeros(2 * width, dtype=tensor.dtype)
                cut[gate_at], cut[up_at] = biases["gate"], biases["up"]
                tensor[slot].copy_(cut)
            else:
                tensor[slot].copy_(biases["down"])

    def _padded(self, rows: int, at: Tensor, codes: Tensor, zeros: Tensor, scales: Tensor) -> dict[str, Tensor]:
        """A `[rows, H]` quantized weight holding the given rows at positions `at`, zero elsewhere, packed."""
        hidden, groups = self.hidden, self.hidden // self.group_size
        all_codes = torch.zeros((rows, hidden), dtype=torch.int8)
        all_zeros = torch.zeros((rows, groups), dtype=torch.int8)
        all_scales = torch.zeros((rows, groups), dtype=SCALE_DTYPE)
        all_codes[at], all_zeros[at], all_scales[at] = codes.to(torch.int8), zeros.to(torch.int8), scales
        return {
            "weight_packed": pack_codes(all_codes, self.bits, packed_dim=1),
            "weight_scale": all_scales,
            "weight_zero_point": pack_codes(all_zeros, self.bits, packed_dim=0),
        }

    def weight(self, part: str, slot: int) -> Tensor:
        raw = self.tensors.get((part, "raw"))
        if raw is not None:
            return raw[slot].to(self.dtype)
        rows = 2 * self.width if part == "gate_up_proj" else self.width
        qw = QuantizedWeight(
            self.tensors[(part, "weight_packed")][slot],
            self.tensors[(part, "weight_scale")][slot],
            self.tensors[(part, "weight_zero_point")][slot],
        )
        weight = dequantize(qw, self.bits, self.group_size, (rows, self.hidden), self.dtype)  # [rows, H]
        if part == "gate_up_proj":
            return weight.t() if self.transposed else weight  # runtime [H, 2w] or [2w, H]
        return weight if self.transposed else weight.t()  # runtime [w, H] or [H, w]


def full_rows(records: Mapping[str, Tensor], family: str) -> dict[str, Tensor]:
    """An expert cut to `k` channels (runtime layout at width `k`) from its full-precision channel records."""
    rows = records["rows"]  # [k, 3, H]: gate row, up row, down column
    count = int(rows.shape[0])
    gate_at, up_at = gate_up_rows(family, torch.arange(count), count)
    gate_up = rows.new_empty((2 * count, rows.shape[2]))
    gate_up[gate_at], gate_up[up_at] = rows[:, 0], rows[:, 1]
    transposed = family in TRANSPOSED
    out = {
        "gate_up_proj": gate_up.t() if transposed else gate_up,
        "down_proj": rows[:, 2] if transposed else rows[:, 2].t(),
    }
    if "gate_bias" in records:
        bias = rows.new_empty(2 * count)
        bias[gate_at], bias[up_at] = records["gate_bias"][:, 0], records["up_bias"][:, 0]
        out["gate_up_proj_bias"], out["down_proj_bias"] = bias, records["down_bias"]
    return out


Rows = tuple[Tensor, Tensor, Tensor]  # codes [k, H], zero points [k, G], scales [k, G]


def quantized_rows(records: Mapping[str, Tensor], bank: QuantizedChannelBank) -> tuple[Rows, Rows, Rows]:
    """(codes, zero points, scales) of the gate, up and down rows of `k` channels, from their integer records."""
    packed, zeros, scales = records["packed"], records["zero"], records["scale"]  # [k, 3, ...]
    count = int(packed.shape[0])

    def rows(j: int) -> Rows:
        return unpack_codes(packed[:, j], bank.bits, (count, bank.hidden), packed_dim=1), zeros[:, j], scales[:, j]

    return rows(0), rows(1), rows(2)


def record_biases(records: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if "gate_bias" not in records:
        return {}
    return {"gate": records["gate_bias"][:, 0], "up": records["up_bias"][:, 0], "down": records["down_bias"]}
