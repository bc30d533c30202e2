"""The HTTP boundary, replies: results encoded in OpenAI's shapes, with our routing stats under `premoe`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..serving import GenerationResult, TaskView
from .http_types import AUTO, GenerationCall

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def completion_body(
    call: GenerationCall, result: GenerationResult, total_experts: int, decode: Callable[[int], str] | None = None
) -> dict[str, Any]:
    """The whole reply of a non-streamed request; `decode` spells one token (for `logprobs`)."""
    text = (call.prompt + result.text) if call.echo else result.text
    if call.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    logprobs = _logprobs(result, decode, call.echo) if decode is not None and result.logprobs is not None else None
    choice |= {"logprobs": logprobs, "finish_reason": finish_reason(result)}
    return _envelope(call, [choice]) | _extras(result, total_experts)


def _logprobs(result: GenerationResult, decode: Callable[[int], str], echo: bool) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs` object: per token its text, log-probability, best alternatives
    (text -> log-probability) and character offset; with `echo` the prompt's tokens come first (the very first
    has no log-probability)."""
    items = [*((result.prompt_logprobs or []) if echo else []), *(result.logprobs or [])]
    tokens, offsets, position = [], [], 0
    for item in items:
        piece = decode(item.token)
        tokens.append(piece)
        offsets.append(position)
        position += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [
            None if item.logprob is None else {decode(token): lp for token, lp in item.top} for item in items
        ],
        "text_offset": offsets,
    }


def chunk_body(
    call: GenerationCall, text: str | None = None, result: GenerationResult | None = None, total_experts: int = 0
) -> dict[str, Any]:
    """One server-sent event of a streamed request: a text piece, or the last one with the finish reason, usage
    and routing stats (`text=None` with no result: the chat stream's opening role delta)."""
    reason = finish_reason(result) if result is not None else None
    if call.chat:
        delta = {"content": text} if text is not None else {} if result is not None else {"role": "assistant"}
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice |= {"logprobs": None, "finish_reason": reason}
    extras = _extras(result, total_experts) if result is not None else {}
    return _envelope(call, [choice], chunk=True) | extras


def finish_reason(result: GenerationResult) -> str:
    return FINISH_REASONS.get(result.finish_reason, result.finish_reason)


def _envelope(call: GenerationCall, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if call.chat else "text_completion"
    prefix = "chatcmpl-" if call.chat else "cmpl-"
    return {"id": prefix + call.id, "object": kind, "created": call.created, "model": call.model, "choices": choices}


def _extras(result: GenerationResult, total_experts: int) -> dict[str, Any]:
    completion = len(result.token_ids)
    plan = result.plan
    return {
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
        },
        "premoe": {
            "task": plan.task,
            "decision": plan.decision,
            "score": plan.score,
            "pattern_experts": plan.pattern.size,
            "total_experts": total_experts,
            "coverage": result.coverage,
            "widened": result.widened,
            "loads": {**result.loads, "bytes": result.loaded_bytes},
            "timings": result.timings,
            "token_ids": result.token_ids,
            "expert_calls": result.expert_calls,
            "expert_calls_skipped": result.expert_calls_skipped,
        },
    }


def model_body(view: TaskView | None) -> dict[str, Any]:
    """A task as an OpenAI model (`None`: the `auto` model, retrieval's choice per prompt)."""
    if view is None:
        return {"id": AUTO, "object": "model", "created": 0, "owned_by": "premoe", "premoe": {"retrieval": True}}
    try:
        created = int(datetime.fromisoformat(view.created).timestamp())
    except ValueError:
        created = 0
    return {
        "id": view.name,
        "object": "model",
        "created": created,
        "owned_by": "premoe",
        "premoe": {
            "description": view.description,
            "criterion": view.criterion,
            "pattern_experts": view.pattern.size,
            "pattern_bytes": view.pattern_bytes,
            # Kept experts per precision below full ({} for a drop-only pattern); GetTask has them per expert.
            "lowered_experts": _lowered_counts(view),
            "demo_coverage": view.demo_coverage,
        },
    }


def _lowered_counts(view: TaskView) -> dict[str, int]:
    counts: dict[str, int] = {}
    for by_expert in view.pattern.precisions.values():
        for precision in by_expert.values():
            counts[precision] = counts.get(precision, 0) + 1
    return dict(sorted(counts.items()))


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
