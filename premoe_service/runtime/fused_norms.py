"""RMSNorm layers run as torch's one-kernel `rms_norm` wherever that gives the same bits as the layer's own forward.

transformers' RMSNorm layers compute in seven or eight tensor operations (cast, square, mean, add, rsqrt, two
products, cast back); at this project's model sizes each costs more in dispatch than in arithmetic, and a decode
step runs one to four of them per layer. `torch.nn.functional.rms_norm` computes the same in one kernel. Whether it
gives the same bits depends on the layer's formula and the dtype (in float32 it matches the Llama-style and the
GPT-OSS-style layers; in bfloat16 only the latter; in float64 neither, its reduction order differs). So nothing is
assumed: each kind of layer (class, dtype, width, epsilon) is run both ways on random inputs of several shapes, and
only a kind whose outputs are equal bit for bit runs fused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# Shapes the check runs, before the layer's width: one decode token, a short prompt, a packed batch, heads.
_CHECK_SHAPES = ((1, 1), (1, 7), (3, 5), (1, 9, 4), (64,))


def fuse_rms_norms(model: nn.Module) -> int:
    """Run each RMSNorm layer of `model` fused where the fused kernel gives the same bits; returns how many do."""
    verdicts: dict[tuple[Any, ...], bool] = {}
    fused = 0
    for module in model.modules():
        weight = _norm_weight(module)
        if weight is None or weight.is_meta:
            continue
        eps = float(module.variance_epsilon)  # type: ignore[arg-type]
        key = (type(module), weight.dtype, weight.device, weight.shape[0], eps)
        if key not in verdicts:
            verdicts[key] = _same_bits(module, weight, eps)
        if verdicts[key]:
            module.forward = _FusedForward(module, eps)
            fused += 1
    return fused


def _norm_weight(module: nn.Module) -> Tensor | None:
    """The scale of a transformers RMSNorm layer (its class named so, a 1-D `weight` and `variance_epsilon`)."""
    if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
        return None
    weight = module._parameters.get("weight")
    return weight if weight is not None and weight.dim() == 1 else None


def _same_bits(module: nn.Module, weight: Tensor, eps: float) -> bool:
    generator = torch.Generator(device="cpu").manual_seed(0)
    width = weight.shape[0]
    with torch.no_grad():
        for shape in _CHECK_SHAPES:
            for scale in (1e-3, 1.0, 30.0):
                x = (torch.randn(*shape, width, generator=generator) * scale).to(weight.dtype).to(weight.device)
                if not torch.equal(module(x), nn.functional.rms_norm(x, (width,), weight, eps)):
                    return False
    return True


class _FusedForward:
    """A layer's forward as one `rms_norm` call over its own weight (read at each call, as the layer would)."""

    def __init__(self, module: nn.Module, eps: float) -> None:
        self.module, self.eps = module, eps

    def __call__(self, hidden_states: Tensor) -> Tensor:
        weight: Tensor = self.module.weight  # type: ignore[assignment]
        return nn.functional.rms_norm(hidden_states, (weight.shape[0],), weight, self.eps)
