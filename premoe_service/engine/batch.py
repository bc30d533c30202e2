"""The running batch: the requests decoding together, their KV rows in row order, a decode step's inputs, and
the forward pass under a routing context."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from ..runtime import PatternedModel
from ..runtime.context import RoutingContext, routing
from .kv import KVBatch
from .request import Request


class RunningBatch:
    """Rows join after a prefill (their KV rows merged) and leave at token boundaries (their rows dropped); the
    decode step's routing context is rebuilt only when the rows change."""

    def __init__(self, engine: PatternedModel) -> None:
        self.engine = engine
        self.requests: list[Request] = []  # in KV row order
        self.kv: KVBatch | None = None
        self._context: RoutingContext | None = None

    def add(self, requests: Sequence[Request], kv: KVBatch) -> None:
        """Append prefilled requests with their KV rows (same order)."""
        if self.kv is None:
            self.kv = kv
        else:
            self.kv.merge(kv)
        self.requests.extend(requests)
        self._context = None

    def remove(self, requests: Sequence[Request]) -> None:
        """Drop these requests' rows (and the leading cache columns no remaining row uses)."""
        gone = {id(r) for r in requests}
        keep = [row for row, r in enumerate(self.requests) if id(r) not in gone]
        self.requests = [self.requests[row] for row in keep]
        if self.kv is not None:
            if keep:
                self.kv.select(keep)
            else:
                self.kv = None
        self._context = None

    def decode_inputs(self) -> tuple[Tensor, Tensor, Tensor, RoutingContext]:
        """Token ids `[B, 1]` (each row's last token), the extended mask, position ids, and the routing context."""
        assert self.kv is not None
        mask, positions = self.kv.decode_inputs()
        ids = torch.tensor([[r.generated[-1]] for r in self.requests], device=self.engine.device)
        if self._context is None:
            patterns, skip = [r.pattern for r in self.requests], [r.params.skip_below for r in self.requests]
            self._context = RoutingContext.build(self.engine, patterns, 1, skip_below=skip)
        return ids, mask, positions, self._context


def forward(
    engine: PatternedModel,
    context: RoutingContext,
    ids: Tensor,
    mask: Tensor,
    positions: Tensor,
    cache: DynamicCache,
    logits_to_keep: int,
) -> Tensor:
    """One forward pass of the model with every token row routed by `context`; the logits it kept."""
    with routing(engine, context):
        out = engine.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=logits_to_keep
        )
    logits: Tensor = out.logits
    return logits
