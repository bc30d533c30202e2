"""Group-wise integer quantization of routed experts in compressed-tensors' packed layout, and its inverse.

A weight `W [out, in]` (the matmul's output rows, input columns) is cut into groups of `group_size` input
columns. Each group gets a float16 scale and an integer zero point chosen by a small clipping search (the
range that minimises the group's squared error), so `W ~ (q - zero) * scale` with `q` in the signed range
of `bits`. The integers are stored exactly as compressed-tensors' `pack-quantized` format stores them (the
layout vLLM reads): `weight_packed` int32 `[out, ceil(in * bits / 32)]` packed along the input dim,
`weight_scale` `[out, in / group]`, `weight_zero_point` int32 packed along the output dim. The packing
functions are compressed-tensors' own; dequantization is ours and is the one function that both the
runtime's expert forward and the tests' "dequantized checkpoint" call, so the two see identical weights.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidArgument

# The lower precisions a store can hold, with their bits per weight: a float copy (each tensor cast, no scales;
# `FLOAT_PRECISIONS` names its dtype) or group-wise integers (this module).
BITS: dict[str, int] = {"bf16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2}
FLOAT_PRECISIONS: dict[str, str] = {"bf16": "bfloat16"}
PRECISIONS: tuple[str, ...] = ("full", *BITS)  # "full": the store's own dtype
# Measured: at int2/int3 it loses less per stored bit than 32 (docs/evaluation.md, byte accounting).
DEFAULT_GROUP_SIZE = 64
SCALE_DTYPE = torch.float16
_CLIP_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # shares of each group's range tried
TRANSPOSED_FAMILIES = frozenset({"gpt_oss"})  # experts stored [in, out]: quantized as their transpose


def check_precision(name: str, field: str = "precision") -> str:
    if name not in PRECISIONS:
        raise InvalidArgument(f"unknown precision {name!r} (use {', '.join(PRECISIONS)})", field=field)
    return name


def parse_precisions(text: str, field: str = "precisions") -> tuple[str, ...]:
    """`"int8,int4"` -> ("int8", "int4"); only lower precisions (the full one is always there)."""
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    for name in names:
        if name not in BITS:
            raise InvalidArgument(f"unknown precision {name!r} (use {', '.join(BITS)})", field=field)
    return names


def _pack(q: Tensor, bits: int, packed_dim: int) -> Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q.to(torch.int8), bits, packed_dim=packed_dim)


def _unpack(packed: Tensor, bits: int, shape: tuple[int, int], packed_dim: int) -> Tensor:
    """The int8 codes `[*, out, in]` of packed words `[*, ...]` (any leading dims: a stack of slots)."""
    if packed_dim == 0 and packed.shape[-2] == 1:
        # One word per column (a narrow channel slot's zero points): unpacked as the transpose packed along dim 1,
        # on a copy with plain strides, since the byte views below refuse the transpose of a `[1, n]` tensor (its
        # size-1 dim keeps a stride other than 1).
        words = packed.transpose(-2, -1).clone(memory_format=torch.contiguous_format)
        return _unpack(words, bits, (shape[1], shape[0]), packed_dim=1).transpose(-2, -1)
    if bits in (2, 4, 8) and _byte_views(packed):
        return _unpack_bytes(packed, bits, shape, packed_dim)
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if packed.dim() > 2:  # compressed-tensors unpacks one matrix at a time
        flat = packed.reshape(-1, *packed.shape[-2:])
        values = torch.stack([unpack_from_int32(w, bits, torch.Size(shape), packed_dim=packed_dim) for w in flat])
        return values.view(*packed.shape[:-2], *shape)
    return unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=packed_dim)


def _byte_views(packed: Tensor) -> bool:
    """Whether packed words can be read through byte views: byte j of a word holds its lowest bits on a
    little-endian CPU (and on the accelerators torch runs on)."""
    return packed.device.type != "cpu" or sys.byteorder == "little"


def _unpack_bytes(packed: Tensor, bits: int, shape: tuple[int, int], packed_dim: int) -> Tensor:
    """Values of 2, 4 or 8 bits packed into int32 words (value i at bits `i*bits` up, offset by `2**(bits-1)`): on a
    little-endian device byte j of a row holds values `j*8/bits` onwards, lowest bits first, so byte views and
    shifts replace compressed-tensors' general bit gather, which costs more than the matmul of the weight it
    unpacks (the same integers: `tests/test_quant.py`)."""
    values = _offset_codes(packed, bits, shape, packed_dim)
    if bits == 8:  # x ^ 0x80 is x - 128 in two's complement, without a wider type
        return (values ^ 0x80).view(torch.int8)
    return values.view(torch.int8) - (1 << (bits - 1))


def _offset_codes(packed: Tensor, bits: int, shape: tuple[int, int], packed_dim: int) -> Tensor:
    """The stored values `[*, out, in]` (uint8, each the code plus `2**(bits-1)`) of 2, 4 or 8 bits packed into
    int32 words along `packed_dim` on a little-endian device; for 8 bits packed along the rows, a view of the
    words' bytes (no copy)."""
    words = packed if packed_dim == 1 else packed.transpose(-2, -1)
    lead, rows, count = words.shape[:-2], words.shape[-2], shape[packed_dim]
    raw = words.contiguous().view(torch.uint8).view(*lead, rows, -1)
    if bits == 8:
        values = raw[..., :count]
    else:
        mask = (1 << bits) - 1
        parts = [raw & mask, *((raw >> shift) & mask for shift in range(bits, 8, bits))]
        values = torch.stack(parts, dim=-1).view(*lead, rows, -1)[..., :count]
    return values.transpose(-2, -1) if packed_dim == 0 else values


