"""The expert-importance criteria, each declared once: what it adds up over demo tokens and how its score reads.

The profiler's statistics, the profile file, task registration, evaluation and the command line all take the
criteria's names from `CRITERIA` here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerTokens:
    """What one forward pass saw in one MoE layer over the real (non-pad) demo tokens, N of them.

    Attributes:
        probs: Full router scores p_t (the family's own scoring). [N, E] fp32
        chosen: Chosen experts K_t. [N, k]
        weights: Their routing weights g_t,e. [N, k] fp32
        norms: Their output norms ||E_e(x_t)||. [N, k] fp32
        contribution: EASY-EP's token contribution s_t = max(0, 1 - cos(x_t, x_t + sum_e g_t,e E_e(x_t))). [N]
        tcess_threshold: PreMoe's r: probabilities below it do not count towards TCESS.
    """

    probs: Tensor
    chosen: Tensor
    weights: Tensor
    norms: Tensor
    contribution: Tensor
    tcess_threshold: float = 0.0

    def per_expert(self, values: Tensor) -> Tensor:
        """Sum `values` [N, k] of the chosen experts into one number per expert. [E]"""
        zeros = torch.zeros(self.probs.shape[-1], device=values.device, dtype=values.dtype)
        return zeros.index_add_(0, self.chosen.reshape(-1), values.reshape(-1))


@dataclass(frozen=True)
class Criterion:
    """One criterion: a running sum per expert over demo tokens, and the score matrix row read off the sums.

    Attributes:
        name: The name in profiles, selections, the API and the command line.
        summary: One line for help texts.
        add: This pass's contribution to the criterion's running sum. [E]
        score: The score row from the running sums of all criteria (by name) and the demo token count. [E]
    """

    name: str
    summary: str
    add: Callable[[LayerTokens], Tensor]
    score: Callable[[Mapping[str, Tensor], int], Tensor]


def _reap(sums: Mapping[str, Tensor], tokens: int) -> Tensor:
    routed = sums["frequency"]  # tokens routed to each expert
    return torch.where(routed > 0, sums["reap"] / routed.clamp_min(1), torch.zeros_like(routed))


REGISTRY: tuple[Criterion, ...] = (
    Criterion(
        "frequency",
        "share of demo tokens routed to the expert",
        lambda t: t.per_expert(torch.ones_like(t.weights)),
        lambda sums, tokens: sums["frequency"] / tokens,
    ),
    Criterion(
        "tcess",
        "PreMoe: mean full-router probability of the expert (probabilities >= r)",
        lambda t: (t.probs * (t.probs >= t.tcess_threshold)).sum(dim=0),
        lambda sums, tokens: sums["tcess"] / tokens,
    ),
    Criterion(
        "easyep",
        "EASY-EP: routing weight x output norm, weighted by the token's contribution",
        lambda t: t.per_expert(t.contribution.unsqueeze(-1) * t.weights * t.norms),
        lambda sums, tokens: sums["easyep"],
    ),
    Criterion(
        "reap",
        "REAP: mean routing weight x output norm over the tokens routed to the expert",
        lambda t: t.per_expert(t.weights * t.norms),
        _reap,
    ),
)
CRITERIA: tuple[str, ...] = tuple(c.name for c in REGISTRY)
# What `premoe eval` on the reference model measured best (docs/evaluation.md).
DEFAULT_CRITERION = "easyep"
