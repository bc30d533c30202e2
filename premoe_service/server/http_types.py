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
from ..retrieval import check_prompt
from ..serving import SamplingParams

AUTO = "auto"  # the model name that lets retrieval pick the task
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_BODY_BYTES = 64 << 20  # the gRPC door's receive limit
MAX_LOGPROBS = 20  # alternatives per token
MAX_PROMPTS = 64  # prompts x n in one request (each is a request of its own in the engine's queue)
MAX_STOP_TOKEN_IDS = 64
ROLES = ("system", "developer", "user", "assistant")
# OpenAI and vLLM fields the engine cannot honour, with the values that ask for nothing (those are accepted).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "length_penalty": (None, 1),
    "top_k": (None, -1, 0),
    "min_p": (None, 0),
    "logit_bias": (None, {}),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "use_beam_search": (None, False),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "return_tokens_as_token_ids": (None, False),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "parallel_tool_calls": (None,),
}
# The fields each endpoint reads; any other field is refused by name (none is accepted and ignored).
COMMON_FIELDS = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user"}
    | {"ignore_eos", "min_tokens", "stop_token_ids", "add_special_tokens", "expert_skip_threshold", "n"}
    | {"full_precision"}
    | set(UNSUPPORTED)
)
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "logprobs", "best_of"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs"}
# Service error fields under the names an HTTP caller used.
PARAM_NAMES = {"max_new_tokens": "max_tokens", "task": "model", "name": "model"}
# JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes: text with one is refused.
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Prompt:
    """One prompt as the caller gave it: text (tokenized by the server; a completion's is checked here, once) or
    token ids (used as they are)."""

    text: str | None = None
    ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StreamOptions:
    """`stream_options`: a last chunk with the usage of the whole request (`include_usage`), and each chunk's
    usage so far (vLLM's `continuous_usage_stats`)."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


@dataclass(frozen=True)
class GenerationCall:
    """One `/v1/completions` or `/v1/chat/completions` request, validated."""

    prompts: tuple[Prompt, ...]
    model: str  # as asked: a task name, "auto", or the served model's name
    params: SamplingParams
    stream: bool = False
    echo: bool = False
    chat: bool = False
    add_special_tokens: bool = True
    stream_options: StreamOptions = StreamOptions()
    n: int = 1  # choices per prompt: prompt i's j-th is choice i * n + j (seed + j when a seed is given)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def task(self) -> str | None:
        return None if self.model == AUTO else self.model

    @classmethod
    def from_completion(cls, body: dict[str, Any]) -> GenerationCall:
        """Legacy completions: `prompt` is a string, a list of strings, a list of token ids or a list of such lists
        (one choice each); `logprobs: k` returns each token's log-probability and its k best alternatives; with
        `echo` the prompt's tokens are scored too (and `max_tokens` may be 0), as evaluation harnesses ask."""
        refuse_unknown(body, COMPLETION_FIELDS, "/v1/completions")
        _refuse_unsupported(body)
        echo, stream = boolean_field(body, "echo"), boolean_field(body, "stream")
        logprobs = _integer(body, "logprobs")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(f"must lie in 0..{MAX_LOGPROBS}, got {logprobs}", field="logprobs")
        if logprobs is not None and stream:
            raise InvalidArgument("logprobs with stream is not supported yet; ask without stream", field="logprobs")
        scoring = logprobs is not None and echo
        params = replace(_params(body, "max_tokens"), logprobs=logprobs, prompt_logprobs=scoring)
        prompts = _prompts(body)
        return cls(
            prompts,
            _model(body),
            params,
            n=_choices(body, len(prompts)),
            stream=stream,
            echo=echo,
            add_special_tokens=boolean_field(body, "add_special_tokens", True),
            stream_options=_stream_options(body, stream),
        )

    @classmethod
    def from_chat(
        cls, body: dict[str, Any], template: Callable[[list[dict[str, str]]], tuple[str, bool]]
    ) -> GenerationCall:
        """`template` renders the messages into the prompt, and says whether the tokenizer's special tokens go on
        top of it (a template that writes its own BOS: no)."""
        refuse_unknown(body, CHAT_FIELDS, "/v1/chat/completions")
        _refuse_unsupported(body)
        if body.get("logprobs") not in (None, False):
            raise InvalidArgument("logprobs is supported on /v1/completions only, not yet on chat", field="logprobs")
        model = _model(body)
        length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params = _params(body, length_field)
        text, special = template(messages_field(body))
        stream = boolean_field(body, "stream")
        return cls(
            (Prompt(text=text),),
            model,
            params,
            n=_choices(body, 1),
            stream=stream,
            chat=True,
            add_special_tokens=boolean_field(body, "add_special_tokens", special),
            stream_options=_stream_options(body, stream),
        )


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


