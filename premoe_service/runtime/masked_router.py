"""The masked router: the family's routing over the full router weights, restricted to a pattern."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ..families import Routing, RoutingSpec
from ..families.routing import RouterWeights, full_scores, route

RouterObserver = Callable[[int, Tensor, Routing], None]


class RowRouting(Protocol):
    """What a masked router reads from the routing context of a batched forward pass (`runtime.context`)."""

    def excluded(self, layer: int) -> Tensor | None:
        """`[T, E]` bool: the experts each token row may not use in `layer` (None: any)."""
        ...

    def slots(self, layer: int) -> Tensor | None:
        """`[T, E]` long: each token row's slot id per expert (None: the router's own table serves all rows)."""
        ...

    def observe(self, layer: int, routing: Routing) -> None:
        """Record what routing chose for the rows (coverage, prompt scores)."""
        ...

    skip_below: Tensor | None

    def prune(self, weights: Tensor, slots: Tensor, sentinel: int) -> tuple[Tensor, Tensor]:
        """Take out the routed experts the rows skip (`skip_below`): weight 0, slot id `sentinel`."""
        ...


@dataclass
class GraphRouting:
    """A step's routing context as the compiled decoder stack's routers read it (`engine/compiled_stack.py`): tensors
    only, so that they become the graph's inputs and routing runs inside the graph; and what routing saw, which
    the graph hands back. The routers of the stack share one; the stack sets its fields before each call.

    Attributes:
        excluded: `[M, P, E]` bool: per MoE layer (in order), the experts each distinct pattern excludes. P is at
            least 2 (a spare row): torch specializes a size of 1, and one graph serves any count of patterns.
        slots: `[M, P, E]` long: each pattern's slot id per expert (the routers' tables, or a banked pattern's).
        token_pattern: `[T]` each token's row in the tables.
        skip_below: `[T]` each token's expert skip threshold (0: none skipped; `skip_low_weights`).
        skip_ids: `[M]` the slot id that the experts module skips, per MoE layer (`MaskedRouter.skip_id`).
        logits: Out: per MoE layer, the router logits `[T, E]` (what coverage and the prompt's scores read).
        dropped: Out: `[T]` routed pairs skipped per token, summed over the MoE layers.
        kept: Out: `[T]` float32, per token, the share of the full router's mass on its pattern, summed over the
            MoE layers (what the routing context's `collect` computes from the logits, computed in the graph).
        decode: The step runs as decode rows (every row one query: a decode step, or a prompt's step attending
            token by token): the experts may be computed inside the graph (`engine/opaque_ops.py`'s
            `inline_experts`). Not a tensor: a graph is traced for each value.
    """

    excluded: Tensor
    slots: Tensor
    token_pattern: Tensor
    skip_below: Tensor
    skip_ids: Tensor
    logits: list[Tensor | None] = field(default_factory=list)
    dropped: Tensor | None = None
    kept: Tensor | None = None
    decode: bool = False

    @classmethod
    def of(
        cls,
        routers: Sequence[MaskedRouter],
        excluded: Tensor,
        token_pattern: Tensor,
        skip_below: Tensor,
        slots: Tensor | None = None,
    ) -> GraphRouting:
        """The record for `routers` (the MoE layers in order); `slots` None: each pattern routes by the routers' own
        slot tables as published now (the loader re-points them between steps)."""
        if slots is None:
            table = torch.stack([router.slot_of for router in routers])  # [M, E]
            slots = table.unsqueeze(1).expand(-1, excluded.shape[1], -1).contiguous()
        skip_ids = torch.tensor([router.skip_id for router in routers], device=skip_below.device)
        return cls(excluded, slots, token_pattern, skip_below, skip_ids, [None] * len(routers))


def skip_low_weights(weights: Tensor, slots: Tensor, skip_below: Tensor, sentinel: int | Tensor) -> tuple[Tensor, ...]:
    """The Mixture Compressor's online dynamic pruning: each token skips the routed experts whose share of its
    routing weights lies below its threshold (`skip_below` `[T]`), never its top one. Skipped pairs get weight 0 and
    the slot id `sentinel`, which the experts module computes nothing for. Returns the weights and slots `[T, k]`
    and the skipped pairs `[T, k]` (bool)."""
    share = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    drop = (share < skip_below.unsqueeze(-1)) & (weights < weights.amax(-1, keepdim=True))
    return weights.masked_fill(drop, 0.0), slots.masked_fill(drop, sentinel), drop


class MaskedRouter(nn.Module):
    """Stands in for a transformers router module and returns slot ids instead of expert ids.

    It adopts the wrapped router's parameters and buffers under their own names, so the model's state
    dict keeps transformers' keys. The router weights are small and always resident: routing is computed
    over all experts, the excluded ones are taken out before any top-k, and the chosen expert ids are
    mapped to the slots that hold them.
    """

    slot_of: Tensor

    def __init__(self, router: nn.Module, spec: RoutingSpec, layer: int) -> None:
        super().__init__()
        for name, param in router.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in router.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        self.spec = spec
        self.layer = layer
        self.top_k = spec.top_k
        self.num_experts = spec.num_experts
        self.wrapped_class = type(router).__name__
        self.excluded: Tensor | None = None  # [E] bool, None = nothing excluded
        self.register_buffer("slot_of", torch.full((spec.num_experts,), -1, dtype=torch.long), persistent=False)
        self.observer: RouterObserver | None = None
        self.context: RowRouting | None = None  # set around a batched forward pass (`runtime.context.routing`)
        self.skip_id = spec.num_experts  # the slot id the experts module skips: its slot count (set by the engine)
        self.graph: GraphRouting | None = None  # what the compiled stack's graph routes by (`graph_forward`)
        self.graph_index = 0  # this router's MoE layer among the model's (its row in `graph`'s tables)

    def set_routing(self, excluded: Tensor | None, slot_of: Tensor) -> None:
        """Route among the non-excluded experts; `slot_of[e]` is the slot holding expert e (-1: none)."""
        device = self.slot_of.device
        self.excluded = None if excluded is None else excluded.to(device)
        self.slot_of.copy_(slot_of.to(device))

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        if self.graph is not None and torch.compiler.is_compiling():
            return self.graph_forward(hidden, self.graph)
        # Read the weights at call time: loading a state dict with assign=True replaces the parameters.
        context = self.context
        if context is not None:  # per-token patterns of a batch of requests
            routing = route(self.spec, RouterWeights.of(self), hidden, context.excluded(self.layer))
            context.observe(self.layer, routing)
            rows = context.slots(self.layer)  # rows whose patterns hold experts at other precisions
            slots = self.slot_of[routing.experts] if rows is None else rows.gather(1, routing.experts)
            if context.skip_below is not None:  # some rows skip their low-weight experts (decode only)
                weights, slots = context.prune(routing.weights, slots, self.skip_id)
                return routing.logits, weights, slots
            return routing.logits, routing.weights, slots
        routing = route(self.spec, RouterWeights.of(self), hidden, self.excluded)
        if self.observer is not None:
            self.observer(self.layer, hidden, routing)
        return routing.logits, routing.weights, self.slot_of[routing.experts]

    def graph_forward(self, hidden: Tensor, graph: GraphRouting) -> tuple[Tensor, Tensor, Tensor]:
        """The batched path above, written for the compiled graph: the context's tables are its inputs, every token
        is masked (a pattern that excludes nothing has an all-False row) and goes through the skip rule (a threshold
        of 0 skips nothing), so that one graph serves every step; what routing saw goes back through `graph`."""
        j = self.graph_index
        excluded = graph.excluded[j].index_select(0, graph.token_pattern)  # [T, E]
        routing = route(self.spec, RouterWeights.of(self), hidden, excluded)
        graph.logits[j] = routing.logits
        slots = graph.slots[j].index_select(0, graph.token_pattern).gather(1, routing.experts)
        weights, slots, drop = skip_low_weights(routing.weights, slots, graph.skip_below, graph.skip_ids[j])
        dropped = drop.sum(-1)
        graph.dropped = dropped if j == 0 or graph.dropped is None else graph.dropped + dropped
        scores = full_scores(self.spec, routing.logits)  # [T, E] fp32
        kept = scores.masked_fill(excluded, 0.0).sum(-1) / scores.sum(-1).clamp_min(1e-30)
        graph.kept = kept if j == 0 or graph.kept is None else graph.kept + kept
        return routing.logits, weights, slots

    def extra_repr(self) -> str:
        return f"layer={self.layer}, wraps={self.wrapped_class}, kind={self.spec.kind}, top_k={self.top_k}"
