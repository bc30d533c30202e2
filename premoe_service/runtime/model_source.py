"""Experts read from a model in memory (tests, `PatternedModel.from_model`): the same `ExpertSource` protocol the
store's readers follow."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..experts import ExpertTensors
from ..families import FamilyAdapter, adapter_for
from .slots import expert_params


class ModelExpertSource:
    """The experts of a fully loaded transformers model, taken before its experts are cut into slots."""

    def __init__(self, tensors: Mapping[int, Mapping[str, Tensor]]) -> None:
        self._tensors = tensors  # layer -> param name -> [E, ...]

    @classmethod
    def capture(cls, model: nn.Module, adapter: FamilyAdapter | None = None) -> ModelExpertSource:
        adapter = adapter or adapter_for(model.config)
        layers = adapter.spec(model.config).moe_layers
        return cls(
            {
                layer: {n: p.detach() for n, p in expert_params(adapter.experts(model, layer)).items()}
                for layer in layers
            }
        )

    def read(self, layer: int, expert: int) -> ExpertTensors:
        return {name: stack[expert] for name, stack in self._tensors[layer].items()}
