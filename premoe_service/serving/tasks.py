"""Tasks of a running service: patterns derived from profiles, and registration through the profiler."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InvalidArgument
from ..families import MoESpec
from ..names import check_task_name
from ..pattern import Pattern
from ..profiler import Demo, Profile, Selection, best_routable, profile_store, select
from ..profiler.demos import check_demos, check_examples
from ..retrieval import Registry
from ..runtime.model import PatternedModel
from ..runtime.residency import PatternResidency
from ..store import Store


@dataclass(frozen=True)
class TaskResidency:
    """A task's residency as the API reports it."""

    state: PatternResidency
    pinned: bool
    loading: bool


@dataclass
class TaskView:
    """What the API shows of a task."""

    name: str
    description: str
    demos: int
    criterion: str
    pattern: Pattern
    pattern_bytes: int
    demo_coverage: float
    created: str
    registered: bool = True
    layers: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # Layer -> expert -> precision of the kept experts held below full precision (with `layers` only).
    precisions: dict[int, dict[int, str]] = field(default_factory=dict)
    # Layer -> expert -> intermediate channels kept, for kept experts held in part (with `layers` only).
    channels: dict[int, dict[int, int]] = field(default_factory=dict)
    residency: TaskResidency | None = None  # what of the pattern is in device slots now (the serving core adds it)


def _version(profile: Profile) -> tuple[str, str, str]:
    """What tells one registration of a task from another (`created` has whole seconds, so the demos too)."""
    return (profile.name, profile.created, profile.demo_hash)


def demo_coverage(profile: Profile, pattern: Pattern) -> float:
    """Mean share of the router's mass on the pattern over the demo tokens, from the TCESS sums.

    For softmax routers the per-token scores sum to one, so the mean over tokens of the kept share is
    the kept share of the mean scores (exact with r = 0); for sigmoid routers it is the share of the
    mean scores, an approximation.
    """
    scores = profile.scores.get("tcess")
    if scores is None:
        return float("nan")
    shares = []
    for row, layer in enumerate(profile.moe_layers):
        total = float(scores[row].sum())
        shares.append(float(scores[row][list(pattern.kept(layer))].sum()) / total if total > 0 else 1.0)
    return sum(shares) / len(shares)


