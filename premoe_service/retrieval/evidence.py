"""Router evidence: each task's demo router signals and the off-topic background, scored against a prompt's."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import InvalidArgument
from ..profiler.profile import Profile
from ..runtime.router_signal import RouterFeatures, RouterSignal
from .scoring import DEFAULT_TOP_M

NONE_CLASS = "(none)"


@dataclasses.dataclass(frozen=True)
class PromptEvidence:
    """What the router signal says about one prompt.

    Attributes:
        inputs: Per candidate task, the mean of its `top_m` best cosines between the prompt's router input and
            its demos' (the router-input score).
        distribution: Per candidate task, the cosine between the prompt's router distribution and the task's
            router signature (its demos' distributions averaged).
        none_similarity: The prompt's embedding score against the background set (top-m mean), or None
            without a background.
        none_inputs: The router-input score against the background set, or None without one.
        none_distribution: The distribution cosine against the background's signature, or None without one.
    """

    inputs: dict[str, float]
    distribution: dict[str, float]
    none_similarity: float | None = None
    none_inputs: float | None = None
    none_distribution: float | None = None


class RouterEvidence:
    """The router signals a registry routes with: per task its demos', and an off-topic background set's.

    Args:
        signal: Computes router signals (for prompts, for demos a profile lacks, for the background).
        top_m: Demos averaged in the router-input score, as in the embedding score.
    """

    def __init__(self, signal: RouterSignal, top_m: int = DEFAULT_TOP_M) -> None:
        if top_m < 1:
            raise InvalidArgument(f"top_m must be at least 1, got {top_m}", field="top_m")
        self.signal = signal
        self.top_m = top_m
        self._inputs: dict[str, np.ndarray] = {}  # task -> unit rows [n, H]
        self._scores: dict[str, np.ndarray] = {}  # task -> its demos' distributions [n, E]
        self._signatures: dict[str, np.ndarray] = {}  # task -> its router signature, a unit vector [E]
        self._background: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # embeddings, inputs, scores
        self._lock = threading.Lock()
        # The router pass of a prompt runs here while the caller embeds it: the two overlap.
        self._passes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="router-signal")

    def begin(self, prompt: str) -> Future[RouterFeatures]:
        """Start the router pass of `prompt` beside the caller; `.result()` is its `RouterFeatures`."""
        return self._passes.submit(self.signal.features, [prompt])

    def prepare(self, profile: Profile) -> Profile:
        """The profile with a router signal from this model's first MoE layer: its own, or computed from its demos.

        Raises:
            InvalidArgument: The profile has no router signal for this layer and no demos to compute it from.
        """
        scores, inputs = profile.router_scores, profile.router_inputs
        if (
            scores is not None
            and inputs is not None
            and profile.router_layer == self.signal.layer
            and scores.shape[1] == self.signal.num_experts
            and inputs.shape[1] == self.signal.hidden
        ):
            return profile
        if not profile.route_texts:
            raise InvalidArgument(
                f"task {profile.name!r} has no router signal for layer {self.signal.layer} and no demos to compute "
                "it from: profile the task again with `premoe profile`",
                field="router_scores",
            )
        return dataclasses.replace(profile, **self.signal.profile_fields(profile.route_texts))

    def add(self, profile: Profile) -> None:
        """Index a prepared profile's router signal (replacing the task's previous one)."""
        if profile.router_scores is None or profile.router_inputs is None:
            raise InvalidArgument(f"task {profile.name!r} has no router signal: prepare it first", field="profile")
        inputs = _unit(profile.router_inputs.float().numpy())
        with self._lock:
            self._inputs[profile.name] = inputs
            self._scores[profile.name] = profile.router_scores.float().numpy()
            self._signatures[profile.name] = _signature(self._scores[profile.name])

    def remove(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                self._inputs.pop(name, None)
                self._scores.pop(name, None)
                self._signatures.pop(name, None)

    def set_background(self, embeddings: np.ndarray, features: RouterFeatures) -> None:
        """The off-topic background: its prompts' embeddings [b, d] (normalised) and router signals."""
        if embeddings.shape[0] != features.inputs.shape[0] or embeddings.shape[0] == 0:
            raise InvalidArgument(
                "the background needs one embedding and one router signal per prompt", field="background"
            )
        with self._lock:
            self._background = (embeddings.astype(np.float32), _unit(features.inputs), features.scores.copy())

    def clear_background(self) -> None:
        with self._lock:
            self._background = None

    @property
    def has_background(self) -> bool:
        return self._background is not None

    @property
    def background_size(self) -> int:
        return 0 if self._background is None else self._background[0].shape[0]

    def score(
        self,
        query: np.ndarray,
        features: RouterFeatures,
        tasks: Sequence[str],
        *,
        leave_out: tuple[str, int] | None = None,
        leave_out_background: int | None = None,
    ) -> PromptEvidence:
        """The evidence for one prompt (embedding `query` [d], `features` of one row) about `tasks`.

        `leave_out` (task, demo index) and `leave_out_background` (a background row) drop one item from the
        comparison: calibration scores each demo and background prompt against the others.
        """
        prompt_inputs = _unit(features.inputs[:1])[0]  # [H]
        prompt_scores = _unit(features.scores[:1])[0]  # [E]
        inputs: dict[str, float] = {}
        distribution: dict[str, float] = {}
        with self._lock:
            for task in tasks:
                demo_inputs, signature = self._inputs.get(task), self._signatures.get(task)
                if demo_inputs is None or signature is None:
                    continue
                if leave_out is not None and leave_out[0] == task and demo_inputs.shape[0] > 1:
                    demo_inputs = np.delete(demo_inputs, leave_out[1], axis=0)
                    signature = _signature(np.delete(self._scores[task], leave_out[1], axis=0))
                inputs[task] = _top_mean(demo_inputs @ prompt_inputs, self.top_m)
                distribution[task] = float(signature @ prompt_scores)
            background = self._background
        if background is None:
            return PromptEvidence(inputs, distribution)
        embeddings, bg_inputs, bg_scores = background
        if leave_out_background is not None:
            keep = np.arange(embeddings.shape[0]) != leave_out_background
            embeddings, bg_inputs, bg_scores = embeddings[keep], bg_inputs[keep], bg_scores[keep]
        return PromptEvidence(
            inputs,
            distribution,
            none_similarity=_top_mean(embeddings @ query.astype(np.float32), self.top_m),
            none_inputs=_top_mean(bg_inputs @ prompt_inputs, self.top_m),
            none_distribution=float(_signature(bg_scores) @ prompt_scores),
        )

    def background(self) -> tuple[np.ndarray, RouterFeatures] | None:
        """The background's embeddings and router signals (inputs normalised), or None."""
        with self._lock:
            if self._background is None:
                return None
            embeddings, inputs, scores = self._background
        return embeddings, RouterFeatures(scores, inputs)


def _signature(scores: np.ndarray) -> np.ndarray:
    """A set's router signature: its distributions averaged, as a unit vector. [E]"""
    return _unit(scores.mean(axis=0, keepdims=True))[0]


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def _top_mean(similarities: np.ndarray, m: int) -> float:
    m = min(m, similarities.shape[0])
    return float(np.partition(similarities, -m)[-m:].sum() / m)
