"""The HTTP boundary, replies: results encoded in OpenAI's shapes, with our routing stats under `premoe`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import Response

from ..errors import PreMoeError
from ..serving import GenerationResult, TaskView
from .http_io import BodyTooLarge
from .http_types import AUTO, GenerationCall
from .interceptor import status_of

log = logging.getLogger(__name__)
Endpoint = Callable[[Request], Awaitable[Response]]

# HTTP statuses of the gRPC codes that the one mapping in `interceptor.STATUS` gives our errors.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class Spelling:
    """How the `logprobs` object writes tokens: `spell` one token alone (the `tokens` and `top_logprobs` keys, as
    OpenAI spells them), `pieces` the text each token adds in context (the `text_offset`s and the echoed text)."""

    def __init__(self, spell: Callable[[int], str], pieces: Callable[[Sequence[int], bool], list[str]]) -> None:
        self.spell = spell
        self.pieces = pieces


def echoed_prompt(result: GenerationResult, spelling: Spelling) -> str:
    """The prompt as echoed: its tokens' text in context, special tokens spelled out (a BOS the server added
    shows), so that the echoed text, the tokens and their offsets agree."""
    return "".join(spelling.pieces(result.prompt_ids, False))


def completion_body(
    call: GenerationCall, results: Sequence[GenerationResult], total_experts: int, spelling: Spelling
) -> dict[str, Any]:
    """The whole reply of a non-streamed request: one choice per prompt, in the prompts' order."""
    choices = []
    for index, result in enumerate(results):
        prompt = echoed_prompt(result, spelling) if call.echo else ""
        text = prompt + result.text
        if call.chat:
            choice: dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": index, "text": text}
        logprobs = _logprobs(result, spelling, call.echo) if result.logprobs is not None else None
        choice |= {"logprobs": logprobs, "finish_reason": finish_reason(result)}
        if len(results) > 1:
            choice["premoe"] = _stats(result, total_experts)
        choices.append(choice)
    return _envelope(call, choices) | {"usage": usage(results, call.n), "premoe": _stats(results[0], total_experts)}


def _logprobs(result: GenerationResult, spelling: Spelling, echo: bool) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs` object: per token its text, log-probability, best alternatives
    (text -> log-probability) and character offset in the choice's text; with `echo` the prompt's tokens come
    first (the very first has no log-probability)."""
    scored = result.prompt_logprobs if echo and result.prompt_logprobs is not None else []
    items = [*scored, *(result.logprobs or [])]
    pieces = [*(spelling.pieces(result.prompt_ids, False) if scored else []), *spelling.pieces(result.token_ids, True)]
    offsets, position = [], 0
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    return {
        "tokens": [spelling.spell(item.token) for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [
            None if item.logprob is None else {spelling.spell(token): lp for token, lp in item.top} for item in items
        ],
        "text_offset": offsets,
    }


def chunk_body(
    call: GenerationCall,
    text: str | None = None,
    result: GenerationResult | None = None,
    total_experts: int = 0,
    index: int = 0,
) -> dict[str, Any]:
    """One server-sent event of a streamed request: a text piece of choice `index`, or its last one with the
    finish reason, usage and routing stats (`text=None` with no result: the chat stream's opening role delta)."""
    reason = finish_reason(result) if result is not None else None
    if call.chat:
        delta = {"content": text} if text is not None else {} if result is not None else {"role": "assistant"}
        choice: dict[str, Any] = {"index": index, "delta": delta}
    else:
        choice = {"index": index, "text": text or ""}
    choice |= {"logprobs": None, "finish_reason": reason}
    extras = {"usage": usage([result]), "premoe": _stats(result, total_experts)} if result is not None else {}
    return _envelope(call, [choice], chunk=True) | extras


def usage_chunk(call: GenerationCall, results: Sequence[GenerationResult]) -> dict[str, Any]:
    """`stream_options.include_usage`: the last chunk, no choices, the whole request's usage."""
    return _envelope(call, [], chunk=True) | {"usage": usage(results, call.n)}


def usage(results: Sequence[GenerationResult], n: int = 1) -> dict[str, int]:
    """Tokens read (each prompt once, whatever its `n` choices) and generated over `results`."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(result: GenerationResult) -> str:
    return FINISH_REASONS.get(result.finish_reason, result.finish_reason)


def _envelope(call: GenerationCall, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if call.chat else "text_completion"
    prefix = "chatcmpl-" if call.chat else "cmpl-"
    return {"id": prefix + call.id, "object": kind, "created": call.created, "model": call.model, "choices": choices}


def _stats(result: GenerationResult, total_experts: int) -> dict[str, Any]:
    plan = result.plan
    return {
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
    }


def model_body(view: TaskView | None) -> dict[str, Any]:
    """A task as an OpenAI model (`None`: the `auto` model, retrieval's choice per prompt)."""
    if view is None:
        return {"id": AUTO, "object": "model", "created": 0, "owned_by": "premoe", "premoe": {"retrieval": True}}
    return task_model_body(view)


def full_model_body(name: str, total_experts: int, context: int | None) -> dict[str, Any]:
    """The served model itself: every routed expert."""
    premoe = {"pattern_experts": total_experts, "whole_model": True}
    return {"id": name, "object": "model", "created": 0, "owned_by": "premoe", "max_model_len": context} | {
        "premoe": premoe
    }


def task_model_body(view: TaskView) -> dict[str, Any]:
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


def error_reply(
    exc: BaseException, params: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], int, grpc.StatusCode]:
    """OpenAI's error body, the HTTP status and the gRPC code of an exception (the one status table of
    `interceptor` mapped to HTTP). `param` is the error's field, renamed by `params` where the door calls it
    otherwise (the completions door's `model` for our `task`); anything but our own errors is a 500."""
    code, message = status_of(exc)
    status = 413 if isinstance(exc, BodyTooLarge) else HTTP_STATUS.get(code, 500)
    if status == 500 or not isinstance(exc, PreMoeError):
        log.error("HTTP request failed", exc_info=exc)
        return error_body("internal error; see the server log", "server_error", None, "internal"), 500, code
    param = (params or {}).get(exc.field, exc.field) if exc.field else None
    if param and param != exc.field:
        message = f"{param}: {exc.message}" if not exc.message.startswith(param) else exc.message
    return error_body(message, ERROR_TYPES[status], param, code.name.lower()), status, code
