"""The experts' forward the serving engine runs: only the experts a pass's tokens hit are computed.

transformers' default experts path on CPU (`grouped_mm`) multiplies every expert's group, empty ones included: at
a decode step of one row (top-2 of 16 experts) that is 32 matrix products per layer where 4 carry tokens, and at
this project's model sizes each costs a dispatch. This forward sorts the (token, expert) pairs by expert once and
runs the gate/up and down products of the hit experts only, on views of the experts' weights (nothing is copied),
then weights and sums the pairs per token as transformers does. When most experts are hit (wide batches), a
Python loop over them costs more than the grouped kernel's C++ loop, and the pass goes to transformers' grouped
path, which computes the same products.

It is registered in transformers' `ExpertsInterface` under `IMPLEMENTATION` and follows the interface's
attributes (`is_transposed`, `has_bias`, `has_gate`, `_apply_gate`, `has_post_expert_norm`), so every family
whose experts module uses `use_experts_implementation` runs it unchanged. Pair ids at or above the module's
expert count are the skip id (`MaskedRouter.skip_id`): such pairs contribute nothing, as in transformers' eager
and grouped paths.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

IMPLEMENTATION = "premoe_hit"

# Up to this many (token, expert) pairs per expert of the module, a pass runs the hit experts one by one; above
# it, transformers' grouped kernel (its per-expert loop is in C++ and costs less than a Python loop once most
# experts are hit). Measured on the reference model (16 experts, top-2, 2 cores): one token 120 us a layer
# against 185, two tokens 180 against 210, four tokens 280 against 265.
HIT_PAIRS_PER_EXPERT = 0.25


def hit_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts-forward signature: `hidden_states` `[T, H]`, `top_k_index` and `top_k_weights`
    `[T, K]`; returns `[T, H]`."""
    experts: int = self.num_experts  # type: ignore[assignment]
    tokens, top_k = top_k_index.shape
    if tokens * top_k > HIT_PAIRS_PER_EXPERT * experts and grouped_dtype(hidden_states):
        return grouped_with_skips(self, hidden_states, top_k_index, top_k_weights)
    weights = Weights(self)
    return run_hit(hidden_states, top_k_index, top_k_weights, experts, lambda x, e: weights.expert(self, x, e))


def grouped_with_skips(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' grouped path, with pairs at or above the module's expert count (skip ids) contributing exactly
    zero: its kernel leaves those pairs' rows uninitialised unless the module is marked expert-parallel (then it
    zeroes them, as for another rank's experts), so a pass holding skip ids runs on a shallow copy so marked."""
    if int(top_k_index.max()) >= module.num_experts:  # type: ignore[operator]
        module = copy.copy(module)
        setattr(module, "_is_expert_parallel", True)  # noqa: B010 - a plain attribute of the copy
    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


def grouped_dtype(hidden_states: Tensor) -> bool:
    """Whether transformers' grouped kernel takes this dtype on this device (the CPU kernel refuses float64)."""
    return hidden_states.dtype in (torch.float32, torch.bfloat16, torch.float16)


def run_hit(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    end: int,
    expert_out: Callable[[Tensor, int], Tensor],
) -> Tensor:
    """The pairs' weighted outputs summed per token, computing each hit id below `end` once with `expert_out(rows,
    id)` (its output before the routing weight); ids at or above `end` are skipped."""
    tokens, top_k = top_k_index.shape
    if tokens == 1:  # a lone decode row: its K experts in turn, summed in top-k order as transformers sums them
        out: Tensor | None = None
        for k, e in enumerate(top_k_index[0].tolist()):
            if e < end:
                y = expert_out(hidden_states, e) * top_k_weights[:, k : k + 1]
                out = y if out is None else out + y
        return hidden_states.new_zeros(hidden_states.shape) if out is None else out.to(hidden_states.dtype)
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat.clamp(max=end), minlength=end + 1).tolist()
    pairs = hidden_states.index_select(0, order // top_k)  # [S, H], sorted by expert
    out = hidden_states.new_zeros(pairs.shape)
    start = 0
    for e in range(end):
        if counts[e]:
            out[start : start + counts[e]] = expert_out(pairs[start : start + counts[e]], e)
        start += counts[e]
    out = out * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def follows_interface(module: nn.Module) -> bool:
    """Whether an experts module names its layout with the experts interface's attributes (what `Weights` reads)."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm"))


class Weights:
    """An experts module's weights and biases as the interface's attributes name them, read once per call."""

    def __init__(self, module: nn.Module) -> None:
        params = module._parameters
        self.gate = bool(module.has_gate)
        self.bias = bool(module.has_bias)
        self.up_name = "gate_up_proj" if self.gate else "up_proj"
        self.up = params[self.up_name]
        self.down = params["down_proj"]
        self.up_bias = params[f"{self.up_name}_bias"] if self.bias else None
        self.down_bias = params["down_proj_bias"] if self.bias else None
        self.transposed = bool(module.is_transposed)
        self.post_norm = bool(module.has_post_expert_norm)

    def expert(self, module: Any, x: Tensor, e: int) -> Tensor:
        """Expert `e`'s output for rows `x` (before its routing weight)."""
        up_bias = None if self.up_bias is None else self.up_bias[e]
        down_bias = None if self.down_bias is None else self.down_bias[e]
        return self.compute(module, x, self.up[e], self.down[e], up_bias, down_bias)  # type: ignore[index]

    def of(self, module: Any, x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """The output for rows `x` of an expert given as its tensors by parameter name (a bank slot's)."""
        up_bias = tensors[f"{self.up_name}_bias"] if self.bias else None
        down_bias = tensors["down_proj_bias"] if self.bias else None
        return self.compute(module, x, tensors[self.up_name], tensors["down_proj"], up_bias, down_bias)

    def compute(
        self, module: Any, x: Tensor, up: Tensor, down: Tensor, up_bias: Tensor | None, down_bias: Tensor | None
    ) -> Tensor:
        h = _linear(x, up, up_bias, self.transposed)
        h = module._apply_gate(h) if self.gate else module.act_fn(h)
        y = _linear(h, down, down_bias, self.transposed)
        return module.post_expert_norm(y) if self.post_norm else y


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    if transposed:  # weight [in, out]
        y = x @ weight
        return y if bias is None else y + bias
    return nn.functional.linear(x, weight, bias)


def use_hit_experts(model: Any) -> None:
    """Run `model`'s experts modules through `hit_experts_forward` (the config's experts implementation)."""
    model.set_experts_implementation(IMPLEMENTATION)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, hit_experts_forward)
