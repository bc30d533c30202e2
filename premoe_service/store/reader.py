"""Reading a store: experts through the tiers cache <- disk, checksum-verified, decoded into tensors."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

import torch
import xxhash
from safetensors.torch import load_file

from ..errors import DataCorruption, InvalidArgument
from ..experts import TIERS, ExpertBuffers, ExpertTensors, Tier
from ..fsutil import OpenFiles, remove_stale_temps
from .cache import ByteCache, CacheHealth
from .manifest import DENSE, Manifest

log = logging.getLogger(__name__)

# Tensors decoded from cache values are read-only views that are copied into slots right away.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass
class TierStats:
    """Expert reads per tier: count and bytes; plus cache repairs after a bad value."""

    loads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    repairs: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, tier: Tier, nbytes: int, count: int = 1) -> None:
        """Count reads (the loader thread, the engine loop and profiling threads all record here)."""
        with self._lock:
            self.loads[tier] += count
            self.bytes[tier] += nbytes

    def count_repair(self) -> None:
        with self._lock:
            self.repairs += 1


class Store:
    """An opened shard store: an `ExpertReader` (see `premoe_service.experts`) for the engine and the loader.

    Args:
        store_dir: The folder `premoe shard` wrote.
        cache: The cache tier (Redis or in-process); None reads from disk only.
    """

    def __init__(self, store_dir: str | Path, cache: ByteCache | None = None) -> None:
        self.dir = Path(store_dir)
        self.manifest = Manifest.load(self.dir)
        self.cache = cache
        self.stats = TierStats()
        self._files = OpenFiles()
        for folder in {self.dir, *((self.dir / info.file).parent for info in self.manifest.layers.values())}:
            remove_stale_temps(folder)  # leftovers of a killed `premoe shard`
        self._views = [(p.name, p.offset, p.nbytes, p.shape) for p in self.manifest.parts]

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def cache_key(self, layer: int, expert: int) -> str:
        return f"premoe:{self.manifest.fingerprint}:{layer}:{expert}"

    def health(self) -> CacheHealth:
        return self.cache.health() if self.cache is not None else "ok"

    # --- tiers -----------------------------------------------------------------------------------

    def read_blob(self, layer: int, expert: int) -> tuple[bytes, Tier]:
        """One expert's bytes and the tier they came from; the cache is filled (or repaired) from disk."""
        self._check_address(layer, expert)
        if self.cache is not None:
            value = self.cache.get(self.cache_key(layer, expert))
            if self._cached(value, layer, expert):
                self.stats.record("cache", len(value))
                return value, "cache"
        data = self._read_disk(layer, expert)
        if self.cache is not None:
            self.cache.put(self.cache_key(layer, expert), data)
        self.stats.record("disk", len(data))
        return data, "disk"

    def read_into(self, layer: int, expert: int, buffers: Sequence[memoryview]) -> Tier:
        """Read one expert straight into `buffers` (its parts in `part_names` order, e.g. slot memory).

        From disk this is one scatter read (`preadv`) into the buffers, with no intermediate copy; from
        the cache, one copy of the value. Checks as `read_blob`; on an error the buffers hold garbage.
        """
        return self.read_many_into([(layer, expert, buffers)])[0]

    def read_many_into(self, items: Sequence[ExpertBuffers]) -> list[Tier]:
        """`read_into` for several experts (a pattern's missing ones): one cache round trip for all of them
        (a Redis pipeline), then disk for the misses. Returns each expert's tier."""
        nbytes = self.manifest.expert_nbytes
        for layer, expert, buffers in items:
            self._check_address(layer, expert)
            if sum(b.nbytes for b in buffers) != nbytes:
                raise InvalidArgument(
                    f"buffers hold {sum(b.nbytes for b in buffers)} bytes, an expert {nbytes}", field="buffers"
                )
        values: list[bytes | None] = [None] * len(items)
        if self.cache is not None and items:
            values = self.cache.get_many([self.cache_key(layer, expert) for layer, expert, _ in items])
        tiers: list[Tier] = []
        for (layer, expert, buffers), value in zip(items, values, strict=True):
            if self._cached(value, layer, expert):
                source, offset = memoryview(value), 0
                for buffer in buffers:
                    buffer[:] = source[offset : offset + buffer.nbytes]
                    offset += buffer.nbytes
                self.stats.record("cache", nbytes)
                tiers.append("cache")
                continue
            read = os.preadv(self._fd(layer), buffers, expert * nbytes)
            # Every disk read is checked before its bytes count as the expert (in a slot) or reach the cache: a
            # file damaged after an earlier good read is caught on this read. xxh3 runs at memory speed, far
            # above what the disk delivers (see `premoe bench load`).
            hasher = xxhash.xxh3_64()
            for buffer in buffers:
                hasher.update(buffer)
            self._verify(layer, expert, read == nbytes and hasher.hexdigest() == self.manifest.checksum(layer, expert))
            if self.cache is not None:
                self.cache.put(self.cache_key(layer, expert), b"".join(buffers))
            self.stats.record("disk", nbytes)
            tiers.append("disk")
        return tiers

    def _cached(self, value: bytes | None, layer: int, expert: int) -> TypeGuard[bytes]:
        """Whether a cache value is the expert's bytes; a bad value is logged and counted, and the caller
        reads the disk and puts the right bytes back (the repair)."""
        if value is None or self.cache is None:
            return False
        if len(value) == self.manifest.expert_nbytes and (
            self.cache.trusted or xxhash.xxh3_64_hexdigest(value) == self.manifest.checksum(layer, expert)
        ):
            return True
        log.warning("cache value of layer %d expert %d fails its checksum: repairing from disk", layer, expert)
        self.stats.count_repair()
        return False

    @property
    def part_names(self) -> list[str]:
        """Expert parameter names in blob order."""
        return [name for name, *_ in self._views]

    def _verify(self, layer: int, expert: int, ok: bool) -> None:
        if not ok:
            raise DataCorruption(
                f"expert {expert} of layer {layer} in {self.dir / self.manifest.layers[layer].file} fails its "
                "checksum: the store is damaged, shard the checkpoint again",
                field=f"layer {layer} expert {expert}",
            )

    def _read_disk(self, layer: int, expert: int) -> bytes:
        nbytes = self.manifest.expert_nbytes
        data = os.pread(self._fd(layer), nbytes, expert * nbytes)
        checksum = self.manifest.checksum(layer, expert)
        self._verify(layer, expert, len(data) == nbytes and xxhash.xxh3_64_hexdigest(data) == checksum)
        return data

    def _fd(self, layer: int) -> int:
        return self._files.fd(layer, lambda: self.dir / self.manifest.layers[layer].file)

    def _check_address(self, layer: int, expert: int) -> None:
        if layer not in self.manifest.layers:
            raise InvalidArgument(
                f"not an MoE layer of this store ({self.manifest.moe_layers})", field=f"layer {layer}"
            )
        if not 0 <= expert < self.manifest.num_experts:
            raise InvalidArgument(
                f"expert {expert} out of range 0..{self.manifest.num_experts - 1}", field=f"layer {layer}"
            )

    # --- decoding --------------------------------------------------------------------------------

    def decode(self, data: bytes | bytearray) -> ExpertTensors:
        """Views of one expert's tensors over its bytes (no copy)."""
        raw = torch.frombuffer(data, dtype=torch.uint8)
        dtype = self.manifest.torch_dtype
        return {name: raw[offset : offset + n].view(dtype).view(shape) for name, offset, n, shape in self._views}

    def read(self, layer: int, expert: int) -> ExpertTensors:
        data, _ = self.read_blob(layer, expert)
        return self.decode(data)

    def dense_state_dict(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The dense part, checked against the manifest's checksum of its tensor bytes."""
        path = self.dir / DENSE
        with path.open("rb") as handle:
            header = int.from_bytes(handle.read(8), "little")
            handle.seek(8 + header)
            hasher = xxhash.xxh3_64()
            while chunk := handle.read(1 << 24):
                hasher.update(chunk)
        if hasher.hexdigest() != self.manifest.dense_checksum:
            raise DataCorruption(f"{path} fails its checksum: shard the checkpoint again", field="dense")
        tensors = load_file(str(path), device=str(device))
        if torch.device(device).type == "cpu":
            # Tensors read from a safetensors file sit at the file's offsets (16-byte aligned); BLAS rounds
            # differently on unaligned operands, so give each its own allocation, as transformers' are.
            tensors = {name: tensor.clone() for name, tensor in tensors.items()}
        return tensors

    def close(self) -> None:
        self._files.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down os already
            self.close()
