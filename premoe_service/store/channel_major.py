"""Channel-major copies of a store's routed experts: every expert written channel after channel, so that a channel
slot (`runtime.channel_slots`) loads its kept channels with one read per run of consecutive channel ids
(`store.channel_major_reader`); this module writes them and describes their layout.

`STORE/channel-major/<precision>/` holds, per MoE layer, `layer_NNN.bin` and `layer_NNN.xxh`:

- each expert is a block of `I` records and a tail; record `c` is channel `c`: its gate row, up row and down
  column, each a row of the hidden size `H`, and (GPT-OSS) its gate and up biases; the tail is the expert's down
  bias (the same whatever the channels).
  - `full`: the three rows in the store's dtype (`3 H` values), then the biases.
  - an integer precision: the three rows' packed integers (`ceil(H * bits / 32)` int32 each), their float16 scales
    (`3 x H / group`) and their zero points, one int8 each (`3 x H / group`: packed per record, not across
    channels, so any record stands alone), then the biases in the store's dtype. Gate and up rows are the store
    copy's own integers, scales and zero points (it groups them along the hidden size); the down column is the
    full expert's, quantized one channel a row (the copy groups the down projection along the channels): what
    `store.channels.ChannelReader` computes, so a slot loaded either way holds the same bytes.
- `layer_NNN.xxh`: `[E, I + 1]` xxh3-64 of each record and of each tail, so that a read of any run of records is
  verified record by record.
- `layout.json`: precision, bits, group size, `H`, `I`, the record's and the tail's layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor
from tqdm import tqdm

from ..errors import DataCorruption, InvalidArgument
from ..families.channels import gate_up_rows
from ..fsutil import atomic_write_bytes, atomic_writer, ensure_folder, remove_stale_temps
from .manifest import DTYPES
from .quant import BITS, FLOAT_PRECISIONS, TRANSPOSED_FAMILIES, quantize, unpack_codes
from .reader import Store

FOLDER = "channel-major"
LAYOUT = "layout.json"
_FORMAT = 1


@dataclass(frozen=True)
class Field:
    """One tensor of a record (or of the tail): name, dtype name, shape, byte offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_of(self.dtype).itemsize


def dtype_of(name: str) -> torch.dtype:
    return {**DTYPES, "int32": torch.int32, "int8": torch.int8, "float16": torch.float16}[name]


def _fields(specs: Sequence[tuple[str, str, tuple[int, ...]]]) -> tuple[tuple[Field, ...], int]:
    out, offset = [], 0
    for name, dtype, shape in specs:
        field = Field(name, dtype, shape, offset)
        out.append(field)
        offset += field.nbytes
    return tuple(out), offset


@dataclass(frozen=True)
class ChannelLayout:
    """Where each channel's bytes lie in a channel-major copy (see the module doc)."""

    precision: str
    bits: int  # 0 for full precision
    group_size: int  # 0 for full precision
    hidden: int
    intermediate: int
    biased: bool
    record: tuple[Field, ...]
    record_nbytes: int
    tail: tuple[Field, ...]
    tail_nbytes: int

    @property
    def expert_nbytes(self) -> int:
        return self.intermediate * self.record_nbytes + self.tail_nbytes

    @classmethod
    def build(
        cls, precision: str, hidden: int, intermediate: int, biased: bool, store_dtype: str, group_size: int
    ) -> ChannelLayout:
        bias = [("gate_bias", store_dtype, (1,)), ("up_bias", store_dtype, (1,))] if biased else []
        if precision == "full":
            specs = [("rows", store_dtype, (3, hidden)), *bias]
            bits, group_size = 0, 0
        else:
            bits = BITS[precision]
            groups = hidden // group_size
            specs = [
                ("packed", "int32", (3, math.ceil(hidden * bits / 32))),
                ("scale", "float16", (3, groups)),
                ("zero", "int8", (3, groups)),
                *bias,
            ]
        record, record_nbytes = _fields(specs)
        tail, tail_nbytes = _fields([("down_bias", store_dtype, (hidden,))] if biased else [])
        return cls(precision, bits, group_size, hidden, intermediate, biased, record, record_nbytes, tail, tail_nbytes)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "precision": self.precision,
            "bits": self.bits,
            "group_size": self.group_size,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "biased": self.biased,
            "record": [[f.name, f.dtype, list(f.shape), f.offset] for f in self.record],
            "record_nbytes": self.record_nbytes,
            "tail": [[f.name, f.dtype, list(f.shape), f.offset] for f in self.tail],
            "tail_nbytes": self.tail_nbytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChannelLayout:
        if data.get("format") != _FORMAT:
            raise DataCorruption(f"unknown channel-major format {data.get('format')!r}", field="channel-major")
        record = tuple(Field(n, d, tuple(s), o) for n, d, s, o in data["record"])
        tail = tuple(Field(n, d, tuple(s), o) for n, d, s, o in data["tail"])
        return cls(
            data["precision"],
            int(data["bits"]),
            int(data["group_size"]),
            int(data["hidden"]),
            int(data["intermediate"]),
            bool(data["biased"]),
            record,
            int(data["record_nbytes"]),
            tail,
            int(data["tail_nbytes"]),
        )


