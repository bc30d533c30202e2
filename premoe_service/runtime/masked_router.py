"""The masked router: the family's routing over the full router weights, restricted to a pattern."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from ..families import Routing, RoutingSpec
from ..families.routing import RouterWeights, route

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

    def set_routing(self, excluded: Tensor | None, slot_of: Tensor) -> None:
        """Route among the non-excluded experts; `slot_of[e]` is the slot holding expert e (-1: none)."""
        device = self.slot_of.device
        self.excluded = None if excluded is None else excluded.to(device)
        self.slot_of.copy_(slot_of.to(device))

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
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

    def extra_repr(self) -> str:
        return f"layer={self.layer}, wraps={self.wrapped_class}, kind={self.spec.kind}, top_k={self.top_k}"
