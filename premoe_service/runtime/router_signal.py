"""The router signal: a prompt's router distribution at the first MoE layer, on a private copy of the layers before it.

The first MoE layer's router input depends only on the embeddings, attention and any dense layers before it,
never on a routed expert, so its router scores are exact with no expert loaded and identical on every replica
whatever is resident. The signal owns its own modules (the embeddings and the decoder layers up to the first MoE
layer's router, built from the dense tensors): it never calls the serving model, whose one owner is the engine
loop, so it may run on any thread. The dense tensors may be the engine's own (read-only, shared, not copied).

Two ways to the router: the reference runs the model's forward and stops it at the router (`_RouterTap` raises
there); the plain pass (`_PlainPass`) runs the decoder stack with the MoE block answering zeros, so that the layer
returns its residual after attention, and applies the layer's `post_attention_layernorm` and the router to it: a
function of its inputs with no exception in it, which `torch.compile` takes whole. The plain pass is used where it
gives the reference's bits on a probe (checked when the signal is built; every family here does). Compiled
(`compiled=True`, what a server does when it compiles its step) it runs as one native call without the GIL, where
op by op each of its ~60 operators gives the GIL up and takes it back. Measured on the reference model (2-core VM,
1 thread): a 10-token prompt 1.13 ms op by op, 0.65 compiled; 16 prompts routed at once by the server's core
(in process, nothing else running) took 30 ms of the signal threads' CPU op by op and 17.5 compiled, and the burst's
routes 67.5 ms of wall against 54.9. Building it compiles one graph: ~14 s on an empty inductor cache, ~7 s warm.

Every pass, the compiling one included, runs at one intra-op thread count (`threads`, on the calling thread alone:
`intra_op.intra_op_threads`). A compiled graph is guarded on the calling thread's count: compiled on the main thread
at the process's count and called from the server's signal threads at the engine's, it compiled again on the first
routed requests (seconds each, their routes waiting), and callers at more than 8 counts exhausted dynamo's cache and
failed. A text's signal is also the same bits whichever thread computes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DataCorruption, FailedPrecondition, InvalidArgument
from ..families import FamilyAdapter, RoutingSpec, adapter_for, full_scores
from ..intra_op import intra_op_threads
from .build import materialise_buffers
from .decoder_stack import INDUCTOR_OPTIONS

log = logging.getLogger(__name__)


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


class _NoBlock(nn.Module):
    """Stands in for the first MoE layer's block in the plain pass: answers zeros, so the layer returns its
    residual after attention (with the router scores' place filled where the family's block returns them too)."""

    def __init__(self, with_scores: bool) -> None:
        super().__init__()
        self.with_scores = with_scores

    def forward(self, hidden: Tensor, *_: Any, **__: Any) -> Any:
        zeros = torch.zeros_like(hidden)
        return (zeros, None) if self.with_scores else zeros


class _PlainPass(nn.Module):
    """The router input and full router scores of ids [1, T] at the first MoE layer, by the decoder stack up to
    that layer's residual after attention, then its `post_attention_layernorm` and the router."""

    def __init__(self, base: nn.Module, norm: nn.Module, router: _RouterTap) -> None:
        super().__init__()
        self.base = base
        self.norm = norm
        self.router = router

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        residual = self.base(input_ids=ids, use_cache=False).last_hidden_state
        flat = self.norm(residual).reshape(-1, residual.shape[-1]).float()  # [T, H]
        bias = None if self.router.bias is None else self.router.bias.float()
        logits = F.linear(flat, self.router.weight.float(), bias)  # [T, E]
        return flat, full_scores(self.router.spec, logits)


