"""Evaluation helpers of the reference training script and its tests, on the task files' JSONL records.

* :func:`exact_match_accuracy` -- greedy generation after ``record["prompt"]``; the completion (cut at
  the first newline or EOS, surrounding whitespace stripped) must equal ``record["answer"]``.
* :func:`mean_token_nll` -- mean negative log-likelihood (nats) per predicted text token over
  ``record["text"]``, pooled over all records (padding excluded; a leading BOS added by the tokenizer is
  only context, never a target).

Both adapt records to the one implementation in :mod:`premoe_service.evaluation.metrics`, which ``premoe eval``
uses too, so the reference model's ``metrics.json`` and the service's evaluation measure the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from premoe_service.evaluation.metrics import EvalItem, greedy_answers, mean_nll


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def exact_match_accuracy(model, tokenizer, records: Sequence[dict], max_new_tokens: int = 16,
                         batch_size: int = 64) -> float:
    """Fraction of ``records`` (``{"prompt", "answer"}``) whose greedy completion equals the answer."""
    if not records:
        raise ValueError("no records")
    with _eval_mode(model):
        answers = greedy_answers(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, batch_size)
    return sum(a == r["answer"].strip() for a, r in zip(answers, records, strict=True)) / len(records)


def mean_token_nll(model, tokenizer, records: Sequence[dict], batch_size: int = 16,
                   max_length: int | None = None) -> float:
    """Mean per-token NLL (nats) of ``record["text"]`` under the model, pooled over all text tokens."""
    if not records:
        raise ValueError("no records")
    with _eval_mode(model):
        return mean_nll(model, tokenizer, [EvalItem(text=r["text"]) for r in records], batch_size, max_length)
