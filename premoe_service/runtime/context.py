"""The routing context of one forward pass: which pattern each token row follows, and what routing saw per row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..families import Routing, RoutingSpec, full_scores
from ..pattern import Pattern
from .masked_router import GraphRouting, MaskedRouter, skip_low_weights
from .model import PatternedModel


@dataclass
class RoutingContext:
    """Per-forward routing state: rows of a batch follow their own patterns.

    A forward pass over `[B, S]` tokens has `T = B * S` token rows in the router (row-major, so token `t`
    belongs to batch row `t // S`). Each batch row names a pattern; per MoE layer the context gathers the
    excluded-expert table of the distinct patterns into a `[T, E]` mask, which the masked router applies
    before any top-k or group scoring. Observations (coverage, the prompt's router scores) come back per
    batch row; pad tokens (`token_weight == 0`) are routed like any token but never counted.

    Attributes:
        tables: MoE layer -> `[P, E]` bool, excluded experts of each distinct pattern (None: none excluded).
        slot_tables: MoE layer -> `[P, E]` long, the slot id of each expert for each distinct pattern, when some
            pattern holds experts below full precision (their ids point into the quantized slots); empty
            otherwise, and the router's own table serves every row.
        token_pattern: `[T]` index into the tables' rows.
        token_row: `[T]` batch row of each token.
        token_weight: `[T]` 1.0 for real tokens, 0.0 for padding.
        rows: Batch rows B.
        prompt_scores: MoE layer -> `[B, E]` sums of the normalised router scores over real tokens (when
            `keep_scores`).
    """

    spec: RoutingSpec
    tables: dict[int, Tensor | None]
    token_pattern: Tensor
    token_row: Tensor
    token_weight: Tensor
    rows: int
    keep_scores: bool = False
    slot_tables: dict[int, Tensor] = field(default_factory=dict)
    skip_below: Tensor | None = None  # [T] each token's expert skip threshold (`prune`); None: no row skips
    skipped: Tensor | None = None  # [B] routed expert calls skipped per batch row since `take_skipped`
    prompt_scores: dict[int, Tensor] = field(default_factory=dict)
    patterns: int = 1  # the distinct patterns: the tables' rows
    _masks: dict[int, Tensor | None] = field(default_factory=dict)
    _slots: dict[int, Tensor] = field(default_factory=dict)
    _logits: list[Tensor] = field(default_factory=list)
    _observed: list[int] = field(default_factory=list)
    _stacked: tuple[tuple[int, ...], Tensor] | None = None
    _graph: tuple[Tensor, Tensor | None, Tensor] | None = None  # `graph_routing`'s tables, kept across steps
    _graph_kept: Tensor | None = None  # `[T]` the compiled graph's coverage shares of the last pass (`take_graph`)

    @classmethod
    def build(
        cls,
        patterned: PatternedModel,
        patterns: Sequence[Pattern],
        seq_len: int,
        lengths: Sequence[int] | None = None,
        *,
        keep_scores: bool = False,
        skip_below: Sequence[float] | None = None,
    ) -> RoutingContext:
        """The context of a `[len(patterns), seq_len]` batch whose row `b` is left-padded to `seq_len` from
        `lengths[b]` real tokens (default: no padding)."""
        rows = len(patterns)
        weight = torch.ones(rows, seq_len, dtype=torch.float32)
        if lengths is not None:
            for row, length in enumerate(lengths):
                weight[row, : seq_len - length] = 0.0
        token_row = torch.arange(rows).repeat_interleave(seq_len)
        skip = None
        if skip_below is not None and any(s > 0 for s in skip_below):
            skip = torch.tensor(list(skip_below), dtype=torch.float32)[token_row]
        return cls.assemble(PatternTables.of(patterned, patterns), token_row, weight.reshape(-1), keep_scores, skip)

    @classmethod
    def packed(
        cls,
        tables: PatternTables,
        counts: Sequence[int],
        *,
        keep_scores: bool = False,
        skip_below: Sequence[float] | None = None,
    ) -> RoutingContext:
        """The context of a packed `[1, T]` forward pass whose row `b` brings `counts[b]` tokens (no padding);
        `skip_below[b]` applies to every token of row `b` (prompt rows give 0: only decode tokens skip)."""
        token_row = torch.from_numpy(np.repeat(np.arange(len(counts), dtype=np.int64), list(counts)))
        skip = None
        if skip_below is not None and any(s > 0 for s in skip_below):
            skip = torch.tensor(list(skip_below), dtype=torch.float32)[token_row]
        weight = torch.ones(len(token_row), dtype=torch.float32)
        return cls.assemble(tables, token_row, weight, keep_scores, skip)

    @classmethod
    def assemble(
        cls, tables: PatternTables, token_row: Tensor, weight: Tensor, keep_scores: bool, skip: Tensor | None
    ) -> RoutingContext:
        device = tables.device
        rows = len(tables.row_pattern)
        token_row = token_row.to(device)
        return cls(
            tables.spec,
            tables.tables,
            tables.row_pattern.to(device)[token_row],
            token_row,
            weight.to(device),
            rows,
            keep_scores=keep_scores,
            slot_tables=tables.slot_tables,
            skip_below=None if skip is None else skip.to(device),
            skipped=None if skip is None else torch.zeros(rows, dtype=torch.long, device=device),
            patterns=len(tables.patterns),
        )

    def excluded(self, layer: int) -> Tensor | None:
        """`[T, E]` bool mask of the experts each token may not use in `layer` (None: it may use any)."""
        if layer not in self._masks:
            table = self.tables.get(layer)
            self._masks[layer] = None if table is None else table.index_select(0, self.token_pattern)
        return self._masks[layer]

    def slots(self, layer: int) -> Tensor | None:
        """`[T, E]` long: each token's slot id per expert in `layer` (None: the router's own table serves all)."""
        table = self.slot_tables.get(layer)
        if table is None:
            return None
        if layer not in self._slots:
            self._slots[layer] = table.index_select(0, self.token_pattern)
        return self._slots[layer]

    def prune(self, weights: Tensor, slots: Tensor, sentinel: int) -> tuple[Tensor, Tensor]:
        """The Mixture Compressor's online dynamic pruning: each token skips the routed experts whose share of its
        routing weights lies below its threshold, never its top one. Skipped pairs get weight 0 and the slot id
        `sentinel`, which the experts module computes nothing for. [T, k] each"""
        assert self.skip_below is not None and self.skipped is not None
        weights, slots, drop = skip_low_weights(weights, slots, self.skip_below, sentinel)
        self.skipped.index_add_(0, self.token_row, drop.sum(-1))
        return weights, slots

    def take_skipped(self) -> list[int]:
        """Skipped expert calls per batch row since the last call (zeros when no row skips)."""
        if self.skipped is None:
            return [0] * self.rows
        counts = self.skipped.tolist()
        self.skipped.zero_()
        return counts

    def graph_routing(self, routers: Sequence[MaskedRouter]) -> GraphRouting:
        """This context as the compiled stack's routers read it (`GraphRouting`), for `routers` (the MoE layers in
        order). The pattern tables are stacked once per context (a running batch reuses a decode step's context);
        the routers' own slot tables are read at each call, since the loader re-points them between steps."""
        if self._graph is None:
            layers = [router.layer for router in routers]
            experts = self.spec.num_experts
            device = self.token_row.device
            spare = torch.zeros((1, experts), dtype=torch.bool, device=device)
            excluded = torch.stack(
                [
                    torch.cat([spare.expand(self.patterns, -1) if (t := self.tables.get(layer)) is None else t, spare])
                    for layer in layers
                ]
            )
            slots = None
            if self.slot_tables:  # banked patterns: their tables, each with a spare row like `excluded`
                slots = torch.stack([torch.cat([t, t[:1]]) for t in (self.slot_tables[layer] for layer in layers)])
            skip = self.skip_below if self.skip_below is not None else torch.zeros(len(self.token_row), device=device)
            self._graph = (excluded, slots, skip)
        excluded, slots, skip = self._graph
        return GraphRouting.of(routers, excluded, self.token_pattern, skip, slots)

    def take_graph(self, routers: Sequence[MaskedRouter], graph: GraphRouting) -> None:
        """Take in what the compiled graph's routing saw (`graph_routing`): the coverage shares it summed over the
        layers (`collect` reads them in place of the logits), the logits for the prompt's router scores when asked,
        and the skipped pairs."""
        assert graph.kept is not None, "the compiled graph's routers sum their coverage shares"
        for router, logits in zip(routers, graph.logits, strict=True):
            assert logits is not None, "the compiled graph did not route every MoE layer"
            if self.keep_scores:
                self._keep_scores(router.layer, logits)
            self._observed.append(router.layer)
        self._graph_kept = graph.kept
        if self.skipped is not None and graph.dropped is not None:
            self.skipped.index_add_(0, self.token_row, graph.dropped)

    def observe(self, layer: int, routing: Routing) -> None:
        """Keep the router logits for `collect` (and the prompt's router scores when asked)."""
        self.observe_logits(layer, routing.logits)

    def observe_logits(self, layer: int, logits: Tensor) -> None:
        """`observe` for the logits `[T, E]` alone."""
        self._observed.append(layer)
        if any(table is not None for table in self.tables.values()):  # else all the mass is on every pattern
            self._logits.append(logits)
        if self.keep_scores:
            self._keep_scores(layer, logits)

    def _keep_scores(self, layer: int, logits: Tensor) -> None:
        """The prompt's router scores of `layer`: per row, the normalised scores summed over its real tokens."""
        scores = full_scores(self.spec, logits)  # [T, E] fp32
        normalised = scores / scores.sum(-1, keepdim=True).clamp_min(1e-30) * self.token_weight.unsqueeze(-1)
        sums = torch.zeros(self.rows, scores.shape[-1], dtype=scores.dtype, device=scores.device)
        self.prompt_scores[layer] = sums.index_add_(0, self.token_row, normalised)

    def collect(self) -> Tensor:
        """`[B]` float64: per batch row, the sum over its real tokens and the MoE layers of the share of the
        full router's probability mass on the row's pattern, for the forward pass just run. All layers are
        reduced at once (a handful of tensor operations per step, not per layer)."""
        coverage = torch.zeros(self.rows, dtype=torch.float64, device=self.token_row.device)
        if not self._observed:
            return coverage
        layers, logits = self._observed, torch.stack(self._logits) if self._logits else None  # [L, T, E]
        kept_in_graph, self._graph_kept = self._graph_kept, None
        self._logits, self._observed = [], []
        if all(self.excluded(layer) is None for layer in layers):
            share = self.token_weight * len(layers)  # every expert allowed: all the mass is on the pattern
        elif kept_in_graph is not None:  # the compiled graph summed the shares (`take_graph`)
            share = kept_in_graph * self.token_weight
        else:
            assert logits is not None, "a pattern excludes experts: `observe_logits` kept the logits"
            key = tuple(layers)
            if self._stacked is None or self._stacked[0] != key:
                none = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)
                masks = [self.excluded(layer) for layer in layers]
                self._stacked = (key, torch.stack([none if m is None else m for m in masks]))
            scores = full_scores(self.spec, logits)  # [L, T, E] fp32
            kept = scores.masked_fill(self._stacked[1], 0.0).sum(-1)
            share = (kept / scores.sum(-1).clamp_min(1e-30)).sum(0) * self.token_weight  # [T]
        return coverage.index_add_(0, self.token_row, share.double())


