"""The server's registry as its configuration asks: the embedder, the router signal, the none-class, the leads."""

from __future__ import annotations

from typing import Any

from ..retrieval import Embedder, ProfileStore, Registry, RoutePolicy, load_route_records
from ..retrieval.task_leads import load_task_leads
from ..runtime.model import PatternedModel
from ..runtime.router_signal import RouterSignal
from ..store import Store
from .config import ServiceConfig


def build_registry(
    config: ServiceConfig, store: Store, patterned: PatternedModel, embedder: Embedder, profiles: ProfileStore | None
) -> Registry:
    """The registry `ServingCore` routes with.

    With `config.route_signal` the router signal runs on its own copy of the layers before the first MoE layer,
    built on the engine's dense tensors (shared, not copied): the engine loop keeps the model to itself, and the
    signal never depends on which experts are resident, so every replica decides alike. It runs compiled where the
    engine's step does (`config.compile_step`).
    """
    fields: dict[str, Any] = {}
    if config.route_threshold is not None:
        # An explicit threshold is the floor with a none-class as well (which otherwise has its own, lower one).
        fields["threshold"] = fields["background_floor"] = config.route_threshold
    if config.route_calibration is not None:
        fields["task_leads"] = load_task_leads(config.route_calibration)
    signal = None
    if config.route_signal:
        signal = RouterSignal.from_store(
            store, device=patterned.device, dense=patterned.dense_state_dict(), compiled=config.compile_step
        )
    background = (
        [r.query for r in load_route_records(config.route_background)] if config.route_background is not None else []
    )
    return Registry(
        profiles,
        embedder=embedder,
        policy=RoutePolicy(**fields),
        fingerprint=store.fingerprint,
        signal=signal,
        background=background,
    )
