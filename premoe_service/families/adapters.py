"""The adapters of the supported families: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2/V3, GPT-OSS."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModel
from .base import ExpertPart, FamilyAdapter
from .routing import RoutingSpec

# Per-expert checkpoint parts (what `save_pretrained` writes) -> slices of the fused runtime parameters.
# gate_up_proj is [2I, H] per expert with the gate rows first, as transformers' conversion concatenates.
_SWIGLU_PARTS = {
    "gate_proj": ExpertPart("gate_up_proj", index=0, chunks=2),
    "up_proj": ExpertPart("gate_up_proj", index=1, chunks=2),
    "down_proj": ExpertPart("down_proj"),
}
_MIXTRAL_PARTS = {
    "w1": ExpertPart("gate_up_proj", index=0, chunks=2),
    "w3": ExpertPart("gate_up_proj", index=1, chunks=2),
    "w2": ExpertPart("down_proj"),
}


def _all_layers(config: Any) -> tuple[int, ...]:
    return tuple(range(config.num_hidden_layers))


def _qwen_moe_layers(config: Any) -> tuple[int, ...]:
    # The rule of Qwen2/3-MoE decoder layers: sparse unless listed in mlp_only_layers or off the step.
    only_mlp = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    if config.num_experts <= 0:
        return ()
    return tuple(i for i in range(config.num_hidden_layers) if i not in only_mlp and (i + 1) % step == 0)


def _deepseek_moe_layers(config: Any) -> tuple[int, ...]:
    first = config.first_k_dense_replace or 0
    return tuple(range(first, config.num_hidden_layers))


def _qwen_routing(config: Any) -> RoutingSpec:
    return RoutingSpec(
        kind="softmax_topk",
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        norm_topk=bool(config.norm_topk_prob),
    )


def _mixtral_routing(config: Any) -> RoutingSpec:
    return RoutingSpec(
        kind="softmax_topk",
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        norm_topk=True,
        cast_back=False,
    )


def _deepseek_v2_routing(config: Any) -> RoutingSpec:
    method = config.topk_method
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModel(
            f"DeepSeek-V2 topk_method {method!r} is not supported; use 'greedy' or 'group_limited_greedy'",
            field="topk_method",
        )
    grouped = method == "group_limited_greedy"
    return RoutingSpec(
        kind="deepseek_v2",
        num_experts=config.n_routed_experts,
        top_k=config.num_experts_per_tok,
        n_group=config.n_group if grouped else 1,
        topk_group=config.topk_group if grouped else 1,
        group_rule="max" if grouped else None,
        scaling=float(config.routed_scaling_factor),
    )


def _deepseek_v3_routing(config: Any) -> RoutingSpec:
    return RoutingSpec(
        kind="deepseek_v3",
        num_experts=config.n_routed_experts,
        top_k=config.num_experts_per_tok,
        norm_topk=bool(config.norm_topk_prob),
        n_group=config.n_group,
        topk_group=config.topk_group,
        group_rule="top2_sum",
        scaling=float(config.routed_scaling_factor),
    )


def _gpt_oss_routing(config: Any) -> RoutingSpec:
    return RoutingSpec(kind="gpt_oss", num_experts=config.num_local_experts, top_k=config.num_experts_per_tok)


ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        router_attr="gate",
        expert_count_field="num_experts",
        per_expert_parts=_SWIGLU_PARTS,
        routing_spec=_qwen_routing,
        moe_layers=_qwen_moe_layers,
    ),
    FamilyAdapter(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        router_attr="gate",
        expert_count_field="num_experts",
        per_expert_parts=_SWIGLU_PARTS,
        routing_spec=_qwen_routing,
        moe_layers=_qwen_moe_layers,
    ),
    FamilyAdapter(
        name="olmoe",
        model_types=("olmoe",),
        router_attr="gate",
        expert_count_field="num_experts",
        per_expert_parts=_SWIGLU_PARTS,
        routing_spec=_qwen_routing,
        moe_layers=_all_layers,
    ),
    FamilyAdapter(
        name="mixtral",
        model_types=("mixtral",),
        router_attr="gate",
        expert_count_field="num_local_experts",
        per_expert_parts=_MIXTRAL_PARTS,
        routing_spec=_mixtral_routing,
        moe_layers=_all_layers,
        checkpoint_block="block_sparse_moe",
    ),
    FamilyAdapter(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        router_attr="gate",
        expert_count_field="n_routed_experts",
        per_expert_parts=_SWIGLU_PARTS,
        routing_spec=_deepseek_v2_routing,
        moe_layers=_deepseek_moe_layers,
    ),
    FamilyAdapter(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        router_attr="gate",
        expert_count_field="n_routed_experts",
        per_expert_parts=_SWIGLU_PARTS,
        routing_spec=_deepseek_v3_routing,
        moe_layers=_deepseek_moe_layers,
    ),
    FamilyAdapter(
        name="gpt_oss",
        model_types=("gpt_oss",),
        router_attr="router",
        expert_count_field="num_local_experts",
        per_expert_parts={},  # GPT-OSS checkpoints hold fused (transposed, biased) expert tensors only
        routing_spec=_gpt_oss_routing,
        moe_layers=_all_layers,
        block_scores=True,  # GptOssMLP returns (routed, router_scores)
    ),
)

_BY_MODEL_TYPE = {model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types}


def adapter_for(config: Any) -> FamilyAdapter:
    """The adapter for a transformers config (or anything with `model_type`)."""
    model_type = getattr(config, "model_type", None)
    adapter = _BY_MODEL_TYPE.get(model_type)  # type: ignore[arg-type]
    if adapter is None:
        supported = ", ".join(sorted(_BY_MODEL_TYPE))
        raise UnsupportedModel(
            f"model_type {model_type!r} is not a supported MoE family ({supported})", field="model_type"
        )
    return adapter


def adapter_named(name: str) -> FamilyAdapter:
    """The adapter with this family name (as written in store manifests)."""
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise UnsupportedModel(f"unknown family {name!r}", field="family")
