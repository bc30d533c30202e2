"""A request's decoding options."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options; `temperature == 0` is greedy and equals transformers' greedy `generate`."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self, limit: int) -> SamplingParams:
        """Validate against the server's token limit; errors name the field."""
        if not 1 <= self.max_new_tokens <= limit:
            raise InvalidArgument(f"must lie in 1..{limit}, got {self.max_new_tokens}", field="max_new_tokens")
        if not (0 <= self.temperature <= 10) or self.temperature != self.temperature:
            raise InvalidArgument(f"must lie in [0, 10], got {self.temperature}", field="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"must lie in (0, 1], got {self.top_p}", field="top_p")
        if any(not s or len(s) > 256 for s in self.stop) or len(self.stop) > 16:
            raise InvalidArgument("stop strings must be 1 to 256 characters, at most 16 of them", field="stop")
        return self
