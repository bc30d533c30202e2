"""A lower-precision copy of a store's routed experts: its blob layout, its manifest record, and one expert's encoding.

An integer copy (`int8` ... `int2`) holds each weight group-wise quantized in compressed-tensors' packed layout
(`store/quant.py`); a float copy (`bf16`) holds every tensor cast to that dtype, as `raw` tensors (no groups, no
scales). Tensors kept as they are (biases of integer copies) are `raw` too, in the store's dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import DataCorruption
from .checkpoint_io import tensor_bytes
from .manifest import DTYPES, Manifest
from .quant import (
    BITS,
    FLOAT_PRECISIONS,
    SCALE_DTYPE,
    TRANSPOSED_FAMILIES,
    QuantizedWeight,
    check_group,
    dequantize,
    packed_shapes,
    quantize,
)

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


def quant_layout(manifest: Manifest, precision: str, group_size: int) -> tuple[QuantPart, ...]:
    """Where each tensor of one expert at `precision` lies in its blob."""
    transposed = manifest.family in TRANSPOSED_FAMILIES
    bits = BITS[precision]
    parts, offset = [], 0
    floating = FLOAT_PRECISIONS.get(precision)
    if floating is not None:  # every tensor cast, in the runtime layout
        for part in manifest.parts:
            nbytes = math.prod(part.shape) * DTYPES[floating].itemsize
            parts.append(QuantPart(part.name, "raw", floating, part.shape, offset, nbytes))
            offset += nbytes
        return tuple(parts)
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
    """One expert's full-precision tensors -> its blob at the copy's precision (in `copy.layout` order) and its
    relative weight error (what the precision loses: the selection's error weight)."""
    chunks: list[bytes] = []
    done: dict[str, QuantizedWeight] = {}
    lost = total = 0.0
    for part in copy.layout:
        tensor = tensors[part.part]
        if part.tensor == "raw":
            cast = tensor.to(DTYPES[part.dtype])
            if cast.dtype != tensor.dtype:  # a float copy: its rounding is its error
                lost += float(((cast.double() - tensor.double()) ** 2).sum())
                total += float((tensor.double() ** 2).sum())
            chunks.append(bytes(tensor_bytes(cast)))
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
