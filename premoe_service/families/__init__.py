"""Family adapters: where each transformers MoE family keeps its experts and how it routes."""

from .adapters import ADAPTERS, adapter_for, adapter_named
from .base import ExpertKey, ExpertPart, FamilyAdapter, MoESpec
from .routing import Routing, RoutingSpec, full_scores, route

__all__ = [
    "ADAPTERS",
    "ExpertKey",
    "ExpertPart",
    "FamilyAdapter",
    "MoESpec",
    "Routing",
    "RoutingSpec",
    "adapter_for",
    "adapter_named",
    "full_scores",
    "route",
]
