"""Serving: the domain behind the gRPC API (routing, leases, generation, task registration, stats)."""

from ..engine import SamplingParams
from .config import ServiceConfig
from .service import GenerationResult, PreMoeService, RoutePlan
from .tasks import TaskView

__all__ = ["GenerationResult", "PreMoeService", "RoutePlan", "SamplingParams", "ServiceConfig", "TaskView"]
