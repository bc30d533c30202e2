"""A profile's demo vectors for one embedder: the stored ones when that embedder made them, else its demos
embedded again (the profile then carries the new vectors)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..errors import InvalidArgument
from ..profiler.profile import Profile
from .embedder import Embedder


def demo_vectors(profile: Profile, embedder: Embedder) -> tuple[Profile, np.ndarray]:
    """The profile (with `embedder`'s demo embeddings) and those vectors. [n, dim]"""
    stored = profile.demo_embeddings
    if (
        stored is not None
        and profile.embedder == embedder.name
        and stored.ndim == 2
        and stored.shape[0] > 0
        and stored.shape[1] == embedder.dim
    ):
        return profile, stored.detach().cpu().float().numpy()
    if not profile.route_texts:
        raise InvalidArgument(
            f"task {profile.name!r} has no demos to embed with {embedder.name} "
            f"(its embeddings are from {profile.embedder or 'no embedder'!r})",
            field="demos",
        )
    vectors = embedder.encode(profile.route_texts)  # [n, dim]: demos, then examples
    embedded = dataclasses.replace(profile, demo_embeddings=torch.from_numpy(vectors), embedder=embedder.name)
    return embedded, vectors