def channel_group_size(store: Store) -> int:
    """The group size integer channel slices use: the store copies' one group size, else 64 (as
    `store.channels.ChannelReader`)."""
    from .copies import quantized_copies

    sizes = {c.group_size for c in quantized_copies(store.manifest).values() if c.group_size}
    return sizes.pop() if len(sizes) == 1 else 64


def _shape(store: Store) -> tuple[int, int, bool]:
    parts = {p.name: tuple(p.shape) for p in store.manifest.parts}
    down = parts["down_proj"]
    transposed = store.manifest.family in TRANSPOSED_FAMILIES
    hidden, intermediate = (down[1], down[0]) if transposed else (down[0], down[1])
    return int(hidden), int(intermediate), "gate_up_proj_bias" in parts


def expert_records(store: Store, layout: ChannelLayout, layer: int, expert: int, reader: Any = None) -> bytes:
    """One expert's block in `layout` (records of channels 0..I-1, then the tail), from the store (and, for an
    integer precision, the `reader` of its copy)."""
    family = store.manifest.family
    transposed = family in TRANSPOSED_FAMILIES
    full = store.read(layer, expert)
    hidden, inter = layout.hidden, layout.intermediate
    down = full["down_proj"]
    down_rows = (down if transposed else down.t()).contiguous()  # [I, H]
    gate_pos, up_pos = gate_up_rows(family, torch.arange(inter), inter)  # each channel's gate and up rows
    arrays: dict[str, Tensor] = {}  # record field -> [I, ...]
    if layout.precision == "full":
        gate_up = full["gate_up_proj"]
        rows = gate_up.t() if transposed else gate_up  # [2I, H] in the family's channel order
        stacked = torch.stack([rows[gate_pos], rows[up_pos], down_rows], dim=1)  # [I, 3, H]
        arrays["rows"] = stacked
    else:
        bits, group = layout.bits, layout.group_size
        groups = hidden // group
        copy = reader.read(layer, expert)["gate_up_proj"]
        words = copy["weight_packed"]  # [2I, words], one row per gate/up row
        zeros = unpack_codes(copy["weight_zero_point"], bits, (2 * inter, groups), packed_dim=0)
        qw = quantize(down_rows, bits, group)
        down_zeros = unpack_codes(qw.zero, bits, (inter, groups), packed_dim=0)
        arrays["packed"] = torch.stack([words[gate_pos], words[up_pos], qw.packed], dim=1)
        arrays["scale"] = torch.stack([copy["weight_scale"][gate_pos], copy["weight_scale"][up_pos], qw.scale], dim=1)
        arrays["zero"] = torch.stack([zeros[gate_pos], zeros[up_pos], down_zeros], dim=1).to(torch.int8)
    if layout.biased:
        bias = full["gate_up_proj_bias"]
        arrays["gate_bias"] = bias[gate_pos].reshape(inter, 1)
        arrays["up_bias"] = bias[up_pos].reshape(inter, 1)
    block = np.zeros((inter, layout.record_nbytes), dtype=np.uint8)
    for field in layout.record:
        block[:, field.offset : field.offset + field.nbytes] = _bytes(arrays[field.name]).reshape(inter, -1)
    tail = _bytes(full["down_proj_bias"]).tobytes() if layout.tail else b""  # the tail's one field, the down bias
    return block.tobytes() + tail


