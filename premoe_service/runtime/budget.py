"""The device-memory budget for routed experts, and how many slots per MoE layer it buys."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument, ResourceExhausted
from ..families import MoESpec


@dataclass(frozen=True)
class Budget:
    """Device memory for routed experts: bytes, or a fraction of all routed-expert bytes."""

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.fraction is None):
            raise InvalidArgument("give a budget in bytes or as a fraction, not both or neither", field="budget")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise InvalidArgument(f"budget fraction {self.fraction} must lie in (0, 1]", field="budget")
        if self.bytes is not None and self.bytes <= 0:
            raise InvalidArgument(f"budget of {self.bytes} bytes must be positive", field="budget")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """A share of all routed-expert bytes (`0.5`, `50%`) or bytes with a unit (`512MiB`, `8GiB`, `2e9B`).

        A bare number above 1 is refused: it would silently be read as bytes where a share was meant."""
        value = text.strip()
        try:
            if value.endswith("%"):
                return cls(fraction=float(value[:-1]) / 100)
            units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
            for unit, scale in units.items():
                if value.endswith(unit):
                    return cls(bytes=int(float(value[: -len(unit)]) * scale))
            number = float(value)
        except ValueError as exc:
            raise InvalidArgument(f"cannot read budget {text!r} (e.g. 0.5, 50%, 512MiB)", field="budget") from exc
        if number > 1:
            raise InvalidArgument(
                f"budget {text!r} has no unit: give a share (0.5, 50%) or bytes with a unit (8GiB, 2e9B)",
                field="budget",
            )
        return cls(fraction=number)

    def slots_per_layer(self, spec: MoESpec, expert_nbytes: int) -> int:
        """Slots per MoE layer that fit the budget (at least top-k, at most every expert)."""
        total = spec.num_experts * len(spec.moe_layers)
        slots = int(total * self.fraction) if self.fraction is not None else int(self.bytes or 0) // expert_nbytes
        per_layer = slots // len(spec.moe_layers)
        if per_layer < spec.top_k:
            raise ResourceExhausted(
                f"budget holds {per_layer} experts per layer, fewer than top-k {spec.top_k}", field="budget"
            )
        return min(per_layer, spec.num_experts)
