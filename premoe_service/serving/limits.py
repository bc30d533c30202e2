"""A prompt's size limits, checked before any expensive work: bytes before tokenizing or embedding, then tokens
against the server's limit and the model's context."""

from __future__ import annotations

from ..errors import InvalidArgument


def check_prompt_bytes(prompt: object, limit: int) -> None:
    """Refuse a prompt over `limit` UTF-8 bytes, encoding it only when its length alone cannot decide (what is not
    a string is `check_prompt`'s to refuse)."""
    if isinstance(prompt, str) and len(prompt) * 4 > limit:  # a character is at most 4 UTF-8 bytes
        size = len(prompt) if len(prompt) > limit else len(prompt.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise InvalidArgument(f"prompt is over {limit} bytes (the server's limit)", field="prompt")


def check_prompt_tokens(count: int, new_tokens: int, limit: int, context: int | None) -> None:
    """The prompt's `count` tokens fit the server's `limit` and, with `new_tokens`, the model's `context`."""
    if count == 0:
        raise InvalidArgument("prompt encodes to no tokens", field="prompt")
    if context is not None:
        limit = min(limit, context - 1)
    if count > limit:
        raise InvalidArgument(f"prompt has {count} tokens, the limit is {limit}", field="prompt")
    if context is not None and count + new_tokens > context:
        raise InvalidArgument(
            f"{count} prompt tokens + {new_tokens} new tokens exceed the model's context of {context}",
            field="max_new_tokens",
        )


def check_token_ids(ids: object, vocab_size: int, field: str = "prompt") -> list[int]:
    """`ids` as a list if it is a non-empty list of token ids below `vocab_size`, else an error naming the first
    bad id, its position and the vocabulary size."""
    if not isinstance(ids, list | tuple) or not ids:
        raise InvalidArgument("expected a non-empty list of token ids", field=field)
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise InvalidArgument(
                f"token id {token!r:.20} at position {position} is not in the vocabulary of {vocab_size} tokens "
                f"(0..{vocab_size - 1})",
                field=field,
            )
    return list(ids)
