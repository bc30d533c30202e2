"""The routing functions of the MoE families, with experts outside a pattern excluded before any top-k.

Each function repeats the operations of the family's transformers router in the same order, so that with
nothing excluded the result is bit-for-bit the router's own. Exclusion happens on the scores that
selection reads (before group scoring too), which equals running a checkpoint from which the excluded
experts were cut out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RoutingSpec

NEG_INF = float("-inf")


@dataclass
class Routing:
    """One router call: full logits, chosen weights and chosen expert ids.

    Attributes:
        logits: Router logits over all experts, unmasked. [T, E]
        weights: Weights of the chosen experts. [T, k]
        experts: Chosen expert ids (not slot ids). [T, k]
    """

    logits: Tensor
    weights: Tensor
    experts: Tensor


@dataclass
class RouterWeights:
    """A router's tensors: weight [E, H], optional bias [E] (GPT-OSS) and score correction bias [E] (DeepSeek-V3)."""

    weight: Tensor
    bias: Tensor | None = None
    correction: Tensor | None = None

    @classmethod
    def of(cls, router: nn.Module) -> RouterWeights:
        def tensor(name: str) -> Tensor | None:
            value = getattr(router, name, None)
            return value if isinstance(value, Tensor) else None

        weight = tensor("weight")
        if weight is None:
            raise TypeError(f"{type(router).__name__} has no router weight")
        return cls(weight, tensor("bias"), tensor("e_score_correction_bias"))


def route(spec: RoutingSpec, router: RouterWeights, hidden: Tensor, excluded: Tensor | None) -> Routing:
    """Run the family's routing for `hidden` [T, H] with `excluded` [E] (bool) experts never chosen."""
    if spec.kind == "softmax_topk":
        return _softmax_topk(spec, router, hidden, excluded)
    if spec.kind == "deepseek_v2":
        return _deepseek_v2(spec, router, hidden, excluded)
    if spec.kind == "deepseek_v3":
        return _deepseek_v3(spec, router, hidden, excluded)
    if spec.kind == "gpt_oss":
        return _gpt_oss(spec, router, hidden, excluded)
    raise ValueError(f"unknown routing kind {spec.kind!r}")


def full_scores(spec: RoutingSpec, logits: Tensor) -> Tensor:
    """The full router's per-expert scores (the family's own scoring, no exclusion). [T, E] fp32

    Softmax for the softmax-routed families (GPT-OSS included: its softmax over all experts), sigmoid for
    DeepSeek-V3. Coverage and TCESS read these.
    """
    if spec.kind == "deepseek_v3":
        return logits.float().sigmoid()
    return torch.softmax(logits.float(), dim=-1)


def _mask(scores: Tensor, excluded: Tensor | None) -> Tensor:
    return scores if excluded is None else scores.masked_fill(excluded, NEG_INF)


def _softmax_topk(spec: RoutingSpec, router: RouterWeights, hidden: Tensor, excluded: Tensor | None) -> Routing:
    logits = F.linear(hidden, router.weight)  # [T, E]
    probs = torch.softmax(_mask(logits, excluded).float(), dim=-1)  # [T, E]
    top_v, top_i = torch.topk(probs, spec.top_k, dim=-1)  # [T, k]
    if spec.norm_topk:
        top_v /= top_v.sum(dim=-1, keepdim=True)
    if spec.cast_back:
        top_v = top_v.to(logits.dtype)
    return Routing(logits, top_v, top_i)


def _group_mask(spec: RoutingSpec, choice: Tensor) -> Tensor:
    """Bool [T, E]: experts in the `topk_group` best groups of each token, groups scored by `group_rule`."""
    grouped = choice.view(-1, spec.n_group, spec.group_size)  # [T, G, E/G]
    # DeepSeek-V2 scores a group by its best expert, V3 by its best two.
    group_scores = grouped.max(dim=-1).values if spec.group_rule == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, spec.n_group, spec.group_size).reshape(-1, spec.num_experts).bool()


def _deepseek_v2(spec: RoutingSpec, router: RouterWeights, hidden: Tensor, excluded: Tensor | None) -> Routing:
    logits = F.linear(hidden.float(), router.weight.float())  # [T, E]
    scores = _mask(logits, excluded).softmax(dim=-1, dtype=torch.float32)  # excluded -> exactly 0
    if spec.group_rule is not None:
        scores = scores.masked_fill(~_group_mask(spec, scores), 0.0)
    if excluded is not None:
        # A zero score could still win a top-k slot if a chosen group ran short; never an excluded expert.
        scores = scores.masked_fill(excluded, NEG_INF)
    top_v, top_i = torch.topk(scores, k=spec.top_k, dim=-1, sorted=False)
    return Routing(logits, top_v * spec.scaling, top_i)


def _deepseek_v3(spec: RoutingSpec, router: RouterWeights, hidden: Tensor, excluded: Tensor | None) -> Routing:
    logits = F.linear(hidden.float(), router.weight.float())  # [T, E]
    scores = logits.sigmoid()
    correction = router.correction if router.correction is not None else torch.zeros_like(scores[0])
    choice = _mask(scores + correction, excluded)  # bias-corrected, excluded at -inf
    choice = choice.masked_fill(~_group_mask(spec, choice), NEG_INF)
    top_i = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]
    top_v = scores.gather(1, top_i)
    if spec.norm_topk:
        top_v /= top_v.sum(dim=-1, keepdim=True) + 1e-20
    return Routing(logits, top_v * spec.scaling, top_i)


def _gpt_oss(spec: RoutingSpec, router: RouterWeights, hidden: Tensor, excluded: Tensor | None) -> Routing:
    logits = F.linear(hidden, router.weight, router.bias)  # [T, E]
    top_v, top_i = torch.topk(_mask(logits, excluded), spec.top_k, dim=-1)
    return Routing(logits, torch.softmax(top_v, dim=1, dtype=top_v.dtype), top_i)
