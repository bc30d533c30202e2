"""The decoder stack compiled (`torch.compile`, inductor), attention included, around the MoE block.

At this project's model sizes a step is mostly dispatch: a decode step of one row on the reference model is some
600 tensor operations, each a few microseconds of Python and dispatcher for much less arithmetic. Compiled, the
norms, projections' glue, rotary embeddings, residual adds and attention of a layer become a few generated kernels;
the matrix products stay the same library calls.

- **Attention runs inside the graph** (`engine/attention.py`'s `graph_attention`): the step's layout and the KV
  pool's tensors are the graph's inputs (a `GraphStep`, passed where the layers take their attention mask), the
  pool is written in place by a generated kernel and the family's attention, written out in tensor operations
  (`attention.written_attention`: the arithmetic of its sdpa path), is traced in. A step that brings a prompt of
  up to as many tokens as a decode graph takes rows attends token by token in that graph (`_per_token`): its
  experts are then computed inside the graph, and decoding rows beside a prompt chunk attend without the chunk's
  padding (15 rows beside a 20-token prompt: 35 queries, not 320 padded slots). The engine's closed loop of 16
  requests (prompts of 8-30 tokens joining decode rows) went from 2128 to 2546 tok/s with the padding's rule alone
  (`docs/serving.md`). A family
  whose attention cannot be traced so (logged once, `graph_failure`) runs it behind an operator the compiler does
  not look into (`premoe::packed_attention`), as it did before; in an A/B on the reference model, the graph saves
  a tenth of a step.
- **The MoE block runs inside the graph too**: the family's block code is traced, its masked router routes there
  (`runtime.masked_router.GraphRouting`: the step's pattern tables, slot tables and skip thresholds are the
  graph's inputs, the router logits and skipped pairs its outputs). Its experts:
  - in a decode graph's step (a decode step, or a prompt attending token by token: `_per_token`) of at most
    `kernel_pairs` (token, expert) pairs, on a module that computes with its own slots, are computed inside the
    graph too (`opaque_ops.inline_experts`): the code of the experts kernel below, reading the slots' weights,
    which the loader writes in place between steps. Against the opaque call, that takes 0.5 ms off a one-row
    decode step on the reference model (0.66x) and 0.6 ms off one of 16 rows, and 15 decode rows beside a
    20-token prompt from 14.6 to 12.1 ms;
  - otherwise (a prompt's step grouped by row, a wider step, slot banks) go out to an operator the compiler does
    not look into (`premoe::experts`), which runs eager on the slots, banks included. Inside it the experts'
    products run compiled again, apart: a kernel compiled from `runtime.experts_forward.gathered_experts` computes every
    (token, expert) pair in one generated loop over the slots' weights, where the eager paths make a library call
    per hit expert (2.5 to 4.5x faster a layer on the reference model, at 1 to 16 rows).

Both operators are declared in `engine/opaque_ops.py`, and run on the modules the `Opaque` record of the call
names.

Sizes are dynamic, and torch specializes a size of 1, so a graph serves each class of step (`WARM_UP_GRAPH`): one
row decoding, several rows decoding (and more rows than the experts inside the graph take, when the pool has them),
and any step that brings a prompt (whose rows and kept logits are traced as sizes torch does not specialize). The
engine compiles them, and the experts kernel, when it starts (`warm_up`), so that no request waits for a compile.

The compiled graph is not bit-identical to the eager stack (generated reductions sum in another order), so it
is kept to the exactness tests' tolerances (`tests/test_compiled_stack.py`) rather than to the bit. A model the
compiler cannot take whole (no C++ compiler on the machine, a family passing its attention something the step
does not carry) is logged once and runs eager from then on. A float64 model runs eager (`compiles`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModel
from ..families import adapter_for
from ..runtime.context import RoutingContext
from ..runtime.decoder_stack import INDUCTOR_OPTIONS, DecoderStack
from ..runtime.experts_forward import (
    IMPLEMENTATION,
    INLINE_PAIRS,
    Weights,
    follows_interface,
    gathered_experts,
    install_front,
    kernel_pairs,
    library_experts_forward,
    own_forward,
)
from ..runtime.masked_router import GraphRouting, MaskedRouter
from .attention import (
    PER_TOKEN_COLUMNS,
    AttentionFunction,
    GraphStep,
    PackedStep,
    UnsupportedAttention,
    current_step,
    packed_attention_for,
    per_token_pays,
    switched_attention,
    written_attention,
)
from .kv import KVPool
from .opaque_ops import CURRENT, IDLE, Opaque, block_forward, experts_front, inline_experts

log = logging.getLogger(__name__)

# Packed tokens and kept positions of the passes the warm-up runs where attention cannot run inside the graph (it
# runs behind the opaque operator): one row decoding, a prompt, several rows. Most families compile three graphs
# for these (T = 1; T > 1 with K = 1; K > 1); some trace a guard that sets T = 2 apart (DeepSeek V2: `8 * T !=
# 16`), which the shapes of two tokens cover. Another such coincidence costs one compile at its first pass, not a
# wrong result.
WARM_UP = ((1, 1), (2, 1), (2, 2), (3, 1), (3, 2))

# The steps the warm-up runs with attention inside the graph, as (starts, counts, kept positions) of rows 0..B-1:
# one row decoding; two rows and three (the DeepSeek V2 guard above); a decode row beside a prompt. Torch
# specializes sizes of 1, and a decode step skips the query gather, so the two decode classes are graphs of their
# own. The prompt's step is traced with its rows B, kept logits K and query gather as unbacked sizes (`_unbacked`):
# its graph then also serves a prompt alone, a chunk that keeps no logit or all of them (prompt logprobs), and any
# number of decode rows beside prompts. The tokens T and queries per row Q stay specialized at 1: transformers'
# norms and attention branch on them in Python.
WARM_UP_GRAPH = (
    ((4,), (1,), (0,)),
    ((4, 5), (1, 1), (0, 1)),
    ((4, 5, 6), (1, 1, 1), (0, 1, 2)),
    ((4, 0), (1, 5), (0, 5)),
)
# The prompt's classes where its step cannot be traced with unbacked sizes (`_warm_up_graph`): a prompt alone with
# one logit kept, or all. A chunk that keeps no logit then compiles at its first pass.
SPECIALIZED_PROMPT_STEPS = (((0,), (5,), (4,)), ((0,), (5,), (0, 1, 2, 3, 4)))
# Graphs per code object that torch keeps (its default is 8): the warm-up's three or four (or the opaque operator's
# three), and room for shape coincidences that a family's code guards on.
RECOMPILE_LIMIT = 16


def compiles(model: nn.Module) -> bool:
    """Whether `model` runs its stack compiled: not in float64. The families' norms compute in float32 even in a
    float64 model, and the compiled kernels round those float32 sums in another order: the logits would move by
    float32 rounding (~1e-7), far outside the float64 bound the eager stack keeps (1e-9 of transformers alone)."""
    return next(model.parameters()).dtype != torch.float64


class CompiledStack:
    """Runs `stack` compiled; the same call as `DecoderStack`. Falls back to `stack` itself for good when
    compiling fails."""

    def __init__(self, stack: DecoderStack, pool: KVPool | None = None, inner: AttentionFunction | None = None) -> None:
        self.stack = stack
        # Attention inside the graph, over `pool` with the model's own attention function `inner` (both given by
        # the running batch); without them, or once it failed to compile, behind the opaque operator.
        self.pool, self.inner = pool, inner
        # What the graph traces in (`written_attention`); the opaque operator runs the model's own, `inner`.
        self.graph_inner = None if inner is None else written_attention(stack.model, inner)
        self.graph_failure: str | None = None if pool is not None and inner is not None else "no pool given"
        model: Any = stack.model
        adapter = adapter_for(model.config)
        layers = model.model.layers
        attention = {int(m.layer_idx): m for layer in layers for m in layer.children() if hasattr(m, "layer_idx")}
        experts_modules: dict[int, nn.Module] = {}
        self.routers: list[MaskedRouter] = []
        for index in adapter.moe_layers(model.config):
            block = getattr(layers[index], adapter.block_attr)
            block.forward = functools.partial(block_forward, block, adapter.block_scores)
            router = getattr(block, adapter.router_attr)
            if not isinstance(router, MaskedRouter):
                raise UnsupportedModel(f"layer {index}'s router is not masked", field="router")
            router.graph_index = len(self.routers)
            self.routers.append(router)
            experts = experts_modules[index] = getattr(block, adapter.experts_attr)
            install_front(experts, functools.partial(experts_front, experts, index))
        # What the routers route by inside the graph: one record for all, its fields set before each call.
        self.graph = self._idle_routing(1)
        for router in self.routers:
            router.graph = self.graph
        # The experts modules that run the engine's experts forward (some families' do not use the interface).
        self.experts = [
            experts
            for experts in experts_modules.values()
            if follows_interface(experts) and getattr(experts.config, "_experts_implementation", None) == IMPLEMENTATION
        ]
        self.top_k = adapter.spec(model.config).routing.top_k
        # The most rows a decode step may have and still compute its experts inside the graph: the fewest pairs
        # any inlined experts module takes, over top-k (`_inline_experts`; 0: none is inlined).
        self.inline_rows = 0
        self.opaque = Opaque(attention, experts_modules, kernel=self._experts_call if self.experts else None)
        self.failure: str | None = None
        self.experts_failure: str | None = None
        self.layers = len(attention)
        if sorted(attention) != list(range(self.layers)):
            self.graph_failure = "the attention layers are not numbered 0..L-1"
        compile_: Any = torch.compile  # its typed overloads lack `recompile_limit`
        options = INDUCTOR_OPTIONS if self._device().type == "cpu" else {}  # measured on CPU only
        self._compiled = compile_(
            _own_code(stack.__call__), dynamic=True, fullgraph=True, options=options, **_recompile_limit()
        )
        self._compiled_experts = torch.compile(
            _own_function(gathered_experts), dynamic=True, fullgraph=True, options=options
        )

    def warm_up(self, attention_mask: Any) -> float:
        """Compile the experts kernel, then the shape classes (`WARM_UP_GRAPH`, or `WARM_UP` where attention cannot
        run inside the graph), so that no request waits for a compile. The MoE blocks stand idle meanwhile (they
        add zeros and touch no state: the opaque operator returns zeros, and experts computed inside the graph are
        routed to the skip id); attention writes blocks of rows the pool lends beyond the batch's (`KVPool.borrow`:
        a batch of one row still warms up the steps of three), given back after each step. Returns the seconds it
        took."""
        start = time.perf_counter()
        model: Any = self.stack.model
        with torch.no_grad(), switched_attention(model), _tracing():
            self._warm_up_experts()
            self._inline_experts()
            self._make_pool(attention_mask)
            self._warm_up_graph()
            if self.graph_failure is not None:
                self._warm_up_opaque(attention_mask)
        return time.perf_counter() - start

    def _inline_experts(self) -> None:
        """Once the experts kernel compiled: have the decode steps' graphs compute the experts modules that run it
        with their own slots inside (`inline_experts`), in passes the kernel takes (`kernel_pairs`)."""
        if self.experts_failure is not None:
            return
        inlined = [experts for experts in self.experts if own_forward(experts)]
        for experts in inlined:
            inline_experts(experts, self.graph, kernel_pairs(experts))
        self.inline_rows = min((kernel_pairs(experts) for experts in inlined), default=0) // self.top_k

    def _make_pool(self, attention_mask: Any) -> None:
        """Have the pool make its layers' tensors (the graphs take them as inputs): one eager pass of a token in
        a row the pool lends, its MoE blocks idle (they return zeros)."""
        if self.pool is None or self.inner is None:
            return
        layout = PackedStep.build(self.pool, self.pool.borrow(1), [0], [1])
        ids = torch.zeros((1, 1), dtype=torch.long, device=self._device())
        keep = torch.zeros(1, dtype=torch.long, device=ids.device)
        token = CURRENT.set(IDLE)
        try:
            with packed_attention_for(self.stack.model, layout, self.inner):
                self.stack(ids, layout.position_ids(), attention_mask, keep)
        finally:
            CURRENT.reset(token)
            self.pool.return_borrowed()

    def _warm_up_opaque(self, attention_mask: Any) -> None:
        """Compile the graphs with attention behind the opaque operator (`WARM_UP`)."""
        device = self._device()
        for tokens, kept in WARM_UP:
            if self.failure is not None:
                return
            ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
            positions = torch.arange(tokens, device=device).unsqueeze(0)
            keep = torch.arange(tokens - kept, tokens, device=device)
            try:
                self._compiled_call(ids, positions, attention_mask, keep, IDLE)
            except Exception as exc:
                self._failed(exc)

    def _warm_up_graph(self) -> None:
        """Compile the graphs with attention inside (`WARM_UP_GRAPH`), on rows the pool lends beyond the batch's
        (their blocks are given back after each step, and what was written there is overwritten before it is
        read). Where a family's code cannot take a prompt's step with unbacked sizes, that step is traced with its
        sizes known, and the prompt's classes get graphs of their own (`SPECIALIZED_PROMPT_STEPS`; logged once)."""
        if self.failure is not None or self.graph_failure is not None:
            return
        steps = [(*step, max(step[1]) > 1) for step in [*WARM_UP_GRAPH, *self._wide_decode_steps()]]
        while steps:
            starts, counts, kept, unbacked = steps.pop(0)
            try:
                if not self._warm_up_step(starts, counts, kept, unbacked):
                    self.graph_failure = "the pool's tensors were not made"
                    return
            except Exception as exc:
                if not (unbacked and _compile_failure(exc)):
                    self._graph_failed(exc)
                    return
                log.warning(
                    "a step with a prompt compiles with its sizes known (%s): a prompt alone gets graphs of its "
                    "own, and a chunk that keeps no logit compiles at its first pass",
                    _compile_failure_summary(exc),
                )
                steps[:0] = [(*step, False) for step in ((starts, counts, kept), *SPECIALIZED_PROMPT_STEPS)]

    def _wide_decode_steps(self) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Decode steps of more rows than an inlined experts module takes pairs (its graph makes the opaque call),
        up to the pool's rows: one for each such bound, so that those graphs compile at the start too."""
        assert self.pool is not None
        bounds = {getattr(e, INLINE_PAIRS, 0) // self.top_k + 1 for e in self.experts}
        rows = sorted(b for b in bounds if 3 < b <= self.pool.rows)
        return [((4,) * b, (1,) * b, tuple(range(b))) for b in rows]

    def _warm_up_step(self, starts: Sequence[int], counts: Sequence[int], kept: Sequence[int], unbacked: bool) -> bool:
        """Compile the graph of one warm-up step (`WARM_UP_GRAPH`); False while the pool's tensors are not made."""
        assert self.pool is not None and self.graph_inner is not None
        layout = PackedStep.build(self.pool, self.pool.borrow(len(counts)), starts, counts)
        try:
            graph = GraphStep.of(layout, self.layers, self.graph_inner)
            if graph is None:
                return False
            device = self._device()
            ids = torch.zeros((1, sum(counts)), dtype=torch.long, device=device)
            keep = torch.tensor(kept, dtype=torch.long, device=device)
            if unbacked:
                _unbacked(graph, keep)
            self._compiled_call(ids, layout.position_ids(), graph, keep, IDLE)
            return True
        finally:
            self.pool.return_borrowed()

    def _device(self) -> torch.device:
        model: Any = self.stack.model
        device: torch.device = model.lm_head.weight.device
        return device

    def _warm_up_experts(self) -> None:
        """Compile the experts kernel for one token and several, on every experts module (one graph serves all
        layers; the others only check its guards), with routing weights in the model's dtype and in float32 (the
        families differ). Slot 0 is read, nothing is written."""
        if self.failure is not None:
            return
        for experts in self.experts:
            weights = Weights(experts)
            down = weights.down  # [slots, H, I], or [slots, I, H] transposed
            hidden = down.shape[2] if weights.transposed else down.shape[1]
            for tokens in (1, 2, 3):
                for dtype in dict.fromkeys((down.dtype, torch.float32)):
                    if self.experts_failure is not None:
                        return
                    self._experts_call(
                        experts,
                        down.new_zeros((tokens, hidden)),
                        torch.zeros((tokens, self.top_k), dtype=torch.long, device=down.device),
                        torch.zeros((tokens, self.top_k), dtype=dtype, device=down.device),
                    )

    def __call__(self, ids: Tensor, position_ids: Tensor, attention_mask: Any, keep: Tensor) -> Tensor:
        """The stack's call, inside `packed_attention_for`: attention runs inside the graph over the step it
        installed, or behind the opaque operator."""
        if self.failure is None and self.graph_failure is None and (step := current_step()) is not None:
            assert self.graph_inner is not None
            graph = GraphStep.of(step, self.layers, self.graph_inner, self._per_token(step, keep))
            if graph is not None:
                try:
                    return self._compiled_call(ids, position_ids, graph, keep, self.opaque)
                except Exception as exc:
                    self._graph_failed(exc)
        if self.failure is None:
            try:
                return self._compiled_call(ids, position_ids, attention_mask, keep, self.opaque)
            except Exception as exc:
                self._failed(exc)
        return self.stack(ids, position_ids, attention_mask, keep)

    def _per_token(self, step: PackedStep, keep: Tensor) -> bool:
        """Whether a step that brings a prompt runs token by token (`GraphStep.of`), in the graph of several decode
        rows: when it keeps several logits (that graph is traced for several, as a decode step keeps one a row; a
        lone prompt keeps one) and its keys are few (`PER_TOKEN_COLUMNS`). Where the experts are computed inside
        the graph: when its tokens are as many rows as the decode graph that computes them there takes
        (`inline_rows`); its experts then pay even where the grouped layout has no padding. Elsewhere: where it
        saves padding (`per_token_pays`)."""
        tokens = step.positions.shape[0]
        if step.out_index is None or keep.shape[0] < 2 or tokens * step.width > PER_TOKEN_COLUMNS:
            return False
        if self.inline_rows:
            return tokens <= self.inline_rows
        return per_token_pays(step)

    def _compiled_call(
        self,
        ids: Tensor,
        position_ids: Tensor,
        attention_mask: Any,
        keep: Tensor,
        opaque: Opaque,
    ) -> Tensor:
        context = None if opaque.idle else self.routers[0].context
        assert context is None or isinstance(context, RoutingContext), "the routers' context is the engine's"
        if context is None:
            routing = self._idle_routing(ids.shape[1], compute=not opaque.idle)
        else:
            routing = context.graph_routing(self.routers)
        vars(self.graph).update(vars(routing))
        self.graph.decode = isinstance(attention_mask, GraphStep) and attention_mask.query_index is None
        token = CURRENT.set(opaque)
        try:
            out: Tensor = self._compiled(ids, position_ids, attention_mask, keep)
        finally:
            CURRENT.reset(token)
        if context is not None:
            context.take_graph(self.routers, self.graph)
        return out

    def _idle_routing(self, tokens: int, compute: bool = True) -> GraphRouting:
        """Routing for a pass outside a routing context (the warm-up's, or a call outside the engine's loop): by each
        router's own pattern, as its eager path routes then. Without `compute` (the warm-up), every expert routes to
        the skip id, so that experts computed inside the graph add exact zeros, whatever the slots hold."""
        device = self.routers[0].slot_of.device
        excluded = torch.stack(
            [
                torch.zeros(r.num_experts, dtype=torch.bool, device=device) if r.excluded is None else r.excluded
                for r in self.routers
            ]
        )
        first_row = torch.zeros(tokens, dtype=torch.long, device=device)  # every token on the routers' own row
        no_skip = torch.zeros(tokens, device=device)
        excluded = excluded.unsqueeze(1).expand(-1, 2, -1).contiguous()
        slots = None
        if not compute:
            skip = torch.tensor([r.skip_id for r in self.routers], device=device)
            slots = skip.view(-1, 1, 1).expand(excluded.shape).contiguous()
        return GraphRouting.of(self.routers, excluded, first_row, no_skip, slots)

    def _experts_call(self, module: nn.Module, hidden: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """The compiled experts kernel; the eager paths from the first compile failure on (logged once)."""
        if self.experts_failure is None:
            try:
                out: Tensor = self._compiled_experts(module, hidden, index, weights)
                return out
            except Exception as exc:
                self.experts_failure = _compile_failure_summary(exc)
                log.warning("the experts run eager: compiling their kernel failed (%s)", self.experts_failure)
        return library_experts_forward(module, hidden, index, weights)

    def _failed(self, exc: Exception) -> None:
        """Run eager from now on if `exc` comes from compiling; raise it otherwise."""
        self.failure = _compile_failure_summary(exc)
        log.warning("the decode step runs eager: compiling it failed (%s)", self.failure)

    def _graph_failed(self, exc: Exception) -> None:
        """Run attention behind the opaque operator from now on if `exc` comes from compiling; raise it otherwise.
        A compile failure leaves the pool as it was: the graph fails before it runs."""
        self.graph_failure = _compile_failure_summary(exc)
        log.warning("attention runs outside the compiled graph: compiling it inside failed (%s)", self.graph_failure)


def _tracing() -> contextlib.AbstractContextManager[Any]:
    """How the warm-up traces its graphs:
    - sizes that happen to be equal in a warm-up step (a prompt's tokens and its width, rows and pool rows) get
      symbols of their own (no duck sizing), else a step where they differ would compile a graph while serving;
    - floats the graph reads (attention's scaling) are constants from the start: traced as inputs, they make
      dynamo restart each graph's analysis, which doubles the start's time."""
    stack = contextlib.ExitStack()
    shapes: Any = torch.fx.experimental._config  # a config module: its `patch` is not typed
    stack.enter_context(shapes.patch(use_duck_shape=False))
    stack.enter_context(torch._dynamo.config.patch(specialize_float=True))
    return stack


def _unbacked(graph: GraphStep, keep: Tensor) -> None:
    """Trace a step that brings a prompt with sizes torch does not specialize at 0 or 1 (`WARM_UP_GRAPH`): its
    rows B (the layout's row list and query positions, one size), its kept logits K (0 for a chunk that keeps none)
    and its query gather (B * Q). B and the gather are at least 1, which transformers' reshapes need to know."""
    mark: Any = torch._dynamo.decorators.mark_unbacked
    mark(graph.blocks, 0, shape_id="rows", min=1)
    mark(graph.query_pos, 0, shape_id="rows", min=1)
    mark(keep, 0)
    assert graph.query_index is not None  # a step with a prompt gathers its queries
    mark(graph.query_index, 0, min=1)


def _recompile_limit() -> dict[str, int]:
    """`torch.compile`'s argument that keeps up to RECOMPILE_LIMIT graphs, where it takes one (torch 2.13 does)."""
    takes = "recompile_limit" in inspect.signature(torch.compile).parameters
    return {"recompile_limit": RECOMPILE_LIMIT} if takes else {}


def _own_code(method: Any) -> Any:
    """`method` with a code object of its own: torch keeps compiled graphs, and its limit on them (8), per code
    object, so the stacks of several engines in one process (tests, benchmarks) would otherwise share them."""
    return types.MethodType(_own_function(method.__func__), method.__self__)


def _own_function(function: Any) -> Any:
    """`function` with a code object of its own (`_own_code`)."""
    code = function.__code__.replace()  # equal, not the same object
    own = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__, function.__closure__)
    return own


def _compile_failure_summary(exc: Exception) -> str:
    """`exc` in a line, if it comes from compiling; raised again otherwise."""
    if not _compile_failure(exc):
        raise exc
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _compile_failure(exc: BaseException) -> bool:
    """Whether `exc` comes from compiling (the graph could not be captured or built), not from running it."""
    if isinstance(exc, UnsupportedAttention | torch._dynamo.exc.TorchDynamoException):
        return True
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))
