"""Channel-level plans: per kept expert a precision *and* a number of its channels, under one byte budget.

The expert-level knapsack of `precision.select_precisions` gets more options per expert: besides dropping it
or holding it whole at a precision, it can hold its best `k` channels at a precision, for `k` on a small grid
of channel counts shared by every layer (the bank sizes slots would need). Such an option costs the packed
bytes of `k` channels (scales and zero points included) and is worth the expert's value at that precision
times the share of its channel score mass the `k` best channels hold (`channels.kept_share`): the task's
expert score says how much the expert matters, its channel scores how much of it `k` channels keep.

A quantized channel slice is quantized channel-major: every weight is viewed as rows of the hidden size (gate
and up rows, down columns as rows), grouped along the hidden dim, so each channel's integers and scales are its
own and any subset of channels is a slice of rows (`channel_nbytes`). Gate and up are stored that way already;
the down projection of an expert-level copy groups along its channels instead, so it is re-quantized.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidArgument
from ..families import MoESpec
from ..pattern import FULL, Pattern
from ..store.quant import BITS, FLOAT_PRECISIONS, SCALE_DTYPE, packed_shapes
from .channels import best_channels, kept_share
from .precision_plan import PrecisionOption, choose_options

DEFAULT_FRACTIONS: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)  # shares of I, below whole


@dataclass(frozen=True)
class ExpertShape:
    """What channel byte counts need of one expert: hidden size, intermediate size, biases, dtype bytes."""

    hidden: int
    intermediate: int
    biased: bool
    itemsize: int

    @classmethod
    def of(cls, manifest) -> ExpertShape:
        from ..store.manifest import DTYPES
        from ..store.quant import TRANSPOSED_FAMILIES

        parts = {p.name: tuple(p.shape) for p in manifest.parts}
        down = parts["down_proj"]
        hidden, intermediate = (down[1], down[0]) if manifest.family in TRANSPOSED_FAMILIES else down
        return cls(hidden, intermediate, "gate_up_proj_bias" in parts, DTYPES[manifest.dtype].itemsize)

    def params(self, channels: int) -> int:
        """Parameters of an expert of `channels` channels."""
        return 3 * channels * self.hidden + (2 * channels + self.hidden if self.biased else 0)


def channel_counts(intermediate: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[int]:
    """Channel counts (ascending, distinct, below `intermediate`) for shares of the intermediate size."""
    counts = set()
    for fraction in fractions:
        if not 0 < fraction < 1:
            raise InvalidArgument(f"channel share {fraction} is not in (0, 1)", field="channel_fractions")
        counts.add(max(1, round(fraction * intermediate)))
    return sorted(c for c in counts if c < intermediate)


def channel_nbytes(shape: ExpertShape, precision: str, channels: int, group_size: int, full_nbytes: int) -> int:
    """Bytes of `channels` channels of one expert at `precision`: full at `full_nbytes` per whole expert (pro
    rata of parameters), a float copy at its width, integers channel-major with their scales and zero points
    (biases at the store's dtype, as quantized copies hold them)."""
    if precision == FULL:
        return math.ceil(full_nbytes * shape.params(channels) / shape.params(shape.intermediate))
    floating = FLOAT_PRECISIONS.get(precision)
    if floating is not None:
        return shape.params(channels) * 2
    bits = BITS[precision]
    total = 0
    for rows in (2 * channels, channels):  # gate and up rows, down columns: rows of the hidden size
        for tensor, dims in packed_shapes(rows, shape.hidden, bits, group_size).items():
            total += math.prod(dims) * (SCALE_DTYPE.itemsize if tensor == "weight_scale" else 4)
    if shape.biased:
        total += (2 * channels + shape.hidden) * shape.itemsize
    return total


def channel_key(precision: str, channels: int) -> str:
    return f"{precision}@{channels}"


def channel_options(
    options: Mapping[str, PrecisionOption],
    channel_scores: Tensor,
    shape: ExpertShape,
    counts: Sequence[int],
    group_size: int,
    kept: Tensor | None = None,
) -> dict[str, PrecisionOption]:
    """`options` (whole experts) and, for each of them and each channel count, the option of holding the
    best `count` channels (by `channel_scores [L, E, I]`) at that precision. `kept [L, E, len(counts)]` is what
    each count keeps of an expert (measured on demos: `demo_error.channel_kept`); by default its share of the
    expert's channel score mass."""
    share = kept_share(channel_scores, counts) if kept is None else kept  # [L, E, len(counts)]
    out = dict(options)
    for name, option in options.items():
        for j, count in enumerate(counts):
            nbytes = channel_nbytes(shape, option.precision, count, group_size, options[FULL].nbytes)
            out[channel_key(name, count)] = PrecisionOption(
                option.precision, nbytes, option.error, count, share[..., j]
            )
    return out


@dataclass(frozen=True)
class ChannelPlan:
    """A channel-level plan: the pattern (kept experts and their precisions), the channels each kept expert
    holds (absent: all of them), and the bytes it holds.

    Attributes:
        channels: Layer -> expert -> ascending ids of its kept channels, for experts holding only some. [k]
    """

    pattern: Pattern
    channels: dict[int, dict[int, Tensor]]
    nbytes: int
    counts: dict[str, int]  # option key -> experts held at it

    def served(self) -> Pattern:
        """The pattern a server runs for this plan: its kept experts and precisions, and the channels of each expert
        held in part (`runtime.channel_slots`)."""
        channels = {layer: {e: tuple(ids.tolist()) for e, ids in by.items()} for layer, by in self.channels.items()}
        return Pattern(self.pattern.layers, self.pattern.precisions, {k: v for k, v in channels.items() if v})

    def channel_count(self, layer: int, expert: int, intermediate: int) -> int:
        ids = self.channels.get(layer, {}).get(expert)
        return intermediate if ids is None else int(ids.numel())

    def to_json(self) -> dict[str, Any]:
        """The pattern file's JSON with `"channels": {"<layer>": {"<expert>": [channel ids]}}` added."""
        data = self.pattern.to_json()
        data["channels"] = {
            str(layer): {str(e): ids.tolist() for e, ids in by_expert.items()}
            for layer, by_expert in self.channels.items()
        }
        return data

    @classmethod
    def from_json(cls, spec: MoESpec, intermediate: int, data: Any) -> ChannelPlan:
        """Parse a pattern file with optional `channels` (kept experts it does not name hold every channel)."""
        if not isinstance(data, dict):
            raise InvalidArgument("a pattern is a JSON object", field="pattern")
        pattern = Pattern.from_json(spec, {k: v for k, v in data.items() if k != "channels"})
        raw = data.get("channels", {})
        if not isinstance(raw, dict):
            raise InvalidArgument("'channels' must map layers to {expert: [channel ids]}", field="channels")
        channels: dict[int, dict[int, Tensor]] = {}
        for layer_key, by_expert in raw.items():
            where = f"channels.{layer_key}"
            if not str(layer_key).isdigit() or int(layer_key) not in pattern.layers or not isinstance(by_expert, dict):
                raise InvalidArgument("not an MoE layer of the pattern mapping experts to channel ids", field=where)
            layer = int(layer_key)
            for expert_key, ids in by_expert.items():
                field = f"{where}.{expert_key}"
                if not str(expert_key).isdigit() or int(expert_key) not in pattern.kept(layer):
                    raise InvalidArgument("not an expert the pattern keeps in this layer", field=field)
                if (
                    not isinstance(ids, list)
                    or not ids
                    or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < intermediate for c in ids)
                    or sorted(set(ids)) != ids
                ):
                    raise InvalidArgument(
                        f"channel ids must be ascending distinct integers in 0..{intermediate - 1}", field=field
                    )
                channels.setdefault(layer, {})[int(expert_key)] = torch.tensor(ids, dtype=torch.long)
        return cls(pattern, channels, 0, {})

    def save(self, path: str | Path) -> None:
        from ..fsutil import atomic_write_bytes

        atomic_write_bytes(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, spec: MoESpec, intermediate: int, path: str | Path) -> ChannelPlan:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{path} is not JSON: {exc}", field="pattern") from exc
        if not isinstance(data, dict):
            raise InvalidArgument("a pattern is a JSON object", field="pattern")
        return cls.from_json(spec, intermediate, data)