def pack_codes(q: Tensor, bits: int, packed_dim: int) -> Tensor:
    """Signed integer codes packed into int32 along `packed_dim`, as `quantize` packs them."""
    return _pack(q, bits, packed_dim)


def unpack_codes(packed: Tensor, bits: int, shape: tuple[int, int], packed_dim: int) -> Tensor:
    """The int8 codes `[out, in]` of packed int32 words (the inverse of `pack_codes`)."""
    return _unpack(packed.contiguous(), bits, shape, packed_dim)


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight in packed form: packed [out, ceil(in*b/32)], scale [out, in/g], zero [ceil(out*b/32), in/g]."""

    packed: Tensor
    scale: Tensor
    zero: Tensor


def packed_shapes(out: int, inp: int, bits: int, group_size: int) -> dict[str, tuple[int, int]]:
    """Shapes of the three tensors of one quantized `[out, in]` weight."""
    groups = inp // group_size
    return {
        "weight_packed": (out, math.ceil(inp * bits / 32)),
        "weight_scale": (out, groups),
        "weight_zero_point": (math.ceil(out * bits / 32), groups),
    }


def check_group(inp: int, group_size: int, where: str) -> None:
    if group_size <= 0 or inp % group_size:
        raise InvalidArgument(
            f"group size {group_size} does not divide the input dim {inp} of {where} (choose a divisor)",
            field="group_size",
        )


@torch.no_grad()
def quantize(weight: Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Asymmetric group-wise quantization of `weight [out, in]` with a per-group clipping search."""
    out, inp = weight.shape
    check_group(inp, group_size, "a weight")
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = weight.double().reshape(out, inp // group_size, group_size)  # [O, G, g]
    lo_full, hi_full = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)  # the range always holds 0
    best_err = torch.full(lo_full.shape, math.inf, dtype=torch.float64)
    best_scale = torch.zeros_like(lo_full)
    best_zero = torch.zeros_like(lo_full)
    for shrink in _CLIP_SHRINKS:
        lo, hi = lo_full * shrink, hi_full * shrink
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8).to(SCALE_DTYPE).double()  # as stored
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
        q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(qmin, qmax)
        err = (((q - zero[..., None]) * scale[..., None] - w) ** 2).sum(-1)  # [O, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    q = (torch.round(w / best_scale[..., None]) + best_zero[..., None]).clamp(qmin, qmax).reshape(out, inp)
    return QuantizedWeight(
        packed=_pack(q, bits, packed_dim=1),
        scale=best_scale.to(SCALE_DTYPE),
        zero=_pack(best_zero, bits, packed_dim=0),
    )


def dequantize(qw: QuantizedWeight, bits: int, group_size: int, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """`[*, out, in]` weights in `dtype` from a quantized weight whose tensors may carry leading dims (a stack of
    slots, dequantized in one pass): `(q - zero) * scale` per group (any device)."""
    out, inp = shape
    lead = qw.packed.shape[:-2]
    groups = inp // group_size
    codes, offset = _codes(qw.packed, bits, (out, inp))  # q + offset, as stored
    if offset and qw.zero.shape[-2] > 1:  # the zero points' bytes are zero + offset too
        zero = _offset_codes(qw.zero, bits, (out, groups), packed_dim=0).to(torch.float32)  # [*, O, G]
    else:
        zero = _unpack(qw.zero, bits, (out, groups), packed_dim=0).to(torch.float32).add_(offset)
    # (q - zero) * scale in float32 on one buffer: q - zero is (q + offset) - (zero + offset), exact in float32 for
    # these small integers, then one rounding by the scale, as the plain expression
    values = codes.reshape(*lead, out, groups, group_size).to(torch.float32).sub_(zero.unsqueeze(-1))
    values.mul_(qw.scale.to(torch.float32).unsqueeze(-1))
    return values.reshape(*lead, out, inp).to(dtype)


def _codes(packed: Tensor, bits: int, shape: tuple[int, int]) -> tuple[Tensor, int]:
    """The stored codes `[*, out, in]` of a weight packed along its rows, and the offset they carry: for 8 bits on a
    little-endian device the packed words' bytes themselves (no copy; offset 128), else the signed values."""
    if bits == 8 and _byte_views(packed):
        return _offset_codes(packed, bits, shape, packed_dim=1), 1 << 7
    return _unpack(packed, bits, shape, packed_dim=1), 0


def relative_error(weight: Tensor, bits: int, group_size: int) -> float:
    """||W - deq(q(W))|| / ||W||: how much of a weight a precision loses."""
    qw = quantize(weight, bits, group_size)
    back = dequantize(qw, bits, group_size, tuple(weight.shape), torch.float64)  # type: ignore[arg-type]
    return float((back - weight.double()).norm() / weight.double().norm().clamp_min(1e-30))
