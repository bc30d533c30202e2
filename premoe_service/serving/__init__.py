"""Serving: the domain behind both doors (routing, submitting to the engine loop, task registration, stats)."""

from ..engine import SamplingParams
from .config import ServiceConfig
from .core import ServingCore
from .results import GenerationResult, RoutePlan, ServiceStats, Submission
from .tasks import TaskView

__all__ = [
    "GenerationResult",
    "RoutePlan",
    "SamplingParams",
    "ServiceConfig",
    "ServiceStats",
    "ServingCore",
    "Submission",
    "TaskView",
]
