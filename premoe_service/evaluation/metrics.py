"""Task metrics on any causal LM: exact-match accuracy of greedy answers, and mean per-token NLL of texts.

The one implementation: `premoe eval` calls it, and so does the reference model's training script
(`reference/metrics.py` adapts its JSONL records to these functions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..hf_compat import cache_keyword, output_cache


@dataclass(frozen=True)
class EvalItem:
    """A held-out item: a prompt with its exact answer, or a text scored by likelihood."""

    prompt: str = ""
    answer: str = ""
    text: str = ""

    @property
    def exact(self) -> bool:
        return bool(self.prompt)


def pad_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its EOS, else 0. Padded positions
    are masked out of attention and never a target, so the choice never changes a metric; it only has to be
    a token the model can embed."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _padded(
    tokenizer: Any, encoded: Sequence[list[int]], device: torch.device, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask [B, S] of token lists padded to the longest (left for generation, right for
    likelihood)."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
        ids[row, span] = torch.tensor(tokens, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 128
) -> list[str]:
    """Greedy completions, cut at the first newline or EOS and stripped (left-padded batches, KV cache)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]]
        ids, mask = _padded(tokenizer, encoded, device, left=True)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        generated = torch.empty((ids.shape[0], 0), dtype=torch.long, device=device)
        past, step_ids, step_pos, keyword = None, ids, positions, cache_keyword(model)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            out = model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **{keyword: past}
            )
            past = output_cache(out)
            token = out.logits[:, -1].argmax(-1)  # [B]
            generated = torch.cat([generated, token[:, None]], dim=1)
            if eos is not None:
                finished |= token == eos
            finished |= torch.tensor(["\n" in tokenizer.decode(row[-1:]) for row in generated], device=device)
            if bool(finished.all()):
                break
            step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        for row in generated.tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).split("\n", 1)[0].strip())
    return answers


def exact_match(model: Any, tokenizer: Any, items: Sequence[EvalItem], batch_size: int = 128, margin: int = 2) -> float:
    """Share of items whose greedy answer equals the expected answer (both stripped).

    Decoding stops at a newline, EOS, or `margin` tokens past the longest expected answer.
    """
    longest = max(len(tokenizer(i.answer, add_special_tokens=False)["input_ids"]) for i in items)
    answers = greedy_answers(model, tokenizer, [i.prompt for i in items], longest + margin, batch_size)
    return sum(a == i.answer.strip() for a, i in zip(answers, items, strict=True)) / len(items)


@torch.no_grad()
def mean_nll(
    model: Any, tokenizer: Any, items: Sequence[EvalItem], batch_size: int = 32, max_length: int | None = 256
) -> float:
    """Mean negative log-likelihood (nats) per predicted token over all texts, pooled (padding never counts;
    a leading BOS is context, never a target). Texts are cut to `max_length` tokens (None: never)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        encoded = [tokenizer(i.text)["input_ids"][:max_length] for i in items[start : start + batch_size]]
        ids, mask = _padded(tokenizer, encoded, device, left=False)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [B, S-1, V]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((targets != -100).sum())
    return total / max(count, 1)


def perplexity(nll: float) -> float:
    return math.exp(nll)
