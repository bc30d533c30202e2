"""RMSNorm layers run fused only where the fused kernel gives their own bits: every family's logits are unchanged bit
for bit, float32 fuses, float64 (another reduction order) and a layer of another formula do not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from premoe_service.families.tiny import TINY_CONFIGS, tiny_model
from premoe_service.runtime.fused_norms import fuse_rms_norms


def norms(model: nn.Module) -> int:
    return sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_layers_give_the_same_logits_bit_for_bit(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype=dtype)
    model.set_experts_implementation("eager")  # the CPU grouped kernel refuses float64
    fused = copy.deepcopy(model)
    count = fuse_rms_norms(fused)
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, model(input_ids=ids).logits)
    if dtype == torch.float32:
        assert count == norms(model) > 0  # every family's layers fuse in float32
    else:
        assert count == 0  # float64: the fused kernel reduces in another order


class GemmaStyleRMSNorm(nn.Module):
    """Scales by (1 + weight), as Gemma's layers do: not what `rms_norm` computes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width) * 0.1)
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return (1 + self.weight) * (x * torch.rsqrt(variance + self.variance_epsilon))


def test_a_layer_of_another_formula_keeps_its_own_forward() -> None:
    model = nn.Sequential(GemmaStyleRMSNorm(64))
    x = torch.randn(3, 64)
    before = model(x)
    assert fuse_rms_norms(model) == 0
    assert torch.equal(model(x), before)
