"""The running batch: the requests holding KV pool rows, and each step's packed forward pass over them (decode
tokens and prompt chunks of joining requests in one pass), under a routing context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..runtime import PatternedModel
from ..runtime.context import PatternTables, RoutingContext, routing
from ..runtime.decoder_stack import DecoderStack, plain_stack
from .attention import PackedStep, model_attention, packed_attention_for
from .compiled_stack import CompiledStack, compiles
from .kv import KVPool, reserved_tokens
from .request import Request


@dataclass
class StepPlan:
    """One forward pass: which rows bring which tokens, and whose logits come out.

    Attributes:
        rows: The requests in the pass, in packed order.
        counts: Tokens each brings (1 for a decoding row, a prompt chunk for a joining one).
        starts: Tokens of each already in the pool (its first new token's position).
        kept: Per row, the range of the kept logits that are its own: its last token's when it samples now (a
            decoding row, or a joining row whose chunk ends its prompt), every prompt position's when it scores
            its prompt, none while its prompt is still being chunked.
        ids: `[1, T]` token ids; `layout`: the packed attention's layout; `context`: the routing context.
        keep: `[K]` packed indices whose logits the model computes.
    """

    rows: list[Request]
    counts: list[int]
    starts: list[int]
    kept: list[range]
    ids: Tensor
    keep: Tensor
    layout: PackedStep
    context: RoutingContext

    @property
    def decoding(self) -> int:
        """Rows that decode (bring their last generated token)."""
        return sum(1 for r in self.rows if r.generated)

    @property
    def prompt_tokens(self) -> int:
        return sum(n for r, n in zip(self.rows, self.counts, strict=True) if not r.generated)


class RunningBatch:
    """Requests join by taking a pool row (their prompt then rides in the next passes, chunked under the token
    budget) and leave by giving it back. The pattern tables of the routing context are rebuilt only when the
    rows' distinct patterns change, and a pure decode step over unchanged rows reuses the last context whole."""

    def __init__(
        self, patterned: PatternedModel, max_rows: int, *, compiled: bool = False, max_kv_tokens: int | None = None
    ) -> None:
        self.patterned = patterned
        self.pool = KVPool(max_rows, patterned.device, max_tokens=max_kv_tokens)
        self.requests: list[Request] = []  # in join order
        self._tables: PatternTables | None = None
        self._decode: tuple[tuple[int, ...], RoutingContext] | None = None
        self._last: tuple[tuple[int, ...], PackedStep, Tensor] | None = None  # last pure decode step's layout
        self.attention = model_attention(patterned.model)  # the model's own, run on the gathered rows
        stack: DecoderStack | CompiledStack | None = plain_stack(patterned.model)  # None: the model's own forward
        if isinstance(stack, DecoderStack) and compiled and compiles(patterned.model):
            stack = CompiledStack(stack, self.pool, self.attention)
        self.stack = stack

    @property
    def compiled(self) -> bool:
        """Whether the decoder stack runs through `CompiledStack` (eager only if compiling failed)."""
        return isinstance(self.stack, CompiledStack)

    def warm_up(self) -> float | None:
        """Compile the stack's shape classes now (`CompiledStack.warm_up`); the seconds, None when it runs eager."""
        if not isinstance(self.stack, CompiledStack):
            return None
        return self.stack.warm_up(mask_marker(self.patterned.device))

    def stack_state(self, seconds: float | None = None) -> str:
        """How the decoder stack runs: compiled (in `seconds`, when given), eager, or eager since compiling failed."""
        if not isinstance(self.stack, CompiledStack):
            return "eager"
        if self.stack.failure:
            return f"eager, compiling failed: {self.stack.failure}"
        state = "compiled" if seconds is None else f"compiled in {seconds:.1f} s"
        if self.stack.graph_failure:
            state += f" (attention outside the graph: {self.stack.graph_failure})"
        if self.stack.experts_failure:
            state += f" (the experts eager, compiling their kernel failed: {self.stack.experts_failure})"
        return state

    @property
    def free_rows(self) -> int:
        return self.pool.free_rows

    def add(self, requests: Sequence[Request]) -> None:
        """Give each request a pool row; its prompt is fed from the next pass on."""
        for request in requests:
            request.row, request.cached = self.pool.take(), 0
            self.requests.append(request)

    def remove(self, requests: Sequence[Request]) -> None:
        """Take these requests out and give their rows back."""
        gone = {id(r) for r in requests}
        for request in requests:
            if request.row is not None:
                self.pool.give_back(request.row)
                request.row = None
        self.requests = [r for r in self.requests if id(r) not in gone]

    def reserved_kv_tokens(self) -> int:
        """The pool tokens the running requests may come to hold (`reserved_tokens` of each)."""
        return sum(reserved_tokens(len(r.prompt_ids), r.params.max_new_tokens) for r in self.requests)

    def pending_prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) - r.cached for r in self.requests if not r.generated)

    def plan(self, budget: int) -> StepPlan | None:
        """The next pass: every decoding row's token, then prompt tokens of joining rows in join order up to
        `budget` (a prompt that must go whole, because its positions are scored or its coverage checked, goes
        whole, alone over budget when it is the first); None when no row has a token to bring."""
        rows: list[Request] = []
        counts: list[int] = []
        left = budget
        for request in self.requests:
            if request.generated:
                count = 1
            else:
                remaining = len(request.prompt_ids) - request.cached
                if request.whole_prompt():
                    count = remaining if remaining <= left or left == budget else 0
                else:
                    count = min(remaining, left)
                left -= count
            if count:
                rows.append(request)
                counts.append(count)
        if not rows:
            return None
        key = tuple(id(r) for r in rows)
        decode = all(r.generated for r in rows)
        if decode and self._last is not None and self._last[0] == key:  # the same rows again: one column on
            layout, last_keep = self._last[1].advanced(), self._last[2]
            self._last = (key, layout, last_keep)
            tokens = torch.tensor([[r.generated[-1] for r in rows]], dtype=torch.long, device=self.patterned.device)
            single = [range(b, b + 1) for b in range(len(rows))]
            return StepPlan(
                rows, counts, [r.cached for r in rows], single, tokens, last_keep, layout, self._context(rows, counts)
            )
        starts = [r.cached for r in rows]
        ids: list[int] = []
        kept: list[range] = []
        keep: list[int] = []
        for request, start, count in zip(rows, starts, counts, strict=True):
            if request.generated:
                ids.append(request.generated[-1])
            else:
                ids.extend(request.prompt_ids[start : start + count])
            first = len(keep)
            if request.generated or start + count == len(request.prompt_ids):
                if request.params.prompt_logprobs and not request.generated:
                    keep.extend(range(len(ids) - count, len(ids)))
                else:
                    keep.append(len(ids) - 1)
            kept.append(range(first, len(keep)))
        device = self.patterned.device
        layout = PackedStep.build(self.pool, [r.row for r in rows], starts, counts)  # type: ignore[misc]
        kept_index = torch.tensor(keep, dtype=torch.long, device=device)
        self._last = (key, layout, kept_index) if decode else None
        return StepPlan(
            rows,
            counts,
            starts,
            kept,
            torch.tensor([ids], dtype=torch.long, device=device),
            kept_index,
            layout,
            self._context(rows, counts),
        )

    def _context(self, rows: list[Request], counts: list[int]) -> RoutingContext:
        key = tuple(id(r) for r in rows)
        decode = all(r.generated for r in rows)
        if decode and self._decode is not None and self._decode[0] == key:
            return self._decode[1]
        self._tables = PatternTables.of(self.patterned, [r.pattern for r in rows], self._tables)
        context = RoutingContext.packed(
            self._tables,
            counts,
            keep_scores=any(not r.generated and r.coverage_floor > 0 and not r.widened for r in rows),
            skip_below=[r.params.skip_below if r.generated else 0.0 for r in rows],
        )
        self._decode = (key, context) if decode else None
        return context


def mask_marker(device: torch.device | str) -> Tensor:
    """What the layers get as their attention mask: a 4D mask makes transformers skip building one (packed
    attention builds its own)."""
    return torch.zeros((1, 1, 1, 1), device=device)


def forward(batch: RunningBatch, plan: StepPlan) -> Tensor:
    """The plan's forward pass, every token routed by its row's pattern; the kept logits `[K, V]`."""
    patterned = batch.patterned
    marker = mask_marker(patterned.device)
    with routing(patterned, plan.context), packed_attention_for(patterned.model, plan.layout, batch.attention):
        if batch.stack is not None:  # the same modules, without transformers' wrappers (`runtime.decoder_stack`)
            return batch.stack(plan.ids, plan.layout.position_ids(), marker, plan.keep)[0]
        out = patterned.model(
            input_ids=plan.ids,
            attention_mask=marker,
            position_ids=plan.layout.position_ids(),
            use_cache=False,
            logits_to_keep=plan.keep,
        )
    logits: Tensor = out.logits[0]
    return logits
