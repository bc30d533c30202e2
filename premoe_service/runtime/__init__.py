"""Runtime: slot experts, masked routers and the patterned model (residency and leases build on these)."""

from .engine import ApplyReport, ExpertSource, ModelExpertSource, PatternedModel
from .masked_router import MaskedRouter
from .slots import ExpertTensors, LayerSlots

__all__ = [
    "ApplyReport",
    "ExpertSource",
    "ExpertTensors",
    "LayerSlots",
    "MaskedRouter",
    "ModelExpertSource",
    "PatternedModel",
]
