"""Retrieval: embed a prompt, find the task whose demos it resembles, or fall back; the task registry."""

from .calibration import RouteEvaluation, RouteRecord, TaskEvaluation, evaluate, load_route_records, suggest_threshold
from .embedder import DEFAULT_EMBEDDER, Embedder, default_model_path
from .index import HNSW_THRESHOLD, TaskIndex
from .redis_store import RedisProfileStore
from .registry import Registry
from .router import DEFAULT_THRESHOLD, RouteDecision, RoutePolicy, Router, SupportsRoute, check_prompt, decide
from .scoring import DEFAULT_TOP_M, task_scores
from .stores import LocalProfileStore, MemoryProfileStore, ProfileStore, open_profile_store

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_THRESHOLD",
    "DEFAULT_TOP_M",
    "HNSW_THRESHOLD",
    "Embedder",
    "LocalProfileStore",
    "MemoryProfileStore",
    "ProfileStore",
    "RedisProfileStore",
    "Registry",
    "RouteDecision",
    "RouteEvaluation",
    "RoutePolicy",
    "RouteRecord",
    "Router",
    "SupportsRoute",
    "TaskEvaluation",
    "TaskIndex",
    "check_prompt",
    "decide",
    "default_model_path",
    "evaluate",
    "load_route_records",
    "open_profile_store",
    "suggest_threshold",
    "task_scores",
]
