"""Attention of a packed forward pass over the KV pool: every row's new tokens (one decode token, or a prompt
chunk) ride in one `[1, T]` sequence, write their keys and values into the row's pool columns and attend to the
row's own columns only.

The engine registers `packed_attention` with transformers under `ATTENTION` and switches the model to it for the
length of a forward pass. The model computes projections, rotary embeddings, norms, routers and experts token by
token as usual; only the attention step changes: queries are gathered into `[B, h, Q, d]` (Q: the most tokens any
row brings), keys and values are gathered from the rows' pool blocks (`[B, kv_heads, W, d]`), and the model's
own attention function (its sdpa or eager path, sinks included) runs on them with a mask built from the rows'
positions, its sliding window applied. The outputs go back to the packed order. In the compiled graph, a step that
brings a short prompt may attend token by token instead, each token a row of one query (`GraphStep.of`; the
compiled stack decides, `per_token_pays` says where that saves the padding of decoding rows beside a prompt chunk).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .kv import KVPool, gather_rows

ATTENTION = "premoe_packed"


@dataclass
class PackedStep:
    """The layout of one packed forward pass: B rows, row `b` bringing `counts[b]` tokens after `starts[b]` cached.

    Attributes:
        pool: Where the rows' keys and values live.
        row_ids: Pool row of each step row.
        last: Position of each step row's last token in this pass.
        blocks: `[B, nb]` each step row's blocks for columns 0..W-1, padded with the null block.
        positions: `[T]` position (= the row's column) of each packed token.
        slots: `[T]` the flat pool slot of each packed token.
        query_index: `[B * Q]` packed index of each (row, query slot); T for the slots a row leaves empty.
        out_index: `[T]` index into `B * Q` of each packed token.
        query_pos: `[B, Q]` position of each query (-1: empty slot).
        width: Columns W the rows reach after this pass.
    """

    pool: KVPool
    row_ids: tuple[int, ...]
    last: tuple[int, ...]
    blocks: Tensor
    positions: Tensor
    slots: Tensor  # [T] flat pool slot of each token (its block * P + its offset in the block)
    query_index: Tensor | None  # None: every row brings one token (a pure decode step), no gather needed
    out_index: Tensor | None
    query_pos: Tensor
    width: int
    _masks: dict[tuple[int | None, torch.dtype], Tensor] = field(default_factory=dict)
    _open: bool | None = None  # every query sees every column (no mask needed)

    @classmethod
    def build(cls, pool: KVPool, rows: Sequence[int], starts: Sequence[int], counts: Sequence[int]) -> PackedStep:
        """The layout of a pass; each row first gets the pool blocks its new tokens need (`KVPool.reserve`)."""
        # The index arithmetic runs on Python ints, one tensor made per result: a step's rows and tokens are few
        # (hundreds at most), and each tensor operation on them would cost more than the loop.
        device = pool.device
        width = max(start + count for start, count in zip(starts, counts, strict=True))
        queries = max(counts)
        total = sum(counts)
        positions: list[int] = []
        slots: list[int] = []
        query_pos: list[int] = []  # [B * Q]
        query_index: list[int] = []
        out_index: list[int] = []
        first = 0  # packed index of the row's first token
        for b, (row, start, count) in enumerate(zip(rows, starts, counts, strict=True)):
            # Token i of row b sits at position start + i, in the row's column of that number.
            pool.reserve(row, start + count)
            positions.extend(range(start, start + count))
            slots.extend(pool.slots(row, start, count))
            query_pos.extend(range(start, start + count))
            query_pos.extend([-1] * (queries - count))
            if queries > 1:
                query_index.extend(range(first, first + count))
                query_index.extend([total] * (queries - count))
                out_index.extend(range(b * queries, b * queries + count))
            first += count
        blocks = pool.row_tables(list(rows), width)

        def tensor(values: list[int], *shape: int) -> Tensor:  # through numpy: 3x faster than torch.tensor
            # Shaped in numpy, so that no result is a view: the compiled stack's graphs guard on their inputs' bases.
            return torch.from_numpy(np.array(values, dtype=np.int64).reshape(shape or (-1,))).to(device)

        return cls(
            pool,
            tuple(rows),
            tuple(start + count - 1 for start, count in zip(starts, counts, strict=True)),
            tensor(blocks, len(counts), pool.table_width(width)),
            tensor(positions),
            tensor(slots),
            tensor(query_index) if queries > 1 else None,
            tensor(out_index) if queries > 1 else None,
            tensor(query_pos, len(counts), queries),
            width,
        )

    def advanced(self) -> PackedStep:
        """The layout of the next pure decode step over the same rows: every row one column further. A row whose
        next column opens a block takes one (and the step's tables widen when the width calls for it, `table_width`);
        until then its tokens' slots just move one on."""
        size = self.pool.block_size
        widens = self.pool.table_width(self.width + 1) != self.blocks.shape[1]
        if widens or any((p + 1) % size == 0 for p in self.last):
            return PackedStep.build(self.pool, self.row_ids, [p + 1 for p in self.last], [1] * len(self.last))
        return PackedStep(
            self.pool,
            self.row_ids,
            tuple(p + 1 for p in self.last),
            self.blocks,
            self.positions + 1,
            self.slots + 1,
            None,
            None,
            self.query_pos + 1,
            self.width + 1,
        )

    def position_ids(self) -> Tensor:
        """`[1, T]` each token's position in its own sequence (what the model's rotary embedding reads)."""
        return self.positions.unsqueeze(0)

    def mask(self, window: int | None, dtype: torch.dtype) -> Tensor | None:
        """`[B, 1, Q, W]` additive: 0 where a query may see a column (its own row's, not after it, within the
        window), the dtype's minimum elsewhere (transformers' convention). None when every query may see every
        column: one decode token per row, all rows as long as the widest, within the window (a lone request)."""
        key = (window, dtype)
        if self.query_index is None and (window is None or self.width <= window):
            if self._open is None:
                self._open = self.query_pos.shape[0] == 1 or bool((self.query_pos == self.width - 1).all())
            if self._open:
                return None
        if key not in self._masks:
            columns = torch.arange(self.width, device=self.query_pos.device)
            query = self.query_pos.unsqueeze(-1)  # [B, Q, 1]
            allowed = columns <= query
            if window is not None:
                allowed &= query - columns < window
            zero = torch.zeros((), dtype=dtype, device=query.device)
            low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=query.device)
            self._masks[key] = torch.where(allowed, zero, low).unsqueeze(1)
        return self._masks[key]


AttentionFunction = Callable[..., tuple[Tensor, Any]]
_STEP: ContextVar[PackedStep | None] = ContextVar("premoe_packed_step", default=None)
_INNER: ContextVar[AttentionFunction] = ContextVar("premoe_packed_inner")


@dataclass(frozen=True)
class GraphStep:
    """A packed step as the compiled decoder stack takes it, in place of the layers' attention mask: tensors only,
    so that they become the graph's inputs and attention runs inside the graph (`graph_attention`).

    Attributes:
        keys, values: Each layer's pool tensors, `[N, P, kv_heads, d]` (layers 0..L-1).
        slots, blocks, query_index, out_index, query_pos: The `PackedStep`'s.
        columns: `arange(W)`, which hands the graph the width W as a size rather than a constant. At least 2
            columns: a lone one-token prompt (W = 1) would otherwise need a graph of its own (torch specializes a
            size of 1); the extra column is masked like any column past a row's position, so it weighs exactly 0.
        inner: The attention function traced in (`written_attention`).
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    slots: Tensor
    blocks: Tensor
    query_index: Tensor | None
    out_index: Tensor | None
    query_pos: Tensor
    columns: Tensor
    inner: AttentionFunction

    @classmethod
    def of(cls, step: PackedStep, layers: int, inner: AttentionFunction, per_token: bool = False) -> GraphStep | None:
        """`step` for the graph; None while the pool has not made every layer's tensors (before its first pass).

        `per_token`: a step that brings a prompt attends token by token, each packed token a row of its own that
        brings one query (its row's block table, its position): the layout of a decode step, whose graph then
        runs it, without the queries padded to the longest chunk."""
        pool = step.pool.layers(layers)
        if pool is None:
            return None
        columns = torch.arange(max(step.width, 2), device=step.query_pos.device)
        if per_token and step.out_index is not None:
            rows = torch.div(step.out_index, step.query_pos.shape[1], rounding_mode="floor")  # each token's row
            blocks = step.blocks.index_select(0, rows)
            return cls(*pool, step.slots, blocks, None, None, step.positions.unsqueeze(1), columns, inner)
        return cls(*pool, step.slots, step.blocks, step.query_index, step.out_index, step.query_pos, columns, inner)


# The most key columns a step attending token by token may gather per layer (tokens x width): each token gathers
# its row's keys and values, where the padded layout gathers them once per row.
PER_TOKEN_COLUMNS = 8192


def per_token_pays(step: PackedStep) -> bool:
    """Whether a step that brings a prompt costs less attending token by token (`GraphStep.of`) than with its
    queries grouped by row: the grouped layout attends B x Q query slots (Q the longest chunk) over W columns and
    gathers B rows of keys and values, token by token T queries and T rows. Decode rows beside a prompt chunk pay
    the chunk's length each in the grouped layout: 15 decode rows beside a 20-token prompt attend 320 query slots
    for 35 tokens. A lone prompt, or chunks of one length, pay nothing (B x Q = T). The caller has checked that
    the step brings a prompt and gathers no more than `PER_TOKEN_COLUMNS` (`CompiledStack._per_token`)."""
    tokens = step.positions.shape[0]
    rows, queries = step.query_pos.shape
    return 2 * tokens < rows * (1 + queries)


def current_step() -> PackedStep | None:
    """The step `packed_attention_for` installed (None outside one)."""
    return _STEP.get()


def graph_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, step: GraphStep, kwargs: dict[str, Any]
) -> Tensor:
    """`packed_attention`'s computation written for the compiled graph: the pool's tensors are the graph's inputs
    and its writes happen in place in them, the mask is built from the query positions (always, so that one graph
    serves every step of a shape class), and `step.inner` (`written_attention`) is traced in. `[1, T, h, d_v]`"""
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    pool_keys, pool_values = step.keys[layer], step.values[layer]
    new_keys, new_values = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, kv_heads, d]
    pool_keys.view(-1, *new_keys.shape[1:]).index_copy_(0, step.slots, new_keys)
    pool_values.view(-1, *new_values.shape[1:]).index_copy_(0, step.slots, new_values)
    width = step.columns.shape[0]
    keys = gather_rows(pool_keys, step.blocks, width).transpose(1, 2)  # [B, kv_heads, W, d]
    values = gather_rows(pool_values, step.blocks, width).transpose(1, 2)
    grouped = _grouped_queries(query, step.query_pos, step.query_index)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    position = step.query_pos.unsqueeze(-1)  # [B, Q, 1]
    allowed = step.columns <= position
    if window is not None:
        allowed = allowed & (position - step.columns < window)
    mask = torch.where(allowed, 0.0, torch.finfo(query.dtype).min).to(query.dtype).unsqueeze(1)  # as `mask`
    out, _ = step.inner(module, grouped, keys, values, mask, **kwargs)  # [B, Q, h, d_v]
    return _packed_out(out, step.out_index)


def _grouped_queries(query: Tensor, query_pos: Tensor, query_index: Tensor | None) -> Tensor:
    """The packed queries `[1, h, T, d_q]` grouped by row, `[B, h, Q, d_q]` (empty slots zero)."""
    rows, queries = query_pos.shape
    heads, dim = query.shape[1], query.shape[3]
    packed = query[0].transpose(0, 1)  # [T, h, d_q]
    if query_index is not None:
        packed = torch.cat([packed, packed.new_zeros((1, heads, dim))]).index_select(0, query_index)
    return packed.reshape(rows, queries, heads, dim).transpose(1, 2)


def _packed_out(out: Tensor, out_index: Tensor | None) -> Tensor:
    """The attention function's output `[B, Q, h, d_v]` back in the packed order, `[1, T, h, d_v]`."""
    rows, queries, heads = out.shape[:3]
    out = out.reshape(rows * queries, heads, out.shape[-1])
    if out_index is not None:
        out = out.index_select(0, out_index)
    return out.unsqueeze(0)


def model_attention(model: nn.Module) -> AttentionFunction:
    """The attention function `model` itself uses (its configured implementation; eager: its module's own)."""
    config: Any = model.config
    implementation = config._attn_implementation
    if implementation == ATTENTION:
        raise RuntimeError("the model is already switched to packed attention")
    if implementation == "eager":
        eager = _eager_function(model)
        if eager is None:
            raise RuntimeError("the model is configured for eager attention but its module defines none")
        return eager
    function: AttentionFunction = ALL_ATTENTION_FUNCTIONS[implementation]
    return function


def _eager_function(model: nn.Module) -> AttentionFunction | None:
    """The family's `eager_attention_forward` (the module of its attention layers defines it), or None."""
    attention = next((m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")), None)
    function = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None) if attention else None
    return function if callable(function) else None


def written_attention(model: nn.Module, inner: AttentionFunction) -> AttentionFunction:
    """What the compiled graph traces for `model`'s attention (`graph_attention`): its family's attention written
    out in tensor operations (the module's `eager_attention_forward`, sinks and soft caps included), which is the
    arithmetic of the family's sdpa path, and which the compiler fuses into the graph's kernels, where sdpa stays
    one library call a layer around its own buffers (a decode step's four on the reference model took a tenth of
    the step). `inner` (the model's own, `model_attention`) when the family has none."""
    return _eager_function(model) or inner


def packed_attention(
    module: nn.Module,
    query: Tensor,  # [1, h, T, d_q]
    key: Tensor,  # [1, kv_heads, T, d_k]
    value: Tensor,  # [1, kv_heads, T, d_v]
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature; see the module docstring."""
    if torch.compiler.is_compiling():  # the compiled step (`engine/compiled_stack.py`)
        if isinstance(attention_mask, GraphStep):  # attention inside the graph
            return graph_attention(module, query, key, value, attention_mask, _carried(kwargs)), None
        return _opaque_attention(module, query, key, value, _carried(kwargs)), None  # one opaque call
    step = _STEP.get()
    if step is None:
        raise RuntimeError("packed attention runs only inside `packed_forward`")
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    keys, values = step.pool.write(layer, key[0].transpose(0, 1), value[0].transpose(0, 1), step.slots)
    keys = gather_rows(keys, step.blocks, step.width).transpose(1, 2)  # [B, kv_heads, W, d]
    values = gather_rows(values, step.blocks, step.width).transpose(1, 2)
    grouped = _grouped_queries(query, step.query_pos, step.query_index)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    mask = step.mask(window, query.dtype)
    out, _ = _INNER.get()(module, grouped, keys, values, mask, **kwargs)  # [B, Q, h, d_v]
    return _packed_out(out, step.out_index), None  # [1, T, h, d_v]


AttentionInterface.register(ATTENTION, packed_attention)

# What the families pass their attention function beyond the tensors: these reach it in the compiled step too;
# the ignored ones no attention function reads; any other name stops the compiled step (it falls back to eager).
_PASSED = ("dropout", "scaling", "sliding_window", "s_aux")
_IGNORED = ("position_ids", "use_cache", "cache_position")


class UnsupportedAttention(RuntimeError):
    """The family passes its attention function something the compiled step does not carry."""


def _carried(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The attention arguments the compiled step passes on (`_PASSED`); raises on any it does not know."""
    unknown = set(kwargs) - set(_PASSED) - set(_IGNORED)
    if unknown:
        raise UnsupportedAttention(f"attention arguments the compiled step does not carry: {sorted(unknown)}")
    return {name: kwargs[name] for name in _PASSED if name in kwargs}


def _opaque_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """The call to `premoe::packed_attention` (declared in `engine/opaque_ops.py`) in the compiled graph."""
    out: Tensor = torch.ops.premoe.packed_attention(
        query,
        key,
        value,
        int(module.layer_idx),  # type: ignore[arg-type]
        kwargs.get("scaling"),
        float(kwargs.get("dropout", 0.0)),
        kwargs.get("sliding_window"),
        kwargs.get("s_aux"),
    )
    return out


@contextmanager
def packed_attention_for(model: nn.Module, step: PackedStep, inner: AttentionFunction) -> Iterator[None]:
    """Switch `model` to packed attention over `step` for the forward passes inside the block; `inner` is the
    model's own attention function (`model_attention`), which runs on the gathered rows."""
    step_token, inner_token = _STEP.set(step), _INNER.set(inner)
    try:
        with switched_attention(model):
            yield
    finally:
        _STEP.reset(step_token)
        _INNER.reset(inner_token)


@contextmanager
def switched_attention(model: nn.Module) -> Iterator[None]:
    """`model`'s attention modules call `packed_attention` inside the block."""
    config: Any = model.config
    original = config._attn_implementation_internal
    # The internal field, not the property (its setter walks sub-configs; these models' attention modules read
    # the top config), set past the config's validating __setattr__: this runs twice per forward pass.
    object.__setattr__(config, "_attn_implementation_internal", ATTENTION)
    try:
        yield
    finally:
        object.__setattr__(config, "_attn_implementation_internal", original)
