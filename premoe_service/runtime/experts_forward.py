"""The experts' forward the serving engine runs: only the experts a pass's tokens hit are computed.

transformers' default experts path on CPU (`grouped_mm`) multiplies every expert's group, empty ones included: at
a decode step of one row (top-2 of 16 experts) that is 32 matrix products per layer where 4 carry tokens, and at
this project's model sizes each costs a dispatch. This forward sorts the (token, expert) pairs by expert once and
runs the gate/up and down products of the hit experts only, on views of the experts' weights (nothing is copied),
then weights and sums the pairs per token as transformers does. When most experts are hit (wide batches), a
Python loop over them costs more than the grouped kernel's C++ loop, and the pass goes to transformers' grouped
path, which computes the same products.

While the engine's decoder stack runs compiled, a pass goes instead to the kernel the stack compiled from
`gathered_experts` (`experts_kernel`): each (token, expert) pair's products as reductions over the slot weights
it indexes, one generated loop for all pairs where the paths above make a library call per hit expert. On the
reference model that is 2.5 to 4.5x faster than either path at 1 to 16 tokens (`docs/serving.md`; `kernel_takes`
says which passes go to it).

It is registered in transformers' `ExpertsInterface` under `IMPLEMENTATION` and follows the interface's
attributes (`is_transposed`, `has_bias`, `has_gate`, `_apply_gate`, `has_post_expert_norm`), so every family
whose experts module uses `use_experts_implementation` runs it unchanged. Pair ids at or above the module's
expert count are the skip id (`MaskedRouter.skip_id`): such pairs contribute nothing, as in transformers' eager
and grouped paths.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

IMPLEMENTATION = "premoe_hit"
# The module attribute that says a compiled step computes the module inside its graph, for passes of up to that
# many (token, expert) pairs (`engine/opaque_ops.py`'s `inline_experts`).
INLINE_PAIRS = "_premoe_inline_pairs"

# Up to this many (token, expert) pairs per expert of the module, a pass runs the hit experts one by one; above
# it, transformers' grouped kernel (its per-expert loop is in C++ and costs less than a Python loop once most
# experts are hit). Measured on the reference model (16 experts, top-2, 2 cores): one token 120 us a layer
# against 185, two tokens 180 against 210, four tokens 280 against 265.
HIT_PAIRS_PER_EXPERT = 0.25

# Which passes go to the compiled kernel (`experts_kernel`, `kernel_takes`). The kernel reads a slot's weights once
# per pair, the grouped path once per hit slot; what the kernel saves is the library call per expert.
# - A layer whose slots stay in the caches between pairs (up to CACHED_LAYER_BYTES): up to GATHERED_PAIRS_PER_EXPERT
#   pairs per slot. Measured on the reference model (16 experts of 442 KB, top-2, 2 cores, a layer): 16 tokens
#   360 us against the grouped path's 1,110, 64 tokens 1,080 against 1,560, 128 tokens 1,790 against 2,060, 256
#   tokens 3,150 against 2,680: the crossover is about 16 pairs per slot, with all four layers' experts (28 MB) in a
#   32 MB L3. Inside the compiled step's graph (`engine/opaque_ops.py`'s `inline_experts`), where the kernel also
#   saves the opaque call, measured with the prompt steps' experts computed there: an engine's closed loop of 16
#   requests (prompts of 8-30 tokens joining decode rows) made 1889 tok/s with them out of the graph, 2009 inside up
#   to 4 pairs per slot and 2233 up to 8; rounds of prompts sent at once, their prefill inside against out: 134
#   tokens (17 pairs per slot) 76.3 ms against 77.8, 276 tokens (34 a slot) 94.1 against 91.7, 360 tokens (45)
#   124.6 against 120.9. The crossover stays near 16 pairs per slot (`docs/serving.md`).
# - A larger layer: a re-read comes from memory, and a library call is small beside reading an expert, so only
#   passes whose pairs rarely share a slot (at most a quarter as many pairs as slots: a lone decode row's top-k).
GATHERED_PAIRS_PER_EXPERT = 16
CACHED_LAYER_BYTES = 16 * 2**20

ExpertsKernel = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
_KERNEL: ContextVar[ExpertsKernel | None] = ContextVar("premoe_experts_kernel", default=None)


@contextmanager
def experts_kernel(kernel: ExpertsKernel | None) -> Iterator[None]:
    """Within the block, passes in a dtype the kernel takes go to `kernel` (a compiled `gathered_experts`);
    None: the paths below."""
    token = _KERNEL.set(kernel)
    try:
        yield
    finally:
        _KERNEL.reset(token)


def hit_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts-forward signature: `hidden_states` `[T, H]`, `top_k_index` and `top_k_weights`
    `[T, K]`; returns `[T, H]`."""
    kernel = _KERNEL.get()
    if kernel is not None and grouped_dtype(hidden_states) and kernel_takes(self, top_k_index.numel()):
        return kernel(self, hidden_states, top_k_index, top_k_weights)
    return library_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def kernel_takes(module: nn.Module, pairs: int) -> bool:
    """Whether a pass of `pairs` (token, expert) pairs goes to the compiled kernel (see GATHERED_PAIRS_PER_EXPERT)."""
    return pairs <= kernel_pairs(module)


def kernel_pairs(module: nn.Module) -> int:
    """The most (token, expert) pairs of a pass that the compiled kernel takes (see GATHERED_PAIRS_PER_EXPERT)."""
    slots: int = module.num_experts  # type: ignore[assignment]
    layer_bytes = sum(p.nbytes for p in module._parameters.values() if p is not None)
    if layer_bytes <= CACHED_LAYER_BYTES:
        return GATHERED_PAIRS_PER_EXPERT * slots
    return slots // 4


