"""Quantized copies of a store's routed experts: written beside the full ones, read through cache and disk tiers.

`premoe shard --precisions int4,int2` adds, for each precision asked for, one file per MoE layer in which
every expert's quantized tensors are contiguous (one read, one cache value), with an xxh3 checksum per
expert in the manifest's `quantized` section. Cache keys name the precision
(`premoe:<fingerprint>:<layer>:<expert>:int4`), so the copies never collide with the full experts.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from tqdm import tqdm

from ..errors import AlreadyExists, DataCorruption, InvalidArgument
from ..experts import Tier
from ..fsutil import atomic_writer
from .checkpoint_io import tensor_bytes
from .manifest import DTYPES, Manifest
from .quant import (
    BITS,
    SCALE_DTYPE,
    TRANSPOSED_FAMILIES,
    QuantizedWeight,
    check_group,
    dequantize,
    packed_shapes,
    quantize,
)
from .reader import Store

log = logging.getLogger(__name__)

QUANT_FORMAT = "compressed-tensors pack-quantized, asymmetric, group"
_DTYPE_NAMES = {torch.int32: "int32", SCALE_DTYPE: "float16"}


@dataclass(frozen=True)
class QuantPart:
    """One tensor of a quantized expert blob: `part` is the expert parameter, `tensor` what of it this is
    (`weight_packed`, `weight_scale`, `weight_zero_point`, or `raw` for tensors kept as they are, biases)."""

    part: str
    tensor: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class QuantizedCopy:
    """One precision's copy of every routed expert: scheme, blob layout, files and checksums."""

    precision: str
    bits: int
    group_size: int
    transposed: bool  # experts are stored [in, out] (GPT-OSS): each weight is quantized as its transpose
    expert_nbytes: int
    layout: tuple[QuantPart, ...]
    files: dict[int, str]
    checksums: dict[int, list[str]]
    errors: dict[int, list[float]]  # per expert: ||W - deq(q(W))|| / ||W|| over its quantized weights

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "format": QUANT_FORMAT,
            "transposed": self.transposed,
            "expert_nbytes": self.expert_nbytes,
            "layout": [asdict(p) for p in self.layout],
            "layers": {
                str(k): {"file": self.files[k], "checksums": self.checksums[k], "errors": self.errors[k]}
                for k in self.files
            },
        }

    @classmethod
    def from_json(cls, precision: str, data: dict[str, Any]) -> QuantizedCopy:
        try:
            layout = tuple(QuantPart(**{**p, "shape": tuple(p["shape"])}) for p in data["layout"])
            layers = data["layers"]
            copy = cls(
                precision=precision,
                bits=int(data["bits"]),
                group_size=int(data["group_size"]),
                transposed=bool(data["transposed"]),
                expert_nbytes=int(data["expert_nbytes"]),
                layout=layout,
                files={int(k): str(v["file"]) for k, v in layers.items()},
                checksums={int(k): list(v["checksums"]) for k, v in layers.items()},
                errors={int(k): [float(x) for x in v["errors"]] for k, v in layers.items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataCorruption(
                f"quantized copy {precision} is damaged: {exc}", field=f"manifest.{precision}"
            ) from exc
        if sum(p.nbytes for p in layout) != copy.expert_nbytes:
            raise DataCorruption("quantized part sizes do not add up", field=f"manifest.{precision}")
        return copy


def quant_layout(manifest: Manifest, bits: int, group_size: int) -> tuple[QuantPart, ...]:
    """Where each tensor of one quantized expert lies in its blob."""
    transposed = manifest.family in TRANSPOSED_FAMILIES
    parts, offset = [], 0
    for part in manifest.parts:
        if len(part.shape) != 2 or part.name.endswith("_bias"):
            parts.append(QuantPart(part.name, "raw", manifest.dtype, part.shape, offset, part.nbytes))
            offset += part.nbytes
            continue
        out, inp = (part.shape[1], part.shape[0]) if transposed else part.shape
        check_group(inp, group_size, part.name)
        for tensor, shape in packed_shapes(out, inp, bits, group_size).items():
            dtype = SCALE_DTYPE if tensor == "weight_scale" else torch.int32
            nbytes = math.prod(shape) * dtype.itemsize
            parts.append(QuantPart(part.name, tensor, _DTYPE_NAMES[dtype], shape, offset, nbytes))
            offset += nbytes
    return tuple(parts)


def quantized_copies(manifest: Manifest) -> dict[str, QuantizedCopy]:
    return {name: QuantizedCopy.from_json(name, data) for name, data in manifest.quantized.items()}


def encode_expert(tensors: dict[str, torch.Tensor], copy: QuantizedCopy) -> tuple[bytes, float]:
    """One expert's full-precision tensors -> its quantized blob (in `copy.layout` order) and its relative
    weight error (what the precision loses: the selection's error weight)."""
    chunks: list[bytes] = []
    done: dict[str, QuantizedWeight] = {}
    lost = total = 0.0
    for part in copy.layout:
        tensor = tensors[part.part]
        if part.tensor == "raw":
            chunks.append(bytes(tensor_bytes(tensor)))
            continue
        if part.part not in done:
            weight = tensor.t() if copy.transposed else tensor
            done[part.part] = quantize(weight, copy.bits, copy.group_size)
            back = dequantize(
                done[part.part], copy.bits, copy.group_size, (weight.shape[0], weight.shape[1]), torch.float64
            )
            lost += float(((back - weight.double()) ** 2).sum())
            total += float((weight.double() ** 2).sum())
        qw = done[part.part]
        value = {"weight_packed": qw.packed, "weight_scale": qw.scale, "weight_zero_point": qw.zero}[part.tensor]
        if tuple(value.shape) != part.shape:
            raise DataCorruption(f"{part.part}.{part.tensor} has shape {tuple(value.shape)}", field=part.part)
        chunks.append(bytes(tensor_bytes(value)))
    return b"".join(chunks), math.sqrt(lost / total) if total > 0 else 0.0


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
        if name in existing and existing[name].group_size != group_size:
            raise AlreadyExists(
                f"the store holds {name} with group size {existing[name].group_size}, not {group_size}",
                field="group_size",
            )
    todo = [name for name in precisions if name not in existing]
    bar = tqdm(total=len(todo) * manifest.num_experts * len(manifest.moe_layers), desc="quantize", disable=not progress)
    for name in todo:
        bits = BITS[name]
        layout = quant_layout(manifest, bits, group_size)
        copy = QuantizedCopy(
            name,
            bits,
            group_size,
            manifest.family in TRANSPOSED_FAMILIES,
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
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

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
        """Views of one quantized expert's tensors over its bytes: part -> {tensor kind -> tensor}."""
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
            if "raw" in kinds:
                out[part] = kinds["raw"].clone()
                continue
            rows, groups = kinds["weight_scale"].shape
            qw = QuantizedWeight(kinds["weight_packed"], kinds["weight_scale"], kinds["weight_zero_point"])
            weight = dequantize(qw, copy.bits, copy.group_size, (rows, groups * copy.group_size), dtype)
            out[part] = weight.t().contiguous() if copy.transposed else weight
        return out

    def _fd(self, layer: int) -> int:
        with self._lock:
            fd = self._fds.get(layer)
            if fd is None:
                fd = self._fds[layer] = os.open(self.store.dir / self.copy.files[layer], os.O_RDONLY)
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