def refuse_unknown(body: dict[str, Any], known: frozenset[str], endpoint: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidArgument(f"{unknown[0]} is not a field of {endpoint} this server knows", field=unknown[0])


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if any(_same(value, ok) for ok in neutral):
            continue
        why = " (the engine returns no per-token log-probabilities)" if "logprobs" in name else ""
        raise InvalidArgument(f"{name} is not supported yet{why}; got {value!r:.40}", field=name)


def _same(value: Any, neutral: Any) -> bool:
    """Equal and both booleans or neither (`logprobs: 0` asks for log-probabilities, `false` does not)."""
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def _model(body: dict[str, Any]) -> str:
    """A task name, `auto`, or any other name (the served model's own is checked where it is known)."""
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise InvalidArgument(f"expected a task name, the model's name or {AUTO!r}, got {model!r:.60}", field="model")
    return checked_text(model, "model")


def _prompts(body: dict[str, Any]) -> tuple[Prompt, ...]:
    """What OpenAI's and vLLM's servers take: a string, a list of strings, a list of token ids, or a list of
    lists of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return (Prompt(text=check_prompt(checked_text(prompt, "prompt"))),)
    if not isinstance(prompt, list) or not prompt:
        raise InvalidArgument(
            f"expected a string, a list of strings, a list of token ids or a list of such lists, got {prompt!r:.40}",
            field="prompt",
        )
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return (Prompt(ids=_token_ids(prompt, "prompt")),)
    if len(prompt) > MAX_PROMPTS:
        raise InvalidArgument(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", field="prompt")
    prompts = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            prompts.append(Prompt(text=check_prompt(checked_text(item, f"prompt[{i}]"), f"prompt[{i}]")))
        elif isinstance(item, list) and item:
            prompts.append(Prompt(ids=_token_ids(item, f"prompt[{i}]")))
        else:
            raise InvalidArgument(
                f"expected a string or a non-empty list of token ids, got {item!r:.40}", field=f"prompt[{i}]"
            )
    return tuple(prompts)


def _choices(body: dict[str, Any], prompts: int) -> int:
    """`n`, the choices per prompt; `best_of` may only say the same (no ranking of extra samples yet)."""
    n = _integer(body, "n")
    n = 1 if n is None else n
    if n < 1 or n * prompts > MAX_PROMPTS:
        raise InvalidArgument(f"must lie in 1..{MAX_PROMPTS // prompts} for {prompts} prompt(s), got {n}", field="n")
    best_of = _integer(body, "best_of")
    if best_of is not None and best_of != n:
        raise InvalidArgument(
            f"only best_of = n ({n}) is supported (ranking extra samples is not), got {best_of}", field="best_of"
        )
    return n


def _token_ids(ids: list[Any], name: str) -> tuple[int, ...]:
    """Integers (their range is the vocabulary's, checked by the service)."""
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int):
            raise InvalidArgument(
                f"expected token ids (integers), got {token!r:.20} at position {position}", field=name
            )
    return tuple(ids)


def _stream_options(body: dict[str, Any], stream: bool) -> StreamOptions:
    options = body.get("stream_options")
    if options is None:
        return StreamOptions()
    if not stream:
        raise InvalidArgument("is only allowed with stream: true", field="stream_options")
    if not isinstance(options, dict):
        raise InvalidArgument(f"expected an object, got {options!r:.40}", field="stream_options")
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise InvalidArgument(f"unknown option {unknown[0]!r}", field=f"stream_options.{unknown[0]}")
    return StreamOptions(
        boolean_field(options, "include_usage", field="stream_options.include_usage"),
        boolean_field(options, "continuous_usage_stats", field="stream_options.continuous_usage_stats"),
    )


def messages_field(body: dict[str, Any]) -> list[dict[str, str]]:
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
        out.append({"role": role, "content": checked_text(content, f"messages[{i}].content")})
    return out


def _params(body: dict[str, Any], length_field: str) -> SamplingParams:
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise InvalidArgument(f"must lie in 0..2**63-1, got {seed}", field="seed")
    max_tokens = _integer(body, length_field)
    max_new_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    min_tokens = _integer(body, "min_tokens") or 0
    if not 0 <= min_tokens <= max(max_new_tokens, 0):
        raise InvalidArgument(f"must lie in 0..{length_field} ({max_new_tokens}), got {min_tokens}", field="min_tokens")
    stop = _stop(body)
    if min_tokens and stop:
        raise InvalidArgument(
            "min_tokens with stop strings is not supported yet (stop_token_ids and the EOS are)", field="min_tokens"
        )
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        seed=seed,
        stop=stop,
        skip_below=_number(body, "expert_skip_threshold", 0.0),  # our extension: online expert skipping
        ignore_eos=boolean_field(body, "ignore_eos"),
        min_tokens=min_tokens,
        stop_token_ids=_stop_token_ids(body),
        full_precision=boolean_field(body, "full_precision"),  # our extension: never demoted under pressure
    )


def _stop_token_ids(body: dict[str, Any]) -> tuple[int, ...]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"expected a list of at most {MAX_STOP_TOKEN_IDS} token ids", field="stop_token_ids")
    return _token_ids(ids, "stop_token_ids")


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


def boolean_field(body: dict[str, Any], name: str, default: bool = False, field: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(f"expected true or false, got {value!r:.40}", field=field or name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument(f"expected a string or a list of strings, got {stop!r:.40}", field="stop")
    return tuple(checked_text(s, "stop") for s in stops)


def checked_text(value: str, name: str) -> str:
    """`value` unless it holds a lone surrogate (valid JSON, but not text: the gRPC door refuses it as bad UTF-8)."""
    found = SURROGATE.search(value)
    if found is not None:
        raise InvalidArgument(
            f"holds the lone surrogate \\u{ord(found.group()):04x} at {found.start()}, which is not text", field=name
        )
    return value
