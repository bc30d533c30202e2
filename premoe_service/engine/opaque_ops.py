"""The two operators the compiled decoder stack calls out to, which the compiler does not look into
(`engine/compiled_stack.py`): `premoe::experts`, an MoE block's experts module run eager on the slots its router
chose (the slots the loader fills while the engine runs, slot banks, skipped pairs), and `premoe::packed_attention`,
attention over the KV pool where it cannot run inside the graph. Each runs on the modules that the `Opaque` record
set for the call (`CURRENT`) names; `IDLE` makes them return zeros and touch no state (the warm-up)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false

from ..runtime.experts_forward import (
    INLINE_PAIRS,
    ExpertsKernel,
    eager_forward,
    experts_kernel,
    gathered_experts,
)
from ..runtime.masked_router import GraphRouting
from .attention import packed_attention


@dataclass(frozen=True)
class Opaque:
    """What the two operators run on during a compiled call: the layers' attention modules and experts modules by
    layer index; `idle`: neither, they return zeros and touch no state (the warm-up)."""

    attention: dict[int, nn.Module]
    experts: dict[int, nn.Module]
    idle: bool = False
    kernel: ExpertsKernel | None = None  # what computes the experts (None: their eager paths)


IDLE = Opaque({}, {}, idle=True)
CURRENT: ContextVar[Opaque] = ContextVar("premoe_compiled_opaque")


def block_forward(block: nn.Module, scores: bool, hidden: Tensor) -> Any:
    """The MoE block's forward: its family's own, traced into the compiled graph (its router routes there, its
    experts call out to `premoe::experts`); in the warm-up's eager pass (`IDLE`), zeros."""
    if not torch.compiler.is_compiling():
        opaque = CURRENT.get(None)
        if opaque is not None and opaque.idle:  # the warm-up's eager pass (`_make_pool`)
            return (torch.zeros_like(hidden), None) if scores else torch.zeros_like(hidden)
    return type(block).forward(block, hidden)


def experts_front(experts: nn.Module, layer: int, hidden: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """The experts module's forward. While compiled: the experts kernel's code traced into the step's graph when
    the module takes it (`inline_experts`) and the pass's pairs are known to be few enough for it (a decode graph
    checks its rows), else one opaque call (`premoe::experts`); eager, its own forward."""
    if torch.compiler.is_compiling():
        pairs: int = getattr(experts, INLINE_PAIRS, 0)
        graph = getattr(experts, "_premoe_graph", None)
        if pairs and graph is not None and graph.decode and guard_or_false(index.numel() <= pairs):
            return gathered_experts(experts, hidden, index, weights)
        out: Tensor = torch.ops.premoe.experts(hidden, index, weights, layer)
        return out
    return eager_forward(experts)(hidden, index, weights)


def inline_experts(experts: nn.Module, graph: GraphRouting, pairs: int) -> None:
    """Have the compiled step compute `experts` inside its graph in decode graphs' steps (`graph.decode`: decode
    steps, and prompts attending token by token) of at most `pairs` (token, expert) pairs: the experts kernel's code
    (`gathered_experts`), without the opaque call's dispatch, Python and guards around it. A step with a prompt
    grouped by row, or more pairs, makes the opaque call. The graph is traced for each answer (the module's
    attribute, the record's flag and the step's size are guarded), and either way computes the same products.
    `pairs` 0: never. Only for a module that computes with its own slots: slot banks replace its forward
    (`replace_forward`), and must be installed before the stack compiles."""
    setattr(experts, INLINE_PAIRS, pairs)
    setattr(experts, "_premoe_graph", graph)  # noqa: B010 - a plain attribute of this module


def _experts_op(hidden: Tensor, index: Tensor, weights: Tensor, layer: int) -> Tensor:
    """The experts module of `layer`, run eager on the slots the router chose: the slots the loader fills while the
    engine runs, slot banks, skipped pairs."""
    opaque = CURRENT.get()
    if opaque.idle:
        return torch.zeros_like(hidden, memory_format=torch.contiguous_format)
    with experts_kernel(opaque.kernel):
        out: Tensor = eager_forward(opaque.experts[layer])(hidden, index, weights)
    if out.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr():
        return out.clone()  # an operator's output may not alias its input
    return out.contiguous()


def _experts_shape(hidden: Tensor, index: Tensor, weights: Tensor, layer: int) -> Tensor:
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _attention_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layer: int,
    scaling: float | None,
    dropout: float,
    sliding_window: int | None,
    sinks: Tensor | None,
) -> Tensor:
    """`packed_attention` of `layer`, run eager: it writes the pool and reads the step's layout."""
    opaque = CURRENT.get()
    if opaque.idle:
        return _attention_shape(query, key, value).zero_()
    kwargs: dict[str, Any] = {"dropout": dropout, "scaling": scaling, "sliding_window": sliding_window}
    if sinks is not None:
        kwargs["s_aux"] = sinks
    out, _ = packed_attention(opaque.attention[layer], query, key, value, None, **kwargs)
    return out.contiguous()


def _attention_shape(query: Tensor, key: Tensor, value: Tensor, *_: Any) -> Tensor:
    return query.new_empty((1, query.shape[2], query.shape[1], value.shape[3]))


# Both operators are declared with the dispatcher directly: `torch.library.custom_op`'s Python wrapper (autograd
# and redispatch in Python) costs 10 us a call against 4, and a step makes two per layer.
OPS = torch.library.Library("premoe", "FRAGMENT")
OPS.define(
    "packed_attention(Tensor query, Tensor key, Tensor value, int layer, float? scaling, float dropout, "
    "int? sliding_window, Tensor? sinks) -> Tensor"
)
OPS.impl("packed_attention", _attention_op, "CompositeExplicitAutograd")
torch.library.register_fake("premoe::packed_attention", _attention_shape, lib=OPS)
OPS.define("experts(Tensor hidden, Tensor index, Tensor weights, int layer) -> Tensor")
OPS.impl("experts", _experts_op, "CompositeExplicitAutograd")
torch.library.register_fake("premoe::experts", _experts_shape, lib=OPS)
