"""The KV pool: keys and values of every running request in blocks of a few tokens, which a request takes as its
sequence grows and gives back when it leaves (a paged pool: memory follows the tokens held, not rows x the
longest sequence)."""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from ..errors import InvalidArgument

# Tokens per block. vLLM's default too: small enough that a row wastes at most 15 columns, large enough that a
# row's table stays a few entries long (the gather reads whole blocks).
BLOCK_SIZE = 16
# Block 0 is never handed out nor written: it pads the table of a row that holds fewer blocks than the widest row
# of a step. Its columns lie past the row's length, and attention masks them like any such column.
NULL_BLOCK = 0
# The blocks a pool starts with, per row (256 tokens a row: what the unpaged pool made at first). The pool doubles
# when a row needs a block and none is free (one copy of the pool), and returns to its start when no row holds a
# block (`KVPool.shrink`; the engine loop calls it once it has been idle a while).
START_TOKENS_PER_ROW = 256


def reserved_tokens(prompt_tokens: int, new_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """The pool tokens a request may come to hold: its prompt and every new token it may make, in whole blocks (what
    `--max-kv-tokens` counts against a request when it joins)."""
    return -(-(prompt_tokens + new_tokens) // block_size) * block_size


def check_kv_tokens(prompt_tokens: int, new_tokens: int, limit: int | None) -> None:
    """Refuse a request that could never join under the pool's cap `limit` (None: no cap)."""
    if limit is not None and (reserved := reserved_tokens(prompt_tokens, new_tokens)) > limit:
        raise InvalidArgument(
            f"{prompt_tokens} prompt tokens + {new_tokens} new tokens ({reserved} in blocks of {BLOCK_SIZE}) exceed "
            f"the KV pool's cap of {limit} tokens (--max-kv-tokens)",
            field="max_new_tokens",
        )


class KVPool:
    """Per attention layer, keys `[N, P, kv_heads, d_k]` and values `[N, P, kv_heads, d_v]`: N blocks of P tokens.

    A request holds a row (its place in the batch) from its first prompt token to its last token, and the row
    holds blocks: its token at position `p` sits in block `table[row][p // P]` at offset `p % P`, so positions,
    lengths and the attention mask still follow from the row's length alone. A row takes blocks as it grows
    (`reserve`) and gives them all back when it leaves (`give_back`): nothing is concatenated or copied, and a long
    request holds its own blocks only, not a wider row for everyone. Writes are one `index_copy_` over the
    flattened `[N * P]` slots; reads gather each row's blocks. The layers' tensors are made at their first write,
    with the shapes the model gives them (grouped-query and multi-latent attention alike).
    """

    def __init__(
        self,
        rows: int,
        device: torch.device,
        *,
        block_size: int = BLOCK_SIZE,
        blocks: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.rows, self.device, self.block_size = rows, device, block_size
        # The most blocks the pool doubles to (the null block included) when the tokens it may hold are capped: the
        # loop admits requests only while their reserved tokens fit (`reserved_tokens`), so the rows never need more.
        self.max_blocks = None if max_tokens is None else max(2, -(-max_tokens // block_size) + 1)
        if blocks is None:
            blocks = rows * -(-START_TOKENS_PER_ROW // block_size) + 1
            if self.max_blocks is not None:
                blocks = min(blocks, self.max_blocks)
        self.blocks = max(2, blocks)
        self.start_blocks = self.blocks
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.table: list[list[int]] = [[] for _ in range(rows)]  # each row's blocks, in column order
        self._free = list(range(rows - 1, -1, -1))  # lowest row first: running rows stay near the front
        self._free_blocks = list(range(1, self.blocks))  # a heap: lowest block first
        self.grown = 0  # times the pool doubled
        self.shrunk = 0  # times it returned to its starting blocks

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def held_blocks(self) -> int:
        """Blocks the rows hold now."""
        return self.blocks - 1 - len(self._free_blocks)

    def nbytes(self) -> int:
        """Bytes of the layers' tensors made so far (every block, held or free)."""
        return sum(t.nbytes for store in (self.keys, self.values) for t in store.values())

    def take(self) -> int:
        """A free row, holding no block yet (the caller holds it until `give_back`)."""
        return self._free.pop()

    def give_back(self, row: int) -> None:
        """The row and all its blocks are free again."""
        self.clear(row)
        self._free.append(row)
        self._free.sort(reverse=True)

    def clear(self, row: int) -> None:
        """`row`'s blocks are free again; the row keeps its place."""
        for block in self.table[row]:
            heapq.heappush(self._free_blocks, block)
        self.table[row] = []

    def borrow(self, count: int) -> list[int]:
        """`count` rows beyond the batch's (ids from `rows` on), holding no block: the compiled stack's warm-up
        steps need rows that no request holds, however few rows the batch has. `return_borrowed` frees them."""
        first = len(self.table)
        self.table.extend([] for _ in range(count))
        return list(range(first, first + count))

    def return_borrowed(self) -> None:
        """The borrowed rows' blocks are free again, and the rows are gone."""
        for row in range(self.rows, len(self.table)):
            self.clear(row)
        del self.table[self.rows :]

    def reserve(self, row: int, width: int) -> None:
        """Give `row` the blocks for columns 0..width-1 that it lacks (doubling the pool when too few are free)."""
        held = self.table[row]
        need = -(-width // self.block_size) - len(held)
        if need <= 0:
            return
        if need > len(self._free_blocks):
            self._grow(need - len(self._free_blocks))
        held.extend(heapq.heappop(self._free_blocks) for _ in range(need))

    def _grow(self, at_least: int) -> None:
        """At least `at_least` more blocks: the pool doubles (one copy of each layer's tensors), up to `max_blocks`
        unless more are needed now."""
        doubled = 2 * self.blocks if self.max_blocks is None else min(2 * self.blocks, self.max_blocks)
        blocks = max(doubled, self.blocks + at_least)
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = _static_block(old.new_zeros((blocks, *old.shape[1:])))
                new[: self.blocks] = old
                store[layer] = new
        for block in range(self.blocks, blocks):
            heapq.heappush(self._free_blocks, block)
        self.blocks = blocks
        self.grown += 1

    def shrink(self) -> int:
        """Back to the blocks the pool started with, when it grew past them and no row holds a block (nor a borrowed
        row exists): each layer's tensors are made anew at that size, nothing is copied. Returns the bytes given
        back (0 when it did not shrink). The compiled graphs take the blocks' count as a size, and the starting
        count is the one their warm-up ran with."""
        if self.blocks <= self.start_blocks or self.held_blocks or len(self.table) != self.rows:
            return 0
        before = self.nbytes()
        for store in (self.keys, self.values):
            for layer, old in store.items():
                store[layer] = _static_block(old.new_zeros((self.start_blocks, *old.shape[1:])))
        self.blocks = self.start_blocks
        self._free_blocks = list(range(1, self.blocks))  # ascending: a heap
        self.shrunk += 1
        return before - self.nbytes()

    def slot(self, row: int, column: int) -> int:
        """The flat slot of `row`'s column in the `[N * P]` view (the row must hold that column's block)."""
        return self.slots(row, column, 1)[0]

    def slots(self, row: int, start: int, count: int) -> list[int]:
        """`slot` of `row`'s columns start..start+count-1."""
        table, size = self.table[row], self.block_size
        return [table[c // size] * size + c % size for c in range(start, start + count)]

    def table_width(self, width: int) -> int:
        """Entries nb of a step's block tables for `width` columns: more blocks than the columns fill (nb * P > W,
        never equal: the compiled graphs take the gathered columns past W as a slice, and a slice that takes all
        would be another graph), and at least 2 (torch specializes a size of 1)."""
        return max(width // self.block_size + 1, 2)

    def row_tables(self, rows: list[int], width: int) -> list[int]:
        """`rows`' blocks for columns 0..width-1, each padded with the null block to `table_width(width)` entries,
        flattened `[B * nb]`."""
        count = self.table_width(width)
        flat: list[int] = []
        for row in rows:
            held = self.table[row][:count]
            flat.extend(held)
            flat.extend([NULL_BLOCK] * (count - len(held)))
        return flat

    def allocate(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Make `layer`'s tensors, unless made, for keys and values shaped as these `[T, kv_heads, d]`."""
        if layer not in self.keys:
            self.keys[layer] = _static_block(keys.new_zeros((self.blocks, self.block_size, *keys.shape[1:])))
            self.values[layer] = _static_block(values.new_zeros((self.blocks, self.block_size, *values.shape[1:])))

    def layers(self, count: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None:
        """Layers 0..count-1's keys and values, or None while some layer's tensors are not made."""
        try:
            return tuple(self.keys[i] for i in range(count)), tuple(self.values[i] for i in range(count))
        except KeyError:
            return None

    def write(self, layer: int, keys: Tensor, values: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Store token `t`'s keys and values `[T, kv_heads, d]` at flat slot `slots[t]`; the layer's pool."""
        self.allocate(layer, keys, values)
        pool_keys, pool_values = self.keys[layer], self.values[layer]
        pool_keys.view(-1, *keys.shape[1:]).index_copy_(0, slots, keys)
        pool_values.view(-1, *values.shape[1:]).index_copy_(0, slots, values)
        return pool_keys, pool_values


def _static_block(pool: Tensor) -> Tensor:
    """`pool` with its block's sizes (tokens, heads, width) marked static for the compiled graphs: they never
    change, and a constant block size makes the gather's `column // P` and `column % P` a shift and a mask in the
    generated kernels instead of a division per element. The blocks' count stays a size the graphs take."""
    for dim in range(1, pool.dim()):
        torch._dynamo.mark_static(pool, dim)
    return pool


def gather_rows(pool: Tensor, blocks: Tensor, width: int | Tensor) -> Tensor:
    """The rows' columns 0..width-1 of one layer's keys or values, `[B, W, kv_heads, d]`, from their block tables
    `blocks` `[B, nb]` (nb * P > W)."""
    # Advanced indexing, not `index_select` over the flattened table and a view: in the compiled graphs of
    # DeepSeek V2 and V3 that view of the rows' unbacked count gave wrong logits (off by 0.4 against eager).
    gathered = pool[blocks]  # [B, nb, P, kv_heads, d]
    return gathered.flatten(1, 2)[:, :width]
