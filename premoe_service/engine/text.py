"""Per-request token choice and incremental text: sampling as when alone, constant detokenizing work per token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .params import SamplingParams


def choose(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row's logits `[V]`: argmax when greedy, else one draw from the request's own
    generator (temperature, then top-p), exactly the draw the request makes when it runs alone."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits.double().cpu()
    # Shift before dividing, so a tiny temperature sharpens towards the argmax instead of overflowing to nan.
    probs = torch.softmax((scaled - scaled.max()) / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: Tensor, requests: Sequence[Any]) -> list[int]:
    """The next token of each row of `logits` `[N, V]` for the matching request: one argmax over the batch for
    greedy rows; a request with a seed draws with its own generator, exactly as alone; the other sampled rows draw
    together in one call."""
    barred = [(row, ends) for row, request in enumerate(requests) if (ends := request.barred())]
    if barred:  # rows under their min_tokens may not draw what would end them, whichever way they pick
        logits = logits.clone()
        for row, ends in barred:
            logits[row, ends] = float("-inf")
    # `max`'s indices: the first maximal index, as argmax's, documented so for both; on CPU 3-4x faster than argmax
    tokens: list[int] = logits.max(-1).indices.tolist()
    free = []
    for row, request in enumerate(requests):
        if request.params.temperature == 0:
            continue
        if request.params.seed is not None:
            tokens[row] = request.choose(logits[row])
        else:
            free.append(row)
    if free:
        params = [requests[row].params for row in free]
        drawn = draw(logits[free], [p.temperature for p in params], [p.top_p for p in params])
        for row, token in zip(free, drawn, strict=True):
            tokens[row] = token
    return tokens


def draw(logits: Tensor, temperatures: Sequence[float], top_ps: Sequence[float]) -> list[int]:
    """One draw per row of `logits` `[N, V]` with its temperature and top-p, from torch's global generator: the
    same distribution as `choose`, in one batched call."""
    scaled = logits.double().cpu()
    temperature = torch.tensor(list(temperatures), dtype=torch.float64).unsqueeze(1)
    probs = torch.softmax((scaled - scaled.amax(-1, keepdim=True)) / temperature, dim=-1)
    top_p = torch.tensor(list(top_ps), dtype=torch.float64).unsqueeze(1)
    if bool((top_p < 1).any()):
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        keep = torch.cumsum(sorted_probs, -1) - sorted_probs < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
        probs /= probs.sum(-1, keepdim=True)
    result: list[int] = torch.multinomial(probs, 1).squeeze(1).tolist()
    return result


def prompt_logprobs(logits: Tensor, ids: Tensor, top: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability under the logits of the position before it (the first has none), from a
    prefill that kept every position's logits [N, V] of the prompt `ids` [N]."""
    return [TokenLogprob(int(ids[0]), None), *token_logprobs(logits[:-1], ids[1:], top)]


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> list[TokenLogprob]:
    """Log-probabilities of `tokens` [N] under `logits` [N, V] (the model's distribution), with the `top` most
    likely alternatives at each position."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.to(logprobs.device).view(-1, 1)).squeeze(1).tolist()
    best = torch.topk(logprobs, top, dim=-1) if top else None
    values = best.values.tolist() if best is not None else [[] for _ in chosen]
    ids = best.indices.tolist() if best is not None else [[] for _ in chosen]
    return [
        TokenLogprob(int(token), float(lp), tuple(zip(i, v, strict=True)))
        for token, lp, i, v in zip(tokens.tolist(), chosen, ids, values, strict=True)
    ]


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely alternatives (token, log-probability)."""

    token: int
    logprob: float | None  # None for a prompt's first token (nothing precedes it)
    top: tuple[tuple[int, float], ...] = ()


class TextStream:
    """The text of a request's generated tokens, built one token at a time, with stop strings.

    Uses the tokenizer's `DecodeStream` (constant work per token; characters split over tokens come out
    whole) when the tokenizer is a fast one, else decodes the whole sequence per token. `push` returns the
    text that is safe to send: a tail that could still grow into a stop string is held back.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.text = ""
        self.emitted = 0  # characters of `text` already sent
        self.stopped = False
        self.ids: list[int] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend
        self._stream: Any = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; returns the newly sendable text (may be empty)."""
        self.ids.append(token)
        if self._stream is not None:
            piece = self._stream.step(self._backend, token) or ""
            self.text += piece
        else:
            full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            piece = full[len(self.text) :] if full.startswith(self.text) else full
            self.text = full
        if self.stops and piece:
            start = max(0, len(self.text) - len(piece) - self.longest_stop + 1)
            window = self.text[start:]
            found = [window.find(s) for s in self.stops if s in window]
            if found:
                self.text = self.text[: start + min(found)]
                self.stopped = True
                return self._flush()
        return self._flush(hold=self._held())

    def finish(self) -> str:
        """The request ended: settle the text on the full decode of its tokens, and return the unsent rest."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stopped or self.stops:
            cut = [full.find(s) for s in self.stops if s in full]
            full = full[: min(cut)] if cut else full
        self.text = full
        return self._flush()

    def _held(self) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def _flush(self, hold: int = 0) -> str:
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