def library_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The hit experts one by one, or transformers' grouped kernel for a wide pass: the library matrix products
    transformers' own paths make."""
    experts: int = self.num_experts  # type: ignore[assignment]
    tokens, top_k = top_k_index.shape
    if tokens * top_k > HIT_PAIRS_PER_EXPERT * experts and grouped_dtype(hidden_states):
        return grouped_with_skips(self, hidden_states, top_k_index, top_k_weights)
    weights = Weights(self)
    return run_hit(hidden_states, top_k_index, top_k_weights, experts, lambda x, e: weights.expert(self, x, e))


def gathered_experts(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The experts' output for every (token, expert) pair at once, written to be compiled: each pair's gate/up and
    down products are sums over the weights of the slot it indexes (`weight[ids]`), which inductor fuses into one
    loop that reads each pair's slot in place; run eager, that indexing would copy every pair's weights. Skip ids
    (at or above the module's slot count) read slot 0 and contribute exactly zero. Pairs are weighted and summed
    per token in top-k order, as transformers does; the products sum in another order than a library matrix
    product, so the output matches transformers' to the dtype's rounding, not to the bit.

    With more than one token, the pairs run in the order of their slots, and their outputs go back to the pairs'
    order: pairs of one slot then read its weights one after the other, while they are in the core's cache, rather
    than once per pair from memory (each pair's products are the same in either order)."""
    weights = Weights(module)
    slots: int = module.num_experts  # type: ignore[assignment]
    tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    ids = torch.where(flat < slots, flat, 0)
    x = hidden_states.unsqueeze(1).expand(tokens, top_k, hidden_states.shape[-1]).reshape(tokens * top_k, -1)
    order = torch.argsort(ids) if tokens > 1 else None
    if order is not None:
        x, ids = x[order], ids[order]
    h = _gathered_linear(x, weights.up, ids, weights.up_bias, weights.transposed)
    h = module._apply_gate(h) if weights.gate else module.act_fn(h)  # type: ignore[operator]
    y = _gathered_linear(h, weights.down, ids, weights.down_bias, weights.transposed)
    if order is not None:
        y = torch.empty_like(y).index_copy(0, order, y)  # back to the pairs' order
    if weights.post_norm:
        y = module.post_expert_norm(y)  # type: ignore[operator]
    y = torch.where((flat < slots).unsqueeze(-1), y * top_k_weights.reshape(-1, 1), 0)
    return y.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _gathered_linear(x: Tensor, weight: Tensor, ids: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """Row p of `x` times the weight of slot `ids[p]` (`[slots, out, in]`, or `[slots, in, out]` transposed)."""
    rows = weight[ids]
    y = (x.unsqueeze(-1) * rows).sum(dim=1) if transposed else (rows * x.unsqueeze(1)).sum(dim=-1)
    return y if bias is None else y + bias[ids]


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
        self.up: Tensor = params[self.up_name]  # type: ignore[assignment]
        self.down: Tensor = params["down_proj"]  # type: ignore[assignment]
        self.up_bias = params[f"{self.up_name}_bias"] if self.bias else None
        self.down_bias = params["down_proj_bias"] if self.bias else None
        self.transposed = bool(module.is_transposed)
        self.post_norm = bool(module.has_post_expert_norm)

    def expert(self, module: Any, x: Tensor, e: int) -> Tensor:
        """Expert `e`'s output for rows `x` (before its routing weight)."""
        up_bias = None if self.up_bias is None else self.up_bias[e]
        down_bias = None if self.down_bias is None else self.down_bias[e]
        return self.compute(module, x, self.up[e], self.down[e], up_bias, down_bias)

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


def install_front(module: nn.Module, front: Callable[..., Tensor]) -> None:
    """Have `front` take the experts module's calls from now on; what it stood before stays its `eager_forward`, and a
    forward installed later (`replace_forward`, slot banks) goes behind it."""
    setattr(module, "_premoe_eager", eager_forward(module))  # noqa: B010 - a plain attribute of this module
    setattr(module, "forward", front)  # noqa: B010 - this module's forward only


def eager_forward(module: nn.Module) -> Callable[..., Tensor]:
    """The experts module's forward behind any front (`install_front`)."""
    forward: Callable[..., Tensor] = module.__dict__.get("_premoe_eager") or module.forward
    return forward


def replace_forward(module: nn.Module, forward: Callable[..., Tensor]) -> None:
    """Make `forward` the experts module's forward: behind its front, when it has one (`install_front`).

    Raises:
        RuntimeError: A compiled step computes this module inside its graph already (`INLINE_PAIRS`), where a new
            forward would not be seen.
    """
    if module.__dict__.get(INLINE_PAIRS):
        raise RuntimeError("this experts module is compiled into the step's graph: replace its forward before")
    setattr(module, "_premoe_eager" if "_premoe_eager" in module.__dict__ else "forward", forward)


def own_forward(module: nn.Module) -> bool:
    """Whether the experts module computes with its class's own forward (no forward replaced behind a front)."""
    forward = eager_forward(module)
    return getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module


def use_hit_experts(model: Any) -> None:
    """Run `model`'s experts modules through `hit_experts_forward` (the config's experts implementation)."""
    model.set_experts_implementation(IMPLEMENTATION)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, hit_experts_forward)
