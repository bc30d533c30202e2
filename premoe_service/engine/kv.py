"""The KV pool: keys and values of every running request in preallocated rows, each row with its own length."""

from __future__ import annotations

import torch
from torch import Tensor


class KVPool:
    """Per attention layer, keys `[R, C, kv_heads, d_k]` and values `[R, C, kv_heads, d_v]`.

    A request holds one row from its first prompt token to its last token: its token at position `p` sits in
    column `p`, so positions, lengths and the attention mask follow from the row's length alone. A request that
    joins takes a free row and one that leaves gives it back: nothing is concatenated or copied. Token-major rows
    make a pass's writes one `index_copy_` over the flattened `[R * C]` slots. The capacity C doubles (one copy)
    when a row would outgrow it; the layers' tensors are made at their first write, with the shapes the model
    gives them (grouped-query and multi-latent attention alike).
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
                new = old.new_zeros((old.shape[0], capacity, *old.shape[2:]))
                new[:, : self.capacity] = old
                store[layer] = new
        self.capacity = capacity

    def slots(self, rows: Tensor, columns: Tensor) -> Tensor:
        """`[T]` flat slot of each (row, column) in the `[R * C]` view (valid until the capacity changes)."""
        return rows * self.capacity + columns

    def slot(self, row: int, column: int) -> int:
        """`slots` of one (row, column)."""
        return row * self.capacity + column

    def allocate(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Make `layer`'s tensors, unless made, for keys and values shaped as these `[T, kv_heads, d]`."""
        if layer not in self.keys:
            self.keys[layer] = keys.new_zeros((self.rows, self.capacity, *keys.shape[1:]))
            self.values[layer] = values.new_zeros((self.rows, self.capacity, *values.shape[1:]))

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
