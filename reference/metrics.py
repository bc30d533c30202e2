"""Evaluation helpers shared by the reference training script, the tests and the service benchmarks.

* :func:`exact_match_accuracy` -- greedy generation after ``record["prompt"]``; the completion (cut at
  the first newline or EOS, surrounding whitespace stripped) must equal ``record["answer"]``.
* :func:`mean_token_nll` -- mean negative log-likelihood (nats) per predicted text token over
  ``record["text"]``, pooled over all records (padding excluded; a leading BOS added by the tokenizer is
  only context, never a target).

Both work with any causal LM / tokenizer pair (they only use ``model(input_ids, attention_mask)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, KV cache), cut at newline/EOS."""
    device = _device(model)
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        past = None
        gen: list[list[int]] = [[] for _ in enc]
        done = torch.zeros(len(enc), dtype=torch.bool, device=device)
        step_ids, step_pos = ids, pos
        for _ in range(max_new_tokens):
            res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                        past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1, :].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    gen[i].append(t)
            if eos is not None:
                done |= nxt == eos
            texts = [tokenizer.decode(g, skip_special_tokens=False) for g in gen]
            done |= torch.tensor(["\n" in t for t in texts], device=device)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((len(enc), 1), dtype=mask.dtype, device=device)], dim=1)
        for g in gen:
            if eos is not None and eos in g:
                g = g[:g.index(eos)]
            text = tokenizer.decode(g, skip_special_tokens=True)
            out.append(text.split("\n", 1)[0].strip())
    return out


def exact_match_accuracy(model, tokenizer, records: Sequence[dict], max_new_tokens: int = 16,
                         batch_size: int = 64) -> float:
    """Fraction of ``records`` (``{"prompt", "answer"}``) whose greedy completion equals the answer."""
    if not records:
        raise ValueError("no records")
    was_training = model.training
    model.eval()
    try:
        preds = greedy_completions(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    return sum(p == r["answer"].strip() for p, r in zip(preds, records, strict=True)) / len(records)


@torch.no_grad()
def mean_token_nll(model, tokenizer, records: Sequence[dict], batch_size: int = 16,
                   max_length: int | None = None) -> float:
    """Mean per-token NLL (nats) of ``record["text"]`` under the model, pooled over all text tokens."""
    if not records:
        raise ValueError("no records")
    was_training = model.training
    model.eval()
    device = _device(model)
    pad = _pad_id(tokenizer)
    total, count = 0.0, 0
    try:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            enc = [tokenizer(r["text"], add_special_tokens=True)["input_ids"] for r in batch]
            if max_length is not None:
                enc = [e[:max_length] for e in enc]
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, :len(e)] = torch.tensor(e)
                mask[i, :len(e)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                  ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)
