"""The batch's KV rows: one transformers DynamicCache in a left-padded layout, its 2D mask and next positions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache


@dataclass
class KVBatch:
    """KV cache rows of the running requests, right-aligned: row `b` holds its tokens in the last columns.

    Every row shares the cache width `W`; `mask[b]` is 1 on the row's real columns. Positions are per row
    (`next_pos[b]` = real tokens so far), so rows that joined at different times keep their own positions.
    Joining concatenates along the batch after left-padding the narrower side; leaving selects rows and
    cuts columns no remaining row uses. The cache holds plain full layers (no sliding-window layers), so
    every layer's columns line up; sliding-window models still get their window through the mask.
    """

    cache: DynamicCache
    mask: Tensor  # [B, W] long
    next_pos: Tensor  # [B] long

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @staticmethod
    def prefill_inputs(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, ...]:
        """`ids`, `mask` and `position_ids` `[N, S]` for prompts left-padded to the longest."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what `generate` passes
        return ids.to(device), mask.to(device), positions.to(device)

    @classmethod
    def after_prefill(cls, cache: DynamicCache, mask: Tensor) -> KVBatch:
        return cls(cache, mask, mask.sum(-1))

    def decode_inputs(self) -> tuple[Tensor, Tensor]:
        """The mask `[B, W + 1]` and position ids `[B, 1]` of a one-token decode step."""
        ones = torch.ones((self.rows, 1), dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1), self.next_pos.unsqueeze(1)

    def advance(self, mask: Tensor) -> None:
        """Record a decode step (its extended mask) after the forward pass appended one column."""
        self.mask = mask
        self.next_pos = self.next_pos + 1

    def merge(self, other: KVBatch) -> None:
        """Append `other`'s rows after ours."""
        width = max(self.width, other.width)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            keys = [_pad_left(mine.keys, width), _pad_left(theirs.keys, width)]
            values = [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
            mine.keys, mine.values = torch.cat(keys, dim=0), torch.cat(values, dim=0)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)], dim=0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows `keep` (in that order) and drop the leading columns none of them uses."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.sum(0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[..., start:, :]
            layer.values = layer.values.index_select(0, index)[..., start:, :]
        self.mask = mask[:, start:]
        self.next_pos = self.next_pos.index_select(0, index)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers; only full-attention KV layers (keys and values `[B, h, L, d]`) join and leave."""
    from transformers.cache_utils import DynamicLayer

    layers = list(cache.layers)
    for layer in layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise TypeError(f"cannot batch a {type(layer).__name__} cache layer")
    return layers


def _pad_left(tensor: Tensor, width: int) -> Tensor:
    """Left-pad the sequence dimension (dim -2 of KV `[B, h, L, d]`, dim -1 of a mask `[B, L]`) with zeros."""
    if tensor.dim() == 2:
        missing = width - tensor.shape[1]
        return tensor if missing == 0 else F.pad(tensor, (missing, 0))
    missing = width - tensor.shape[-2]
    return tensor if missing == 0 else F.pad(tensor, (0, 0, missing, 0))
