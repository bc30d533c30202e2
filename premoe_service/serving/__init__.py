"""Serving: the domain behind both doors (routing, submitting to the engine loop, task registration, stats)."""

from ..engine import GenerationResult, Request, RoutePlan, SamplingParams
from .config import ServiceConfig
from .core import ServingCore
from .service_stats import ServiceStats
from .tasks import TaskView

__all__ = [
    "GenerationResult",
    "Request",
    "RoutePlan",
    "SamplingParams",
    "ServiceConfig",
    "ServiceStats",
    "ServingCore",
    "TaskView",
]
