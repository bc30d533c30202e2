"""DeepSeek-V3-shaped metadata for the scale benchmark: the engine's slots, synthetic task scores, their resemblance.

The engine is the real transformers DeepSeek-V3 class at DeepSeek-V3's layout (61 decoder layers, the first 3 dense,
so 58 MoE layers x 256 routed experts, 8 groups, 4 groups per token, top-8) with tiny hidden sizes, so its slots
hold a few bytes per expert; the bytes an expert really has (`EXPERT_NBYTES_FP8`) exist only in the accounting.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ...families import MoESpec
from ...pattern import Pattern
from ...profiler import Selection, select
from ...runtime.model import PatternedModel

# One routed expert of DeepSeek-V3 as released (FP8 e4m3): gate, up and down projections of 7168 x 2048 at one byte,
# plus their float32 scales, one per 128 x 128 block (3 x 56 x 16 x 4 bytes). 58 x 256 of them make 654 GB.
EXPERT_NBYTES_FP8 = 3 * 7168 * 2048 + 3 * 56 * 16 * 4
EXPERT_NBYTES_BF16 = 3 * 7168 * 2048 * 2


@dataclass(frozen=True)
class Shape:
    """The MoE layout simulated (DeepSeek-V3 by default; tests shrink it)."""

    decoder_layers: int = 61
    dense_layers: int = 3
    experts: int = 256
    groups: int = 8
    topk_group: int = 4
    top_k: int = 8

    @property
    def moe_layers(self) -> int:
        return self.decoder_layers - self.dense_layers


def deepseek_engine(shape: Shape, capacity: int) -> PatternedModel:
    """The transformers DeepSeek-V3 model of `shape` with tiny hidden sizes, `capacity` slots per MoE layer."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=4,
        num_hidden_layers=shape.decoder_layers,
        first_k_dense_replace=shape.dense_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=shape.experts,
        n_group=shape.groups,
        topk_group=shape.topk_group,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        max_position_embeddings=64,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return PatternedModel(model, capacity, device="cpu")


class SyntheticTasks:
    """Score matrices of many tasks that overlap the way measured ones do, drawn from one seeded world.

    Per MoE layer the world holds `clusters` clusters of experts (most members from one expert group, as
    group-limited routing concentrates a token's experts, the rest anywhere) and `domains` domains that each mix a
    few clusters. A task belongs to a domain: its scores are the domain's clusters with task-specific weights, one
    cluster of its own, a long tail over every expert, and experts its demos never reached at zero. Each expert has
    a strength shared by every task (some experts are busy in any text). Task i is the same for any task count.

    Args:
        shape: The MoE layout.
        seed: Seeds the world and, with a task's index, the task.
        domains, clusters, cluster_size: The structure described above.
    """

    def __init__(
        self, shape: Shape, seed: int = 0, *, domains: int = 40, clusters: int = 48, cluster_size: int = 14
    ) -> None:
        self.shape, self.seed, self.domains = shape, seed, domains
        rng = np.random.default_rng([seed, 0xC1])
        layers, experts, group = shape.moe_layers, shape.experts, shape.experts // shape.groups
        self.strength = rng.lognormal(0.0, 0.8, (layers, experts))  # [L, E]
        self.members = np.zeros((layers, clusters, experts))  # [L, C, E] cluster membership
        for layer, cluster in itertools.product(range(layers), range(clusters)):
            home = int(rng.integers(shape.groups))
            local = rng.choice(np.arange(home * group, (home + 1) * group), size=min(group, cluster_size * 3 // 4))
            anywhere = rng.choice(experts, size=cluster_size - len(local))
            self.members[layer, cluster, np.concatenate([local, anywhere])] = 1.0
        # Each domain mixes 4 clusters per layer with decreasing weight.
        self.domain_clusters = rng.integers(clusters, size=(domains, layers, 4))  # [D, L, 4]
        self.domain_weights = np.array([1.0, 0.6, 0.4, 0.25])

    def domain(self, task: int) -> int:
        return task % self.domains

    def scores(self, task: int) -> torch.Tensor:
        """Task `task`'s score matrix, rows summing to one. [L, E] fp32"""
        rng = np.random.default_rng([self.seed, 0x7A5C, task])
        layers, clusters, _ = self.members.shape
        picked = self.domain_clusters[self.domain(task)]  # [L, 4]
        weights = self.domain_weights * rng.lognormal(0.0, 0.4, picked.shape)  # [L, 4]
        rows = np.arange(layers)[:, None]
        mix = np.einsum("lk,lke->le", weights, self.members[rows, picked])  # [L, E]
        own = self.members[np.arange(layers), rng.integers(clusters, size=layers)]  # [L, E]
        mix += 0.5 * rng.lognormal(0.0, 0.3, (layers, 1)) * own
        tail = 0.02 * rng.lognormal(0.0, 0.3, mix.shape)
        scores = self.strength * (mix * rng.lognormal(0.0, 0.5, mix.shape) + tail)
        scores[rng.random(mix.shape) < 0.08] = 0.0  # experts the demos never reached
        scores /= scores.sum(axis=1, keepdims=True)
        return torch.from_numpy(scores.astype(np.float32))


def pattern_of(scores: torch.Tensor, spec: MoESpec, capacity: int, selection: Selection) -> Pattern:
    """The task's pattern as the service derives it (`TaskBook.pattern`): its selection, capped at the slots."""
    return select(scores, spec, selection, max_per_layer=capacity)


def resemblance(scores: list[torch.Tensor], patterns: list[Pattern]) -> dict[str, float]:
    """How concentrated and how shared score matrices are, to compare synthetic tasks with measured ones.

    `top_quarter_mass`: mean share of a layer's score mass on its best quarter of experts; `zero_share`: experts
    with no score; `pattern_overlap`: for pairs of tasks, the share of one pattern's experts the other keeps too
    (mean, min, max over up to 300 random pairs).
    """
    tops, zeros = [], []
    for matrix in scores:
        ordered = matrix.double().sort(dim=1, descending=True).values
        quarter = max(1, matrix.shape[1] // 4)
        tops.append(float((ordered[:, :quarter].sum(1) / ordered.sum(1).clamp_min(1e-30)).mean()))
        zeros.append(float((matrix == 0).double().mean()))
    overlaps = []
    pairs = list(itertools.combinations(range(len(patterns)), 2))
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(pairs))[:300]:
        a, b = (patterns[j] for j in pairs[i])
        shared = sum(len(set(a.kept(layer)) & set(b.kept(layer))) for layer in a.layers)
        overlaps.append(shared / a.size)
    return {
        "top_quarter_mass": float(np.mean(tops)),
        "zero_share": float(np.mean(zeros)),
        "pattern_overlap_mean": float(np.mean(overlaps)) if overlaps else 1.0,
        "pattern_overlap_min": float(np.min(overlaps)) if overlaps else 1.0,
        "pattern_overlap_max": float(np.max(overlaps)) if overlaps else 1.0,
    }
