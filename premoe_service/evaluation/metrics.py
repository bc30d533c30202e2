"""Task metrics on any causal LM: exact-match accuracy of greedy answers, and mean per-token NLL of texts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EvalItem:
    """A held-out item: a prompt with its exact answer, or a text scored by likelihood."""

    prompt: str = ""
    answer: str = ""
    text: str = ""

    @property
    def exact(self) -> bool:
        return bool(self.prompt)


def _left_padded(tokenizer: Any, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
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
        ids, mask = _left_padded(tokenizer, prompts[start : start + batch_size], device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        generated = torch.empty((ids.shape[0], 0), dtype=torch.long, device=device)
        past, step_ids, step_pos = None, ids, positions
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            out = model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past, use_cache=True
            )
            past = out.past_key_values
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
    model: Any, tokenizer: Any, items: Sequence[EvalItem], batch_size: int = 32, max_length: int = 256
) -> float:
    """Mean negative log-likelihood (nats) per predicted token over all texts (padding never counts)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        encoded = [tokenizer(i.text)["input_ids"][:max_length] for i in items[start : start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.zeros((len(encoded), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(device), mask.to(device)
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
