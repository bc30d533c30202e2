"""Routed experts between the store and the slots: one expert's tensors, the read tiers, and the sources of experts.

The store produces experts and the runtime consumes them; both import these types from here, so neither imports
the other for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

ExpertTensors = dict[str, Tensor]  # experts-module parameter name -> one expert's slice
Tier = Literal["device", "cache", "disk"]
TIERS: tuple[Tier, ...] = ("device", "cache", "disk")
ExpertBuffers = tuple[int, int, Sequence[memoryview]]  # (layer, expert, its parts' buffers in `part_names` order)


class ExpertSource(Protocol):
    """Anything that hands out one routed expert's tensors (runtime layout, any device)."""

    def read(self, layer: int, expert: int) -> ExpertTensors: ...


@runtime_checkable
class ExpertReader(ExpertSource, Protocol):
    """An expert source that also reads an expert's bytes straight into caller memory (slots, pinned staging).

    A `Store` is one. Callers test for the capability with `isinstance(source, ExpertReader)` and fall back
    to `read` for plain sources (a model's experts in memory).
    """

    @property
    def part_names(self) -> list[str]:
        """Expert parameter names in the order of an expert's bytes (and of the buffers handed in)."""
        ...

    def read_into(self, layer: int, expert: int, buffers: Sequence[memoryview]) -> Tier:
        """Fill `buffers` with one expert's parts; returns the tier the bytes came from."""
        ...

    def read_many_into(self, items: Sequence[ExpertBuffers]) -> list[Tier]:
        """`read_into` for several experts at once (one cache round trip); returns each expert's tier."""
        ...


def bytes_view(tensor: Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a writable uint8 array (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()
