"""The engine computes what transformers computes: with all experts, with a pattern, and after a switch."""

from __future__ import annotations

import pytest
import torch

from premoe_service.errors import PatternError
from premoe_service.families import adapter_for
from premoe_service.families.tiny import TINY_CONFIGS, tiny_config, tiny_model
from premoe_service.pattern import Pattern
from premoe_service.runtime import PatternedModel

from .references import masked_transformers, pruned_checkpoint_model, random_pattern

ATOL = 1e-5
FAMILIES = sorted(TINY_CONFIGS)
NEW_TOKENS = 16


def padded_batch(vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 12, 9 and 5, left-padded with token 0."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate((12, 9, 5)):
        ids[row, : 12 - length] = 0
        mask[row, : 12 - length] = 0
    return ids, mask


@torch.no_grad()
def logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def greedy(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


def half_pattern(model) -> dict[int, list[int]]:
    spec = adapter_for(model.config).spec(model.config)
    return random_pattern(model, spec.num_experts // 2, seed=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_equal_transformers(family: str) -> None:
    reference = tiny_model(family)
    patterned, _ = PatternedModel.from_model(tiny_model(family))
    ids, mask = padded_batch()
    expected, actual = logits(reference, ids, mask), logits(patterned.model, ids, mask)
    assert torch.isfinite(actual).all()
    assert (actual - expected).abs().max().item() <= ATOL
    assert torch.equal(greedy(patterned.model, ids, mask), greedy(reference, ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_pattern_equals_pruned_checkpoint_and_masked_transformers(family: str) -> None:
    reference = tiny_model(family)
    kept = half_pattern(reference)
    pruned = pruned_checkpoint_model(reference, kept)
    spec = adapter_for(reference.config).spec(reference.config)
    patterned, _ = PatternedModel.from_model(tiny_model(family), Pattern.build(spec, kept))
    ids, mask = padded_batch()

    actual = logits(patterned.model, ids, mask)
    assert (actual - logits(pruned, ids, mask)).abs().max().item() <= ATOL
    with masked_transformers(reference, kept):
        masked = logits(reference, ids, mask)
    assert (actual - masked).abs().max().item() <= ATOL
    # The pattern must matter, or the comparisons above prove nothing.
    assert (actual - logits(reference, ids, mask)).abs().max().item() > 1e-3

    tokens = greedy(patterned.model, ids, mask)
    assert torch.equal(tokens, greedy(pruned, ids, mask))
    with masked_transformers(reference, kept):
        assert torch.equal(tokens, greedy(reference, ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_uneven_pattern_equals_masked_transformers(family: str) -> None:
    reference = tiny_model(family)
    spec = adapter_for(reference.config).spec(reference.config)
    groups = spec.routing.groups
    # Different counts per layer (multiples of the group count, at least top-k and what scores a group).
    low = max(spec.top_k, spec.routing.group_entry * groups)
    counts = [low + (i % 2) * groups for i in range(len(spec.moe_layers))]
    kept = random_pattern(reference, counts, seed=11)
    patterned, _ = PatternedModel.from_model(tiny_model(family), Pattern.build(spec, kept))
    ids, mask = padded_batch()
    with masked_transformers(reference, kept):
        expected = logits(reference, ids, mask)
    assert (logits(patterned.model, ids, mask) - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_switching_pattern_in_place_equals_fresh_build(family: str) -> None:
    base = tiny_model(family)
    spec = adapter_for(base.config).spec(base.config)
    first = Pattern.build(spec, random_pattern(base, spec.num_experts // 2, seed=1))
    second = Pattern.build(spec, random_pattern(base, spec.num_experts // 2, seed=2))
    patterned, source = PatternedModel.from_model(base, first, capacity=spec.num_experts // 2)
    slots_before = {layer: patterned.experts_module(layer).gate_up_proj for layer in spec.moe_layers}
    report = patterned.apply(second, source)
    fresh, _ = PatternedModel.from_model(tiny_model(family), second)
    ids, mask = padded_batch()
    assert (logits(patterned.model, ids, mask) - logits(fresh.model, ids, mask)).abs().max().item() <= ATOL
    # Same parameters rewritten in place, and only the experts that differ were loaded.
    assert all(patterned.experts_module(layer).gate_up_proj is slots_before[layer] for layer in spec.moe_layers)
    expected_loads = sum(len(set(second.kept(layer)) - set(first.kept(layer))) for layer in spec.moe_layers)
    assert len(report.loaded) == expected_loads == len(report.evicted)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({99: [0, 1]}, "layer 99"),
        ({1: [0, 8]}, "layer 1"),
        ({1: [3]}, "layer 1"),
        ({1: []}, "layer 1"),
        ({1: [2, 2, 3]}, "layer 1"),
    ],
    ids=["unknown-layer", "id-out-of-range", "fewer-than-top-k", "empty-layer", "repeated-id"],
)
def test_invalid_patterns_name_the_layer(layers: dict[int, list[int]], message: str) -> None:
    spec = adapter_for(tiny_model("mixtral").config).spec(tiny_model("mixtral").config)
    full = {layer: list(range(8)) for layer in spec.moe_layers}
    with pytest.raises(PatternError) as info:
        Pattern.build(spec, {**full, **layers})
    assert message in str(info.value)


def test_missing_layer_is_named() -> None:
    spec = adapter_for(tiny_model("olmoe").config).spec(tiny_model("olmoe").config)
    with pytest.raises(PatternError, match="layer 1"):
        Pattern.build(spec, {0: [0, 1]})


def test_group_constraints_are_checked() -> None:
    model = tiny_model("deepseek_v3")  # 16 experts in 4 groups of 4, top-4, 2 groups per token
    spec = adapter_for(model.config).spec(model.config)
    full = {layer: list(range(16)) for layer in spec.moe_layers}
    with pytest.raises(PatternError, match=r"layer 1.*groups \[0\]"):
        Pattern.build(spec, {**full, 1: [0, 4, 5, 8, 9, 12, 13]})  # group 0 keeps a single expert
    with pytest.raises(PatternError, match=r"layer 2.*in 1 groups"):
        Pattern.build(spec, {**full, 2: [0, 1, 2, 3]})
    assert Pattern.build(spec, {**full, 1: [0, 1, 4, 5]}).kept(1) == (0, 1, 4, 5)

    top6 = tiny_config("deepseek_v3", num_experts_per_tok=6)
    spec6 = adapter_for(top6).spec(top6)
    with pytest.raises(PatternError, match=r"layer 1.*thinnest"):
        # Three groups of two: a token whose two best groups are any two of them sees 4 experts, not 6.
        Pattern.build(spec6, {**full, 1: [0, 1, 4, 5, 8, 9]})
