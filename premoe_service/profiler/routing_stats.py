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
from .channels import ChannelBatch, ChannelSums
from .criteria import REGISTRY, LayerTokens


@dataclass
class StatsCollector:
    """Hooks on a `PatternedModel` that accumulate the criteria's statistics during a forward pass.

    Args:
        engine: The model; every MoE layer must route over all experts while collecting.
        token_mask: Bool [B * S]: which flattened positions are demo tokens (not padding).
        tcess_threshold: PreMoe's r: probabilities below it do not count towards TCESS.
        channels: Also gather the channel scores of every expert (`channels`).
    """

    patterned: PatternedModel
    token_mask: Tensor
    tcess_threshold: float = 0.0
    channels: bool = False
    totals: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # layer -> criterion -> running sum [E]
    channel_sums: dict[int, ChannelSums] = field(default_factory=dict)
    _routing: dict[int, Routing] = field(default_factory=dict)
    _residual: dict[int, Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.token_mask.sum())

    @contextmanager
    def attach(self) -> Iterator[None]:
        """Install the hooks for the duration of the block."""
        handles = []
        layers = self.patterned.decoder_layers
        for layer in self.patterned.spec.moe_layers:
            norm = layers[layer].get_submodule("post_attention_layernorm")
            handles.append(norm.register_forward_pre_hook(self._residual_hook(layer)))
            experts = self.patterned.experts_module(layer)
            # An instance attribute shadows the class's forward for this pass only.
            experts.forward = self._experts_forward(layer, experts)
        self.patterned.set_observer(self._on_route)
        try:
            yield
        finally:
            self.patterned.set_observer(None)
            for handle in handles:
                handle.remove()
            for layer in self.patterned.spec.moe_layers:
                del self.patterned.experts_module(layer).forward

    def _residual_hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            residual = args[0]
            self._residual[layer] = residual.reshape(-1, residual.shape[-1])  # [T, H]

        return hook

    def _on_route(self, layer: int, hidden: Tensor, routing: Routing) -> None:
        self._routing[layer] = routing

    def _experts_forward(self, layer: int, experts: nn.Module) -> Any:
        def forward(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
            batches: list[ChannelBatch] | None = [] if self.channels else None
            outputs = expert_outputs(experts, hidden, top_k_index, batches)  # [T, k, H]
            weighted = (outputs * top_k_weights.unsqueeze(-1).to(outputs.dtype)).sum(dim=1)  # [T, H]
            self._accumulate(layer, outputs, weighted, batches, top_k_weights)
            return weighted.to(hidden.dtype)

        return forward

    @torch.no_grad()
    def _accumulate(
        self, layer: int, outputs: Tensor, routed: Tensor, batches: list[ChannelBatch] | None, weights: Tensor
    ) -> None:
        routing = self._routing.pop(layer)
        residual = self._residual.pop(layer).float()
        mask = self.token_mask.to(outputs.device)
        after = residual[mask] + routed[mask].float()
        if batches is not None:
            self._add_channels(layer, batches, residual + routed.float(), mask, weights)
        tokens = LayerTokens(
            probs=full_scores(self.patterned.spec.routing, routing.logits)[mask],  # [N, E]
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

    def _add_channels(
        self, layer: int, batches: list[ChannelBatch], stream: Tensor, mask: Tensor, weights: Tensor
    ) -> None:
        owner = self.patterned.slots[layer].expert_in_slot  # slot -> expert (the same ids when layer-streamed)
        k = weights.shape[-1]
        flat = weights.reshape(-1).float()  # [T * k]
        named = []
        for batch in batches:  # rows are (token, choice) pairs of the flattened [T * k] ids
            expert = owner[batch.expert]
            if expert is None:
                continue
            rows = batch.tokens
            named.append(ChannelBatch(int(expert), rows // k, batch.hidden, batch.down, flat[rows]))
        sums = self.channel_sums.setdefault(layer, ChannelSums(self.patterned.spec.num_experts))
        sums.add(named, stream, mask)

    def channel_scores(self) -> dict[str, Tensor]:
        """Channel criterion -> [L, E, I] fp32 on the CPU, rows in MoE-layer order (empty without `channels`)."""
        if not self.channels:
            return {}
        width = intermediate_size(self.patterned.experts_module(self.patterned.spec.moe_layers[0]))
        per_layer = [
            self.channel_sums.get(layer, ChannelSums(self.patterned.spec.num_experts)).scores(width)
            for layer in self.patterned.spec.moe_layers
        ]
        return {name: torch.stack([scores[name] for scores in per_layer]) for name in per_layer[0]}

    def scores(self) -> dict[str, Tensor]:
        """Criterion -> [L, E] fp32 on the CPU, rows in MoE-layer order."""
        tokens = max(self.tokens, 1)
        return {
            criterion.name: torch.stack(
                [criterion.score(self.totals[layer], tokens) for layer in self.patterned.spec.moe_layers]
            ).cpu()
            for criterion in REGISTRY
        }


def intermediate_size(experts: nn.Module) -> int:
    """The experts' intermediate size I (channels per expert), from the down projection's shape."""
    down = experts.get_parameter("down_proj")
    return int(down.shape[1] if getattr(experts, "is_transposed", False) else down.shape[2])


def expert_outputs(
    experts: nn.Module, hidden: Tensor, slots: Tensor, channels: list[ChannelBatch] | None = None
) -> Tensor:
    """E_e(x_t) for every token and chosen slot, unweighted: [T, k, H].

    Follows the experts module's own conventions (transposed weights, biases, its `_apply_gate`), so the
    outputs are the ones its forward would weight and sum. With `channels`, each slot's intermediate
    activations are appended to it (`ChannelBatch` with the slot id as `expert`, rows of the flattened
    [T * k] choices as `tokens`, no weights yet).
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
            h = apply_gate(h + gate_up_bias[slot] if gate_up_bias is not None else h)
            y = h @ down[slot]
            y = y + down_bias[slot] if down_bias is not None else y
        else:
            h = apply_gate(F.linear(x, gate_up[slot], gate_up_bias[slot] if gate_up_bias is not None else None))
            y = F.linear(h, down[slot], down_bias[slot] if down_bias is not None else None)
        out[rows] = y
        if channels is not None:
            columns = down[slot].t() if transposed else down[slot]  # [H, I]: column c is channel c's direction
            channels.append(ChannelBatch(slot, rows, h.detach(), columns.detach(), h.new_empty(0)))
    return out.view(tokens, k, -1)