def layer_shares(channel_scores: Tensor) -> Tensor | None:
    """`[L]`: each MoE layer's share of the channel scores summed over its experts and channels (None when they sum
    to nothing). The expert scores a plan weighs its options by are normalised per layer, so every layer's experts
    would be worth as much in all as any other's; a channel criterion measures every channel's contribution in one
    unit across layers (`camera`, `heapr`: the layer output's energy, `heapr` relative to the residual stream), so
    its layer totals say how much each layer's experts move the model on the task's demos."""
    totals = channel_scores.double().clamp_min(0).sum(dim=(1, 2))
    total = float(totals.sum())
    return totals / total if total > 0 else None


def select_channels(
    scores: Tensor,
    channel_scores: Tensor,
    spec: MoESpec,
    options: Mapping[str, PrecisionOption],
    budget_bytes: int,
    slots: Mapping[str, int] | None = None,
    weigh_layers: bool = True,
) -> ChannelPlan:
    """The plan of highest summed value within `budget_bytes` over whole-expert and channel options (from
    `channel_options`); each kept expert's channels are its best by `channel_scores [L, E, I]`. `slots`: most
    experts per layer at an option key (a server's slots: `full`, each precision, each channel bank `full@24`).
    `weigh_layers`: each layer's expert values weigh its share of the channel scores' total (`layer_shares`),
    else every layer alike."""
    if channel_scores.ndim != 3 or channel_scores.shape[:2] != (len(spec.moe_layers), spec.num_experts):
        raise InvalidArgument(
            f"channel scores of shape {tuple(channel_scores.shape)} do not fit the model", field="channel_scores"
        )
    weights = layer_shares(channel_scores) if weigh_layers else None
    _, chosen = choose_options(scores, spec, options, budget_bytes, slots, layer_weights=weights)
    layers: dict[int, list[int]] = {}
    precisions: dict[int, dict[int, str]] = {}
    channels: dict[int, dict[int, Tensor]] = {}
    counts: dict[str, int] = {}
    nbytes = 0
    for i, layer in enumerate(spec.moe_layers):
        layers[layer] = sorted(chosen[i])
        precisions[layer] = {e: options[key].precision for e, key in chosen[i].items()}
        for expert, key in chosen[i].items():
            option = options[key]
            counts[key] = counts.get(key, 0) + 1
            nbytes += option.nbytes
            if option.channels is not None:
                channels.setdefault(layer, {})[expert] = best_channels(channel_scores[i, expert], option.channels)
    return ChannelPlan(Pattern.build(spec, layers, precisions), channels, nbytes, counts)


__all__ = [
    "DEFAULT_FRACTIONS",
    "ChannelPlan",
    "ExpertShape",
    "channel_counts",
    "channel_key",
    "channel_nbytes",
    "channel_options",
    "layer_shares",
    "select_channels",
]
