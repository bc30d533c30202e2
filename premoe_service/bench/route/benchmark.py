"""Routing benchmark: route latency against raw embed + raw FAISS, accuracy and threshold calibration.

Run it as `python -m premoe_service.bench.route [--quick] [--repeats N] [--index-sweep]`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from ...profiler.profile import Profile
from ...retrieval import Embedder, MemoryProfileStore, Registry, RouteRecord, TaskIndex, evaluate
from ...retrieval.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, IndexKind
from .tasks import HELD_OUT, TASKS


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_of(name: str, vectors: np.ndarray, embedder: str, demos: list[str]) -> Profile:
    return Profile(
        name=name,
        fingerprint="bench",
        moe_layers=(0,),
        scores={"tcess": torch.zeros(1, 8)},
        demo_embeddings=torch.from_numpy(vectors),
        embedder=embedder,
        demos=demos,
    )


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build_registry(embedder: Embedder, real: dict[str, np.ndarray], tasks: int, rng: np.random.Generator) -> Registry:
    """A registry of `tasks` tasks: the real ones first, then synthetic tasks of 3 demo vectors each.

    Synthetic demos are real demo vectors plus noise, so they land near the queries as real tasks would.
    """
    store = MemoryProfileStore()
    names = list(real)[:tasks]
    for name in names:
        store.write(profile_of(name, real[name], embedder.name, TASKS[name]), replace=False)
    pool = np.concatenate(list(real.values()))
    for i in range(tasks - len(names)):
        base = pool[rng.integers(0, len(pool), 3)]
        vectors = normalise(base + 0.12 * rng.standard_normal(base.shape).astype(np.float32))
        store.write(profile_of(f"synthetic-{i:05d}", vectors, embedder.name, []), replace=False)
    return Registry(store, embedder=embedder)


def raw_index(registry: Registry) -> Any:
    """A bare FAISS index of the same kind and vectors as the registry's: the baseline."""
    import faiss

    index = registry.index
    raw: Any
    if index.uses_hnsw:
        raw = faiss.IndexHNSWFlat(index.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        raw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        raw.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        raw = faiss.IndexFlatIP(index.dim)
    raw.add(np.concatenate([index.vectors(t) for t in index.tasks()]))
    return raw


def latency_rows(embedder: Embedder, sizes: list[int], repeats: int) -> list[str]:
    import faiss

    rng = np.random.default_rng(0)
    real = {name: embedder.encode(demos) for name, demos in TASKS.items()}
    queries = [q for q, _ in HELD_OUT]
    rows = []
    threads = faiss.omp_get_max_threads()
    for size in sizes:
        start = time.perf_counter()
        registry = build_registry(embedder, real, size, rng)
        build_s = time.perf_counter() - start
        raw = raw_index(registry)
        k = registry.policy.neighbours

        def raw_route(query: str, raw: Any = raw, k: int = k) -> None:
            vector = embedder.encode([query])
            # The baseline gets the same one-thread search that TaskIndex uses: its fastest setting here.
            faiss.omp_set_num_threads(1)
            raw.search(vector, min(k, raw.ntotal))

        for query in queries[:3]:  # warm-up
            registry.route(query)
            raw_route(query)
        ours: list[float] = []
        base: list[float] = []
        for _ in range(repeats):
            for query in queries:  # interleaved, so load on the shared machine hits both alike
                ours.append(timed(partial(registry.route, query)))
                base.append(timed(partial(raw_route, query)))
        faiss.omp_set_num_threads(threads)
        route_ms, raw_ms = statistics.median(ours) * 1e3, statistics.median(base) * 1e3
        kind = "hnsw" if registry.index.uses_hnsw else "flat"
        rows.append(
            f"{size:>7d} {registry.index.ntotal:>8d} {kind:>5} {build_s:>8.1f} "
            f"{route_ms:>9.2f} {raw_ms:>9.2f} {route_ms / raw_ms:>6.2f}"
        )
    return rows


def accuracy_report(embedder: Embedder) -> list[str]:
    registry = Registry(embedder=embedder)
    for name, demos in TASKS.items():
        registry.register(Profile(name=name, fingerprint="bench", moe_layers=(0,), scores={}, demos=demos))
    result = evaluate(registry, [RouteRecord(q, t) for q, t in HELD_OUT])
    decisions = [(registry.route(q), t) for q, t in HELD_OUT]
    right = [d.score or 0.0 for d, t in decisions if t is not None and d.ranked[0][0] == t]
    rest = [d.score or 0.0 for d, t in decisions if t is None or d.ranked[0][0] != t]
    lines = [
        f"labelled queries   {result.labelled} on-topic, {result.records - result.labelled} off-topic",
        f"top-1 accuracy     {result.top1_accuracy:.3f}",
        f"match accuracy     {result.match_accuracy:.3f}  (threshold {registry.policy.threshold})",
        f"no-match precision {result.no_match_precision:.3f}",
        f"no-match recall    {result.no_match_recall:.3f}",
        f"right-top scores   {min(right):.3f} .. {max(right):.3f}",
        f"other top scores   {min(rest):.3f} .. {max(rest):.3f}",
        f"suggested threshold {result.suggested_threshold} (balanced accuracy {result.balanced_accuracy:.3f})",
    ]
    lines += [f"miss: {q!r} expected {e} got {g}" for q, e, g in result.misses]
    return lines


def sweep_rows(sizes: list[int]) -> list[str]:
    """Exact against HNSW search on clustered vectors: the measurement behind HNSW_THRESHOLD."""
    rng = np.random.default_rng(0)
    dim, rows = 384, []
    for n in sizes:
        centres = normalise(rng.standard_normal((n // 8, dim)))
        vectors = normalise(np.repeat(centres, 8, axis=0) + 0.08 * rng.standard_normal((n // 8 * 8, dim)))
        queries = normalise(centres[rng.integers(0, len(centres), 200)] + 0.08 * rng.standard_normal((200, dim)))
        timings, tops = {}, {}
        kinds: tuple[IndexKind, ...] = ("flat", "hnsw")
        for kind in kinds:
            index = TaskIndex(dim, kind=kind)
            tasks = [(f"t{i}", vectors[i * 8 : i * 8 + 8]) for i in range(n // 8)]
            build = timed(partial(index.add_many, tasks))
            per_query = [timed(partial(index.search, q[None], 64)) for q in queries]
            timings[kind] = (statistics.median(per_query) * 1e3, build)
            tops[kind] = [index.search(q[None], 1)[0][0][0] for q in queries]
        recall = np.mean([a == b for a, b in zip(tops["flat"], tops["hnsw"], strict=True)])
        (flat_ms, _), (hnsw_ms, hnsw_build) = timings["flat"], timings["hnsw"]
        rows.append(f"{n:>7d} {flat_ms:>8.3f} {hnsw_ms:>8.3f} {hnsw_build:>8.1f} {recall:>9.3f}")
    return rows


def main(quick: bool = False, repeats: int | None = None, index_sweep: bool = False) -> None:
    """Print the accuracy report, route latency against the raw baseline per registry size and, with
    `index_sweep`, exact against HNSW search. `quick`: 1, 100 and 1,000 tasks and fewer repeats (~1 min)."""
    sizes = [1, 100, 1_000] if quick else [1, 100, 10_000]
    repeats = repeats or (2 if quick else 5)

    start = time.perf_counter()
    embedder = Embedder()
    print(f"embedder {embedder.name} ({embedder.dim}-d) loaded in {time.perf_counter() - start:.1f} s\n")

    print("== accuracy on the labelled set ==")
    print("\n".join(accuracy_report(embedder)), "\n")

    print("== route latency (median per query: embed + refresh check + search + scoring) ==")
    print(f"{'tasks':>7} {'vectors':>8} {'index':>5} {'build_s':>8} {'route_ms':>9} {'raw_ms':>9} {'ratio':>6}")
    print("\n".join(latency_rows(embedder, sizes, repeats)))
    print("raw = embedder.encode + bare FAISS search of the same vectors; target ratio <= 1.2\n")

    if index_sweep:
        print("== exact vs HNSW search, one query, k=64 ==")
        print(f"{'vectors':>7} {'flat_ms':>8} {'hnsw_ms':>8} {'build_s':>8} {'recall@1':>9}")
        print("\n".join(sweep_rows([2_000, 5_000, 10_000, 20_000, 40_000])))
