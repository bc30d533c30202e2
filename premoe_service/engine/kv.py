"""The KV pool: keys and values of every running request in preallocated rows, each row with its own length."""

from __future__ import annotations

import torch
from torch import Tensor


class KVPool:
    """Per attention layer, keys `[R, kv_heads, C, d_k]` and values `[R, kv_heads, C, d_v]`.

    A request holds one row from the prefill of its first prompt token to its last token: its token at position
    `p` sits in column `p`, so positions, lengths and the attention mask follow from the row's length alone. A
    request that joins takes a free row and one that leaves gives it back: nothing is concatenated or copied.
    The capacity C doubles (one copy) when a row would outgrow it; the layers' tensors are made at their first
    write, with the shapes the model gives them (grouped-query and multi-latent attention alike).
    """

    def __init__(self, rows: int, device: torch.device, capacity: int = 256) -> None:
        self.rows, self.device, self.capacity = rows, device, capacity
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self._free = list(range(rows - 1, -1, -1))  # lowest row first: running rows stay near the front

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """A free row (the caller holds it until `give_back`)."""
        return self._free.pop()

    def give_back(self, row: int) -> None:
        self._free.append(row)
        self._free.sort(reverse=True)

    def ensure(self, width: int) -> None:
        """Make room for `width` columns in every row (doubling the capacity: one copy of the pool)."""
        if width <= self.capacity:
            return
        capacity = self.capacity
        while capacity < width:
            capacity *= 2
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, : self.capacity] = old
                store[layer] = new
        self.capacity = capacity

    def write(self, layer: int, keys: Tensor, values: Tensor, rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        """Store token `t`'s keys and values `[T, kv_heads, d]` at (`rows[t]`, `columns[t]`); the layer's pool."""
        if layer not in self.keys:
            shape = (self.rows, keys.shape[1], self.capacity)
            self.keys[layer] = keys.new_zeros((*shape, keys.shape[2]))
            self.values[layer] = values.new_zeros((*shape, values.shape[2]))
        pool_keys, pool_values = self.keys[layer], self.values[layer]
        pool_keys[rows, :, columns] = keys
        pool_values[rows, :, columns] = values
        return pool_keys, pool_values
