"""Reading an expert's kept channels from a store's channel-major copy (`store.channel_major`), through the store's
cache tier when it has one: see `ChannelMajorReader`."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor

from ..errors import DataCorruption, FailedPrecondition, InvalidArgument
from ..experts import Tier
from ..fsutil import OpenFiles
from .channel_major import FOLDER, LAYOUT, ChannelLayout, dtype_of
from .reader import Store

log = logging.getLogger(__name__)


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
            out[field.name] = values.view(dtype_of(field.dtype)).reshape(len(ids), *field.shape)
        for field in layout.tail:
            chunk = torch.frombuffer(bytearray(tail[field.offset : field.offset + field.nbytes]), dtype=torch.uint8)
            out[field.name] = chunk.view(dtype_of(field.dtype)).reshape(field.shape)
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


__all__ = ["ChannelMajorReader", "runs"]
