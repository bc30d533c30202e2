"""Lower-precision copies of a store's routed experts: written beside the full ones, read through cache and disk tiers.

`premoe shard --precisions bf16,int4,int2` adds, for each precision asked for, one file per MoE layer in which
every expert's tensors at that precision are contiguous (one read, one cache value), with an xxh3 checksum per
expert in the manifest's `quantized` section (what a copy holds: `store/copies.py`). Cache keys name the
precision (`premoe:<fingerprint>:<layer>:<expert>:int4`), so the copies never collide with the full experts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import xxhash
from tqdm import tqdm

from ..errors import AlreadyExists, DataCorruption, InvalidArgument
from ..experts import Tier
from ..fsutil import OpenFiles, atomic_writer
from .copies import QuantizedCopy, encode_expert, quant_layout, quantized_copies
from .manifest import DTYPES, Manifest
from .quant import BITS, FLOAT_PRECISIONS, TRANSPOSED_FAMILIES, QuantizedWeight, dequantize
from .reader import Store

__all__ = ["PrecisionReader", "QuantizedCopy", "add_precisions", "quantized_copies"]

log = logging.getLogger(__name__)


def add_precisions(
    store_dir: str | Path, precisions: tuple[str, ...], group_size: int, *, progress: bool = True
) -> Manifest:
    """Write the quantized copies a store lacks (from its full experts) and record them in its manifest."""
    store = Store(store_dir)
    manifest = store.manifest
    existing = quantized_copies(manifest)
    for name in precisions:
        if name not in BITS:
            raise InvalidArgument(f"unknown precision {name!r} (use {', '.join(BITS)})", field="precisions")
        if FLOAT_PRECISIONS.get(name) == manifest.dtype:
            raise InvalidArgument(
                f"the store's experts are {manifest.dtype} already: a {name} copy would repeat them", field="precisions"
            )
        if name in existing and name not in FLOAT_PRECISIONS and existing[name].group_size != group_size:
            raise AlreadyExists(
                f"the store holds {name} with group size {existing[name].group_size}, not {group_size}",
                field="group_size",
            )
    todo = [name for name in precisions if name not in existing]
    bar = tqdm(total=len(todo) * manifest.num_experts * len(manifest.moe_layers), desc="quantize", disable=not progress)
    for name in todo:
        floating = name in FLOAT_PRECISIONS  # no groups: every tensor cast, in the runtime layout
        layout = quant_layout(manifest, name, group_size)
        copy = QuantizedCopy(
            name,
            BITS[name],
            0 if floating else group_size,
            manifest.family in TRANSPOSED_FAMILIES and not floating,
            sum(p.nbytes for p in layout),
            layout,
            {},
            {},
            {},
        )
        for layer in manifest.moe_layers:
            file = f"{Path(manifest.layers[layer].file).with_suffix('')}.{name}.bin"
            sums, errors = [], []
            with atomic_writer(store.dir / file) as handle:
                for expert in range(manifest.num_experts):
                    blob, error = encode_expert(store.read(layer, expert), copy)
                    sums.append(xxhash.xxh3_64_hexdigest(blob))
                    errors.append(round(error, 6))
                    handle.write(blob)
                    bar.update()
            copy.files[layer], copy.checksums[layer], copy.errors[layer] = file, sums, errors
        manifest.quantized[name] = copy.to_json()
        manifest.save(store.dir)  # after each precision: a finished copy is never lost to a later failure
    bar.close()
    store.close()
    return manifest


class PrecisionReader:
    """Reads one precision's experts of a store through its tiers (cache, then disk), checksum-verified."""

    def __init__(self, store: Store, precision: str) -> None:
        copies = quantized_copies(store.manifest)
        if precision not in copies:
            raise InvalidArgument(
                f"the store holds no {precision} experts (it has {sorted(copies) or 'none'}): "
                f"add them with `premoe shard MODEL --out {store.dir} --precisions {precision}`",
                field="precision",
            )
        self.store, self.copy = store, copies[precision]
        self._files = OpenFiles()

    def cache_key(self, layer: int, expert: int) -> str:
        return f"{self.store.cache_key(layer, expert)}:{self.copy.precision}"

    def read_blob(self, layer: int, expert: int) -> tuple[bytes, Tier]:
        """One quantized expert's bytes and the tier they came from (the cache is filled or repaired)."""
        store, nbytes = self.store, self.copy.expert_nbytes
        store._check_address(layer, expert)
        checksum = self.copy.checksums[layer][expert]
        cache = store.cache
        if cache is not None:
            value = cache.get(self.cache_key(layer, expert))
            if value is not None:
                if len(value) == nbytes and (cache.trusted or xxhash.xxh3_64_hexdigest(value) == checksum):
                    store.stats.record("cache", nbytes)
                    return value, "cache"
                log.warning(
                    "cache value of layer %d expert %d (%s) fails its checksum", layer, expert, self.copy.precision
                )
                store.stats.count_repair()
        data = os.pread(self._fd(layer), nbytes, expert * nbytes)
        if len(data) != nbytes or xxhash.xxh3_64_hexdigest(data) != checksum:
            raise DataCorruption(
                f"{self.copy.precision} expert {expert} of layer {layer} fails its checksum: add the precision again",
                field=f"layer {layer} expert {expert}",
            )
        if cache is not None:
            cache.put(self.cache_key(layer, expert), data)
        store.stats.record("disk", nbytes)
        return data, "disk"

    def decode(self, data: bytes | bytearray) -> dict[str, dict[str, torch.Tensor]]:
        """Views of one expert's tensors at this precision over its bytes: part -> {tensor kind -> tensor}."""
        raw = torch.frombuffer(data, dtype=torch.uint8)
        out: dict[str, dict[str, torch.Tensor]] = {}
        dtypes = {**DTYPES, "int32": torch.int32}
        for p in self.copy.layout:
            out.setdefault(p.part, {})[p.tensor] = (
                raw[p.offset : p.offset + p.nbytes].view(dtypes[p.dtype]).view(p.shape)
            )
        return out

    def read(self, layer: int, expert: int) -> dict[str, dict[str, torch.Tensor]]:
        return self.decode(self.read_blob(layer, expert)[0])

    def read_dequantized(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's parameters in the store's dtype and runtime layout, quantized weights dequantized: the
        weights the runtime computes with (`premoe export` writes these for experts held below full precision)."""
        copy, dtype = self.copy, self.store.manifest.torch_dtype
        out = {}
        for part, kinds in self.read(layer, expert).items():
            if "raw" in kinds:  # biases in the store's dtype, or a float copy's tensors (cast back)
                out[part] = kinds["raw"].to(dtype, copy=True)
                continue
            rows, groups = kinds["weight_scale"].shape
            qw = QuantizedWeight(kinds["weight_packed"], kinds["weight_scale"], kinds["weight_zero_point"])
            weight = dequantize(qw, copy.bits, copy.group_size, (rows, groups * copy.group_size), dtype)
            out[part] = weight.t().contiguous() if copy.transposed else weight
        return out

    def _fd(self, layer: int) -> int:
        return self._files.fd(layer, lambda: self.store.dir / self.copy.files[layer])

    def close(self) -> None:
        self._files.close()
