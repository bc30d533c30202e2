"""Incremental text: one token at a time gives the text of a full decode, and stop strings never leak."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from premoe_service.engine.text import TextStream
from premoe_service.families.tiny import tiny_tokenizer

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference-moe"
TEXTS = [
    "def f(x):\n    return x * 2  # doubled\n",
    "Ünïcödé façade — naïve café, 日本語のテキスト, emoji 🙂🚀 and maths ∑∫√.",
    "   leading spaces and\ttabs\r\n",
]


@pytest.fixture(scope="module", params=["reference", "tiny"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(REFERENCE) if request.param == "reference" else tiny_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_full_decode(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ())
    pieces = [stream.push(token) for token in ids]
    pieces.append(stream.finish())
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full == stream.text
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in full


@pytest.mark.parametrize("stop", ["return", "  #", "café", "🚀"])
def test_stop_strings_cut_the_text_and_never_leak(tokenizer, stop: str) -> None:
    text = "".join(TEXTS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    if stop not in full:  # the tiny tokenizer is ASCII only: stop on what it spelled instead
        stop = "tabs"
    assert stop in full
    stream = TextStream(tokenizer, (stop, "never-seen"))
    sent = ""
    for token in ids:
        sent += stream.push(token)
        assert stop not in sent
        if stream.stopped:
            break
    sent += stream.finish()
    assert stream.stopped and sent == stream.text == full[: full.index(stop)]
