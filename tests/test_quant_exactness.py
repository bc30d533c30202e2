"""Mixed-precision patterns compute what transformers computes on the checkpoint whose kept experts hold the
dequantized weights (bf16 ones: the weights rounded to bfloat16) and whose dropped experts are excluded, for every
family; resident bytes are the packed ones."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe_service.families import adapter_for
from premoe_service.families.tiny import TINY_CONFIGS, save_tiny_checkpoint
from premoe_service.pattern import Pattern
from premoe_service.runtime.build import load_model
from premoe_service.runtime.quantized import attach_precisions
from premoe_service.store import MemoryCache, Store, shard
from premoe_service.store.quantized_copies import PrecisionReader, add_precisions

from .references import masked_transformers, random_pattern
from .test_exactness import ATOL, greedy, logits, padded_batch

FAMILIES = sorted(TINY_CONFIGS)
PRECISIONS = ("bf16", "int8", "int4", "int2")
GROUP = 8  # divides the tiny models' hidden (32) and expert (16) sizes


def reference_dequantized(reader: PrecisionReader, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's weights rebuilt independently of the runtime: compressed-tensors' own unpacking, then
    `(q - zero) * scale` per group in float64 (exact here: small integers times float16 scales)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    copy, tensors = reader.copy, reader.read(layer, expert)
    out = {}
    for part, kinds in tensors.items():
        if "raw" in kinds:
            out[part] = kinds["raw"].clone()
            continue
        rows, groups = kinds["weight_scale"].shape
        cols = groups * copy.group_size
        q = unpack_from_int32(kinds["weight_packed"], copy.bits, torch.Size((rows, cols)), packed_dim=1).double()
        zero = unpack_from_int32(kinds["weight_zero_point"], copy.bits, torch.Size((rows, groups)), packed_dim=0)
        scale = kinds["weight_scale"].double().repeat_interleave(copy.group_size, dim=1)
        weight = ((q - zero.double().repeat_interleave(copy.group_size, dim=1)) * scale).float()
        out[part] = weight.t() if copy.transposed else weight
    return out


def mixed_plan(model, seed: int) -> tuple[dict[int, list[int]], dict[int, dict[int, str]]]:
    """Half the experts kept per layer; each kept expert at full precision or one of PRECISIONS, in turn across
    layers, so that every precision is used (a layer may keep fewer experts than there are precisions)."""
    spec = adapter_for(model.config).spec(model.config)
    kept = random_pattern(model, spec.num_experts // 2, seed=seed)
    rng = random.Random(seed)
    choices = ("full", *PRECISIONS)
    precisions = {}
    turn = 0
    for layer, experts in kept.items():
        order = rng.sample(experts, len(experts))
        precisions[layer] = {e: choices[(turn + i) % len(choices)] for i, e in enumerate(order)}
        turn += len(order)
    return kept, precisions


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_pattern_equals_transformers_on_the_dequantized_checkpoint(family: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    save_tiny_checkpoint(model_dir, family)
    shard(model_dir, tmp_path / "store", progress=False)
    add_precisions(tmp_path / "store", PRECISIONS, GROUP, progress=False)
    store = Store(tmp_path / "store", MemoryCache())
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    adapter = adapter_for(reference.config)
    spec = adapter.spec(reference.config)
    kept, precisions = mixed_plan(reference, seed=5)
    pattern = Pattern.build(spec, kept, precisions)
    assert {p for by_expert in precisions.values() for p in by_expert.values()} == {"full", *PRECISIONS}

    # Capacity exactly what the pattern needs: the resident bytes are then the plan's bytes.
    full_count = {layer: sum(p == "full" for p in precisions[layer].values()) for layer in spec.moe_layers}
    patterned, _ = load_model(store, capacity=max(max(full_count.values()), spec.top_k))
    capacity = {
        p: {layer: sum(q == p for q in precisions[layer].values()) for layer in spec.moe_layers} for p in PRECISIONS
    }
    attach_precisions(patterned, store, capacity)
    patterned.apply(pattern, store)

    # The reference: transformers' own model, kept quantized experts overwritten with their dequantized weights,
    # bf16 experts with their own weights rounded to bfloat16 (the store's copy is not read for them).
    with torch.no_grad():
        for layer in spec.moe_layers:
            experts = adapter.experts(reference, layer)
            for expert, precision in precisions[layer].items():
                if precision == "bf16":
                    for name in {part.name for part in store.manifest.parts}:
                        weight = getattr(experts, name)
                        weight[expert] = weight[expert].to(torch.bfloat16).float()
                elif precision != "full":
                    reader = PrecisionReader(store, precision)
                    for name, tensor in reference_dequantized(reader, layer, expert).items():
                        getattr(experts, name)[expert] = tensor
    ids, mask = padded_batch()
    actual = logits(patterned.model, ids, mask)
    with masked_transformers(reference, kept):
        expected = logits(reference, ids, mask)
        tokens = greedy(reference, ids, mask)
    assert torch.isfinite(actual).all()
    assert (actual - expected).abs().max().item() <= ATOL
    assert torch.equal(greedy(patterned.model, ids, mask), tokens)
    # The precisions must matter, or the comparison proves nothing: the same keep set at full precision differs.
    full_precision = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with masked_transformers(full_precision, kept):
        assert (actual - logits(full_precision, ids, mask)).abs().max().item() > 1e-3

    # Resident bytes are the packed ones, measured from the slot tensors: full slots at the store's size,
    # each quantized slot at its precision's blob size (scales and zero points included).
    full_slots = sum(patterned.slots[layer].capacity for layer in spec.moe_layers)
    packed = sum(
        capacity[p][layer] * PrecisionReader(store, p).copy.expert_nbytes
        for p in PRECISIONS
        for layer in spec.moe_layers
    )
    assert patterned.expert_bytes_resident() == full_slots * store.manifest.expert_nbytes + packed
    # bf16 of an fp32 store: half its bytes, nothing beside the weights.
    assert PrecisionReader(store, "bf16").copy.expert_nbytes * 2 == store.manifest.expert_nbytes
    # int2 with groups of 8: 2 bits + a float16 scale and a 2-bit zero point per 8 weights = 4.25 of 32 bits.
    # Biases (GPT-OSS) stay as they are.
    copy = PrecisionReader(store, "int2").copy
    raw = sum(p.nbytes for p in copy.layout if p.tensor == "raw")
    assert copy.expert_nbytes - raw <= (store.manifest.expert_nbytes - raw) * 4.25 / 32 + 64