class TaskBook:
    """Registered tasks and their patterns; registration profiles demos on a layer-streaming engine
    that shares the serving model's dense weights, so it never touches the serving slots.

    Args:
        registry: Profiles and the retrieval index.
        store: The expert store.
        spec: The model's MoE layout.
        selection: The default criterion and policy.
        profiler_engine: A capacity-0 engine for layer-streamed profiling.
    """

    def __init__(
        self, registry: Registry, store: Store, spec: MoESpec, selection: Selection, profiler_engine: PatternedModel
    ) -> None:
        self.registry = registry
        self.store = store
        self.spec = spec
        self.selection = selection
        self.profiler_engine = profiler_engine
        self.max_per_layer: int | None = None  # the serving slots per layer: patterns must fit them
        self.precision_slots: dict[str, int] = {}  # slots per layer of each lower precision (`--precision-slots`)
        self.channel_slots: dict[str, int] = {}  # slots per layer of each channel bank (`--channel-slots`)
        self.channel_criterion = "heapr"  # how channel plans rank channels (`--channel-criterion`)
        self._patterns: dict[tuple[str, str, str, str], tuple[Pattern, int]] = {}  # with the pattern's bytes
        # Plans a LoadTask gave a task (its pattern at one lower precision), by the profile version they were made for.
        self._loaded: dict[str, tuple[tuple[str, str, str], Pattern, int]] = {}
        self._lock = threading.Lock()
        self._profiling = threading.Lock()

    def pattern(self, profile: Profile) -> Pattern:
        """The task's pattern under its stored selection (computed once per profile version)."""
        return self.plan(profile)[0]

    def plan(self, profile: Profile) -> tuple[Pattern, int]:
        """The task's pattern and its bytes (quantized experts at their packed bytes): the plan a LoadTask gave it,
        else its own (`own_plan`)."""
        with self._lock:
            loaded = self._loaded.get(profile.name)
        if loaded is not None and loaded[0] == _version(profile):
            return loaded[1], loaded[2]
        return self.own_plan(profile)

    def lower(self, profile: Profile, precision: str) -> tuple[Pattern, int]:
        """The task's own pattern with every kept expert at `precision` (a copy the store holds), and its bytes."""
        from ..store.copies import quantized_copies

        copy = quantized_copies(self.store.manifest).get(precision)
        if copy is None:
            raise InvalidArgument(f"the store holds no {precision!r} copies of the experts", field="precision")
        own, _ = self.own_plan(profile)
        layers = {layer: dict.fromkeys(kept, precision) for layer, kept in own.layers.items()}
        return Pattern(own.layers, layers), own.size * copy.expert_nbytes

    def hold(self, profile: Profile, pattern: Pattern, nbytes: int) -> None:
        """Serve the task with `pattern` (a `lower` plan) until `release`, or until the task is replaced."""
        with self._lock:
            self._loaded[profile.name] = (_version(profile), pattern, nbytes)

    def release(self, name: str) -> Pattern | None:
        """Back to the task's own plan; returns the pattern it was held at, if any."""
        with self._lock:
            loaded = self._loaded.pop(name, None)
        return None if loaded is None else loaded[1]

    def own_plan(self, profile: Profile) -> tuple[Pattern, int]:
        """The task's pattern under its stored selection and its bytes (computed once per profile version)."""
        selection = Selection.from_json(profile.selection) if profile.selection else self.selection
        # `created` has whole seconds: a task replaced within the same second differs by its demos, if at all
        key = (profile.name, profile.created, profile.demo_hash, repr(selection))
        with self._lock:
            cached = self._patterns.get(key)
        if cached is None:
            scores = profile.score(selection.criterion)
            if selection.precisions and self.channel_slots and profile.channels:
                cached = self._channel_plan(scores, selection, profile)
            elif selection.precisions:
                cached = self._precision_plan(scores, selection)
            else:
                pattern = select(
                    scores, self.spec, selection, self.store.manifest.expert_nbytes, max_per_layer=self.max_per_layer
                )
                cached = (pattern, pattern.size * self.store.manifest.expert_nbytes)
            with self._lock:
                self._patterns[key] = cached
        return cached

    def _precision_plan(self, scores: torch.Tensor, selection: Selection) -> tuple[Pattern, int]:
        """Each expert dropped, lowered or full under the selection's bytes (full experts at the store's own
        bytes, as `premoe pattern --precisions` counts them), weighed by the copies' recorded weight errors."""
        from ..pattern import FULL
        from ..profiler.precision_plan import select_precisions, store_options

        manifest = self.store.manifest
        budget = int(selection.value if selection.unit == "bytes" else selection.value * manifest.total_expert_bytes)
        options = store_options(self.store, precisions=(FULL, *selection.precisions))
        slots = dict(self.precision_slots)
        if self.max_per_layer is not None:
            slots[FULL] = self.max_per_layer
        plan = select_precisions(scores, self.spec, options, budget, slots=slots)
        return plan.pattern, plan.nbytes

    def _channel_plan(self, scores: torch.Tensor, selection: Selection, profile: Profile) -> tuple[Pattern, int]:
        """`_precision_plan` with more options per expert: its best channels (by the profile's channel scores of
        `channel_criterion`) at the width of a channel bank this server has, at that bank's precision; an option
        is worth the expert's value times the share of its channel score mass the channels hold
        (`profiler.channel_plan`). Every option within the server's slots per layer."""
        from ..pattern import FULL
        from ..profiler.channel_plan import ExpertShape, channel_options, select_channels
        from ..profiler.precision_plan import store_options
        from ..store.copies import quantized_copies

        manifest = self.store.manifest
        budget = int(selection.value if selection.unit == "bytes" else selection.value * manifest.total_expert_bytes)
        options = store_options(self.store, precisions=(FULL, *selection.precisions))
        widths = sorted({int(bank.partition("@")[2]) for bank in self.channel_slots})
        channel_scores = profile.channel_score(self.channel_criterion)
        sizes = {c.group_size for c in quantized_copies(manifest).values() if c.group_size}
        group = sizes.pop() if len(sizes) == 1 else 64  # what quantized channel slots group down columns by
        every = channel_options(options, channel_scores, ExpertShape.of(manifest), widths, group)
        offered = {key: option for key, option in every.items() if key in options or key in self.channel_slots}
        slots = {**self.precision_slots, **self.channel_slots}
        if self.max_per_layer is not None:
            slots[FULL] = self.max_per_layer
        plan = select_channels(scores, channel_scores, self.spec, offered, budget, slots=slots)
        return plan.served(), plan.nbytes

    def view(self, profile: Profile, *, with_layers: bool, registered: bool = True) -> TaskView:
        pattern, nbytes = self.plan(profile)
        criterion = profile.selection.get("criterion", self.selection.criterion)
        return TaskView(
            name=profile.name,
            description=profile.description,
            demos=len(profile.demos),
            criterion=criterion,
            pattern=pattern,
            pattern_bytes=nbytes,
            demo_coverage=demo_coverage(profile, pattern),
            created=profile.created,
            registered=registered,
            layers=dict(pattern.layers) if with_layers else {},
            precisions={k: dict(v) for k, v in pattern.precisions.items()} if with_layers else {},
            channels={k: {e: len(ids) for e, ids in v.items()} for k, v in pattern.channels.items()}
            if with_layers
            else {},
        )

    def register(
        self,
        name: str,
        demos: Sequence[Demo],
        *,
        description: str = "",
        selection: Selection | None = None,
        replace: bool = False,
        dry_run: bool = False,
        examples: Sequence[str] = (),
    ) -> TaskView:
        """Profile the demos, derive the pattern, and (unless dry run) register the task; `examples` are indexed
        for retrieval beside the demos."""
        check_task_name(name)
        demos = check_demos(demos)  # demos a door checked pass as they are
        examples = check_examples(examples)
        selection = selection or self.selection  # a Selection's criterion is checked when it is made
        if not replace and not dry_run and name in self.registry.names():
            from ..errors import AlreadyExists

            raise AlreadyExists(f"task {name!r} exists; set replace to overwrite it", field="name")
        if selection.precisions:  # before profiling: a plan needs the store's copies at those precisions
            from ..profiler.precision_plan import store_options

            store_options(self.store, precisions=selection.precisions)
            unserved = [p for p in selection.precisions if self.precision_slots and p not in self.precision_slots]
            if unserved:
                raise InvalidArgument(
                    f"this server has no slots for {unserved} experts (it has {sorted(self.precision_slots)}: "
                    "--precision-slots)",
                    field="precisions",
                )
        with self._profiling, torch.inference_mode():
            profile, _ = profile_store(
                self.store,
                name,
                demos,
                description=description,
                selection=selection,
                embedder=self.registry.embedder,
                patterned=self.profiler_engine,
                examples=examples,
                channels=bool(self.channel_slots),  # channel-level plans rank channels by their scores
            )
        view = self.view(profile, with_layers=True, registered=not dry_run)  # selection errors surface here
        if not dry_run:
            self.registry.register(profile, replace=replace)
        return view

    def fallback_pattern(self, tasks: Sequence[str], capacity: int) -> Pattern:
        """`union_pattern` of the named tasks' profiles as the registry holds them now."""
        return self.union_pattern([self.registry.get(t) for t in tasks], capacity)

    def union_pattern(self, profiles: Sequence[Profile], capacity: int) -> Pattern:
        """The union of the tasks' patterns, trimmed per layer to the slot capacity by summed normalised scores;
        the full pattern when no task is given and it fits."""
        if not profiles:
            if capacity >= self.spec.num_experts:
                return Pattern.full(self.spec)
            from ..errors import FailedPrecondition

            raise FailedPrecondition(
                "no task matches and none is registered to fall back on; register a task or raise the budget",
                field="task",
            )
        union = self.pattern(profiles[0])
        for profile in profiles[1:]:
            union = union.union(self.pattern(profile))
        union = Pattern(union.layers)  # at full precision: the serving engine holds no lowered experts yet
        if all(len(union.kept(layer)) <= capacity for layer in self.spec.moe_layers):
            return union
        layers = {}
        for row, layer in enumerate(self.spec.moe_layers):
            kept = list(union.kept(layer))
            if len(kept) <= capacity:
                layers[layer] = kept
                continue
            total = torch.zeros(self.spec.num_experts, dtype=torch.float64)
            for profile in profiles:
                scores = profile.score(Selection.from_json(profile.selection).criterion)[row].double()
                total += scores / scores.sum().clamp_min(1e-30)
            outside = torch.ones(self.spec.num_experts, dtype=torch.bool)
            outside[kept] = False
            # Experts outside the union rank last; group-limited routing may still need one to stay routable.
            layers[layer] = best_routable(total.masked_fill(outside, -1.0), capacity, self.spec.routing, layer)
        return Pattern.build(self.spec, layers)
