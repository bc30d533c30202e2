"""The embedder's precision: bfloat16 weights where the CPU multiplies them natively, float32 vectors either way,
and a name that keeps its vectors apart from float32 ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from premoe_service.errors import InvalidArgument
from premoe_service.profiler.profile import Profile
from premoe_service.retrieval import Embedder
from premoe_service.retrieval.demo_vectors import demo_vectors
from premoe_service.retrieval.embedder import (
    DEFAULT_EMBEDDER,
    PACKED_BFLOAT16_REVISION,
    native_bfloat16,
    resolve_precision,
)
from premoe_service.serving import ServiceConfig

TEXTS = [
    "add: 12+345=",
    "def parse(line): return line.split(':', 1)",
    "Permission is hereby granted, free of charge, to any person",
    '#!/bin/sh\nset -e\nexec "$@"',
    "rev: k q a m =",
    "sort: 5391=",
    "date: 2023-04-05=",
    "static inline int max(int a, int b)",
]


@pytest.fixture(scope="module")
def exact() -> Embedder:
    return Embedder(precision="float32")


@pytest.fixture(scope="module")
def halved() -> Embedder:
    return Embedder(precision="bfloat16")


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_auto_takes_bfloat16_exactly_where_the_cpu_has_it_natively() -> None:
    flags = _cpu_flags()
    native = "avx512_bf16" in flags or "amx_tile" in flags
    assert native_bfloat16("cpu") == native
    assert resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"


def test_an_unknown_precision_is_refused_by_name(tmp_path: Path) -> None:  # the flag: tests/test_cli.py
    with pytest.raises(InvalidArgument) as info:
        resolve_precision("float16")
    assert info.value.field == "embedder_precision"
    with pytest.raises(InvalidArgument) as info:
        ServiceConfig(store=tmp_path, embedder_precision="fp16")
    assert info.value.field == "embedder_precision"


def test_bfloat16_weights_give_float32_unit_vectors_near_the_exact_ones(exact: Embedder, halved: Embedder) -> None:
    assert exact.name == DEFAULT_EMBEDDER and exact.precision == "float32"
    # named apart, with the packed kernels' revision: vectors of an older revision are not this one's
    assert halved.name == f"{DEFAULT_EMBEDDER}@bfloat16.{PACKED_BFLOAT16_REVISION}" and halved.precision == "bfloat16"
    assert {p.dtype for p in halved._model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in exact._model.parameters()} == {torch.float32}
    near, far = exact.encode(TEXTS), halved.encode(TEXTS)
    assert far.dtype == np.float32 and far.shape == near.shape
    np.testing.assert_allclose(np.linalg.norm(far, axis=1), 1.0, atol=1e-6)  # normalised in float32
    cosines = (near * far).sum(axis=1)
    assert cosines.min() > 0.995, cosines
    # Each text is still nearest to itself among the exact vectors: what retrieval needs.
    assert list((far @ near.T).argmax(axis=1)) == list(range(len(TEXTS)))


def test_auto_is_the_default_everywhere() -> None:
    assert Embedder.__init__.__kwdefaults__["precision"] == "auto"
    assert ServiceConfig(store=Path("store")).embedder_precision == "auto"


def test_the_float32_path_gives_sentence_transformers_own_vectors(exact: Embedder) -> None:
    own = exact._model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    np.testing.assert_allclose(exact.encode(TEXTS), own, rtol=0, atol=1e-6)  # packed: no padding, other blocks


def test_stored_float32_vectors_are_embedded_again_by_a_bfloat16_embedder(exact: Embedder, halved: Embedder) -> None:
    profile = Profile(
        name="numbers",
        fingerprint="test",
        moe_layers=(0,),
        scores={"tcess": torch.rand(1, 8)},
        demos=TEXTS[:3],
        demo_embeddings=torch.from_numpy(exact.encode(TEXTS[:3])),
        embedder=exact.name,
    )
    kept, vectors = demo_vectors(profile, exact)
    assert kept is profile and np.array_equal(vectors, profile.demo_embeddings.numpy())
    again, vectors = demo_vectors(profile, halved)
    assert again.embedder == halved.name
    assert np.array_equal(vectors, halved.encode(TEXTS[:3]))
    assert not np.array_equal(vectors, profile.demo_embeddings.numpy())
    # and back: the bfloat16 vectors are not taken for float32 ones
    back, vectors = demo_vectors(dataclasses.replace(again), exact)
    assert back.embedder == exact.name and np.array_equal(vectors, exact.encode(TEXTS[:3]))


def test_the_server_embeds_in_the_precision_it_is_configured_with(tmp_path: Path) -> None:
    from premoe_service.families.tiny import save_tiny_checkpoint
    from premoe_service.profiler import Demo, Selection
    from premoe_service.serving import ServingCore
    from premoe_service.store import shard

    save_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    service = ServingCore(ServiceConfig(store=tmp_path / "store", device="cpu", embedder_precision="bfloat16"))
    try:
        assert service.embedder.precision == "bfloat16"
        assert service.embedder.name == f"{DEFAULT_EMBEDDER}@bfloat16.{PACKED_BFLOAT16_REVISION}"
        service.register_task("code", [Demo("def add(a, b):\n    return a + b\n")], selection=Selection())
        # registered with the vectors of the embedder that routes
        assert service.registry.get("code").embedder == service.embedder.name
        assert service.route("def add(a, b): return a + b").task == "code"
    finally:
        service.close()
