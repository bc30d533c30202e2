"""The router signal: a prompt's router distribution at the first MoE layer, on a private copy of the layers before it.

The first MoE layer's router input depends only on the embeddings, attention and any dense layers before it,
never on a routed expert, so its router scores are exact with no expert loaded and identical on every replica
whatever is resident. The signal owns its own modules (the embeddings and the decoder layers up to the first MoE
layer's router, built from the dense tensors): it never calls the serving model, whose one owner is the engine
loop, so it may run on any thread. The dense tensors may be the engine's own (read-only, shared, not copied).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DataCorruption, FailedPrecondition, InvalidArgument
from ..families import RoutingSpec, adapter_for, full_scores
from .build import materialise_buffers


class _RouterReached(Exception):
    """Carries the first MoE layer's router input and scores out of the forward pass, which stops there."""

    def __init__(self, inputs: Tensor, scores: Tensor) -> None:
        super().__init__("router reached")
        self.inputs = inputs
        self.scores = scores


@dataclass(frozen=True)
class RouterFeatures:
    """The router signal of texts, one row per text.

    Attributes:
        scores: The router distribution: the full router scores (the family's own scoring) averaged over the
            text's tokens and renormalised to sum 1. [n, E] fp32
        inputs: The router input (the hidden state the router projects) averaged over the tokens. [n, H] fp32
    """

    scores: np.ndarray
    inputs: np.ndarray


class _RouterTap(nn.Module):
    """Stands in for the first MoE layer's router: computes the full router scores and stops the pass."""

    def __init__(self, router: nn.Module, spec: RoutingSpec) -> None:
        super().__init__()
        self.weight = router.get_parameter("weight")
        bias = getattr(router, "bias", None)
        self.bias = bias if isinstance(bias, Tensor) else None
        self.spec = spec

    def forward(self, hidden: Tensor, *_: Any, **__: Any) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).float()  # [T, H]
        bias = None if self.bias is None else self.bias.float()
        logits = F.linear(flat, self.weight.float(), bias)  # [T, E]
        raise _RouterReached(flat, full_scores(self.spec, logits))


class RouterSignal:
    """Router distributions of texts at a model's first MoE layer.

    Args:
        config: The model's transformers config.
        dense: The dense tensors under the runtime state-dict names (`model.embed_tokens.weight`, ...); only
            those of the layers up to the first MoE layer are used. They are adopted, not copied.
        tokenizer: Tokenises texts the way the server tokenises prompts.
        device: Where the pass runs.
        max_tokens: Texts are cut to this many tokens (the signal of a long prompt is its start's).
    """

    def __init__(
        self,
        config: Any,
        dense: Mapping[str, Tensor],
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        max_tokens: int = 512,
    ) -> None:
        from transformers import AutoModelForCausalLM

        if max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be at least 1, got {max_tokens}", field="max_tokens")
        adapter = adapter_for(config)
        spec = adapter.spec(config)
        if not spec.moe_layers:
            raise FailedPrecondition("the model has no MoE layer to take a router signal from", field="config")
        self.layer = spec.moe_layers[0]
        self.num_experts = spec.num_experts
        self.hidden = int(config.hidden_size)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=next(iter(dense.values())).dtype)
        base = model.model
        base.layers = nn.ModuleList(list(base.layers)[: self.layer + 1])  # the pass never goes further
        wanted = {k: v.to(self.device) for k, v in dense.items() if _needed(k, self.layer)}
        model.load_state_dict(wanted, strict=False, assign=True)
        block = adapter.moe_block(model, self.layer)
        setattr(block, adapter.router_attr, _RouterTap(adapter.router(model, self.layer), spec.routing))
        materialise_buffers(model, self.device)
        skipped = ("norm.", f"layers.{self.layer}.{adapter.block_attr}.{adapter.experts_attr}.")
        left = [
            n for n, t in [*base.named_parameters(), *base.named_buffers()] if t.is_meta and not n.startswith(skipped)
        ]
        if left:
            raise DataCorruption(f"dense tensors missing for the router signal: {left[:5]}", field="dense")
        self._model = model.eval()

    @classmethod
    def from_store(
        cls, store: Any, *, device: str | torch.device = "cpu", dense: Mapping[str, Tensor] | None = None
    ) -> RouterSignal:
        """The signal of a store's model; `dense` reuses tensors already loaded (the engine's)."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(store.dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
        return cls(config, dense if dense is not None else store.dense_state_dict("cpu"), tokenizer, device=device)

    @torch.no_grad()
    def token_signal(self, text: str) -> tuple[Tensor, Tensor]:
        """The router input and full router scores of every token of `text` at the first MoE layer.

        Returns:
            (inputs [T, H], scores [T, E]), fp32.
        """
        ids: list[int] = self.tokenizer(text)["input_ids"][: self.max_tokens]
        if not ids:
            raise InvalidArgument("the text has no tokens", field="prompt")
        try:
            self._model(input_ids=torch.tensor([ids], device=self.device), use_cache=False)
        except _RouterReached as reached:
            return reached.inputs, reached.scores
        raise FailedPrecondition("the forward pass never reached the first MoE layer's router", field="model")

    def features(self, texts: Sequence[str]) -> RouterFeatures:
        """The router signal of each text (one pass per text: no padding, so no text depends on another)."""
        inputs, scores = [], []
        for text in texts:
            token_inputs, token_scores = self.token_signal(text)
            inputs.append(token_inputs.mean(dim=0))
            mean = token_scores.mean(dim=0)
            scores.append(mean / mean.sum().clamp_min(1e-12))
        if not texts:
            return RouterFeatures(np.zeros((0, self.num_experts), np.float32), np.zeros((0, self.hidden), np.float32))
        return RouterFeatures(
            torch.stack(scores).cpu().numpy().astype(np.float32), torch.stack(inputs).cpu().numpy().astype(np.float32)
        )

    def profile_fields(self, texts: Sequence[str]) -> dict[str, Any]:
        """A profile's router signal of `texts` (its `router_scores`, `router_inputs`, `router_layer` fields)."""
        found = self.features(texts)
        return {
            "router_scores": torch.from_numpy(found.scores),
            "router_inputs": torch.from_numpy(found.inputs),
            "router_layer": self.layer,
        }


def _needed(key: str, last: int) -> bool:
    """Whether a runtime dense key is part of the pass up to layer `last`'s router."""
    if not key.startswith("model."):
        return False  # lm_head
    parts = key.split(".")
    if parts[1] == "layers":
        return int(parts[2]) <= last
    return parts[1] != "norm"