class RouterSignal:
    """Router distributions of texts at a model's first MoE layer.

    Args:
        config: The model's transformers config.
        dense: The dense tensors under the runtime state-dict names (`model.embed_tokens.weight`, ...); only
            those of the layers up to the first MoE layer are used. They are adopted, not copied.
        tokenizer: Tokenises texts the way the server tokenises prompts.
        device: Where the pass runs.
        max_tokens: Texts are cut to this many tokens (the signal of a long prompt is its start's).
        compiled: Run the plain pass compiled (`torch.compile`, compiled here; a text of one token runs op by op).
            Its scores are the reference's within rounding (~1e-6), a text's the same in every call.
        threads: The intra-op threads of every pass, whichever thread calls (one pass is one short prompt).
    """

    def __init__(
        self,
        config: Any,
        dense: Mapping[str, Tensor],
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        max_tokens: int = 512,
        compiled: bool = False,
        threads: int = 1,
    ) -> None:
        if max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be at least 1, got {max_tokens}", field="max_tokens")
        if threads < 1:
            raise InvalidArgument(f"threads must be at least 1, got {threads}", field="threads")
        self.threads = threads
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
        model = self._truncated(config, dense, adapter)
        block = adapter.moe_block(model, self.layer)
        setattr(block, adapter.router_attr, _RouterTap(adapter.router(model, self.layer), spec.routing))
        self._model = model.eval()
        self._plain = self._plain_pass(config, dense, adapter, spec.routing)
        self._compiled: Any = None
        if compiled and self._plain is not None:
            self._compiled = self._compile(self._plain)
        # How a text's pass runs: "compiled", "plain" (op by op) or "reference" (the model's forward, stopped).
        self.mode = "compiled" if self._compiled is not None else "plain" if self._plain is not None else "reference"

    def _truncated(self, config: Any, dense: Mapping[str, Tensor], adapter: FamilyAdapter) -> nn.Module:
        """The causal LM with its decoder layers up to the first MoE layer, on the dense tensors (adopted)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=next(iter(dense.values())).dtype)
        base = model.model
        base.layers = nn.ModuleList(list(base.layers)[: self.layer + 1])  # the pass never goes further
        wanted = {k: v.to(self.device) for k, v in dense.items() if _needed(k, self.layer)}
        model.load_state_dict(wanted, strict=False, assign=True)
        materialise_buffers(model, self.device)
        skipped = ("norm.", f"layers.{self.layer}.{adapter.block_attr}.{adapter.experts_attr}.")
        left = [
            n for n, t in [*base.named_parameters(), *base.named_buffers()] if t.is_meta and not n.startswith(skipped)
        ]
        if left:
            raise DataCorruption(f"dense tensors missing for the router signal: {left[:5]}", field="dense")
        return model

    def _plain_pass(
        self, config: Any, dense: Mapping[str, Tensor], adapter: FamilyAdapter, routing: RoutingSpec
    ) -> _PlainPass | None:
        """The plain pass where it gives the reference's bits on a probe, else None (the reference runs)."""
        model = self._truncated(config, dense, adapter)
        base: Any = model.model
        layer = base.layers[self.layer]
        norm = getattr(layer, "post_attention_layernorm", None)
        if not isinstance(norm, nn.Module):
            return None
        router = _RouterTap(adapter.router(model, self.layer), routing)
        setattr(layer, adapter.block_attr, _NoBlock(adapter.block_scores))
        base.norm = nn.Identity()  # the stack's output is the layer's residual, as it is
        plain = _PlainPass(base, norm, router).eval()
        probe = torch.arange(1, 8, device=self.device).remainder(int(config.vocab_size)).unsqueeze(0)
        with torch.no_grad():
            try:
                found = plain(probe)
            except Exception as exc:  # a family whose layer takes the block's answer otherwise
                log.info("the router signal runs the model's forward: the plain pass failed (%s)", exc)
                return None
            expected = self._reference(probe)
        if not all(torch.equal(a, b) for a, b in zip(found, expected, strict=True)):
            log.info("the router signal runs the model's forward: the plain pass differs from it")
            return None
        return plain

    def _compile(self, plain: _PlainPass) -> Any:
        """`plain` compiled, and compiled now (two lengths: one graph for every text of two tokens or more); None
        where that fails (the plain pass then runs op by op)."""
        options = INDUCTOR_OPTIONS if self.device.type == "cpu" else {}
        compiled = torch.compile(plain, dynamic=True, fullgraph=True, options=options)
        log.warning("compiling the router signal's pass (seconds; inductor caches it for later starts)")
        start = time.perf_counter()
        try:
            with torch.no_grad(), intra_op_threads(self.threads):
                for length in (2, 3):
                    compiled(torch.ones(1, length, dtype=torch.long, device=self.device))
        except Exception as exc:
            log.warning("the router signal runs op by op: it could not be compiled (%s)", exc)
            return None
        log.warning("the router signal's pass runs compiled in %.1f s", time.perf_counter() - start)
        return compiled

    def _reference(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The model's own forward, stopped at the router: (inputs [T, H], scores [T, E])."""
        try:
            self._model(input_ids=ids, use_cache=False)
        except _RouterReached as reached:
            return reached.inputs, reached.scores
        raise FailedPrecondition("the forward pass never reached the first MoE layer's router", field="model")

    @classmethod
    def from_store(
        cls,
        store: Any,
        *,
        device: str | torch.device = "cpu",
        dense: Mapping[str, Tensor] | None = None,
        compiled: bool = False,
    ) -> RouterSignal:
        """The signal of a store's model; `dense` reuses tensors already loaded (the engine's)."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(store.dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
        dense = dense if dense is not None else store.dense_state_dict("cpu")
        return cls(config, dense, tokenizer, device=device, compiled=compiled)

    @torch.no_grad()
    def token_signal(self, text: str) -> tuple[Tensor, Tensor]:
        """The router input and full router scores of every token of `text` at the first MoE layer.

        Returns:
            (inputs [T, H], scores [T, E]), fp32.
        """
        ids: list[int] = self.tokenizer(text)["input_ids"][: self.max_tokens]
        if not ids:
            raise InvalidArgument("the text has no tokens", field="prompt")
        tensor = torch.tensor([ids], device=self.device)
        with intra_op_threads(self.threads):
            if self._compiled is not None and len(ids) > 1:
                inputs, scores = self._compiled(tensor)
                return inputs, scores
            if self._plain is not None:
                return self._plain(tensor)
            return self._reference(tensor)

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