def _bytes(tensor: Tensor) -> np.ndarray:
    """A tensor's bytes as a uint8 array (any dtype, bfloat16 included)."""
    return tensor.contiguous().view(torch.uint8).numpy()


def add_channel_major(
    store_dir: str | Path, precisions: Sequence[str], *, progress: bool = True
) -> list[tuple[Path, bool]]:
    """Write channel-major copies of the store's experts at `precisions` (`full`, or integer precisions whose copy
    the store holds); returns each copy's folder and whether it was written (False: an up-to-date copy of this
    store, with this layout, was there already).

    A copy is written file by file through temp files; its `layout.json` (which readers look for) is removed first
    and written last, so a copy interrupted half way is never read, and the next run writes it again."""
    store = Store(store_dir)
    hidden, intermediate, biased = _shape(store)
    group = channel_group_size(store)
    done = []
    for precision in precisions:
        if precision != "full" and (precision not in BITS or precision in FLOAT_PRECISIONS):
            raise InvalidArgument(
                f"no channel-major copy at {precision!r}: full or an integer precision", field="channel_major"
            )
        reader = None
        if precision != "full":
            from .quantized_copies import PrecisionReader

            reader = PrecisionReader(store, precision)  # refuses a precision the store has no copy of
        layout = ChannelLayout.build(precision, hidden, intermediate, biased, store.manifest.dtype, group)
        folder = store.dir / FOLDER / precision
        described = {**layout.to_json(), "store": store.fingerprint}
        if _up_to_date(folder, described, store, layout):
            done.append((folder, False))
            continue
        ensure_folder(folder)
        remove_stale_temps(folder)
        (folder / LAYOUT).unlink(missing_ok=True)
        layers = store.manifest.moe_layers
        experts = store.manifest.num_experts
        bar = tqdm(total=len(layers) * experts, desc=f"channel-major {precision}", disable=not progress)
        for layer in layers:
            sums = np.zeros((experts, intermediate + 1), dtype=np.uint64)
            with atomic_writer(folder / f"layer_{layer:03d}.bin") as out:
                for expert in range(experts):
                    block = expert_records(store, layout, layer, expert, reader)
                    size = layout.record_nbytes
                    for c in range(intermediate):
                        sums[expert, c] = xxhash.xxh3_64_intdigest(block[c * size : (c + 1) * size])
                    sums[expert, intermediate] = xxhash.xxh3_64_intdigest(block[intermediate * size :])
                    out.write(block)
                    bar.update()
            atomic_write_bytes(folder / f"layer_{layer:03d}.xxh", sums.tobytes())
        bar.close()
        atomic_write_bytes(folder / LAYOUT, (json.dumps(described, indent=1) + "\n").encode())
        if reader is not None:
            reader.close()
        done.append((folder, True))
    store.close()
    return done


def _up_to_date(folder: Path, described: dict[str, Any], store: Store, layout: ChannelLayout) -> bool:
    """Whether `folder` holds a whole copy described by `described` (its layout and the store's fingerprint)."""
    try:
        if json.loads((folder / LAYOUT).read_text()) != described:
            return False
        experts = store.manifest.num_experts
        return all(
            (folder / f"layer_{layer:03d}.bin").stat().st_size == experts * layout.expert_nbytes
            and (folder / f"layer_{layer:03d}.xxh").stat().st_size == experts * (layout.intermediate + 1) * 8
            for layer in store.manifest.moe_layers
        )
    except (OSError, ValueError):
        return False


__all__ = ["FOLDER", "LAYOUT", "ChannelLayout", "add_channel_major", "channel_group_size", "dtype_of"]
