"""Expert loads at lower precisions: bytes moved per expert, and each tier against raw reads of the same bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..pattern import Pattern
from ..runtime.build import load_engine, resolve_device
from ..runtime.quantized import attach_precisions
from ..store import RedisCache, Store
from ..store.precisions import PrecisionReader, quantized_copies
from .load import Row, _interleaved


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
                *_interleaved(ours_disk, raw_disk, rounds),
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

    rows = [Row(f"{label} redis", *_interleaved(ours_redis, raw_redis, rounds), size * len(keys), "GET", len(keys))]

    # Pattern switches into quantized slots (half the experts of every layer at this precision) vs GET + a plain
    # copy of each blob into its own buffer.
    target = resolve_device(device)
    engine, _ = load_engine(store, capacity=engine_floor(store), device=target)
    spec = engine.spec
    half = spec.num_experts // 2
    attach_precisions(engine, store, {precision: half})
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
        engine.load(flip[0], store)
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
            *_interleaved(ours_slots, raw_slots, rounds),
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
