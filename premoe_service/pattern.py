"""A pattern: per MoE layer, the sorted ids of the routed experts a task keeps, at which precision, and, for experts
held in part (a channel plan, docs/atomic-experts.md), which of their intermediate channels."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidArgument, PatternError
from .families import MoESpec, RoutingSpec

PATTERN_FORMAT = 1
FULL = "full"  # the store's own precision
PRECISION_ORDER: tuple[str, ...] = ("int2", "int3", "int4", "int8", "bf16", FULL)  # lowest to highest


@dataclass(frozen=True)
class Pattern:
    """Kept experts per MoE layer. Build with `Pattern.build` (validated) or `Pattern.full`.

    Attributes:
        layers: MoE decoder-layer index -> ascending kept expert ids.
        precisions: Layer -> expert -> precision (`bf16`, `int8`, `int4`, `int3`, `int2`) of kept experts held
            below full precision; a kept expert not named here is at full precision.
        channels: Layer -> expert -> ascending ids of the intermediate channels a kept expert holds, for experts
            held in part (served from channel slots, `runtime.channel_slots`); a kept expert not named here holds
            all of its channels.
    """

    layers: Mapping[int, tuple[int, ...]]
    precisions: Mapping[int, Mapping[int, str]] = field(default_factory=dict)
    channels: Mapping[int, Mapping[int, tuple[int, ...]]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        spec: MoESpec,
        layers: Mapping[int, Iterable[int]],
        precisions: Mapping[int, Mapping[int, str]] | None = None,
        channels: Mapping[int, Mapping[int, Iterable[int]]] | None = None,
    ) -> Pattern:
        """A validated pattern for a model of `spec`; raises `PatternError` naming the layer at fault."""
        kept: dict[int, tuple[int, ...]] = {}
        for layer, experts in layers.items():
            ids = [int(e) for e in experts]
            if len(set(ids)) != len(ids):
                raise PatternError("expert ids repeat", field=f"layer {layer}")
            kept[int(layer)] = tuple(sorted(ids))
        lowered = {
            int(layer): {int(e): p for e, p in sorted(by_expert.items()) if p != FULL}
            for layer, by_expert in sorted((precisions or {}).items())
        }
        cut = {
            int(layer): {int(e): tuple(int(c) for c in ids) for e, ids in sorted(by_expert.items())}
            for layer, by_expert in sorted((channels or {}).items())
        }
        pattern = cls(
            dict(sorted(kept.items())),
            {layer: m for layer, m in lowered.items() if m},
            {layer: m for layer, m in cut.items() if m},
        )
        pattern.validate(spec)
        return pattern

    @classmethod
    def full(cls, spec: MoESpec) -> Pattern:
        """Every routed expert of every MoE layer."""
        return cls({layer: tuple(range(spec.num_experts)) for layer in spec.moe_layers})

    def validate(self, spec: MoESpec) -> None:
        """Check the pattern against a model: layers, id range, top-k, group routing."""
        moe_layers = set(spec.moe_layers)
        for layer in self.layers:
            if layer not in moe_layers:
                raise PatternError(
                    f"not an MoE layer of this model (MoE layers: {sorted(moe_layers)})",
                    field=f"layer {layer}",
                )
        for layer in spec.moe_layers:
            experts = self.layers.get(layer)
            if experts is None:
                raise PatternError(
                    "missing: a pattern names the kept experts of every MoE layer", field=f"layer {layer}"
                )
            _validate_layer(spec.routing, layer, experts)
        for layer, by_expert in self.precisions.items():
            kept = set(self.layers.get(layer, ()))
            for expert, precision in by_expert.items():
                if precision not in PRECISION_ORDER:
                    raise PatternError(
                        f"expert {expert} has unknown precision {precision!r} (use {', '.join(PRECISION_ORDER)})",
                        field=f"layer {layer}",
                    )
                if expert not in kept:
                    raise PatternError(f"expert {expert} has a precision but is not kept", field=f"layer {layer}")
        for layer, cut in self.channels.items():
            if layer not in self.layers:
                raise PatternError("not an MoE layer of the pattern", field=f"channels.{layer}")
            kept = set(self.layers[layer])
            for expert, ids in cut.items():
                where = f"channels.{layer}.{expert}"
                if expert not in kept:
                    raise PatternError("channels of an expert the pattern does not keep in this layer", field=where)
                if not ids or ids[0] < 0 or any(a >= b for a, b in pairwise(ids)):
                    raise PatternError("channel ids must be ascending distinct non-negative integers", field=where)

    def precision(self, layer: int, expert: int) -> str:
        """The precision a kept expert is held at (`full` unless the pattern lowers it)."""
        return self.precisions.get(layer, {}).get(expert, FULL)

    def channel_ids(self, layer: int, expert: int) -> tuple[int, ...] | None:
        """The channels a kept expert holds, or None when it holds all of them."""
        return self.channels.get(layer, {}).get(expert)

    @property
    def sliced(self) -> bool:
        """Whether any kept expert holds only some of its channels."""
        return any(self.channels.values())

    @property
    def mixed(self) -> bool:
        """Whether any kept expert is held below full precision."""
        return any(self.precisions.values())

    def kept(self, layer: int) -> tuple[int, ...]:
        return self.layers[layer]

    def precision_counts(self) -> dict[str, int]:
        """Precision -> kept experts held at it, over all layers (`full` included when any is)."""
        counts: dict[str, int] = {}
        for layer, experts in self.layers.items():
            for expert in experts:
                precision = self.precision(layer, expert)
                counts[precision] = counts.get(precision, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -PRECISION_ORDER.index(item[0])))  # full first

    @property
    def size(self) -> int:
        """Kept experts over all layers."""
        return sum(len(experts) for experts in self.layers.values())

    def excluded(self, layer: int, num_experts: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool [E]: True for the experts of `layer` outside the pattern."""
        mask = torch.ones(num_experts, dtype=torch.bool, device=device)
        mask[list(self.layers[layer])] = False
        return mask

    def union(self, other: Pattern) -> Pattern:
        """The experts either keeps, each at the higher of the two precisions; an expert held in part by both holds
        the union of their channels, one held whole by either is held whole."""
        layers = {
            layer: tuple(sorted(set(self.layers[layer]) | set(other.layers.get(layer, ())))) for layer in self.layers
        }
        channels: dict[int, dict[int, tuple[int, ...]]] = {}
        if self.sliced or other.sliced:
            for layer, kept in layers.items():
                for e in kept:
                    held = [p.channel_ids(layer, e) for p in (self, other) if e in p.layers.get(layer, ())]
                    if all(ids is not None for ids in held):
                        channels.setdefault(layer, {})[e] = tuple(sorted(set().union(*held)))  # type: ignore[arg-type]
        if not (self.mixed or other.mixed):
            return Pattern(layers, {}, channels)
        rank = PRECISION_ORDER.index  # an expert both keep is held at the higher of the two precisions
        precisions = {
            layer: {
                e: max((p.precision(layer, e) for p in (self, other) if e in p.layers.get(layer, ())), key=rank)
                for e in kept
            }
            for layer, kept in layers.items()
        }
        lowered = {k: {e: p for e, p in v.items() if p != FULL} for k, v in precisions.items()}
        return Pattern(layers, {k: v for k, v in lowered.items() if v}, channels)

    # --- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": PATTERN_FORMAT,
            "layers": {str(layer): list(e) for layer, e in self.layers.items()},
        }
        if self.mixed:
            data["precisions"] = {
                str(layer): {str(e): p for e, p in by_expert.items()} for layer, by_expert in self.precisions.items()
            }
        if self.sliced:
            data["channels"] = {
                str(layer): {str(e): list(ids) for e, ids in by_expert.items()}
                for layer, by_expert in self.channels.items()
            }
        return data

    @classmethod
    def from_json(cls, spec: MoESpec, data: Any) -> Pattern:
        """Parse and validate `{"format": 1, "layers": {"<layer>": [ids...]}}`, with optional
        `"precisions": {"<layer>": {"<id>": "int4"}}` (kept experts it does not name are at full precision) and
        `"channels": {"<layer>": {"<id>": [channel ids]}}` (kept experts it does not name hold every channel)."""
        if not isinstance(data, dict):
            raise InvalidArgument("a pattern is a JSON object", field="pattern")
        if data.get("format") != PATTERN_FORMAT:
            raise InvalidArgument(f"unsupported pattern format {data.get('format')!r}", field="format")
        raw = data.get("layers")
        if not isinstance(raw, dict):
            raise InvalidArgument("'layers' must map layer indices to lists of expert ids", field="layers")
        layers: dict[int, list[int]] = {}
        for key, ids in raw.items():
            if not str(key).isdigit():
                raise InvalidArgument(f"layer key {key!r} is not a layer index", field="layers")
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise PatternError("expert ids must be a list of integers", field=f"layer {key}")
            layers[int(key)] = ids
        raw_precisions = data.get("precisions", {})
        if not isinstance(raw_precisions, dict) or not all(
            str(k).isdigit()
            and isinstance(v, dict)
            and all(str(e).isdigit() and isinstance(p, str) for e, p in v.items())
            for k, v in raw_precisions.items()
        ):
            raise InvalidArgument(
                "'precisions' must map layer indices to {expert id: precision name}", field="precisions"
            )
        precisions = {int(k): {int(e): p for e, p in v.items()} for k, v in raw_precisions.items()}
        raw_channels = data.get("channels", {})
        if not isinstance(raw_channels, dict):
            raise InvalidArgument("'channels' must map layer indices to {expert id: [channel ids]}", field="channels")
        channels: dict[int, dict[int, list[int]]] = {}
        for key, by_expert in raw_channels.items():
            if not str(key).isdigit() or not isinstance(by_expert, dict):
                raise InvalidArgument("not a layer index mapping experts to channel ids", field=f"channels.{key}")
            for expert, ids in by_expert.items():
                where = f"channels.{key}.{expert}"
                if not str(expert).isdigit():
                    raise InvalidArgument(f"expert key {expert!r} is not an expert id", field=where)
                if not isinstance(ids, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in ids):
                    raise InvalidArgument("channel ids must be a list of integers", field=where)
                channels.setdefault(int(key), {})[int(expert)] = ids
        return cls.build(spec, layers, precisions, channels)

    @classmethod
    def load(cls, spec: MoESpec, path: str | Path) -> Pattern:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{path} is not JSON: {exc}", field="pattern") from exc
        return cls.from_json(spec, data)


def _validate_layer(routing: RoutingSpec, layer: int, experts: tuple[int, ...]) -> None:
    where = f"layer {layer}"
    if not experts:
        raise PatternError("keeps no experts", field=where)
    bad = [e for e in experts if not 0 <= e < routing.num_experts]
    if bad:
        raise PatternError(f"expert ids {bad} out of range 0..{routing.num_experts - 1}", field=where)
    problem = routing.unroutable(experts)
    if problem is not None:
        raise PatternError(problem, field=where)
