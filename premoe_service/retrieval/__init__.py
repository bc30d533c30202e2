"""Retrieval: embed a prompt, find the task whose demos it resembles, or fall back; the task registry."""

from .accuracy import RouteEvaluation, RouteRecord, TaskEvaluation, evaluate, load_route_records, suggest_threshold
from .decision import DEFAULT_THRESHOLD, RouteDecision, RoutePolicy, decide
from .embedder import DEFAULT_EMBEDDER, Embedder, default_model_path
from .index import HNSW_THRESHOLD, TaskIndex
from .profile_store import LocalProfileStore, MemoryProfileStore, ProfileStore, RedisProfileStore, open_profile_store
from .registry import Registry
from .router import CheckedPrompt, Router, SupportsRoute, check_prompt
from .scoring import DEFAULT_TOP_M, task_scores

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_THRESHOLD",
    "DEFAULT_TOP_M",
    "HNSW_THRESHOLD",
    "CheckedPrompt",
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
