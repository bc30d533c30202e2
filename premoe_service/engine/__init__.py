"""The engine loop: continuous batching of requests of any task, with expert loads beside the loop."""

from .kv import KVPool
from .loader import Loader, LoadJob
from .loop import EngineLoop
from .params import SamplingParams
from .request import Request, Status
from .result import GenerationResult, RoutePlan
from .stats import BatchLimits, LoopStats
from .text import TokenLogprob

__all__ = [
    "BatchLimits",
    "EngineLoop",
    "GenerationResult",
    "KVPool",
    "LoadJob",
    "Loader",
    "LoopStats",
    "Request",
    "RoutePlan",
    "SamplingParams",
    "Status",
    "TokenLogprob",
]
