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
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely alternatives
    prompt_logprobs: bool = False  # also score the prompt's tokens (with `logprobs` alternatives each)
    skip_below: float = 0.0  # decode tokens skip routed experts below this share of their weights (0: off)
    ignore_eos: bool = False  # the model's EOS does not end the request (it runs to max_new_tokens or a stop)
    min_tokens: int = 0  # EOS and stop_token_ids cannot be chosen before this many new tokens
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the request like EOS (kept in its token ids, not text)
    full_precision: bool = False  # never served from demoted copies under memory pressure: it waits instead

    def check(self, limit: int) -> SamplingParams:
        """Validate against the server's token limit; errors name the field."""
        low = 0 if self.prompt_logprobs else 1  # scoring a prompt needs no new token
        if not low <= self.max_new_tokens <= limit:
            raise InvalidArgument(f"must lie in {low}..{limit}, got {self.max_new_tokens}", field="max_new_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidArgument(f"must lie in 0..20, got {self.logprobs}", field="logprobs")
        if not (0 <= self.temperature <= 10) or self.temperature != self.temperature:
            raise InvalidArgument(f"must lie in [0, 10], got {self.temperature}", field="temperature")
        if not 0 <= self.skip_below < 1:
            raise InvalidArgument(f"must lie in [0, 1), got {self.skip_below}", field="expert_skip_threshold")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"must lie in (0, 1], got {self.top_p}", field="top_p")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidArgument(f"must lie in 0..{self.max_new_tokens}, got {self.min_tokens}", field="min_tokens")
        if self.min_tokens and self.stop:
            raise InvalidArgument("min_tokens with stop strings is not supported", field="min_tokens")
        if any(not s or len(s) > 256 for s in self.stop) or len(self.stop) > 16:
            raise InvalidArgument("stop strings must be 1 to 256 characters, at most 16 of them", field="stop")
        return self
