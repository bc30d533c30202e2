"""Family adapters and the routing rules they own: group-limited routing, the MoE block's place, clear errors."""

from __future__ import annotations

from dataclasses import replace
from itertools import combinations

import pytest
import torch
from torch import nn

from premoe_service.errors import FailedPrecondition, PatternError, UnsupportedModel
from premoe_service.families import ADAPTERS, MoESpec, RoutingSpec, adapter_for
from premoe_service.families.routing import RouterWeights
from premoe_service.families.tiny import TINY_CONFIGS, tiny_config, tiny_model
from premoe_service.pattern import Pattern
from premoe_service.runtime.slots import write_slot

# DeepSeek-V3's rule (a group is scored by its best two experts) and DeepSeek-V2's (by its best one), on
# 16 experts in 4 groups of 4 ({0..3}, {4..7}, ...), 2 groups and 4 experts per token.
TOP2 = RoutingSpec("deepseek_v3", num_experts=16, top_k=4, n_group=4, topk_group=2, group_rule="top2_sum")
MAX = RoutingSpec("deepseek_v2", num_experts=16, top_k=4, n_group=4, topk_group=2, group_rule="max")
PLAIN = RoutingSpec("softmax_topk", num_experts=16, top_k=4)


def routable(spec: RoutingSpec, kept: tuple[int, ...]) -> bool:
    """Independently: every choice of `topk_group` groups (by the rule, any may win) leaves `top_k` kept experts,
    and every group that can win is scored over as many experts as the full model scores it by."""
    if spec.group_rule is None:
        return len(kept) >= spec.top_k
    size = spec.num_experts // spec.n_group
    counts = [sum(1 for e in kept if e // size == g) for g in range(spec.n_group)]
    entered = [n for n in counts if n]
    if any(n < (2 if spec.group_rule == "top2_sum" else 1) for n in entered) or len(entered) < spec.topk_group:
        return False
    return all(sum(pick) >= spec.top_k for pick in combinations(entered, spec.topk_group))


def test_every_adapter_has_a_tiny_config_and_every_tiny_config_an_adapter() -> None:
    # A new family is its adapter and its tiny config; the exactness tests then cover it.
    covered = {adapter_for(tiny_config(name)).name for name in TINY_CONFIGS}
    assert covered == {adapter.name for adapter in ADAPTERS}


@pytest.mark.parametrize("spec", [TOP2, MAX, PLAIN], ids=["top2_sum", "max", "no-groups"])
def test_the_routing_spec_decides_which_kept_sets_route(spec: RoutingSpec) -> None:
    sizes = []
    for size in range(1, spec.num_experts + 1):
        for kept in combinations(range(spec.num_experts), size):
            assert (spec.unroutable(kept) is None) == routable(spec, kept), kept
            if routable(spec, kept):
                sizes.append(size)
    assert spec.min_experts == min(sizes)


def test_pattern_validation_names_the_layer_and_the_group_rule() -> None:
    spec = MoESpec("deepseek_v3", (1, 2), TOP2, "n_routed_experts")
    with pytest.raises(PatternError, match="best 2") as info:
        Pattern.build(spec, {1: [0, 1, 4, 5], 2: [0, 1, 2, 4]})  # group 1 of layer 2 keeps one expert
    assert info.value.field == "layer 2"


@pytest.mark.parametrize(
    ("spec", "kept", "expert", "added"),
    [
        (TOP2, [0, 1, 4, 5], 9, [9, 8]),  # entering a group scored by its best two takes the group's next best
        (TOP2, [0, 1, 4, 5, 8, 9], 10, [10]),  # a group already entered takes one more
        (MAX, [0, 1, 2, 4, 5, 6], 9, [9]),  # a group scored by its best one is entered with one
        (MAX, [0, 1, 4, 5], 9, []),  # a token could pick groups {2} and {9}: 3 experts for top-k 4
        (PLAIN, [0, 1, 2, 3], 9, [9]),
    ],
)
def test_joining_keeps_a_routable_set_routable(spec: RoutingSpec, kept: list[int], expert: int, added: list[int]):
    order = [9, 8, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7]  # the prompt's wishes, best first
    assert routable(spec, tuple(kept))
    assert spec.joining(kept, expert, order) == added
    assert routable(spec, tuple(kept + added))


def test_an_unknown_routing_kind_is_an_unsupported_model_naming_the_field() -> None:
    with pytest.raises(UnsupportedModel) as info:
        RoutingSpec("top_p_magic", num_experts=8, top_k=2)  # type: ignore[arg-type]
    assert info.value.field == "kind"


def test_a_router_without_weights_is_an_unsupported_model_naming_the_field() -> None:
    with pytest.raises(UnsupportedModel) as info:
        RouterWeights.of(nn.Module())
    assert info.value.field == "weight"


def test_the_moe_block_is_found_under_the_adapters_attribute() -> None:
    model = tiny_model("qwen3_moe")
    adapter = replace(adapter_for(model.config), block_attr="sparse_moe")
    for layer in model.model.layers:
        layer.sparse_moe = layer.mlp  # the block where another family keeps it
        layer.mlp = nn.Identity()
    router = adapter.router(model, 0)
    assert isinstance(router.weight, torch.Tensor) and router.weight.shape[0] == 8
    assert adapter.experts(model, 1) is model.model.layers[1].sparse_moe.experts
    assert adapter.runtime_prefix(2) == "model.layers.2.sparse_moe."
    key = adapter.parse_expert_key("model.layers.0.sparse_moe.experts.3.down_proj.weight")
    assert key is not None and (key.layer, key.expert, key.part.param) == (0, 3, "down_proj")


def test_checkpoint_keys_of_another_block_name_map_to_the_runtime_block() -> None:
    adapter = adapter_for(tiny_config("mixtral"))  # checkpoints say block_sparse_moe, transformers 5 says mlp
    assert adapter.runtime_dense_key("model.layers.1.block_sparse_moe.gate.weight") == "model.layers.1.mlp.gate.weight"
    key = adapter.parse_expert_key("model.layers.1.block_sparse_moe.experts.5.w3.weight")
    assert key is not None and (key.layer, key.expert, key.part.param, key.part.index) == (1, 5, "gate_up_proj", 1)


def test_a_source_of_another_models_experts_is_refused_naming_the_part() -> None:
    model = tiny_model("olmoe")
    experts = adapter_for(model.config).experts(model, 0)
    with pytest.raises(FailedPrecondition) as info:
        write_slot(experts, 0, {"gate_up_proj": experts.gate_up_proj[0].detach()})  # no down_proj
    assert info.value.field == "down_proj"
