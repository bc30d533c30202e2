"""Channel scores: how much each intermediate channel of each routed expert matters to a task.

An expert computes `y = sum_c h_c d_c` with `h = act(x W_gate^T) * (x W_up^T)` its intermediate activations
`[I]` and `d_c` the c-th column of its down projection (the row of the transposed one): channel `c` (a row of
the gate and up projections and the matching column of the down projection) is an *atomic expert* (HEAPr) or
*micro-expert* (CAMERA), and removing it removes exactly `h_c d_c` from the expert's output. Per MoE layer,
expert and channel, summed over the demo tokens routed to the expert (`g` the token's routing weight to it):

- `energy`: `sum_t h_tc^2`, plain activation energy (the baseline: blind to the routing weight and to `d_c`);
- `camera`: `sum_t ||g h_tc d_c||^2`, the micro-expert's contribution energy to the layer's output (CAMERA-P);
- `heapr`: `sum_t ||J_t g h_tc d_c||^2`, an output-space second-order score in HEAPr's spirit: the quadratic
  form of the Gauss-Newton metric of the residual stream as the next layer reads it, `J_t` the Jacobian of the
  RMS normalisation at the residual `x_t` after the MoE block (norm weights left out), so
  `||J_t v||^2 = H (||v||^2 - (x_t . v)^2 / ||x_t||^2) / ||x_t||^2`: a change along the stream's own direction
  is normalised away, and a change counts relative to the stream's size. HEAPr itself takes the loss's second
  order through a backward pass, which a layer-streamed pass (one layer of experts resident) cannot run.

All three are `[E, I]` per layer; what they cost over a plain forward is one `[n, I]` square and two `[n, H] x
[H, I]` products per expert for its n routed tokens (`premoe profile` reports the measured share).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

CHANNEL_CRITERIA: tuple[str, ...] = ("heapr", "camera", "energy")
# What `premoe eval --channels` on the reference model measured best (docs/atomic-experts.md).
DEFAULT_CHANNEL_CRITERION = "heapr"


@dataclass(frozen=True)
class ChannelBatch:
    """One expert's routed tokens in one forward pass of one MoE layer.

    Attributes:
        expert: The expert id.
        tokens: Which of the layer's flattened tokens these rows are. [n]
        hidden: The intermediate activations h. [n, I]
        down: The down projection as columns per channel: `down[:, c]` is `d_c`. [H, I]
        weights: The tokens' routing weights g to the expert. [n]
    """

    expert: int
    tokens: Tensor
    hidden: Tensor
    down: Tensor
    weights: Tensor


@dataclass
class ChannelSums:
    """Running channel sums of one MoE layer: criterion -> [E, I] fp64 (exact enough over many passes)."""

    num_experts: int
    sums: dict[str, Tensor] = field(default_factory=dict)

    def add(self, batches: Sequence[ChannelBatch], stream: Tensor, token_mask: Tensor) -> None:
        """Add one pass's batches; `stream` [T, H] is the residual after the MoE block, `token_mask` [T] the
        tokens that count (padding never does)."""
        for batch in batches:
            keep = token_mask[batch.tokens]
            if not bool(keep.any()):
                continue
            h = batch.hidden[keep].double()  # [n, I]
            g = batch.weights[keep].double()  # [n]
            d = batch.down.double()  # [H, I]
            x = stream[batch.tokens[keep]].double()  # [n, H]
            energy = (h**2).sum(dim=0)  # [I]
            weighted = (g[:, None] * h) ** 2  # [n, I]
            column = (d**2).sum(dim=0)  # [I] ||d_c||^2
            camera = weighted.sum(dim=0) * column
            size = (x**2).sum(dim=-1).clamp_min(1e-30)  # [n] ||x_t||^2
            along = (x @ d) ** 2 / size[:, None]  # [n, I] (x_t . d_c)^2 / ||x_t||^2
            metric = x.shape[-1] * (column[None, :] - along) / size[:, None]  # [n, I] ||J_t d_c||^2
            heapr = (weighted * metric.clamp_min(0)).sum(dim=0)
            for name, value in (("energy", energy), ("camera", camera), ("heapr", heapr)):
                total = self.sums.get(name)
                if total is None:
                    total = self.sums[name] = torch.zeros(
                        (self.num_experts, value.shape[0]), dtype=torch.float64, device=value.device
                    )
                total[batch.expert] += value

    def scores(self, intermediate: int) -> dict[str, Tensor]:
        """Criterion -> [E, I] fp32 on the CPU (zeros for a layer no demo token reached)."""
        empty = torch.zeros((self.num_experts, intermediate), dtype=torch.float64)
        return {name: self.sums.get(name, empty).float().cpu() for name in CHANNEL_CRITERIA}


def kept_share(scores: Tensor, counts: Sequence[int]) -> Tensor:
    """For each expert, the share of its channel score mass its best `k` channels hold, for each `k` in
    `counts`: `[..., len(counts)]` from `scores [..., I]`. An expert with no mass (never reached) keeps the
    share of its channel count, as if its channels were alike."""
    ordered = scores.double().clamp_min(0).sort(dim=-1, descending=True).values  # [..., I]
    cumulative = ordered.cumsum(dim=-1)
    total = cumulative[..., -1:]
    index = torch.tensor([k - 1 for k in counts], dtype=torch.long)
    share = cumulative.index_select(-1, index) / total.clamp_min(1e-30)
    uniform = torch.tensor([k / scores.shape[-1] for k in counts], dtype=torch.float64)
    return torch.where(total > 0, share, uniform.expand_as(share))


def best_channels(scores: Tensor, count: int) -> Tensor:
    """The `count` best channels of one expert by `scores [I]`, ascending ids (ties: the lower id). [count]"""
    order = sorted(range(scores.shape[0]), key=lambda c: (-float(scores[c]), c))
    return torch.tensor(sorted(order[:count]), dtype=torch.long)
