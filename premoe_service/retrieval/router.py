"""Routing: a prompt's ranked tasks, the match decision against thresholds, and the fallback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import InvalidArgument
from .decision import RouteDecision, RoutePolicy, decide, decide_combined
from .embedder import Embedder
from .index import TaskIndex
from .scoring import task_scores

if TYPE_CHECKING:
    from ..runtime.router_signal import RouterFeatures
    from .evidence import RouterEvidence


class SupportsRoute(Protocol):
    """Anything that routes a prompt: a `Router` or a `Registry`."""

    def route(self, prompt: str) -> RouteDecision: ...


class CheckedPrompt(str):
    """A prompt's text that `check_prompt` passed (a string, not blank): what a door hands on, and what serving and
    routing take as it is, without checking it again."""

    __slots__ = ()


def check_prompt(prompt: object, field: str = "prompt") -> CheckedPrompt:
    """`prompt` as a `CheckedPrompt` if it is a non-blank string, else `InvalidArgument` naming `field`. This is the
    one check of a prompt's text: a door calls it; a `CheckedPrompt` passes as it is (checked where it came in)."""
    if isinstance(prompt, CheckedPrompt):
        return prompt
    if not isinstance(prompt, str):
        raise InvalidArgument(f"expected a string, got {type(prompt).__name__}", field=field)
    if not prompt or prompt.isspace():  # no copy of a long prompt
        raise InvalidArgument("the prompt is empty; give the text to route", field=field)
    return CheckedPrompt(prompt)


class Router:
    """Embeds prompts, searches the task index and decides: the stateless core of routing.

    The router holds no lock: `Registry` serialises index changes against searches. Use a bare
    router only where nothing changes the index concurrently.

    Args:
        embedder: Encodes prompts; must be the embedder that made the index's vectors.
        index: Demo vectors of the registered tasks.
        policy: Thresholds and fallback.
    """

    def __init__(self, embedder: Embedder, index: TaskIndex, policy: RoutePolicy | None = None) -> None:
        if embedder.dim != index.dim:
            raise InvalidArgument(
                f"embedder {embedder.name} makes {embedder.dim}-d vectors, the index holds {index.dim}-d",
                field="embedder",
            )
        self.embedder = embedder
        self.index = index
        self.policy = policy or RoutePolicy()

    def route(self, prompt: str) -> RouteDecision:
        """Route one prompt (embed, search, score, decide)."""
        return self.route_many([prompt])[0]

    def route_many(self, prompts: Sequence[str]) -> list[RouteDecision]:
        """Route several prompts with one embedding batch and one search."""
        for i, prompt in enumerate(prompts):
            check_prompt(prompt, field="prompt" if len(prompts) == 1 else f"prompts[{i}]")
        return self.decide_embedded(self.embedder.encode(list(prompts)))

    def decide_embedded(
        self, queries: np.ndarray, features: RouterFeatures | None = None, evidence: RouterEvidence | None = None
    ) -> list[RouteDecision]:
        """Search, score and decide for embedded prompts. queries: [q, dim] normalised

        With `features` (the prompts' router signals, one row each) and `evidence`, the decision combines both
        signals (`decision.decide_combined`); without, it is the embedding's alone.
        """
        hits = self.index.search(queries, self.policy.neighbours)
        ranked = [task_scores(h, self.index.demo_count, self.policy.top_m) for h in hits]
        if features is None or evidence is None:
            return [decide(r, self.policy) for r in ranked]
        decisions = []
        for i, shortlist in enumerate(ranked):
            row = type(features)(features.scores[i : i + 1], features.inputs[i : i + 1])
            found = evidence.score(queries[i], row, [task for task, _ in shortlist])
            decisions.append(decide_combined(shortlist, found, self.policy))
        return decisions
