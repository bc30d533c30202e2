"""The tokenizer at the HTTP door: vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info` bodies, and the text
pieces that place each token in an echoed text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InvalidArgument
from ..serving.limits import check_token_ids
from .http_types import boolean_field, checked_text, messages_field, refuse_unknown

TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"})
TOKENIZE_FIELDS |= {"return_token_strs"}
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})


def text_pieces(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool = False) -> list[str]:
    """The text each token adds in context: joined they are the decoded text (a character split over tokens
    belongs to the token that completes it; the others add "")."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        return [stream.step(backend, int(token)) or "" for token in ids]
    pieces, text = [], ""
    for end in range(1, len(ids) + 1):  # slow tokenizers: decode the growing prefix
        full = str(tokenizer.decode(list(ids[:end]), skip_special_tokens=skip_special_tokens))
        pieces.append(full[len(text) :] if full.startswith(text) else "")
        text = full if full.startswith(text) else text
    return pieces


def tokenize_body(
    body: dict[str, Any], tokenizer: Any, template: Any, vocab_size: int, context: int | None
) -> dict[str, Any]:
    """`/tokenize`: `prompt` (with special tokens unless `add_special_tokens` is false) or chat `messages`
    (rendered with the chat template)."""
    refuse_unknown(body, TOKENIZE_FIELDS, "/tokenize")
    if ("prompt" in body) == ("messages" in body):
        raise InvalidArgument("give either prompt or messages", field="prompt")
    if "messages" in body:
        if not boolean_field(body, "add_generation_prompt", True):
            raise InvalidArgument("only true is supported", field="add_generation_prompt")
        text, special = template(messages_field(body))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidArgument(f"expected a string, got {prompt!r:.40}", field="prompt")
        text, special = checked_text(prompt, "prompt"), True
    special = boolean_field(body, "add_special_tokens", special)
    ids = [int(i) for i in tokenizer(text, add_special_tokens=special)["input_ids"]]
    reply: dict[str, Any] = {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": None}
    if boolean_field(body, "return_token_strs"):
        reply["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return reply


def detokenize_body(body: dict[str, Any], tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """`/detokenize`: the text of `tokens` (special tokens spelled out, as vLLM does)."""
    refuse_unknown(body, DETOKENIZE_FIELDS, "/detokenize")
    tokens = body.get("tokens")
    if isinstance(tokens, list) and not tokens:
        return {"prompt": ""}
    ids = check_token_ids(tokens, vocab_size, field="tokens")
    return {"prompt": str(tokenizer.decode(ids))}


def tokenizer_info_body(tokenizer: Any, chat_template: str, context: int | None) -> dict[str, Any]:
    """`/tokenizer_info`: what a client needs to tokenize as the server does (lm-eval's remote tokenizer reads
    the special tokens and the chat template)."""
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "model_max_length": context,
        "add_bos_token": bool(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
        if tokenizer.bos_token_id is not None
        else False,
        "chat_template": chat_template,
    }
