"""The HTTP boundary, requests: OpenAI JSON bodies decoded into generation calls (validated, fields named).
Replies are encoded in `http_replies`."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InvalidArgument
from ..names import check_task_name
from ..serving import SamplingParams

AUTO = "auto"  # the model name that lets retrieval pick the task
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_BODY_BYTES = 64 << 20  # the gRPC door's receive limit
MAX_LOGPROBS = 20  # alternatives per token
ROLES = ("system", "developer", "user", "assistant")
# OpenAI fields the engine cannot honour, with the values that ask for nothing (those are accepted).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
}
# Service error fields under the names an HTTP caller used.
PARAM_NAMES = {"max_new_tokens": "max_tokens", "task": "model", "name": "model"}
# JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes: text with one is refused.
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class GenerationCall:
    """One `/v1/completions` or `/v1/chat/completions` request, validated."""

    prompt: str
    model: str  # as asked: a task name or "auto"
    params: SamplingParams
    stream: bool = False
    echo: bool = False
    chat: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def task(self) -> str | None:
        return None if self.model == AUTO else self.model

    @classmethod
    def from_completion(cls, body: dict[str, Any]) -> GenerationCall:
        """Legacy completions: `logprobs: k` returns each token's log-probability and its k best alternatives;
        with `echo` the prompt's tokens are scored too (and `max_tokens` may be 0), as evaluation harnesses ask."""
        _refuse_unsupported(body)
        echo, stream = _boolean(body, "echo"), _boolean(body, "stream")
        logprobs = _integer(body, "logprobs")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(f"must lie in 0..{MAX_LOGPROBS}, got {logprobs}", field="logprobs")
        if logprobs is not None and stream:
            raise InvalidArgument("logprobs with stream is not supported yet; ask without stream", field="logprobs")
        scoring = logprobs is not None and echo
        params = replace(_params(body, "max_tokens"), logprobs=logprobs, prompt_logprobs=scoring)
        return cls(_prompt(body), _model(body), params, stream=stream, echo=echo)

    @classmethod
    def from_chat(cls, body: dict[str, Any], template: Callable[[list[dict[str, str]]], str]) -> GenerationCall:
        """`template` renders the messages into the prompt (the tokenizer's chat template)."""
        _refuse_unsupported(body)
        if body.get("logprobs") not in (None, False):
            raise InvalidArgument("logprobs is supported on /v1/completions only, not yet on chat", field="logprobs")
        model = _model(body)
        length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params = _params(body, length_field)
        return cls(template(_messages(body)), model, params, stream=_boolean(body, "stream"), chat=True)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"the body is not valid JSON ({exc})", field="body") from None
    except RecursionError:
        raise InvalidArgument("the body's JSON is nested too deeply", field="body") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"expected a JSON object, got {type(body).__name__}", field="body")
    return body


# --- decoding ----------------------------------------------------------------------------------------------


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if any(_same(value, ok) for ok in neutral):
            continue
        if name == "n":
            raise InvalidArgument(f"only n = 1 is supported (got {value!r:.40})", field=name)
        why = " (the engine returns no per-token log-probabilities)" if "logprobs" in name else ""
        raise InvalidArgument(f"{name} is not supported yet{why}; got {value!r:.40}", field=name)


def _same(value: Any, neutral: Any) -> bool:
    """Equal and both booleans or neither (`logprobs: 0` asks for log-probabilities, `false` does not)."""
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument(f"expected a task name or {AUTO!r}, got {model!r}", field="model")
    return model if model == AUTO else check_task_name(model, field="model")


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidArgument(f"one prompt per request, got a list of {len(prompt)}", field="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgument(f"expected a string (token ids are not accepted), got {prompt!r:.40}", field="prompt")
    return _text(prompt, "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("expected a non-empty list of {role, content} objects", field="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument("expected an object with role and content", field=f"messages[{i}]")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidArgument(f"expected one of {', '.join(ROLES)}, got {role!r}", field=f"messages[{i}].role")
        if isinstance(content, list):  # content parts: only text ones
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise InvalidArgument("only text content parts are supported", field=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidArgument(f"expected a string, got {content!r:.40}", field=f"messages[{i}].content")
        out.append({"role": role, "content": _text(content, f"messages[{i}].content")})
    return out


def _params(body: dict[str, Any], length_field: str) -> SamplingParams:
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise InvalidArgument(f"must lie in 0..2**63-1, got {seed}", field="seed")
    max_tokens = _integer(body, length_field)
    return SamplingParams(
        max_new_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        seed=seed,
        stop=_stop(body),
        skip_below=_number(body, "expert_skip_threshold", 0.0),  # our extension: online expert skipping
    )


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"expected an integer, got {value!r:.40}", field=name)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"expected a number, got {value!r:.40}", field=name)
    return float(value)


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"expected true or false, got {value!r:.40}", field=name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument(f"expected a string or a list of strings, got {stop!r:.40}", field="stop")
    return tuple(_text(s, "stop") for s in stops)


def _text(value: str, name: str) -> str:
    """`value` unless it holds a lone surrogate (valid JSON, but not text: the gRPC door refuses it as bad UTF-8)."""
    found = SURROGATE.search(value)
    if found is not None:
        raise InvalidArgument(
            f"holds the lone surrogate \\u{ord(found.group()):04x} at {found.start()}, which is not text", field=name
        )
    return value
