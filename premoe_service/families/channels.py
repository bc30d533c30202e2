"""Where an expert's intermediate channels lie in each family's fused expert tensors, and the config field of
their count: what slicing an expert to some of its channels (a channel-pruned checkpoint) needs to know.

Channel `c` of an expert is gate row `c`, up row `c` and down column `c`. Transformers fuses gate and up: most
families stack them (`gate_up_proj [2I, H]`, gate rows first, split by `chunk(2)`); GPT-OSS stores the
transpose (`[H, 2I]`) with gate and up interleaved (`[..., ::2]`, `[..., 1::2]`) and biases.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import InvalidArgument

_INTERMEDIATE_FIELD = {  # the config field holding the routed experts' intermediate size
    "qwen3_moe": "moe_intermediate_size",
    "qwen2_moe": "moe_intermediate_size",
    "deepseek_v2": "moe_intermediate_size",
    "deepseek_v3": "moe_intermediate_size",
    "olmoe": "intermediate_size",
    "mixtral": "intermediate_size",
    "gpt_oss": "intermediate_size",
}
_SHARED_BY_WIDTH = frozenset({"deepseek_v2", "deepseek_v3"})  # shared experts sized moe_intermediate x count
_INTERLEAVED = frozenset({"gpt_oss"})  # gate and up alternate along the channel dim (and tensors are transposed)


def intermediate_field(family: str) -> str:
    """The config field that names the routed experts' intermediate size in `family`."""
    field = _INTERMEDIATE_FIELD.get(family)
    if field is None:
        raise InvalidArgument(f"no channel layout known for family {family!r}", field="family")
    return field


def checkpoint_width(family: str, config, width: int) -> tuple[int, dict[str, int]]:
    """The intermediate size a checkpoint of routed experts of at most `width` channels declares, and the other
    config fields to set with it so nothing else changes size. DeepSeek sizes its shared experts as
    `moe_intermediate_size * n_shared_experts`: the width grows to the nearest divisor of that product and
    `n_shared_experts` takes the quotient (experts narrower than the width get zero channels)."""
    if family not in _SHARED_BY_WIDTH or not getattr(config, "n_shared_experts", None):
        return width, {}
    shared = int(config.moe_intermediate_size) * int(config.n_shared_experts)
    grown = next(w for w in range(width, shared + 1) if shared % w == 0)
    return grown, {"n_shared_experts": shared // grown}


def gate_up_index(family: str, channels: Tensor, intermediate: int) -> Tensor:
    """Positions along gate_up's channel dim (`2I` long) of the given channels' gate and up entries, in the
    family's own order, so a sliced tensor is a gate_up of `len(channels)` channels. [2k]"""
    channels = channels.long()
    if family in _INTERLEAVED:
        return torch.stack([2 * channels, 2 * channels + 1], dim=1).reshape(-1)
    return torch.cat([channels, channels + intermediate])


def gate_up_rows(family: str, channels: Tensor, intermediate: int) -> tuple[Tensor, Tensor]:
    """Positions along gate_up's channel dim (`2I` long) of the given channels' gate entries and of their up
    entries, each in the order of `channels`. [k] each"""
    index = gate_up_index(family, channels, intermediate)
    if family in _INTERLEAVED:
        return index[0::2], index[1::2]
    count = int(channels.numel())
    return index[:count], index[count:]


def slice_channels(family: str, tensors: Mapping[str, Tensor], channels: Tensor) -> dict[str, Tensor]:
    """One expert's runtime tensors (`gate_up_proj`, `down_proj`, biases) cut to `channels` (ascending ids):
    an expert of intermediate size `len(channels)` computing what the kept channels add."""
    transposed = family in _INTERLEAVED
    down = tensors["down_proj"]
    intermediate = int(down.shape[0] if transposed else down.shape[1])
    index = gate_up_index(family, channels, intermediate)
    out = {}
    for name, tensor in tensors.items():
        if name == "gate_up_proj":
            out[name] = tensor.index_select(1 if transposed else 0, index)
        elif name == "gate_up_proj_bias":
            out[name] = tensor.index_select(0, index)
        elif name == "down_proj":
            out[name] = tensor.index_select(0 if transposed else 1, channels.long())
        else:  # the down bias: one per output, whatever the channels
            out[name] = tensor
    return out


def pad_channels(family: str, tensors: Mapping[str, Tensor], width: int) -> dict[str, Tensor]:
    """An expert sliced to k channels, grown to `width` with zero channels (zero gate, up, bias and down: a
    zero channel adds nothing in every family's activation), so experts of one layer share one size."""
    transposed = family in _INTERLEAVED
    down = tensors["down_proj"]
    k = int(down.shape[0] if transposed else down.shape[1])
    if k == width:
        return dict(tensors)
    if k > width:
        raise InvalidArgument(f"an expert of {k} channels does not fit {width}", field="channels")
    extra = width - k
    out = {}
    for name, tensor in tensors.items():
        if name in ("gate_up_proj", "gate_up_proj_bias"):
            dim = 1 if (transposed and name == "gate_up_proj") else 0
            if transposed:  # interleaved: appending whole (gate, up) pairs keeps the alternation
                out[name] = _grow(tensor, dim, 2 * extra)
            else:  # halves: gate rows then up rows, each grown
                gate, up = tensor.chunk(2, dim=dim)
                out[name] = torch.cat([_grow(gate, dim, extra), _grow(up, dim, extra)], dim=dim)
        elif name == "down_proj":
            out[name] = _grow(tensor, 0 if transposed else 1, extra)
        else:
            out[name] = tensor
    return out


def _grow(tensor: Tensor, dim: int, extra: int) -> Tensor:
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
