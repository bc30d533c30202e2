"""The profile file: one safetensors file per task with its expert scores, demo embeddings and provenance."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import DataCorruption, FailedPrecondition, InvalidArgument
from ..fsutil import atomic_write_bytes
from ..names import check_task_name
from .criteria import CRITERIA

# Format 2 adds the router signal (`router_scores`, `router_inputs`, `router_layer`). Format 1 files are read
# (migrated) as profiles without it: a registry with a router signal computes it from the demos.
PROFILE_FORMAT = 2
READABLE_FORMATS = ("1", "2")
_SCORE_PREFIX = "scores."
_CHANNEL_PREFIX = "channels."  # optional (absent from profiles made before channel scores): readers go on without
_EMBEDDINGS = "demo_embeddings"
_ROUTER_SCORES = "router.scores"
_ROUTER_INPUTS = "router.inputs"


@dataclass
class Profile:
    """What the profiler learned about one task.

    Attributes:
        name: Task name (`^[a-z0-9][a-z0-9_.-]{0,63}$`).
        description: Free text shown to operators.
        fingerprint: The store fingerprint of the model the scores belong to.
        moe_layers: Decoder-layer indices of the score rows.
        scores: Criterion (a name in `CRITERIA`) -> score matrix. [L, E] fp32
        channels: Channel criterion (a name in `CHANNEL_CRITERIA`) -> score per intermediate channel of every
            expert (`profiler.channels`); empty for profiles made without them. [L, E, I] fp32
        demo_embeddings: One normalised vector per demo, then per example (`route_texts`), or None when no
            embedder was given. [n, d] fp32
        embedder: Name of the embedding model that made `demo_embeddings`.
        demo_hash: SHA-256 of the demos as given.
        token_count: Demo tokens the scores were computed over.
        selection: How the task's pattern is derived from the scores (criterion, policy, value).
        created: ISO-8601 creation time (UTC).
        demos: The demo texts themselves, so a registry can re-embed with another embedder.
        examples: Prompts written the way users send them for this task, for retrieval only: they are embedded
            and get a router signal beside the demos, but score no expert (`premoe profile --examples`).
        router_scores: Each demo's router distribution at the first MoE layer (see
            `runtime.router_signal`), or None. [n, E] fp32
        router_inputs: Each demo's mean router input at that layer, or None. [n, H] fp32
        router_layer: The decoder layer the router signal was read at, or None.
    """

    name: str
    fingerprint: str
    moe_layers: tuple[int, ...]
    scores: dict[str, torch.Tensor]
    channels: dict[str, torch.Tensor] = field(default_factory=dict)
    description: str = ""
    demo_embeddings: torch.Tensor | None = None
    embedder: str = ""
    demo_hash: str = ""
    token_count: int = 0
    selection: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    demos: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    router_scores: torch.Tensor | None = None
    router_inputs: torch.Tensor | None = None
    router_layer: int | None = None

    @property
    def route_texts(self) -> list[str]:
        """What retrieval indexes, one row each in the embeddings and the router signal: demos, then examples."""
        return [*self.demos, *self.examples]

    @property
    def router_signature(self) -> torch.Tensor | None:
        """The task's router signature: its demos' router distributions averaged. [E] fp32"""
        return None if self.router_scores is None else self.router_scores.float().mean(dim=0)

    def __post_init__(self) -> None:
        check_task_name(self.name)
        for criterion, matrix in self.scores.items():
            if matrix.ndim != 2 or matrix.shape[0] != len(self.moe_layers):
                raise InvalidArgument(
                    f"score matrix of shape {tuple(matrix.shape)} does not match {len(self.moe_layers)} MoE layers",
                    field=f"scores.{criterion}",
                )
        for criterion, matrix in self.channels.items():
            if matrix.ndim != 3 or matrix.shape[0] != len(self.moe_layers):
                raise InvalidArgument(
                    f"channel scores of shape {tuple(matrix.shape)} are not [{len(self.moe_layers)}, E, I]",
                    field=f"channels.{criterion}",
                )

    def to_bytes(self) -> bytes:
        tensors = {f"{_SCORE_PREFIX}{c}": m.detach().float().contiguous().cpu() for c, m in self.scores.items()}
        for criterion, matrix in self.channels.items():
            tensors[f"{_CHANNEL_PREFIX}{criterion}"] = matrix.detach().float().contiguous().cpu()
        if self.demo_embeddings is not None:
            tensors[_EMBEDDINGS] = self.demo_embeddings.detach().float().contiguous().cpu()
        for key, value in ((_ROUTER_SCORES, self.router_scores), (_ROUTER_INPUTS, self.router_inputs)):
            if value is not None:
                tensors[key] = value.detach().float().contiguous().cpu()
        metadata = {
            "format_version": str(PROFILE_FORMAT),
            "name": self.name,
            "description": self.description,
            "fingerprint": self.fingerprint,
            "moe_layers": json.dumps(list(self.moe_layers)),
            "embedder": self.embedder,
            "demo_hash": self.demo_hash,
            "token_count": str(self.token_count),
            "selection": json.dumps(self.selection),
            "created": self.created,
            "demos": json.dumps(self.demos),
            "examples": json.dumps(self.examples),
            "router_layer": json.dumps(self.router_layer),
        }
        return st_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "profile", fingerprint: str | None = None) -> Profile:
        """Parse a profile file; refuses damaged files, other format versions and (if given) other models."""
        try:
            tensors = st_load(data)
            metadata = _read_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
            raise DataCorruption(f"{source} is not a readable profile file: {exc}", field=source) from exc
        version = metadata.get("format_version")
        if version not in READABLE_FORMATS:
            raise FailedPrecondition(
                f"{source} has profile format {version!r}; this build reads formats {', '.join(READABLE_FORMATS)}: "
                "profile the task again with `premoe profile` (or `make profiles` for the shipped ones)",
                field=source,
            )
        if fingerprint is not None and metadata.get("fingerprint") != fingerprint:
            raise FailedPrecondition(
                f"{source} was made for model fingerprint {metadata.get('fingerprint')!r}, not {fingerprint!r}; "
                "profile the task again on this model",
                field=source,
            )
        try:
            profile = cls(
                name=metadata["name"],
                description=metadata.get("description", ""),
                fingerprint=metadata["fingerprint"],
                moe_layers=tuple(json.loads(metadata["moe_layers"])),
                scores={k[len(_SCORE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_SCORE_PREFIX)},
                channels={k[len(_CHANNEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_CHANNEL_PREFIX)},
                demo_embeddings=tensors.get(_EMBEDDINGS),
                embedder=metadata.get("embedder", ""),
                demo_hash=metadata.get("demo_hash", ""),
                token_count=int(metadata.get("token_count", "0")),
                selection=json.loads(metadata.get("selection", "{}")),
                created=metadata.get("created", ""),
                demos=json.loads(metadata.get("demos", "[]")),
                examples=json.loads(metadata.get("examples", "[]")),
                router_scores=tensors.get(_ROUTER_SCORES),
                router_inputs=tensors.get(_ROUTER_INPUTS),
                router_layer=json.loads(metadata.get("router_layer", "null")),
            )
        except (KeyError, ValueError, TypeError, AttributeError, InvalidArgument) as exc:
            raise DataCorruption(f"{source} has incomplete or invalid metadata: {exc}", field=source) from exc
        _check_parts(profile, source)
        return profile

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader sees the old file or the new one."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str | None = None) -> Profile:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            from ..errors import NotFound

            raise NotFound(f"no profile file at {path}", field=str(path)) from exc
        except OSError as exc:  # a folder in its place, an I/O error: unreadable, as a damaged file is
            raise DataCorruption(f"cannot read {path}: {exc.strerror or exc}", field=str(path)) from exc
        return cls.from_bytes(data, source=str(path), fingerprint=fingerprint)

    def score(self, criterion: str) -> torch.Tensor:
        """The score matrix of one criterion. [L, E]"""
        if criterion not in CRITERIA:
            raise InvalidArgument(f"unknown criterion {criterion!r} (use {', '.join(CRITERIA)})", field="criterion")
        if criterion not in self.scores:
            raise InvalidArgument(
                f"profile {self.name!r} has no {criterion!r} scores (has {sorted(self.scores)})",
                field="criterion",
            )
        return self.scores[criterion]

    def channel_score(self, criterion: str) -> torch.Tensor:
        """The channel scores of one channel criterion. [L, E, I]"""
        from .channels import CHANNEL_CRITERIA

        if criterion not in CHANNEL_CRITERIA:
            raise InvalidArgument(
                f"unknown channel criterion {criterion!r} (use {', '.join(CHANNEL_CRITERIA)})",
                field="channel_criterion",
            )
        if criterion not in self.channels:
            raise FailedPrecondition(
                f"profile {self.name!r} has no channel scores: profile the task again with `premoe profile`",
                field="channel_criterion",
            )
        return self.channels[criterion]


def _check_parts(profile: Profile, source: str) -> None:
    """Types a damaged (or hand-edited) file could get wrong, refused here rather than deep in a request."""
    problems = []
    if not all(isinstance(layer, int) for layer in profile.moe_layers):
        problems.append("moe_layers are not integers")
    if not isinstance(profile.demos, list) or not all(isinstance(d, str) for d in profile.demos):
        problems.append("demos are not a list of strings")
    if not isinstance(profile.examples, list) or not all(isinstance(d, str) for d in profile.examples):
        problems.append("examples are not a list of strings")
    if not isinstance(profile.selection, dict):
        problems.append("selection is not an object")
    if not all(m.is_floating_point() for m in profile.scores.values()):
        problems.append("scores are not floating point")
    if not all(m.is_floating_point() for m in profile.channels.values()):
        problems.append("channel scores are not floating point")
    embeddings = profile.demo_embeddings
    if embeddings is not None and (embeddings.ndim != 2 or not embeddings.is_floating_point()):
        problems.append("demo_embeddings are not a float matrix")
    problems += _router_problems(profile)
    if problems:
        raise DataCorruption(f"{source} is not a valid profile: {'; '.join(problems)}", field=source)


def _router_problems(profile: Profile) -> list[str]:
    scores, inputs, layer = profile.router_scores, profile.router_inputs, profile.router_layer
    if scores is None and inputs is None:
        return []
    if scores is None or inputs is None or not isinstance(layer, int):
        return ["router signal is incomplete (router.scores, router.inputs and router_layer go together)"]
    if scores.ndim != 2 or inputs.ndim != 2 or scores.shape[0] != inputs.shape[0] or scores.shape[0] == 0:
        return ["router.scores and router.inputs are not matrices with one row per demo"]
    if not scores.is_floating_point() or not inputs.is_floating_point():
        return ["router signal is not floating point"]
    return []


def _read_metadata(data: bytes) -> Mapping[str, str]:
    # safetensors layout: 8-byte little-endian header length, then the JSON header with "__metadata__".
    if len(data) < 8:
        raise ValueError("file is shorter than a safetensors header")
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("the safetensors header has no metadata object")
    return metadata
