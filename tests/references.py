"""Independent references for exactness tests: transformers itself, on a pruned checkpoint or with masked scores.

Nothing here imports the engine: the pruned checkpoint is cut with plain tensor slicing and loaded with the
transformers class, and masking is applied to transformers' own router computation from the outside.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

MOE_ROUTER_NAMES = ("gate", "router")
EXPERT_COUNT_FIELDS = {
    "qwen3_moe": "num_experts",
    "qwen2_moe": "num_experts",
    "olmoe": "num_experts",
    "mixtral": "num_local_experts",
    "gpt_oss": "num_local_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
}


def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """Decoder-layer index -> MoE block, found by looking for a fused experts module."""
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}


def router_of(block) -> torch.nn.Module:
    return block.gate if hasattr(block, "gate") and not isinstance(block.gate, torch.nn.Linear) else block.router


def random_pattern(model, per_layer: int | Sequence[int], seed: int) -> dict[int, list[int]]:
    """Random kept experts per MoE layer; with expert groups, the same count in every group."""
    rng = random.Random(seed)
    config = model.config
    layers = sorted(moe_blocks(model))
    num_experts = getattr(config, EXPERT_COUNT_FIELDS[config.model_type])
    groups = _groups(config)
    counts = [per_layer] * len(layers) if isinstance(per_layer, int) else list(per_layer)
    pattern = {}
    for layer, count in zip(layers, counts, strict=True):
        size = num_experts // groups
        if count % groups:
            raise ValueError("with groups the count must divide evenly")
        kept = []
        for g in range(groups):
            kept += rng.sample(range(g * size, (g + 1) * size), count // groups)
        pattern[layer] = sorted(kept)
    return pattern


def _groups(config) -> int:
    if config.model_type == "deepseek_v3":
        return config.n_group
    if config.model_type == "deepseek_v2" and config.topk_method == "group_limited_greedy":
        return config.n_group
    return 1


def pruned_checkpoint_model(model, pattern: Mapping[int, Sequence[int]]):
    """A transformers model built from `model`'s weights with only the kept experts (same count per layer)."""
    counts = {len(v) for v in pattern.values()}
    if len(counts) != 1:
        raise ValueError("a pruned checkpoint needs the same expert count in every layer")
    config = copy.deepcopy(model.config)
    setattr(config, EXPERT_COUNT_FIELDS[config.model_type], counts.pop())
    state = {}
    prefixes = {f"model.layers.{layer}.mlp.": torch.tensor(kept) for layer, kept in pattern.items()}
    for key, value in model.state_dict().items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        rest = key[len(prefix) :] if prefix else ""
        if prefix and (rest.startswith("experts.") or rest.split(".")[0] in MOE_ROUTER_NAMES):
            value = value.index_select(0, prefixes[prefix])  # expert tensors, router rows, router biases
        state[key] = value.clone()
    pruned = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    return pruned.eval()


class _MaskRouterLogits(TorchFunctionMode):
    """Adds -inf to the router logits of excluded experts inside transformers' own router forward."""

    def __init__(self, masks: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.masks = masks  # router weight data_ptr -> additive mask [E]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear and len(args) > 1 and args[1].data_ptr() in self.masks:
            out = out + self.masks[args[1].data_ptr()].to(out.dtype)
        return out


@contextmanager
def masked_transformers(model, pattern: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Run transformers' model with excluded experts' router scores at -inf before selection.

    For the softmax and top-k-then-softmax families the scores selection reads are the logits; for
    DeepSeek-V3 they are the bias-corrected sigmoid scores, so its correction bias carries the -inf.
    """
    blocks = moe_blocks(model)
    if model.config.model_type == "deepseek_v3":
        saved = {}
        for layer, kept in pattern.items():
            bias = router_of(blocks[layer]).e_score_correction_bias
            saved[layer] = bias.clone()
            excluded = torch.ones_like(bias, dtype=torch.bool)
            excluded[list(kept)] = False
            bias.masked_fill_(excluded, float("-inf"))
        try:
            yield
        finally:
            for layer, bias in saved.items():
                router_of(blocks[layer]).e_score_correction_bias.copy_(bias)
        return
    masks = {}
    for layer, kept in pattern.items():
        weight = router_of(blocks[layer]).weight
        mask = torch.full((weight.shape[0],), float("-inf"))
        mask[list(kept)] = 0.0
        masks[weight.data_ptr()] = mask
    with _MaskRouterLogits(masks):
        yield
