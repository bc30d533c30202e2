"""Expert-load benchmark: each tier of the store next to the raw read of the same bytes, in one run."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..loopback import temporary_redis
from ..pattern import Pattern
from ..runtime.build import load_model, resolve_device
from ..runtime.quantized import attach_precisions
from ..runtime.residency import Budget
from ..store import MemoryCache, RedisCache, Store, shard
from ..store.quant import DEFAULT_GROUP_SIZE
from ..store.quantized_copies import PrecisionReader, quantized_copies
from .common import bench_model_dir, interleaved


@dataclass
class Row:
    tier: str
    ours_s: float
    raw_s: float
    nbytes: int
    baseline: str

    @property
    def ratio(self) -> float:
        return self.raw_s / self.ours_s

    reads: int = 1

    def line(self) -> str:
        gbps = lambda s: self.nbytes / s / 1e9  # noqa: E731
        per_read = lambda s: s / self.reads * 1e6  # noqa: E731
        return (
            f"{self.tier:<40} {gbps(self.ours_s):>9.2f} {gbps(self.raw_s):>9.2f} {per_read(self.ours_s):>9.1f} "
            f"{per_read(self.raw_s):>9.1f} {self.ratio:>7.2f}   {self.baseline}"
        )


def bench_store(store_dir: Path, redis_url: str | None, rounds: int = 7, device: str | None = None) -> list[Row]:
    """Measure every tier of `store_dir`; returns one row per tier."""
    disk_store = Store(store_dir)
    manifest = disk_store.manifest
    addresses = [(layer, e) for layer in manifest.moe_layers for e in range(manifest.num_experts)]
    nbytes = manifest.expert_nbytes * len(addresses)
    rows = []

    # Disk: pread + checksum of each expert vs plain pread of the same ranges (page cache warm for both).
    fds = {layer: os.open(store_dir / manifest.layers[layer].file, os.O_RDONLY) for layer in manifest.moe_layers}
    size = manifest.expert_nbytes

    def raw_disk() -> None:
        for layer, e in addresses:
            os.pread(fds[layer], size, e * size)

    def ours_disk() -> None:
        for layer, e in addresses:
            disk_store.read_blob(layer, e)

    def ours_disk_first() -> None:  # a fresh store verifies every expert's checksum on its first read
        fresh = Store(store_dir)
        for layer, e in addresses:
            fresh.read_blob(layer, e)
        fresh.close()

    raw_disk()
    ours_disk()
    rows.append(
        Row(
            "disk, first read",
            *interleaved(ours_disk_first, raw_disk, rounds),
            nbytes,
            "os.pread of the same byte ranges (ours adds the xxh3 check)",
            len(addresses),
        )
    )
    rows.append(
        Row(
            "disk, re-read",
            *interleaved(ours_disk, raw_disk, rounds),
            nbytes,
            "os.pread of the same byte ranges",
            len(addresses),
        )
    )

    memory_store = Store(store_dir, MemoryCache(nbytes * 2))
    for layer, e in addresses:
        memory_store.read_blob(layer, e)
    memory = memory_store.cache
    assert isinstance(memory, MemoryCache)
    keys = [memory_store.cache_key(layer, e) for layer, e in addresses]

    def raw_memory() -> None:
        for key in keys:
            memory.get(key)

    def ours_memory() -> None:
        for layer, e in addresses:
            memory_store.read_blob(layer, e)

    rows.append(
        Row(
            "memory cache",
            *interleaved(ours_memory, raw_memory, rounds),
            nbytes,
            "dict lookup of the same bytes (nothing copied: per-read overhead)",
            len(addresses),
        )
    )

    if redis_url:
        redis_store = Store(store_dir, RedisCache(redis_url))
        for layer, e in addresses:
            redis_store.read_blob(layer, e)  # fill
        client = RedisCache(redis_url).client
        rkeys = [redis_store.cache_key(layer, e) for layer, e in addresses]

        def raw_redis() -> None:
            for key in rkeys:
                client.get(key)

        def ours_redis() -> None:
            for layer, e in addresses:
                redis_store.read_blob(layer, e)

        rows.append(
            Row(
                "redis",
                *interleaved(ours_redis, raw_redis, rounds),
                nbytes,
                "redis-py GET of the same keys",
                len(addresses),
            )
        )

        # Whole pattern loads into device slots through Redis vs raw GETs plus a copy to the device.
        target = resolve_device(device)
        patterned, residency = load_model(redis_store, Budget(fraction=0.5), device=target)
        spec = patterned.spec
        half = spec.num_experts // 2
        a = Pattern.build(spec, {layer: range(half) for layer in spec.moe_layers})
        b = Pattern.build(spec, {layer: range(half, 2 * half) for layer in spec.moe_layers})
        staging = torch.empty(manifest.expert_nbytes, dtype=torch.uint8, device=target)
        half_keys = [redis_store.cache_key(layer, e) for layer in spec.moe_layers for e in range(half)]

        staging_np = staging.numpy() if target.type == "cpu" else None

        def raw_slots() -> None:
            for key in half_keys:
                value = client.get(key)
                if staging_np is not None:  # the fastest plain copy on the CPU
                    np.copyto(staging_np, np.frombuffer(value, dtype=np.uint8))
                else:
                    staging.copy_(torch.frombuffer(value, dtype=torch.uint8))
            if target.type == "cuda":
                torch.cuda.synchronize()

        flip = [a, b]

        def ours_slots() -> None:
            with residency.lease(flip[0]):
                pass
            flip.reverse()
            if target.type == "cuda":
                torch.cuda.synchronize()

        ours_slots()
        ours_slots()
        rows.append(
            Row(
                f"redis -> {target.type} slots",
                *interleaved(ours_slots, raw_slots, rounds),
                len(half_keys) * size,
                "GET + plain copy of each blob into one device buffer",
                len(half_keys),
            )
        )
    rows.append(_slots_from_disk(store_dir, fds, rounds, device))
    rows.append(_slots_from_memory(store_dir, rounds, device))
    for fd in fds.values():
        os.close(fd)
    return rows


def _slots_from_disk(store_dir: Path, fds: dict[int, int], rounds: int, device: str | None) -> Row:
    """Pattern switches from disk (no cache) into slots vs preadv of the same ranges, one buffer per expert."""
    store = Store(store_dir)
    target = resolve_device(device)
    patterned, residency = load_model(store, Budget(fraction=0.5), device=target)
    spec, size = patterned.spec, store.manifest.expert_nbytes
    half = spec.num_experts // 2
    flip = [
        Pattern.build(spec, {layer: range(start, start + half) for layer in spec.moe_layers}) for start in (0, half)
    ]
    addresses = [(layer, e) for layer in spec.moe_layers for e in range(half)]
    # One destination per expert, like slots: a single reused buffer would stay in the CPU cache.
    staging = np.zeros((len(addresses), size), dtype=np.uint8)

    def ours() -> None:
        with residency.lease(flip[0]):
            pass
        flip.reverse()
        if target.type == "cuda":
            torch.cuda.synchronize()

    def raw() -> None:
        for row, (layer, e) in enumerate(addresses):
            os.preadv(fds[layer], [staging[row]], e * size)

    ours()
    ours()
    return Row(
        f"disk -> {target.type} slots",
        *interleaved(ours, raw, rounds),
        len(addresses) * size,
        "os.preadv of the same ranges, one buffer per expert",
        len(addresses),
    )


def _slots_from_memory(store_dir: Path, rounds: int, device: str | None) -> Row:
    """Host-to-device bandwidth of the loader: pattern switches whose experts are all in the in-process cache, into
    slots, vs one copy of the same bytes from a host buffer (page-locked on CUDA) into one device buffer."""
    manifest = Store(store_dir).manifest
    store = Store(store_dir, MemoryCache(manifest.expert_nbytes * manifest.num_experts * len(manifest.moe_layers) * 2))
    target = resolve_device(device)
    patterned, residency = load_model(store, Budget(fraction=0.5), device=target)
    spec, size = patterned.spec, manifest.expert_nbytes
    half = spec.num_experts // 2
    flip = [
        Pattern.build(spec, {layer: range(start, start + half) for layer in spec.moe_layers}) for start in (0, half)
    ]
    count = half * len(spec.moe_layers)
    host = torch.zeros(count * size, dtype=torch.uint8, pin_memory=target.type == "cuda")
    dest = torch.empty(count * size, dtype=torch.uint8, device=target)

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> None:
        with residency.lease(flip[0]):
            pass
        flip.reverse()
        sync()

    host_np, dest_np = (host.numpy(), dest.numpy()) if target.type == "cpu" else (None, None)

    def raw() -> None:
        if host_np is not None and dest_np is not None:  # the fastest plain copy on the CPU
            np.copyto(dest_np, host_np)
        else:
            dest.copy_(host, non_blocking=True)
        sync()

    for _ in range(2):  # the first two switches fill the cache from disk
        ours()
    return Row(
        f"memory cache -> {target.type} slots",
        *interleaved(ours, raw, rounds),
        count * size,
        f"one copy of the same bytes, {'page-locked host' if target.type == 'cuda' else 'host'} -> {target.type}",
        count,
    )


def main(
    store: str | None,
    redis_url: str | None,
    hidden: int,
    experts: int,
    layers: int,
    rounds: int,
    device: str | None,
    precisions: tuple[str, ...] = (),
    group_size: int = DEFAULT_GROUP_SIZE,
) -> list[Row]:
    """Run the benchmark and print the table (building a throwaway store when none is given); with `precisions`,
    also each quantized copy (added to the store when it lacks them)."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        temporary_redis() if redis_url is None else _given(redis_url) as url,
    ):
        store_dir = Path(store) if store else None
        if store_dir is None:
            ckpt = bench_model_dir(Path(tmp) / "ckpt", hidden, experts, layers)
            store_dir = Path(tmp) / "store"
            shard(ckpt, store_dir, progress=False)
        rows = bench_store(store_dir, url, rounds=rounds, device=device)
        if precisions:
            from ..store.quantized_copies import add_precisions

            add_precisions(store_dir, precisions, group_size, progress=False)
            rows += bench_quantized(store_dir, url, rounds, device)
        manifest = Store(store_dir).manifest
        print(
            f"store: {manifest.family}, {len(manifest.moe_layers)} MoE layers x {manifest.num_experts} experts, "
            f"{manifest.expert_nbytes / 2**20:.2f} MiB per expert; median of {rounds} interleaved rounds"
        )
    print(f"{'tier':<40} {'ours GB/s':>9} {'raw GB/s':>9} {'ours us':>9} {'raw us':>9} {'ratio':>7}   raw baseline")
    for row in rows:
        print(row.line())
    return rows


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


