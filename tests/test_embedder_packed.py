"""The embedder run packed (`retrieval/packed.py`): a text's vector is the same bits alone and in any pass, in
float32 and bfloat16, and equals sentence-transformers' own within float32 rounding; a model that cannot run packed
goes through sentence-transformers."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from premoe_service.retrieval import Embedder
from premoe_service.retrieval.embedder import default_model_path

POOL = [
    "add: 12+345=",
    "def parse(line): return line.split(':', 1)",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software",
    '#!/bin/sh\nset -e\nexec "$@"',
    "rev: k q a m =",
    "sort: 5391=",
    "date: 2023-04-05=",
    "static inline int max(int a, int b) { return a > b ? a : b; }",
    "Wie spät ist es in Tokio, wenn es in Berlin Mittag ist? 漢字 ✓",
    "   leading and trailing spaces   ",
    "x",
    # longer than the model's 256 tokens: truncated the same way alone and beside others
    " ".join(f"word{i}" for i in range(400)),
    "The river had risen overnight, and by morning the lower fields were a sheet of grey water under a low sky. "
    "Nobody in the village could remember a flood like it, though the old miller said his father had seen one.",
]


@pytest.fixture(scope="module")
def embedders() -> dict[str, Embedder]:
    return {precision: Embedder(precision=precision) for precision in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def alone(embedders: dict[str, Embedder]) -> dict[str, np.ndarray]:
    return {p: np.stack([e.encode([text])[0] for text in POOL]) for p, e in embedders.items()}


def test_the_default_model_runs_packed(embedders: dict[str, Embedder]) -> None:
    for embedder in embedders.values():
        assert embedder.unpacked_reason is None and embedder._packed is not None


@settings(max_examples=30, deadline=None)
@given(picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=24))
def test_a_text_has_the_same_vector_alone_and_in_any_pass(
    embedders: dict[str, Embedder], alone: dict[str, np.ndarray], picks: list[int]
) -> None:
    # Passes of up to 24 texts (several hundred rows, many row blocks), any order, repeats allowed.
    for precision, embedder in embedders.items():
        got = embedder.encode([POOL[i] for i in picks])
        for row, i in enumerate(picks):
            assert np.array_equal(got[row], alone[precision][i]), (precision, POOL[i][:30], picks)


def test_prompts_that_share_a_pass_get_their_vectors_alone(
    embedders: dict[str, Embedder], alone: dict[str, np.ndarray]
) -> None:
    # Calls made at once share the embedder's passes (`Embedder.encode`): each still gets its vector alone.
    for precision, embedder in embedders.items():
        got = _encode_at_once(embedder, POOL)
        for i in range(len(POOL)):
            assert np.array_equal(got[i], alone[precision][i]), (precision, POOL[i][:30])


def _encode_at_once(embedder: Embedder, texts: list[str]) -> dict[int, np.ndarray]:
    """Each text's vector from its own `encode` call, the calls made at once from threads of their own."""
    got: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(texts))

    def call(i: int) -> None:
        barrier.wait()
        got[i] = embedder.encode([texts[i]])[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return got


def test_packed_vectors_are_sentence_transformers_own_within_rounding(embedders: dict[str, Embedder]) -> None:
    exact = embedders["float32"]
    own = exact._model.encode(POOL, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    np.testing.assert_allclose(exact.encode(POOL), own, rtol=0, atol=1e-6)
    # bfloat16 weights: near the float32 vectors, each text still nearest to its own
    halved = embedders["bfloat16"].encode(POOL)
    assert ((halved * own).sum(axis=1)).min() > 0.999
    assert list((halved @ own.T).argmax(axis=1)) == list(range(len(POOL)))


def test_a_model_that_cannot_run_packed_goes_through_sentence_transformers(tmp_path: Path) -> None:
    model = tmp_path / "cls-pooled"
    shutil.copytree(default_model_path(), model)
    pooling = model / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    pooling.write_text(json.dumps(config))
    embedder = Embedder(model)  # "auto"
    assert embedder.unpacked_reason is not None and "pooling" in embedder.unpacked_reason
    assert embedder._packed is None
    assert embedder.precision == "float32"  # through sentence-transformers a bfloat16 vector moves with its pass
    own = embedder._model.encode(POOL, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    assert np.array_equal(embedder.encode(POOL), own)
    halved = Embedder(model, precision="bfloat16")
    assert halved.precision == "bfloat16"  # asked for by name: as asked
    assert halved.name == "cls-pooled@bfloat16"  # no packed kernels' revision: sentence-transformers' own pass


def test_a_pass_runs_as_one_torchscript_call_with_the_bits_of_the_same_function_op_by_op(
    embedders: dict[str, Embedder],
) -> None:
    import torch

    from premoe_service.retrieval import packed

    texts = POOL[:6]
    for embedder in embedders.values():
        encoder = embedder._packed
        assert encoder is not None
        assert isinstance(encoder._forward, torch.jit.ScriptFunction)  # one call, no GIL held while it runs
        scripted = encoder.encode(texts)
        try:
            encoder._forward = packed._packed_forward  # what runs where TorchScript cannot compile it
            assert np.array_equal(encoder.encode(texts), scripted)
        finally:
            encoder._forward = packed._scripted()
    assert embedders["bfloat16"]._packed is not None and embedders["bfloat16"]._packed.prepacked
