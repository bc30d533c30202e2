"""The routing of the MoE families: the spec read off a config, the rules a kept set must meet, and the routing
functions, with experts outside a pattern excluded before any top-k.

Each function repeats the operations of the family's transformers router in the same order, so that with
nothing excluded the result is bit-for-bit the router's own. Exclusion happens on the scores that
selection reads (before group scoring too), which equals running a checkpoint from which the excluded
experts were cut out. A new routing kind is its name in `RoutingKind`, its function and its line in `_KINDS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModel

NEG_INF = float("-inf")
RoutingKind = Literal["softmax_topk", "deepseek_v2", "deepseek_v3", "gpt_oss"]
GroupRule = Literal["max", "top2_sum"]


@dataclass(frozen=True)
class RoutingSpec:
    """The routing function of one model, read off its config, and the rules a layer's kept experts must meet.

    Attributes:
        kind: Which routing function runs (a key of `_KINDS`).
        num_experts: Routed experts per MoE layer (E).
        top_k: Experts chosen per token.
        norm_topk: Renormalise the chosen weights to sum to one.
        cast_back: Cast the chosen weights back to the logits' dtype (Qwen, OLMoE) or keep fp32 (Mixtral).
        n_group: Expert groups for group-limited selection (1 when there is none).
        topk_group: Groups a token may choose experts from.
        group_rule: How a group is scored: its best expert (`max`) or its best two summed (`top2_sum`); None
            when routing is not group-limited.
        scaling: `routed_scaling_factor` applied to the chosen weights.
    """

    kind: RoutingKind
    num_experts: int
    top_k: int
    norm_topk: bool = False
    cast_back: bool = True
    n_group: int = 1
    topk_group: int = 1
    group_rule: GroupRule | None = None
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise UnsupportedModel(f"unknown routing kind {self.kind!r} (known: {', '.join(_KINDS)})", field="kind")
        if self.num_experts % self.groups:
            raise UnsupportedModel(
                f"{self.num_experts} experts do not split into {self.groups} equal groups", field="n_group"
            )

    @property
    def groups(self) -> int:
        """Expert groups that routing picks among: `n_group` under group-limited routing, else 1."""
        return self.n_group if self.group_rule is not None else 1

    @property
    def group_size(self) -> int:
        return self.num_experts // self.groups

    @property
    def group_entry(self) -> int:
        """Kept experts a group needs so that routing scores it as the full model does: its best two under
        `top2_sum`, else one. A group keeps none of its experts or at least this many."""
        return 2 if self.group_rule == "top2_sum" else 1

    @property
    def min_experts(self) -> int:
        """The fewest experts a layer can keep and still route every token: top-k, and under group-limited
        routing `topk_group` groups holding enough experts each."""
        if self.group_rule is None:
            return self.top_k
        per_group = max(self.group_entry, math.ceil(self.top_k / self.topk_group))
        return max(self.top_k, self.topk_group * per_group)

    def group_counts(self, experts: Collection[int]) -> list[int]:
        """Kept experts per group (one count when routing is not group-limited)."""
        counts = [0] * self.groups
        for expert in experts:
            counts[expert // self.group_size] += 1
        return counts

    def unroutable(self, experts: Collection[int]) -> str | None:
        """Why a layer that keeps exactly `experts` (valid ids) could leave a token without a valid choice, or
        None when every token can be routed as the full model would among them."""
        if len(experts) < self.top_k:
            return f"keeps {len(experts)} experts, fewer than the {self.top_k} each token is routed to"
        if self.group_rule is None:
            return None
        counts = self.group_counts(experts)
        least = self.group_entry
        thin = [g for g, n in enumerate(counts) if 0 < n < least]
        if thin:
            return (
                f"groups {thin} keep fewer than {least} experts; group-limited routing scores a group by its best "
                f"{least}, so keep none or at least {least} per group"
            )
        usable = sorted(n for n in counts if n > 0)
        if len(usable) < self.topk_group:
            return f"keeps experts in {len(usable)} groups; routing picks {self.topk_group} groups per token"
        if sum(usable[: self.topk_group]) < self.top_k:
            return (
                f"the {self.topk_group} thinnest groups hold {sum(usable[: self.topk_group])} kept experts, "
                f"fewer than top-k {self.top_k}; a token routed there would have no valid choice"
            )
        return None

    def joining(self, kept: Collection[int], expert: int, order: Sequence[int]) -> list[int]:
        """The experts to add so that `expert` joins the routable set `kept`: `[expert]`, or with the next
        experts of its group in `order` when it enters a group that needs more (`group_entry`). Empty when
        no such addition leaves the set routable."""
        added = [expert]
        if self.group_rule is not None:
            group = expert // self.group_size
            present = sum(1 for e in kept if e // self.group_size == group)
            partners = [e for e in order if e // self.group_size == group and e != expert and e not in kept]
            added += partners[: max(0, self.group_entry - present - 1)]
        return added if self.unroutable([*kept, *added]) is None else []


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
            raise UnsupportedModel(
                f"router {type(router).__name__} has no weight tensor; no adapter covers this router",
                field="weight",
            )
        return cls(weight, tensor("bias"), tensor("e_score_correction_bias"))


def route(spec: RoutingSpec, router: RouterWeights, hidden: Tensor, excluded: Tensor | None) -> Routing:
    """Run the family's routing for `hidden` [T, H] with `excluded` [E] (bool) experts never chosen."""
    return _KINDS[spec.kind].route(spec, router, hidden, excluded)


def full_scores(spec: RoutingSpec, logits: Tensor) -> Tensor:
    """The full router's per-expert scores (the family's own scoring, no exclusion). [..., E] fp32

    Softmax for the softmax-routed families (GPT-OSS included: its softmax over all experts), sigmoid for
    DeepSeek-V3. Coverage and TCESS read these.
    """
    return _KINDS[spec.kind].scores(logits.float())


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
    grouped = choice.view(-1, spec.groups, spec.group_size)  # [T, G, E/G]
    # DeepSeek-V2 scores a group by its best expert, V3 by its best two.
    group_scores = grouped.max(dim=-1).values if spec.group_rule == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, spec.groups, spec.group_size).reshape(-1, spec.num_experts).bool()


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


@dataclass(frozen=True)
class _Kind:
    """A routing kind: its routing function and the full router's scoring (what coverage and TCESS read)."""

    route: Callable[[RoutingSpec, RouterWeights, Tensor, Tensor | None], Routing]
    scores: Callable[[Tensor], Tensor]


def _softmax(logits: Tensor) -> Tensor:
    return torch.softmax(logits, dim=-1)


_KINDS: dict[str, _Kind] = {
    "softmax_topk": _Kind(_softmax_topk, _softmax),
    "deepseek_v2": _Kind(_deepseek_v2, _softmax),
    "deepseek_v3": _Kind(_deepseek_v3, torch.sigmoid),
    "gpt_oss": _Kind(_gpt_oss, _softmax),
}
