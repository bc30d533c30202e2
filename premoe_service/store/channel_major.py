"""Channel-major copies of a store's routed experts: every expert written channel after channel, so that a channel
slot (`runtime.channel_slots`) loads its kept channels with one read per run of consecutive channel ids.

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
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor
from tqdm import tqdm

from ..errors import DataCorruption, FailedPrecondition, InvalidArgument
from ..experts import Tier
from ..families.channels import gate_up_rows
from ..fsutil import OpenFiles, atomic_write_bytes, atomic_writer, ensure_folder, remove_stale_temps
from .manifest import DTYPES
from .quant import BITS, FLOAT_PRECISIONS, TRANSPOSED_FAMILIES, quantize, unpack_codes
from .reader import Store

log = logging.getLogger(__name__)

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
        return math.prod(self.shape) * _dtype(self.dtype).itemsize


def _dtype(name: str) -> torch.dtype:
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


def runs(ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive ids in ascending `ids`."""
    start = previous = None
    for c in ids:
        if start is None:
            start = previous = c
        elif c == previous + 1:  # type: ignore[operator]
            previous = c
        else:
            yield start, previous - start + 1  # type: ignore[operator]
            start = previous = c
    if start is not None:
        yield start, previous - start + 1  # type: ignore[operator]


class ChannelMajorReader:
    """Reads an expert's kept channels from a channel-major copy, through the store's cache tier when it has one.

    With a cache (Redis, or the in-process one), each expert's whole block (its records and tail) is one cache value:
    a read asks the cache for the kept runs and the tail in one round trip (Redis GETRANGEs); on a miss it reads the
    block from disk once, verifies every record, puts it in the cache and cuts the runs from it. Without a cache it
    reads only the kept runs from disk, one read per run of consecutive ids. Every record is checked against its
    checksum (a cache the store does not trust included); a cache value that fails is read again from disk and
    put back (the repair). `bytes_read` counts the bytes read from either tier (checksums of a disk read included).
    """

    def __init__(self, store: Store, precision: str) -> None:
        folder = store.dir / FOLDER / precision
        if not (folder / LAYOUT).is_file():
            raise FailedPrecondition(
                f"the store has no channel-major {precision} copy (add it with premoe shard --channel-major)",
                field="channel_major",
            )
        self.store, self.folder = store, folder
        self.layout = ChannelLayout.from_json(json.loads((folder / LAYOUT).read_text()))
        self.bytes_read = 0
        self._files = OpenFiles()
        self._lock = threading.Lock()
        layout = self.layout
        self._key = f"premoe:{store.fingerprint}:channel-major:{precision}:{layout.group_size}:{layout.record_nbytes}"

    def cache_key(self, layer: int, expert: int) -> str:
        return f"{self._key}:{layer}:{expert}"

    def read(self, layer: int, expert: int, ids: Sequence[int]) -> tuple[dict[str, Tensor], int, Tier]:
        """The records of channels `ids` (ascending) as tensors `[k, ...]` per record field, and the tail's
        fields (whole); the bytes read and the tier they came from (counted in the store's tier stats)."""
        layout = self.layout
        inter, size = layout.intermediate, layout.record_nbytes
        if expert < 0 or expert >= self.store.manifest.num_experts or not ids or ids[-1] >= inter or ids[0] < 0:
            raise InvalidArgument(f"no channels {list(ids)[:4]}... of expert {expert} here", field="channels")
        spans = list(runs(ids))
        cache = self.store.cache
        chunks: list[bytes] | None = None
        tier: Tier
        if cache is not None:
            chunks, nbytes, tier = self._from_cache(cache, layer, expert, spans), 0, "cache"
            if chunks is not None:
                nbytes = sum(len(c) for c in chunks)
            else:
                chunks, nbytes, tier = self._fill_cache(cache, layer, expert, spans), layout.expert_nbytes, "disk"
        else:
            chunks, nbytes, tier = self._from_disk(layer, expert, spans)
        tail = chunks.pop() if layout.tail_nbytes else b""
        raw = np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(len(ids), size)
        out: dict[str, Tensor] = {}
        for field in layout.record:
            values = torch.from_numpy(raw[:, field.offset : field.offset + field.nbytes].copy())
            out[field.name] = values.view(_dtype(field.dtype)).reshape(len(ids), *field.shape)
        for field in layout.tail:
            chunk = torch.frombuffer(bytearray(tail[field.offset : field.offset + field.nbytes]), dtype=torch.uint8)
            out[field.name] = chunk.view(_dtype(field.dtype)).reshape(field.shape)
        with self._lock:
            self.bytes_read += nbytes
        self.store.stats.record(tier, nbytes)
        return out, nbytes, tier

    def _ranges(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(offset, length) in the expert's block of each run's records, then of the tail if there is one."""
        layout = self.layout
        size = layout.record_nbytes
        tail = [(layout.intermediate * size, layout.tail_nbytes)] if layout.tail_nbytes else []
        return [(first * size, count * size) for first, count in spans] + tail

    def _good(self, layer: int, expert: int, spans: list[tuple[int, int]], chunks: list[bytes]) -> bool:
        """Whether `chunks` (as `_ranges` cuts the block) are the records' and the tail's bytes."""
        sums = self._sums(layer, expert)
        size, inter = self.layout.record_nbytes, self.layout.intermediate
        for (offset, length), chunk in zip(self._ranges(spans), chunks, strict=True):
            if len(chunk) != length:
                return False
            if offset == inter * size:  # the tail
                if xxhash.xxh3_64_intdigest(chunk) != int(sums[inter]):
                    return False
                continue
            first = offset // size
            for i in range(length // size):
                if xxhash.xxh3_64_intdigest(chunk[i * size : (i + 1) * size]) != int(sums[first + i]):
                    return False
        return True

    def _from_cache(self, cache: Any, layer: int, expert: int, spans: list[tuple[int, int]]) -> list[bytes] | None:
        chunks = cache.get_ranges(self.cache_key(layer, expert), self._ranges(spans))
        if chunks is None:
            return None
        if len(chunks) == len(self._ranges(spans)) and self._good(layer, expert, spans, chunks):
            return list(chunks)
        log.warning(
            "cache value of channel-major %s layer %d expert %d fails its checksums: repairing from disk",
            self.layout.precision,
            layer,
            expert,
        )
        self.store.stats.count_repair()
        return None

    def _fill_cache(self, cache: Any, layer: int, expert: int, spans: list[tuple[int, int]]) -> list[bytes]:
        """Read the expert's whole block from disk, verify every record, cache it, and cut `spans` from it."""
        layout = self.layout
        block = os.pread(self._fd(layer, "bin"), layout.expert_nbytes, expert * layout.expert_nbytes)
        whole = [(0, layout.intermediate)]
        if len(block) != layout.expert_nbytes or not self._good(layer, expert, whole, self._cut(block, whole)):
            self._corrupt(layer, expert, whole, self._cut(block, whole))
        cache.put(self.cache_key(layer, expert), block)
        return self._cut(block, spans)

    def _cut(self, block: bytes, spans: list[tuple[int, int]]) -> list[bytes]:
        view = memoryview(block)
        return [bytes(view[offset : offset + length]) for offset, length in self._ranges(spans)]

    def _from_disk(self, layer: int, expert: int, spans: list[tuple[int, int]]) -> tuple[list[bytes], int, Tier]:
        """The kept runs and the tail read from disk, one read each."""
        base = expert * self.layout.expert_nbytes
        fd = self._fd(layer, "bin")
        chunks = [os.pread(fd, length, base + offset) for offset, length in self._ranges(spans)]
        if not self._good(layer, expert, spans, chunks):
            self._corrupt(layer, expert, spans, chunks)
        nbytes = sum(len(c) for c in chunks) + (self.layout.intermediate + 1) * 8  # and the checksum row
        return chunks, nbytes, "disk"

    def _corrupt(self, layer: int, expert: int, spans: list[tuple[int, int]], chunks: list[bytes]) -> None:
        """Raise DataCorruption naming the first record (or the tail) of `chunks` that fails."""
        sums = self._sums(layer, expert)
        size, inter = self.layout.record_nbytes, self.layout.intermediate
        what = "the tail"
        for (offset, length), chunk in zip(self._ranges(spans), chunks, strict=True):
            if offset == inter * size:
                break
            first = offset // size
            bad = [
                first + i
                for i in range(length // size)
                if xxhash.xxh3_64_intdigest(chunk[i * size : (i + 1) * size]) != int(sums[first + i])
            ]
            if bad or len(chunk) != length:
                what = f"channel {bad[0] if bad else first}"
                break
        raise DataCorruption(
            f"{what} of expert {expert} of layer {layer} fails its checksum in the channel-major "
            f"{self.layout.precision} copy: write it again (premoe shard --channel-major)",
            field=f"layer {layer} expert {expert}",
        )

    def _sums(self, layer: int, expert: int) -> np.ndarray:
        """The expert's checksum row: one xxh3-64 per record, then the tail's."""
        inter = self.layout.intermediate
        row = os.pread(self._fd(layer, "xxh"), (inter + 1) * 8, expert * (inter + 1) * 8)
        if len(row) != (inter + 1) * 8:
            raise DataCorruption(
                f"the checksums of expert {expert} of layer {layer} are missing from the channel-major "
                f"{self.layout.precision} copy: write it again (premoe shard --channel-major)",
                field=f"layer {layer} expert {expert}",
            )
        return np.frombuffer(row, dtype=np.uint64)

    def _fd(self, layer: int, kind: str) -> int:
        return self._files.fd((layer, kind), lambda: self.folder / f"layer_{layer:03d}.{kind}")

    def close(self) -> None:
        self._files.close()


__all__ = ["ChannelLayout", "ChannelMajorReader", "add_channel_major", "channel_group_size", "runs"]
