"""The engine: a transformers MoE model whose routed experts live in slots and whose routers follow a pattern."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import FailedPrecondition, PatternError
from ..experts import ExpertReader, ExpertSource
from ..families import MoESpec, adapter_for
from ..pattern import Pattern
from .masked_router import MaskedRouter, RouterObserver
from .model_source import ModelExpertSource
from .quantized import QuantizedSlots
from .slots import LayerSlots, expert_params, install_slots, slot_buffers, write_slot


@dataclass
class ApplyReport:
    """What applying a pattern did: experts written into slots and experts evicted, as (layer, expert)."""

    loaded: list[tuple[int, int]] = field(default_factory=list)
    evicted: list[tuple[int, int]] = field(default_factory=list)


class PatternedModel:
    """A transformers `*ForCausalLM` model with slot experts and masked routers in every MoE layer.

    The model keeps its class and its code (attention, caches, `generate`); per MoE layer the experts
    module holds `capacity[layer]` slots and the router is a `MaskedRouter`. Applying a pattern writes the
    missing experts into slots (evicting unused ones) and updates the routers; no module is rebuilt.

    Args:
        model: The transformers model. Its fused expert parameters are replaced by slots.
        capacity: Slots per MoE layer (one number for all layers, or per layer).
        device: Where slots live; defaults to where the model's experts are (meta becomes cpu).
    """

    def __init__(
        self,
        model: nn.Module,
        capacity: int | Mapping[int, int],
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter_for(model.config)
        self.spec: MoESpec = self.adapter.spec(model.config)
        self.slots: dict[int, LayerSlots] = {}
        self.routers: dict[int, MaskedRouter] = {}
        self.pattern: Pattern | None = None
        self._tick = 0
        self._active_versions: tuple[int, ...] = ()
        self._tables: dict[int, tuple[int, torch.Tensor]] = {}
        self._published: dict[int, int] = {}  # layer -> slot version last written by `publish_slots`
        self._mask_cache: dict[int, tuple[Pattern, dict[int, torch.Tensor | None]]] = {}
        self.quantized: QuantizedSlots | None = None  # slots of lower precisions (`runtime.quantized`)
        for layer in self.spec.moe_layers:
            cap = capacity if isinstance(capacity, int) else capacity[layer]
            # Capacity 0 leaves a layer empty until `fill_layer` (layer-streamed profiling).
            if cap != 0 and not self.spec.top_k <= cap <= self.spec.num_experts:
                raise PatternError(
                    f"capacity {cap} must lie in top-k {self.spec.top_k}..{self.spec.num_experts}",
                    field=f"layer {layer}",
                )
            block = self.adapter.moe_block(model, layer)
            experts = getattr(block, self.adapter.experts_attr)
            slot_device = device if device is not None else _param_device(experts)
            install_slots(experts, cap, slot_device)
            router = MaskedRouter(getattr(block, self.adapter.router_attr), self.spec.routing, layer)
            setattr(block, self.adapter.router_attr, router)
            self.routers[layer] = router
            self.slots[layer] = LayerSlots(cap)

    @classmethod
    def from_model(
        cls, model: nn.Module, pattern: Pattern | None = None, capacity: int | Mapping[int, int] | None = None
    ) -> tuple[PatternedModel, ModelExpertSource]:
        """Turn a fully loaded model into a patterned one; returns it with the source of all its experts.

        Capacity defaults to the pattern's size per layer (all experts when no pattern is given).
        """
        adapter = adapter_for(model.config)
        spec = adapter.spec(model.config)
        pattern = pattern or Pattern.full(spec)
        pattern.validate(spec)
        source = ModelExpertSource.capture(model, adapter)
        engine = cls(
            model, capacity if capacity is not None else {layer: len(kept) for layer, kept in pattern.layers.items()}
        )
        engine.apply(pattern, source)
        return engine, source

    @property
    def config(self) -> Any:
        """The transformers config of the model."""
        return self.model.config

    @property
    def decoder_layers(self) -> list[nn.Module]:
        """The decoder layers of the `*ForCausalLM` model, in order."""
        return list(self.model.model.layers)  # type: ignore[union-attr,arg-type]

    @property
    def device(self) -> torch.device:
        return next(iter(self.routers.values())).slot_of.device

    def experts_module(self, layer: int) -> nn.Module:
        return self.adapter.experts(self.model, layer)

    def apply(self, pattern: Pattern, source: ExpertSource) -> ApplyReport:
        """Make `pattern` the active one: write its missing experts into slots, then point the routers at it."""
        report = self.load(pattern, source)
        self.activate(pattern)
        return report

    def load(self, pattern: Pattern, source: ExpertSource) -> ApplyReport:
        """Write the pattern's missing experts into slots, evicting least recently used unpinned ones.

        Every layer is planned before anything is evicted, so a pattern that cannot fit changes nothing.
        """
        pattern.validate(self.spec)
        if pattern.mixed and self.quantized is None:
            raise FailedPrecondition(
                "the pattern holds experts below full precision but the engine has no quantized slots",
                field="precision",
            )
        report = ApplyReport()
        plans = {layer: self.slots[layer].assign(full_kept(pattern, layer), layer) for layer in self.spec.moe_layers}
        for layer, plan in plans.items():
            slots, experts = self.slots[layer], self.experts_module(layer)
            for expert, slot in plan:
                evicted = slots.evict_slot(slot)
                if evicted is not None:
                    report.evicted.append((layer, evicted))
                self._write(experts, slot, layer, expert, source)
                slots.place(expert, slot)
                report.loaded.append((layer, expert))
        tick = self.next_tick()
        for layer in self.spec.moe_layers:
            self.slots[layer].touch(full_kept(pattern, layer), tick)
        if self.quantized is not None and pattern.mixed:
            self.quantized.load(pattern, report.loaded, tick)
        return report

    def next_tick(self) -> int:
        """A fresh recency stamp for least-recently-used eviction."""
        self._tick += 1
        return self._tick

    def _write(self, experts: nn.Module, slot: int, layer: int, expert: int, source: ExpertSource) -> None:
        """Fill a slot: straight into slot memory when the source can read into buffers and slots are on the
        CPU (no intermediate copy), else through the source's tensors."""
        if isinstance(source, ExpertReader) and self.device.type == "cpu":
            source.read_into(layer, expert, slot_buffers(experts, slot, source.part_names))
        else:
            write_slot(experts, slot, source.read(layer, expert))

    def activate(self, pattern: Pattern) -> None:
        """Point every router at `pattern`, whose experts must all be resident.

        Called before every forward pass of a request (decode steps included), so the router state is
        cached: nothing is recomputed while the same pattern stays active and no expert moved.
        """
        versions = tuple(self.slots[layer].version for layer in self.spec.moe_layers)
        if self.quantized is not None:
            versions += self.quantized.versions()
        if self.pattern is pattern and self._active_versions == versions:
            return
        num_experts = self.spec.num_experts
        masks = self.excluded_masks(pattern)
        for layer, router in self.routers.items():
            slots = self.slots[layer]
            missing = [e for e in full_kept(pattern, layer) if e not in slots.slot_of]
            if missing:
                raise PatternError(
                    f"experts {missing} are not resident; load the pattern first", field=f"layer {layer}"
                )
            cached = self._tables.get(layer)
            if cached is None or cached[0] != slots.version:
                cached = (slots.version, slots.slot_table(num_experts).to(self.device))
                self._tables[layer] = cached
            table = cached[1]
            if pattern.mixed and self.quantized is not None:
                table = self.quantized.table(layer, pattern, table)
            router.set_routing(masks[layer], table)
        self._published.clear()
        self.pattern = pattern
        self._active_versions = versions

    def publish_slots(self) -> None:
        """Point every router's slot table at the experts resident now; the batched loop calls this at a
        step boundary, after committing completed copies, and never during a forward pass."""
        num_experts = self.spec.num_experts
        for layer, router in self.routers.items():
            slots = self.slots[layer]
            if self._published.get(layer) != slots.version:
                router.slot_of.copy_(slots.slot_table(num_experts).to(self.device))
                self._published[layer] = slots.version
        self._active_versions = ()  # `activate` re-points the routers when used again

    def excluded_masks(self, pattern: Pattern) -> dict[int, torch.Tensor | None]:
        """Per MoE layer, the `[E]` bool mask of the experts `pattern` excludes, on the device (None: it keeps
        them all); kept for the patterns used last (the running batch's and the activated one)."""
        key = id(pattern)
        entry = self._mask_cache.get(key)
        if entry is None or entry[0] is not pattern:
            num_experts = self.spec.num_experts
            masks = {
                layer: None
                if len(pattern.kept(layer)) == num_experts
                else pattern.excluded(layer, num_experts, self.device)
                for layer in self.spec.moe_layers
            }
            entry = (pattern, masks)
            self._mask_cache[key] = entry
            while len(self._mask_cache) > 256:
                self._mask_cache.pop(next(iter(self._mask_cache)))
        return entry[1]

    def fill_layer(self, layer: int, source: ExpertSource) -> None:
        """Give `layer` one slot per expert and load all of them; the layer then routes over every expert."""
        num_experts = self.spec.num_experts
        experts = self.experts_module(layer)
        install_slots(experts, num_experts, self.device)
        slots = LayerSlots(num_experts)
        for expert in range(num_experts):
            write_slot(experts, expert, source.read(layer, expert))
            slots.place(expert, expert)
        self._replace_slots(layer, slots)
        self.routers[layer].set_routing(None, slots.slot_table(num_experts))

    def empty_layer(self, layer: int) -> None:
        """Drop every expert of `layer` and free its slots."""
        install_slots(self.experts_module(layer), 0, self.device)
        self._replace_slots(layer, LayerSlots(0))
        self.routers[layer].set_routing(None, torch.full((self.spec.num_experts,), -1, dtype=torch.long))

    def slot_param_names(self) -> set[str]:
        """State-dict names of the slot (routed expert) parameters; everything else is dense."""
        return {
            f"{self.adapter.runtime_prefix(layer)}{self.adapter.experts_attr}.{name}"
            for layer in self.spec.moe_layers
            for name in expert_params(self.experts_module(layer))
        }

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The dense tensors (shared, not copied), e.g. to build a second engine on the same weights."""
        slots = self.slot_param_names()
        return {k: v for k, v in self.model.state_dict().items() if k not in slots}

    def _replace_slots(self, layer: int, slots: LayerSlots) -> None:
        self.slots[layer] = slots
        self._tables.pop(layer, None)  # a fresh LayerSlots restarts its version count
        self._published.pop(layer, None)
        self._active_versions = ()

    def expert_bytes_resident(self) -> int:
        """Bytes of all slots (resident or free) over all layers, quantized slots included."""
        total = 0 if self.quantized is None else self.quantized.nbytes
        for layer in self.spec.moe_layers:
            total += sum(p.numel() * p.element_size() for p in self.experts_module(layer).parameters(recurse=False))
        return total

    def set_observer(self, observer: RouterObserver | None) -> None:
        """Call `observer(layer, hidden, routing)` on every router call (profiling, coverage)."""
        for router in self.routers.values():
            router.observer = observer

    def resident(self) -> dict[int, set[int]]:
        return {layer: slots.resident() for layer, slots in self.slots.items()}


def full_kept(pattern: Pattern, layer: int) -> tuple[int, ...]:
    """The experts `pattern` keeps at full precision in `layer`."""
    lowered = pattern.precisions.get(layer)
    return pattern.kept(layer) if not lowered else tuple(e for e in pattern.kept(layer) if e not in lowered)


def _param_device(module: nn.Module) -> torch.device:
    device: torch.device = next(module.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device
