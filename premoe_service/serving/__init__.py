"""Serving: the domain behind both doors (routing, submitting to the engine loop, task registration, stats)."""

from ..engine import SamplingParams
from .config import ServiceConfig
from .results import GenerationResult, RoutePlan, Submission
from .service import PreMoeService
from .tasks import TaskView

__all__ = [
    "GenerationResult",
    "PreMoeService",
    "RoutePlan",
    "SamplingParams",
    "ServiceConfig",
    "Submission",
    "TaskView",
]