# --- lower precisions: bytes moved per expert, each tier against raw reads of the same bytes ---


def bench_quantized(store_dir: Path, redis_url: str | None, rounds: int, device: str | None) -> list[Row]:
    """Per quantized copy of the store: disk (checksummed first read), Redis, and whole pattern switches from
    Redis into quantized slots, each next to the raw read of the same byte ranges or keys."""
    rows = []
    manifest = Store(store_dir).manifest
    addresses = [(layer, e) for layer in manifest.moe_layers for e in range(manifest.num_experts)]
    for precision, copy in quantized_copies(manifest).items():
        size = copy.expert_nbytes
        nbytes = size * len(addresses)
        fds = {layer: os.open(store_dir / copy.files[layer], os.O_RDONLY) for layer in manifest.moe_layers}

        def raw_disk() -> None:
            for layer, e in addresses:
                os.pread(fds[layer], size, e * size)  # noqa: B023 - used within this iteration only

        reader = PrecisionReader(Store(store_dir), precision)

        def ours_disk() -> None:  # every disk read of a quantized copy is checksummed
            for layer, e in addresses:
                reader.read_blob(layer, e)  # noqa: B023

        raw_disk()
        label = f"{precision} ({size / manifest.expert_nbytes:.1%} of full)"
        rows.append(
            Row(
                f"{label} disk",
                *interleaved(ours_disk, raw_disk, rounds),
                nbytes,
                "os.pread of the same ranges (ours adds the xxh3 check)",
                len(addresses),
            )
        )
        reader.close()
        if redis_url:
            rows += _redis_rows(store_dir, redis_url, precision, label, rounds, device)
        for fd in fds.values():
            os.close(fd)
    return rows


