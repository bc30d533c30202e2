"""The patterned model: a transformers MoE model whose routed experts live in slots and whose routers follow a
pattern."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import FailedPrecondition, PatternError
from ..experts import ExpertReader, ExpertSource
from ..families import MoESpec, adapter_for
from ..pattern import Pattern
from .masked_router import MaskedRouter, RouterObserver
from .model_source import ModelExpertSource
from .pattern_masks import PatternMasks
from .quantized import QuantizedSlots

if TYPE_CHECKING:
    from .channel_slots import ChannelSlots
    from .lending import Lending
from .slot_book import RESIDENT, SlotBook
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
        self.slots: dict[int, LayerSlots] = {}  # row views of `book`
        self.rows = {layer: row for row, layer in enumerate(self.spec.moe_layers)}
        caps = [capacity if isinstance(capacity, int) else capacity[layer] for layer in self.spec.moe_layers]
        self.book = SlotBook(caps, self.spec.num_experts, names=self.spec.moe_layers)
        self.routers: dict[int, MaskedRouter] = {}
        self.pattern: Pattern | None = None
        self._tick = 0
        self._active_versions: tuple[int, ...] = ()
        self._tables: dict[int, tuple[int, torch.Tensor]] = {}
        self._published: dict[int, int] = {}  # layer -> slot version last written by `publish_slots`
        self.masks = PatternMasks(self.spec, lambda: self.device)
        self.quantized: QuantizedSlots | None = None  # slots of lower precisions (`runtime.quantized`)
        self.lending: Lending | None = None  # full slots lent to a lower precision (`runtime.lending`)
        self.channels: ChannelSlots | None = None  # slots of experts held in part (`runtime.channel_slots`)
        for layer, cap in zip(self.spec.moe_layers, caps, strict=True):
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
            router.skip_id = cap  # one past the slots: transformers' experts forward computes nothing for it
            setattr(block, self.adapter.router_attr, router)
            self.routers[layer] = router
            self.slots[layer] = LayerSlots(book=self.book, row=self.rows[layer])

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
        patterned = cls(
            model, capacity if capacity is not None else {layer: len(kept) for layer, kept in pattern.layers.items()}
        )
        patterned.apply(pattern, source)
        return patterned, source

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
        if pattern.mixed and self.quantized is None and self.masks.lowered(pattern):
            raise FailedPrecondition(
                "the pattern holds experts below full precision but the engine has no quantized slots",
                field="precision",
            )
        if pattern.sliced and self.channels is None:
            raise FailedPrecondition(
                "the pattern holds experts in part (channels) but the engine has no channel slots",
                field="channels",
            )
        report = ApplyReport()
        wanted = self.full_mask(pattern)
        book, layers = self.book, self.spec.moe_layers
        plan = book.plan(wanted)
        book.reserve(plan)
        victims = zip(plan.victim_rows.tolist(), plan.victim_experts.tolist(), strict=True)
        report.evicted = [(layers[r], e) for r, e in victims]
        written = 0
        try:
            for row, expert, slot in zip(plan.rows.tolist(), plan.experts.tolist(), plan.slots.tolist(), strict=True):
                self._write(self.experts_module(layers[row]), slot, layers[row], expert, source)
                written += 1
        finally:  # what was written is resident; a failed copy and those after it free their slots
            book.commit(plan.rows[:written], plan.experts[:written])
            book.abort(plan.rows[written:], plan.experts[written:])
        report.loaded = [(layers[r], e) for r, e in zip(plan.rows.tolist(), plan.experts.tolist(), strict=True)]
        tick = self.next_tick()
        book.last_used[wanted] = tick
        if self.quantized is not None and pattern.mixed:
            self.quantized.load(pattern, report.loaded, tick)
        if self.channels is not None and pattern.sliced:
            self.channels.load(pattern, report.loaded, tick, report.evicted)
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
        versions = tuple(self.book.version.tolist())
        if self.quantized is not None:
            versions += self.quantized.versions()
        if self.channels is not None:
            versions += self.channels.versions()
        if self.pattern is pattern and self._active_versions == versions:
            return
        masks = self.excluded_masks(pattern)
        wanted = self.full_mask(pattern)
        if not self.book.all_resident(wanted):
            row = int(np.argmax((wanted & (self.book.state != RESIDENT)).any(axis=1)))
            missing = np.flatnonzero(wanted[row] & (self.book.state[row] != RESIDENT)).tolist()
            raise PatternError(
                f"experts {missing} are not resident; load the pattern first",
                field=f"layer {self.spec.moe_layers[row]}",
            )
        for layer, router in self.routers.items():
            version = int(self.book.version[self.rows[layer]])
            cached = self._tables.get(layer)
            if cached is None or cached[0] != version:
                cached = (version, self._slot_table(layer))
                self._tables[layer] = cached
            table = cached[1]
            if self.banked(pattern):
                table = self.route_table(layer, pattern, table)
            router.set_routing(masks[layer], table)
        self._published.clear()
        self.pattern = pattern
        self._active_versions = versions

    def banked(self, pattern: Pattern) -> bool:
        """Whether `pattern` routes some expert to a bank slot (quantized, or held in part) in this engine."""
        return (pattern.mixed and self.quantized is not None) or pattern.sliced

    def route_table(self, layer: int, pattern: Pattern, full_table: torch.Tensor) -> torch.Tensor:
        """Long [E]: each expert's slot id for `pattern` in `layer`: its full-precision slot (`full_table`), or its
        quantized slot where the pattern lowers it, or its channel slot where the pattern holds it in part."""
        table = full_table
        if pattern.mixed and self.quantized is not None:
            table = self.quantized.table(layer, pattern, table)
        if pattern.sliced:
            if self.channels is None:
                raise FailedPrecondition(
                    "the pattern holds experts in part (channels) but the engine has no channel slots",
                    field="channels",
                )
            table = self.channels.table(layer, pattern, table)
        return table

    def read_into_bank(self, layer: int, expert: int, slot: int) -> tuple[str, int]:
        """Copy a bank's expert (a channel bank's: its variant column) into bank slot id `slot` (the loader
        thread); returns the tier it came from and the bytes read."""
        if self.channels is not None and self.channels.bank_of(layer, slot) is not None:
            return self.channels.read_into(layer, expert, slot)
        if self.quantized is None:
            raise FailedPrecondition(f"slot {slot} of layer {layer} is in no slot bank", field="slot")
        return self.quantized.read_into(layer, expert, slot)

    def publish_slots(self) -> None:
        """Point every router's slot table at the experts resident now; the batched loop calls this at a
        step boundary, after committing completed copies, and never during a forward pass."""
        for layer, router in self.routers.items():
            version = int(self.book.version[self.rows[layer]])
            if self._published.get(layer) != version:
                router.slot_of.copy_(self._slot_table(layer))
                self._published[layer] = version
        self._active_versions = ()  # `activate` re-points the routers when used again

    def excluded_masks(self, pattern: Pattern) -> dict[int, torch.Tensor | None]:
        """Per MoE layer, the `[E]` bool mask of the experts `pattern` excludes, on the device (None: it keeps
        them all); kept for the patterns used last (the running batch's and the activated one)."""
        return self.masks.excluded(pattern)

    def fill_layer(self, layer: int, source: ExpertSource) -> None:
        """Give `layer` one slot per expert and load all of them; the layer then routes over every expert."""
        num_experts = self.spec.num_experts
        experts = self.experts_module(layer)
        install_slots(experts, num_experts, self.device)
        self._resize(layer, num_experts)
        for expert in range(num_experts):
            write_slot(experts, expert, source.read(layer, expert))
            self.slots[layer].place(expert, expert)
        self.routers[layer].set_routing(None, self._slot_table(layer))

    def empty_layer(self, layer: int) -> None:
        """Drop every expert of `layer` and free its slots."""
        install_slots(self.experts_module(layer), 0, self.device)
        self._resize(layer, 0)
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

    def _resize(self, layer: int, capacity: int) -> None:
        self.book.resize(self.rows[layer], capacity)
        self.routers[layer].skip_id = capacity
        self._tables.pop(layer, None)
        self._published.pop(layer, None)
        self._active_versions = ()

    def _slot_table(self, layer: int) -> torch.Tensor:
        """Long [E] on the device: the slot of each expert of `layer`, -1 where not routable."""
        return torch.from_numpy(self.book.table(self.rows[layer])).to(self.device)

    def full_mask(self, pattern: Pattern) -> np.ndarray:
        """Bool [L, E]: the experts `pattern` keeps at full precision, one row per MoE layer (cached)."""
        return self.masks.full(pattern)

    def expert_bytes_resident(self) -> int:
        """Bytes of all slots (resident or free) over all layers, quantized slots included."""
        total = 0 if self.quantized is None else self.quantized.nbytes
        total += 0 if self.channels is None else self.channels.nbytes
        for layer in self.spec.moe_layers:
            total += sum(p.numel() * p.element_size() for p in self.experts_module(layer).parameters(recurse=False))
        return total

    def set_observer(self, observer: RouterObserver | None) -> None:
        """Call `observer(layer, hidden, routing)` on every router call (profiling, coverage)."""
        for router in self.routers.values():
            router.observer = observer

    def resident(self) -> dict[int, set[int]]:
        return {layer: slots.resident() for layer, slots in self.slots.items()}


def _param_device(module: nn.Module) -> torch.device:
    device: torch.device = next(module.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device
