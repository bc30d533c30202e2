from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "task", "max_new_tokens", "temperature", "top_p", "seed", "stop", "expert_skip_threshold", "full_precision")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    EXPERT_SKIP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FULL_PRECISION_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    task: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    expert_skip_threshold: float
    full_precision: bool
    def __init__(self, prompt: _Optional[str] = ..., task: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., expert_skip_threshold: _Optional[float] = ..., full_precision: _Optional[bool] = ...) -> None: ...

class ExpertLoads(_message.Message):
    __slots__ = ("device", "cache", "disk", "bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    device: int
    cache: int
    disk: int
    bytes: int
    def __init__(self, device: _Optional[int] = ..., cache: _Optional[int] = ..., disk: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("route_ms", "load_ms", "prefill_ms", "decode_ms", "total_ms", "queue_ms")
    ROUTE_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    route_ms: float
    load_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    queue_ms: float
    def __init__(self, route_ms: _Optional[float] = ..., load_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("task", "score", "decision", "pattern_experts", "total_experts", "loads", "coverage", "widened", "timings", "prompt_tokens", "generated_tokens", "expert_calls", "expert_calls_skipped", "precisions")
    class PrecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    PATTERN_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    WIDENED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CALLS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CALLS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    task: str
    score: float
    decision: str
    pattern_experts: int
    total_experts: int
    loads: ExpertLoads
    coverage: float
    widened: bool
    timings: Timings
    prompt_tokens: int
    generated_tokens: int
    expert_calls: int
    expert_calls_skipped: int
    precisions: _containers.ScalarMap[str, int]
    def __init__(self, task: _Optional[str] = ..., score: _Optional[float] = ..., decision: _Optional[str] = ..., pattern_experts: _Optional[int] = ..., total_experts: _Optional[int] = ..., loads: _Optional[_Union[ExpertLoads, _Mapping]] = ..., coverage: _Optional[float] = ..., widened: _Optional[bool] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., expert_calls: _Optional[int] = ..., expert_calls_skipped: _Optional[int] = ..., precisions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "stats")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stats: GenerationStats
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "stats")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stats: GenerationStats
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("prompt",)
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    def __init__(self, prompt: _Optional[str] = ...) -> None: ...

class TaskScore(_message.Message):
    __slots__ = ("task", "score")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    task: str
    score: float
    def __init__(self, task: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("ranked", "decision", "task", "fallback_tasks", "pattern_experts", "reason")
    RANKED_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_TASKS_FIELD_NUMBER: _ClassVar[int]
    PATTERN_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ranked: _containers.RepeatedCompositeFieldContainer[TaskScore]
    decision: str
    task: str
    fallback_tasks: _containers.RepeatedScalarFieldContainer[str]
    pattern_experts: int
    reason: str
    def __init__(self, ranked: _Optional[_Iterable[_Union[TaskScore, _Mapping]]] = ..., decision: _Optional[str] = ..., task: _Optional[str] = ..., fallback_tasks: _Optional[_Iterable[str]] = ..., pattern_experts: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RegisterTaskRequest(_message.Message):
    __slots__ = ("name", "description", "demos", "criterion", "experts_per_layer", "fraction", "bytes", "replace", "dry_run", "precisions", "examples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEMOS_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    demos: _containers.RepeatedScalarFieldContainer[str]
    criterion: str
    experts_per_layer: int
    fraction: float
    bytes: int
    replace: bool
    dry_run: bool
    precisions: _containers.RepeatedScalarFieldContainer[str]
    examples: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., demos: _Optional[_Iterable[str]] = ..., criterion: _Optional[str] = ..., experts_per_layer: _Optional[int] = ..., fraction: _Optional[float] = ..., bytes: _Optional[int] = ..., replace: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., precisions: _Optional[_Iterable[str]] = ..., examples: _Optional[_Iterable[str]] = ...) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "experts", "precisions", "channels")
    class PrecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    class ChannelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    precisions: _containers.ScalarMap[int, str]
    channels: _containers.ScalarMap[int, int]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., precisions: _Optional[_Mapping[int, str]] = ..., channels: _Optional[_Mapping[int, int]] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "description", "demos", "criterion", "pattern_experts", "pattern_bytes", "demo_coverage", "layers", "created", "registered", "residency")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEMOS_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    PATTERN_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PATTERN_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEMO_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    demos: int
    criterion: str
    pattern_experts: int
    pattern_bytes: int
    demo_coverage: float
    layers: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    created: str
    registered: bool
    residency: TaskResidency
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., demos: _Optional[int] = ..., criterion: _Optional[str] = ..., pattern_experts: _Optional[int] = ..., pattern_bytes: _Optional[int] = ..., demo_coverage: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., created: _Optional[str] = ..., registered: _Optional[bool] = ..., residency: _Optional[_Union[TaskResidency, _Mapping]] = ...) -> None: ...

class TaskResidency(_message.Message):
    __slots__ = ("resident_share", "resident_experts", "resident_bytes", "precisions", "pinned", "loading")
    class PrecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RESIDENT_SHARE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    resident_share: float
    resident_experts: int
    resident_bytes: int
    precisions: _containers.ScalarMap[str, int]
    pinned: bool
    loading: bool
    def __init__(self, resident_share: _Optional[float] = ..., resident_experts: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., precisions: _Optional[_Mapping[str, int]] = ..., pinned: _Optional[bool] = ..., loading: _Optional[bool] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTaskResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class LoadTaskRequest(_message.Message):
    __slots__ = ("name", "pin", "timeout_s", "precision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    pin: bool
    timeout_s: float
    precision: str
    def __init__(self, name: _Optional[str] = ..., pin: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., precision: _Optional[str] = ...) -> None: ...

class LoadTaskResponse(_message.Message):
    __slots__ = ("task", "loads", "load_ms", "replicas")
    TASK_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    task: TaskInfo
    loads: ExpertLoads
    load_ms: float
    replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[_Union[TaskInfo, _Mapping]] = ..., loads: _Optional[_Union[ExpertLoads, _Mapping]] = ..., load_ms: _Optional[float] = ..., replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class UnloadTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadTaskResponse(_message.Message):
    __slots__ = ("task", "was_pinned", "released_experts", "released_bytes", "replicas")
    TASK_FIELD_NUMBER: _ClassVar[int]
    WAS_PINNED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    RELEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    task: TaskInfo
    was_pinned: bool
    released_experts: int
    released_bytes: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[_Union[TaskInfo, _Mapping]] = ..., was_pinned: _Optional[bool] = ..., released_experts: _Optional[int] = ..., released_bytes: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskStats(_message.Message):
    __slots__ = ("task", "requests", "mean_coverage")
    TASK_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    task: str
    requests: int
    mean_coverage: float
    def __init__(self, task: _Optional[str] = ..., requests: _Optional[int] = ..., mean_coverage: _Optional[float] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("resident_experts", "capacity_experts", "resident_bytes", "budget_bytes", "loads", "evictions", "tasks", "cache_health", "in_flight", "queued", "generated_tokens", "lent_slots", "demoted_experts")
    RESIDENT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HEALTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LENT_SLOTS_FIELD_NUMBER: _ClassVar[int]
    DEMOTED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    resident_experts: int
    capacity_experts: int
    resident_bytes: int
    budget_bytes: int
    loads: ExpertLoads
    evictions: int
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStats]
    cache_health: str
    in_flight: int
    queued: int
    generated_tokens: int
    lent_slots: int
    demoted_experts: int
    def __init__(self, resident_experts: _Optional[int] = ..., capacity_experts: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., loads: _Optional[_Union[ExpertLoads, _Mapping]] = ..., evictions: _Optional[int] = ..., tasks: _Optional[_Iterable[_Union[TaskStats, _Mapping]]] = ..., cache_health: _Optional[str] = ..., in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., lent_slots: _Optional[int] = ..., demoted_experts: _Optional[int] = ...) -> None: ...
