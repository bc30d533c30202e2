"""Runtime: slot experts, masked routers and the patterned model (residency and leases build on these)."""

from ..experts import ExpertReader, ExpertSource, ExpertTensors
from .masked_router import MaskedRouter
from .model import ApplyReport, PatternedModel
from .model_source import ModelExpertSource
from .slots import LayerSlots

__all__ = [
    "ApplyReport",
    "ExpertReader",
    "ExpertSource",
    "ExpertTensors",
    "LayerSlots",
    "MaskedRouter",
    "ModelExpertSource",
    "PatternedModel",
]