@dataclass
class PatternTables:
    """The per-layer tables of a batch's distinct patterns and each row's index into them: the part of a routing
    context that changes only when a pattern joins or leaves the batch (a running batch keeps it across steps).

    Attributes:
        tables: MoE layer -> `[P, E]` bool excluded experts of each distinct pattern (None: none excluded).
        slot_tables: MoE layer -> `[P, E]` long slot ids, when some pattern holds experts below full precision or
            in part (channel slots).
        row_pattern: `[B]` each row's index into the tables' rows.
        patterns: The distinct patterns (held so that their identities stay theirs).
    """

    spec: RoutingSpec
    device: torch.device
    tables: dict[int, Tensor | None]
    slot_tables: dict[int, Tensor]
    row_pattern: Tensor
    patterns: list[Pattern]

    @classmethod
    def of(
        cls, patterned: PatternedModel, patterns: Sequence[Pattern], known: PatternTables | None = None
    ) -> PatternTables:
        """The tables for rows following `patterns`; `known`'s tables are reused when the distinct patterns are the
        same objects in the same order (only the row index is rebuilt then)."""
        device = patterned.device
        index: dict[int, int] = {}
        unique: list[Pattern] = []
        for pattern in patterns:
            if id(pattern) not in index:
                index[id(pattern)] = len(unique)
                unique.append(pattern)
        row_pattern = torch.tensor([index[id(p)] for p in patterns], dtype=torch.long)
        same = known is not None and len(known.patterns) == len(unique)
        if known is not None and same and all(a is b for a, b in zip(known.patterns, unique, strict=True)):
            return cls(known.spec, device, known.tables, known.slot_tables, row_pattern, unique)
        masks = [patterned.excluded_masks(p) for p in unique]
        tables: dict[int, Tensor | None] = {}
        for layer in patterned.spec.moe_layers:
            per_pattern = [m[layer] for m in masks]
            if all(m is None for m in per_pattern):
                tables[layer] = None
            else:
                none = torch.zeros(patterned.spec.num_experts, dtype=torch.bool, device=device)
                tables[layer] = torch.stack([none if m is None else m for m in per_pattern])
        slot_tables: dict[int, Tensor] = {}
        banked = [patterned.banked(p) for p in unique]
        if any(banked):
            # Built from the tables published now: the rows' own experts are pinned, so their slots stay put
            # while the rows run (other entries are excluded for the row anyway).
            for layer, router in patterned.routers.items():
                full = router.slot_of
                slot_tables[layer] = torch.stack(
                    [patterned.route_table(layer, p, full) if b else full for p, b in zip(unique, banked, strict=True)]
                )
        return cls(patterned.spec.routing, device, tables, slot_tables, row_pattern, unique)


@contextmanager
def routing(patterned: PatternedModel, context: RoutingContext) -> Iterator[RoutingContext]:
    """Install `context` in every masked router for the forward passes inside the block. When rows skip experts,
    the experts modules take skipped pairs as transformers' expert-parallel sentinels (their rows masked to zero)."""
    skipping = (
        [patterned.experts_module(layer) for layer in patterned.routers] if context.skip_below is not None else []
    )
    for router in patterned.routers.values():
        router.context = context
    for experts in skipping:
        setattr(experts, "_is_expert_parallel", True)  # noqa: B010 - a transformers attribute
    try:
        yield context
    finally:
        for router in patterned.routers.values():
            router.context = None
        for experts in skipping:
            setattr(experts, "_is_expert_parallel", False)  # noqa: B010
