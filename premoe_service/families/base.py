"""What an adapter tells the engine about one transformers MoE family."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .routing import RoutingSpec


@dataclass(frozen=True)
class MoESpec:
    """Where the routed experts of one model are and how they are chosen.

    Attributes:
        family: The adapter's name.
        moe_layers: Decoder-layer indices that hold an MoE block, ascending.
        routing: The routing function, shared by every MoE layer.
        expert_count_field: The config field that holds the routed-expert count.
    """

    family: str
    moe_layers: tuple[int, ...]
    routing: RoutingSpec
    expert_count_field: str

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    @property
    def top_k(self) -> int:
        return self.routing.top_k


@dataclass(frozen=True)
class ExpertPart:
    """How one checkpoint tensor of a per-expert layout lands in the fused runtime parameter.

    The runtime parameter's expert slice is cut into `chunks` equal pieces along `dim`; this tensor is
    piece `index`. `chunks == 1` means the tensor is the whole slice.
    """

    param: str
    index: int = 0
    chunks: int = 1
    dim: int = 0


@dataclass(frozen=True)
class FamilyAdapter:
    """Everything family-specific the engine, the store and the profiler need.

    Attributes:
        name: Short family name used in manifests and logs.
        model_types: The `config.model_type` values this adapter handles.
        router_attr: Attribute of the MoE block that holds the router.
        expert_count_field: Config field with the routed-expert count (set by export).
        per_expert_parts: Per-expert checkpoint part name -> where it goes in the fused parameters.
        routing_spec: Reads the routing function off a config.
        moe_layers: Reads the MoE decoder-layer indices off a config.
        experts_attr: Attribute of the MoE block that holds the fused experts module.
        block_attr: Attribute of a decoder layer that holds its MoE block in the transformers model.
        checkpoint_block: The MoE block's name in checkpoint keys when it differs from `block_attr`.
        plain_stack: The causal LM's forward is the plain decoder stack, and nothing else: `model.model` embeds the
            ids, computes `rotary_emb(hidden, position_ids)` once, runs its `layers` with those position embeddings
            and applies `norm`; `lm_head` maps the kept positions to logits (no scaling, no soft-capping). The
            engine then runs that stack itself (`runtime/decoder_stack.py`), without transformers' wrappers around
            it; otherwise it calls the model.
        block_scores: The MoE block returns `(hidden, router_scores)` rather than the hidden states alone (the
            decoder layer unpacks it), which the compiled step keeps when it runs the block as one opaque call.
    """

    name: str
    model_types: tuple[str, ...]
    router_attr: str
    expert_count_field: str
    per_expert_parts: dict[str, ExpertPart]
    routing_spec: Callable[[Any], RoutingSpec]
    moe_layers: Callable[[Any], tuple[int, ...]]
    experts_attr: str = "experts"
    block_attr: str = "mlp"
    checkpoint_block: str | None = None
    plain_stack: bool = True
    block_scores: bool = False

    @property
    def checkpoint_name(self) -> str:
        """The MoE block's name in checkpoint keys."""
        return self.checkpoint_block or self.block_attr

    def spec(self, config: Any) -> MoESpec:
        """The MoE layout of a model with this config."""
        return MoESpec(
            family=self.name,
            moe_layers=self.moe_layers(config),
            routing=self.routing_spec(config),
            expert_count_field=self.expert_count_field,
        )

    def moe_block(self, model: nn.Module, layer: int) -> nn.Module:
        """The MoE block of decoder layer `layer` of a `*ForCausalLM` model."""
        return getattr(model.model.layers[layer], self.block_attr)  # type: ignore[union-attr,index]

    def router(self, model: nn.Module, layer: int) -> nn.Module:
        return getattr(self.moe_block(model, layer), self.router_attr)

    def experts(self, model: nn.Module, layer: int) -> nn.Module:
        return getattr(self.moe_block(model, layer), self.experts_attr)

    # --- checkpoint keys -------------------------------------------------------------------------

    def runtime_prefix(self, layer: int) -> str:
        """State-dict prefix of layer `layer`'s MoE block in the runtime model."""
        return f"model.layers.{layer}.{self.block_attr}."

    def checkpoint_prefix(self, layer: int) -> str:
        """Key prefix of layer `layer`'s MoE block in checkpoints on disk."""
        return f"model.layers.{layer}.{self.checkpoint_name}."

    def parse_expert_key(self, key: str) -> ExpertKey | None:
        """Map a checkpoint key to the routed expert tensor it holds, or None for a dense key.

        Both layouts are recognised: per-expert keys (``...experts.{e}.gate_proj.weight``, Mixtral's
        ``w1/w2/w3``) and fused keys (``...experts.gate_up_proj`` holding all experts of a layer).
        """
        match = _EXPERT_KEY.fullmatch(key)
        if match is None or match["block"] not in (self.checkpoint_name, self.block_attr):
            return None
        layer = int(match["layer"])
        rest = match["rest"]
        per_expert = _PER_EXPERT_REST.fullmatch(rest)
        if per_expert is not None:
            part = self.per_expert_parts.get(per_expert["part"])
            if part is None:
                return None
            return ExpertKey(layer=layer, expert=int(per_expert["expert"]), part=part)
        if rest in _FUSED_PARAMS:
            return ExpertKey(layer=layer, expert=None, part=ExpertPart(param=rest))
        return None

    def runtime_dense_key(self, key: str) -> str:
        """The runtime state-dict name of a dense checkpoint key (MoE block renamed to `block_attr`)."""
        if self.checkpoint_name == self.block_attr:
            return key
        pattern = rf"^(model\.layers\.\d+\.){re.escape(self.checkpoint_name)}\."
        return re.sub(pattern, rf"\g<1>{self.block_attr}.", key)


@dataclass(frozen=True)
class ExpertKey:
    """A checkpoint tensor of routed experts: one expert's part, or (expert None) a fused stack."""

    layer: int
    expert: int | None
    part: ExpertPart


_EXPERT_KEY = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<block>[a-z_]+)\.experts\.(?P<rest>.+)")
_PER_EXPERT_REST = re.compile(r"(?P<expert>\d+)\.(?P<part>[a-z0-9_]+)\.weight")
_FUSED_PARAMS = frozenset({"gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"})