def _redis_rows(store_dir: Path, url: str, precision: str, label: str, rounds: int, device: str | None) -> list[Row]:
    store = Store(store_dir, RedisCache(url))
    reader = PrecisionReader(store, precision)
    manifest, size = store.manifest, reader.copy.expert_nbytes
    addresses = [(layer, e) for layer in manifest.moe_layers for e in range(manifest.num_experts)]
    for layer, e in addresses:
        reader.read_blob(layer, e)  # fill
    client = RedisCache(url).client
    keys = [reader.cache_key(layer, e) for layer, e in addresses]

    def raw_redis() -> None:
        for key in keys:
            client.get(key)

    def ours_redis() -> None:
        for layer, e in addresses:
            reader.read_blob(layer, e)

    rows = [Row(f"{label} redis", *interleaved(ours_redis, raw_redis, rounds), size * len(keys), "GET", len(keys))]

    # Pattern switches into quantized slots (half the experts of every layer at this precision) vs GET + a plain
    # copy of each blob into its own buffer.
    target = resolve_device(device)
    patterned, _ = load_model(store, capacity=engine_floor(store), device=target)
    spec = patterned.spec
    half = spec.num_experts // 2
    attach_precisions(patterned, store, {precision: half})
    flip = [
        Pattern.build(
            spec,
            {layer: range(start, start + half) for layer in spec.moe_layers},
            {layer: dict.fromkeys(range(start, start + half), precision) for layer in spec.moe_layers},
        )
        for start in (0, half)
    ]
    half_keys = [reader.cache_key(layer, e) for layer in spec.moe_layers for e in range(half)]
    staging = np.zeros((len(half_keys), size), dtype=np.uint8)

    def ours_slots() -> None:
        patterned.load(flip[0], store)
        flip.reverse()
        if target.type == "cuda":
            torch.cuda.synchronize()

    def raw_slots() -> None:
        for row, key in enumerate(half_keys):
            np.copyto(staging[row], np.frombuffer(client.get(key), dtype=np.uint8))

    ours_slots()
    ours_slots()
    rows.append(
        Row(
            f"{label} redis -> {target.type} slots",
            *interleaved(ours_slots, raw_slots, rounds),
            size * len(half_keys),
            "GET + copy into one buffer per expert",
            len(half_keys),
        )
    )
    return rows


def engine_floor(store: Store) -> int:
    """The fewest full-precision slots an engine may have: the routing's top-k (they stay empty here)."""
    from transformers import AutoConfig

    from ..families import adapter_for

    config = AutoConfig.from_pretrained(store.dir, local_files_only=True)
    return adapter_for(config).spec(config).top_k
