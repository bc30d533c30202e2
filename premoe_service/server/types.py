"""The gRPC boundary: requests decoded into domain values (validated) and domain results encoded as messages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import InvalidArgument, PreMoeError
from ..names import check_task_name
from ..pattern import PRECISION_ORDER, Pattern
from ..profiler import Demo, Selection
from ..profiler.demos import check_demos, check_examples
from ..profiler.profile import CRITERIA
from ..retrieval import CheckedPrompt, check_prompt
from ..serving import GenerationResult, RoutePlan, SamplingParams, ServiceConfig, ServiceStats, TaskView
from ..serving.loading import LoadResult, UnloadResult
from ..serving.tasks import TaskResidency
from .gen import premoe_pb2 as pb

DEFAULT_NEW_TOKENS = 64
PRECISIONS = tuple(p for p in PRECISION_ORDER if p != "full")  # what LoadTask's `precision` may name


@dataclass(frozen=True)
class GenerateCall:
    prompt: CheckedPrompt  # checked here, once: the serving core and the registry take it as it is
    task: str | None
    params: SamplingParams

    @classmethod
    def from_pb(cls, request: pb.GenerateRequest) -> GenerateCall:
        prompt = check_prompt(request.prompt)  # its bytes are measured in the core, before it is tokenized
        task = check_task_name(request.task, field="task") if request.HasField("task") else None
        if request.max_new_tokens < 0:
            raise InvalidArgument(f"must be positive, got {request.max_new_tokens}", field="max_new_tokens")
        params = SamplingParams(
            max_new_tokens=request.max_new_tokens or DEFAULT_NEW_TOKENS,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            seed=request.seed if request.HasField("seed") else None,
            stop=tuple(request.stop),
            skip_below=request.expert_skip_threshold,
            full_precision=request.full_precision,
        )
        return cls(prompt, task, params)


@dataclass(frozen=True)
class RegisterCall:
    name: str
    description: str
    demos: list[Demo]
    selection: Selection
    replace: bool
    dry_run: bool
    selection_field: str | None = None  # the oneof member the caller set, if any
    examples: Sequence[str] = ()  # retrieval-only prompts, checked

    @contextmanager
    def request_fields(self) -> Iterator[None]:
        """Name the request's fields in the domain's errors: the selection's `value` (or a plan's `budget`) is
        the oneof member set."""
        try:
            yield
        except PreMoeError as exc:
            if exc.field in ("value", "budget") and self.selection_field is not None:
                exc.field = self.selection_field
            raise

    @classmethod
    def from_pb(cls, request: pb.RegisterTaskRequest, config: ServiceConfig) -> RegisterCall:
        """Validate every field, sizes first, before any profiling; `config` gives the limits and defaults."""
        name = check_task_name(request.name, field="name")
        check_size(request.description, config.max_description_bytes, "description", "max_description_bytes")
        if len(request.demos) > config.max_demos:
            raise InvalidArgument(
                f"{len(request.demos)} demos, over the limit of {config.max_demos} (the server's max_demos)",
                field="demos",
            )
        if len(request.examples) > config.max_demos:
            raise InvalidArgument(
                f"{len(request.examples)} examples, over the limit of {config.max_demos} (the server's max_demos)",
                field="examples",
            )
        total = 0
        for kind, texts in (("demos", request.demos), ("examples", request.examples)):
            for i, text in enumerate(texts):
                total += check_size(text, config.max_demo_bytes, f"{kind}[{i}]", "max_demo_bytes")
            if total > config.max_demos_total_bytes:
                raise InvalidArgument(
                    f"{total} bytes together, over the limit of {config.max_demos_total_bytes}"
                    " (the server's max_demos_total_bytes, demos and examples together)",
                    field=kind,
                )
        demos = check_demos(request.demos)  # the sizes above, then each demo's own checks: once, here
        default = config.selection
        criterion = request.criterion or default.criterion
        if criterion not in CRITERIA:
            raise InvalidArgument(f"unknown criterion {criterion!r:.80} (use {', '.join(CRITERIA)})", field="criterion")
        which = request.WhichOneof("selection")
        precisions = tuple(request.precisions)  # names checked by Selection, which names the field
        if which is None:
            selection = Selection(criterion, default.policy, default.value, default.unit, precisions)
        elif which == "experts_per_layer":
            if request.experts_per_layer <= 0:
                raise InvalidArgument("must be positive", field="experts_per_layer")
            selection = Selection(criterion, "top_k", request.experts_per_layer, "experts", precisions)
        elif which == "fraction":
            if not 0 < request.fraction <= 1:
                raise InvalidArgument(f"must lie in (0, 1], got {request.fraction}", field="fraction")
            selection = Selection(criterion, "budget", float(request.fraction), "fraction", precisions)
        else:
            if request.bytes <= 0:
                raise InvalidArgument("must be positive", field="bytes")
            selection = Selection(criterion, "budget", int(request.bytes), "bytes", precisions)
        return cls(
            name,
            request.description,
            demos,
            selection,
            request.replace,
            request.dry_run,
            which,
            check_examples(request.examples),
        )


@dataclass(frozen=True)
class LoadCall:
    name: str
    pin: bool
    timeout_s: float | None
    precision: str | None

    @classmethod
    def from_pb(cls, request: pb.LoadTaskRequest) -> LoadCall:
        name = check_task_name(request.name, field="name")
        timeout = request.timeout_s
        if not 0 <= timeout < float("inf"):
            raise InvalidArgument(f"must be a finite number of seconds >= 0, got {timeout}", field="timeout_s")
        precision = request.precision
        if precision and precision not in PRECISIONS:
            raise InvalidArgument(
                f"unknown precision {precision!r:.40} (use {', '.join(PRECISIONS)})", field="precision"
            )
        return cls(name, request.pin, timeout or None, precision or None)


def load_to_pb(view: TaskView, result: LoadResult, replicas: Sequence[str] = ()) -> pb.LoadTaskResponse:
    return pb.LoadTaskResponse(
        task=task_to_pb(view),
        loads=pb.ExpertLoads(
            device=result.loads.get("device", 0),
            cache=result.loads.get("cache", 0),
            disk=result.loads.get("disk", 0),
            bytes=result.loaded_bytes,
        ),
        load_ms=result.seconds * 1000.0,
        replicas=list(replicas),
    )


def unload_to_pb(view: TaskView, result: UnloadResult, replicas: Sequence[str] = ()) -> pb.UnloadTaskResponse:
    return pb.UnloadTaskResponse(
        task=task_to_pb(view),
        was_pinned=result.was_pinned,
        released_experts=result.released_experts,
        released_bytes=result.released_bytes,
        replicas=list(replicas),
    )


def name_from_pb(name: str) -> str:
    return check_task_name(name, field="name")


def check_size(text: str, limit: int, field: str, setting: str) -> int:
    """The UTF-8 size of `text`, or `InvalidArgument` naming `field` when it is over `limit` bytes (the server's
    `setting`); a text with more characters than that is refused without encoding it."""
    size = len(text) if len(text) > limit or text.isascii() else len(text.encode("utf-8"))
    if size > limit:
        more = "" if size == len(text) else " in UTF-8"
        raise InvalidArgument(f"over the limit of {limit} bytes{more} (the server's {setting})", field=field)
    return size


def stats_to_pb(result: GenerationResult, total_experts: int) -> pb.GenerationStats:
    plan = result.plan
    return pb.GenerationStats(
        task=plan.task,
        score=plan.score,
        decision=plan.decision,
        pattern_experts=plan.pattern.size,
        total_experts=total_experts,
        loads=pb.ExpertLoads(
            device=result.loads.get("device", 0),
            cache=result.loads.get("cache", 0),
            disk=result.loads.get("disk", 0),
            bytes=result.loaded_bytes,
        ),
        coverage=result.coverage,
        widened=result.widened,
        timings=pb.Timings(**result.timings),
        prompt_tokens=result.prompt_tokens,
        generated_tokens=len(result.token_ids),
        expert_calls=result.expert_calls,
        expert_calls_skipped=result.expert_calls_skipped,
        precisions=served_precisions(plan.pattern),
    )


def served_precisions(pattern: Pattern) -> dict[str, int]:
    """Experts of a pattern per precision ("full" or a lower one)."""
    counts: dict[str, int] = {}
    for layer, kept in pattern.layers.items():
        for expert in kept:
            precision = pattern.precision(layer, expert)
            counts[precision] = counts.get(precision, 0) + 1
    return counts


def route_to_pb(plan: RoutePlan) -> pb.RouteResponse:
    return pb.RouteResponse(
        ranked=[pb.TaskScore(task=t, score=s) for t, s in plan.ranked],
        decision=plan.decision,
        task=plan.task,
        fallback_tasks=plan.fallback_tasks,
        pattern_experts=plan.pattern.size,
        reason=plan.reason,
    )


def task_to_pb(view: TaskView) -> pb.TaskInfo:
    return pb.TaskInfo(
        name=view.name,
        description=view.description,
        demos=view.demos,
        criterion=view.criterion,
        pattern_experts=view.pattern.size,
        pattern_bytes=view.pattern_bytes,
        demo_coverage=view.demo_coverage,
        layers=[
            pb.LayerExperts(
                layer=layer,
                experts=list(ids),
                precisions=view.precisions.get(layer, {}),
                channels=view.channels.get(layer, {}),
            )
            for layer, ids in sorted(view.layers.items())
        ],
        created=view.created,
        registered=view.registered,
        residency=None if view.residency is None else residency_to_pb(view.residency),
    )


def residency_to_pb(residency: TaskResidency) -> pb.TaskResidency:
    state = residency.state
    return pb.TaskResidency(
        resident_share=state.share,
        resident_experts=state.experts,
        resident_bytes=state.nbytes,
        precisions=state.precisions,
        pinned=residency.pinned,
        loading=residency.loading,
    )


def service_stats_to_pb(stats: ServiceStats) -> pb.GetStatsResponse:
    return pb.GetStatsResponse(
        resident_experts=stats.resident_experts,
        capacity_experts=stats.capacity_experts,
        resident_bytes=stats.resident_bytes,
        budget_bytes=stats.budget_bytes,
        loads=pb.ExpertLoads(**stats.loads, bytes=stats.loaded_bytes),
        evictions=stats.evictions,
        tasks=[pb.TaskStats(task=t, requests=r, mean_coverage=c) for t, (r, c) in sorted(stats.tasks.items())],
        cache_health=stats.cache_health,
        in_flight=stats.in_flight,
        queued=stats.queued,
        generated_tokens=stats.generated_tokens,
        lent_slots=stats.lent_slots,
        demoted_experts=stats.demoted_experts,
    )
