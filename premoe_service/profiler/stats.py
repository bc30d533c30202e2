"""Routing statistics over demo tokens, gathered in one forward pass, and the criteria's running sums over them.

Per MoE layer and demo token t the pass records the full router scores p_t (the family's own scoring),
the chosen experts K_t with weights g_t,e, the norms ||E_e(x_t)|| of the chosen experts' outputs, and the
residual stream x_t entering the MoE sub-block (for EASY-EP's token contribution
s_t = max(0, 1 - cos(x_t, x_t + sum_{e in K_t} g_t,e E_e(x_t)))). Padding never counts. What each criterion
adds up and how its score reads are declared in `criteria`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..families import Routing, full_scores
from ..runtime.model import PatternedModel
from .criteria import REGISTRY, LayerTokens


@dataclass
class StatsCollector:
    """Hooks on a `PatternedModel` that accumulate the criteria's statistics during a forward pass.

    Args:
        engine: The model; every MoE layer must route over all experts while collecting.
        token_mask: Bool [B * S]: which flattened positions are demo tokens (not padding).
        tcess_threshold: PreMoe's r: probabilities below it do not count towards TCESS.
    """

    engine: PatternedModel
    token_mask: Tensor
    tcess_threshold: float = 0.0
    totals: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # layer -> criterion -> running sum [E]
    _routing: dict[int, Routing] = field(default_factory=dict)
    _residual: dict[int, Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.token_mask.sum())

    @contextmanager
    def attach(self) -> Iterator[None]:
        """Install the hooks for the duration of the block."""
        handles = []
        layers = self.engine.decoder_layers
        for layer in self.engine.spec.moe_layers:
            norm = layers[layer].get_submodule("post_attention_layernorm")
            handles.append(norm.register_forward_pre_hook(self._residual_hook(layer)))
            experts = self.engine.experts_module(layer)
            # An instance attribute shadows the class's forward for this pass only.
            experts.forward = self._experts_forward(layer, experts)
        self.engine.set_observer(self._on_route)
        try:
            yield
        finally:
            self.engine.set_observer(None)
            for handle in handles:
                handle.remove()
            for layer in self.engine.spec.moe_layers:
                del self.engine.experts_module(layer).forward

    def _residual_hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            residual = args[0]
            self._residual[layer] = residual.reshape(-1, residual.shape[-1])  # [T, H]

        return hook

    def _on_route(self, layer: int, hidden: Tensor, routing: Routing) -> None:
        self._routing[layer] = routing

    def _experts_forward(self, layer: int, experts: nn.Module) -> Any:
        def forward(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
            outputs = expert_outputs(experts, hidden, top_k_index)  # [T, k, H]
            weighted = (outputs * top_k_weights.unsqueeze(-1).to(outputs.dtype)).sum(dim=1)  # [T, H]
            self._accumulate(layer, outputs, weighted)
            return weighted.to(hidden.dtype)

        return forward

    @torch.no_grad()
    def _accumulate(self, layer: int, outputs: Tensor, routed: Tensor) -> None:
        routing = self._routing.pop(layer)
        residual = self._residual.pop(layer).float()
        mask = self.token_mask.to(outputs.device)
        after = residual[mask] + routed[mask].float()
        tokens = LayerTokens(
            probs=full_scores(self.engine.spec.routing, routing.logits)[mask],  # [N, E]
            chosen=routing.experts[mask],  # [N, k]
            weights=routing.weights[mask].float(),  # [N, k]
            norms=outputs[mask].float().norm(dim=-1),  # [N, k]
            contribution=(1 - F.cosine_similarity(residual[mask], after, dim=-1)).clamp_min(0),  # [N]
            tcess_threshold=self.tcess_threshold,
        )
        sums = {criterion.name: criterion.add(tokens) for criterion in REGISTRY}
        previous = self.totals.get(layer)
        if previous is not None:
            sums = {name: previous[name] + value for name, value in sums.items()}
        self.totals[layer] = sums

    def scores(self) -> dict[str, Tensor]:
        """Criterion -> [L, E] fp32 on the CPU, rows in MoE-layer order."""
        tokens = max(self.tokens, 1)
        return {
            criterion.name: torch.stack(
                [criterion.score(self.totals[layer], tokens) for layer in self.engine.spec.moe_layers]
            ).cpu()
            for criterion in REGISTRY
        }


def expert_outputs(experts: nn.Module, hidden: Tensor, slots: Tensor) -> Tensor:
    """E_e(x_t) for every token and chosen slot, unweighted: [T, k, H].

    Follows the experts module's own conventions (transposed weights, biases, its `_apply_gate`), so the
    outputs are the ones its forward would weight and sum.
    """
    tokens, k = slots.shape
    flat = slots.reshape(-1)  # [T * k]
    source = hidden.repeat_interleave(k, dim=0)  # [T * k, H]
    out = torch.empty_like(source)
    transposed = bool(getattr(experts, "is_transposed", False))
    bias = bool(getattr(experts, "has_bias", False))
    gate_up, down = experts.get_parameter("gate_up_proj"), experts.get_parameter("down_proj")
    gate_up_bias = experts.get_parameter("gate_up_proj_bias") if bias else None
    down_bias = experts.get_parameter("down_proj_bias") if bias else None
    apply_gate: Any = experts._apply_gate
    for slot in torch.unique(flat).tolist():
        rows = (flat == slot).nonzero().squeeze(-1)
        x = source[rows]
        if transposed:
            h = x @ gate_up[slot]
            h = h + gate_up_bias[slot] if gate_up_bias is not None else h
            y = apply_gate(h) @ down[slot]
            y = y + down_bias[slot] if down_bias is not None else y
        else:
            h = apply_gate(F.linear(x, gate_up[slot], gate_up_bias[slot] if gate_up_bias is not None else None))
            y = F.linear(h, down[slot], down_bias[slot] if down_bias is not None else None)
        out[rows] = y
    return out.view(tokens, k, -1)
