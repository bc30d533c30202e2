"""Routing benchmark: route latency against raw embed + raw FAISS, accuracy and threshold calibration."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from premoe_service.profiler.profile import Profile
from premoe_service.retrieval import (
    Embedder,
    MemoryProfileStore,
    Registry,
    RouteRecord,
    TaskIndex,
    evaluate,
)
from premoe_service.retrieval.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M

# Six tasks unlike those of the tests, so that the threshold calibrated here is checked on other text there.
TASKS: dict[str, list[str]] = {
    "sql": [
        "Write a SQL query that joins orders with customers and sums the totals per country.",
        "How do I add an index to a PostgreSQL table to speed up lookups by email?",
        "Explain the difference between a LEFT JOIN and an INNER JOIN.",
        "My SELECT with GROUP BY returns an error about a non-aggregated column.",
        "Create a table with a foreign key referencing the users table.",
        "Use a window function to rank employees by salary within each department.",
        "Why is this query doing a sequential scan instead of using the index?",
        "Write a migration that renames a column without losing data.",
    ],
    "medicine": [
        "What are the common side effects of ibuprofen?",
        "My child has a fever of 39 degrees, when should I see a doctor?",
        "Explain how insulin regulates blood sugar in type 1 diabetes.",
        "What is the recommended dose of amoxicillin for an adult with a sinus infection?",
        "What are the symptoms of a vitamin D deficiency?",
        "How is high blood pressure diagnosed and treated?",
        "Can I take paracetamol together with an antihistamine?",
        "What does an elevated white blood cell count in a blood test mean?",
    ],
    "travel": [
        "Plan a five-day itinerary for Kyoto in autumn.",
        "What documents do I need to travel from Canada to Mexico by plane?",
        "Find cheap ways to get from the airport to the city centre in Lisbon.",
        "Which neighbourhoods are best to stay in for a first visit to Barcelona?",
        "Suggest a two-week backpacking route through Vietnam.",
        "Is it worth buying a rail pass for travelling around Switzerland?",
        "What should I pack for a hiking trip to Patagonia in March?",
        "How early should I arrive at the airport for an international flight?",
    ],
    "music-theory": [
        "What is the difference between a major and a minor scale?",
        "Explain what a ii-V-I chord progression is in jazz.",
        "How do I find the relative minor of a major key?",
        "What does a time signature of 6/8 mean?",
        "Explain modes like Dorian and Mixolydian.",
        "How are seventh chords built from triads?",
        "What is a perfect cadence and where is it used?",
        "How do I transpose a melody from C major to E flat major?",
    ],
    "finance": [
        "Should I pay off my credit card debt before investing in index funds?",
        "Explain how compound interest works on a savings account.",
        "What is the difference between a Roth IRA and a traditional IRA?",
        "How much of my income should go into an emergency fund?",
        "How do bond prices react when interest rates rise?",
        "Make a monthly budget for a salary of 3,000 dollars.",
        "What is dollar-cost averaging and does it reduce risk?",
        "How is capital gains tax calculated when I sell shares?",
    ],
    "gardening": [
        "When should I plant tomato seedlings outdoors?",
        "My basil leaves are turning yellow, what am I doing wrong?",
        "How do I make compost from kitchen scraps?",
        "Which vegetables grow well in partial shade?",
        "How often should I water succulents in summer?",
        "How do I prune a rose bush in early spring?",
        "What is the best way to get rid of aphids without pesticides?",
        "How deep should I plant tulip bulbs in the autumn?",
    ],
}

HELD_OUT: list[tuple[str, str | None]] = [
    ("Write a query that returns the ten most recent orders for each customer.", "sql"),
    ("How can I delete duplicate rows from a MySQL table?", "sql"),
    ("What is a primary key and why does every table need one?", "sql"),
    ("Convert this subquery into a common table expression.", "sql"),
    ("Why does my UPDATE statement lock the whole table?", "sql"),
    ("Is it safe to take aspirin during pregnancy?", "medicine"),
    ("What causes migraines and how are they treated?", "medicine"),
    ("How long does a course of antibiotics usually last?", "medicine"),
    ("What are the early warning signs of a stroke?", "medicine"),
    ("What cholesterol level is considered too high?", "medicine"),
    ("What are the must-see sights on a weekend in Rome?", "travel"),
    ("Do I need a visa to visit Japan as a tourist from Brazil?", "travel"),
    ("Recommend a road trip along the coast of California.", "travel"),
    ("How do I avoid jet lag on a long-haul flight to Australia?", "travel"),
    ("Where can I find affordable hostels in Amsterdam?", "travel"),
    ("What is the circle of fifths used for?", "music-theory"),
    ("How do I identify intervals by ear?", "music-theory"),
    ("What is a diminished chord?", "music-theory"),
    ("Explain syncopation in rhythm.", "music-theory"),
    ("How does a key signature tell me which notes are sharp?", "music-theory"),
    ("Is it better to rent or buy a house right now?", "finance"),
    ("How do I start investing with only 100 dollars a month?", "finance"),
    ("What is an expense ratio on an ETF?", "finance"),
    ("How can I improve my credit score quickly?", "finance"),
    ("What happens to my pension if I change jobs?", "finance"),
    ("How do I grow strawberries in containers on a balcony?", "gardening"),
    ("Why are the leaves on my apple tree curling?", "gardening"),
    ("When is the right time to harvest potatoes?", "gardening"),
    ("What soil mix do orchids need?", "gardening"),
    ("How can I keep slugs away from my lettuce?", "gardening"),
    ("zxqv blorf 7781 qqq", None),
    ("asdf jkl; qwerty uiop", None),
    ("lorem ipsum dolor sit amet consectetur", None),
    ("Tell me a joke about penguins.", None),
    ("Who won the Oscar for best actor in 1995?", None),
    ("Translate 'good morning' into German.", None),
    ("Write a haiku about the sea at night.", None),
    ("What is the capital of Australia?", None),
    ("Summarise the plot of Hamlet in three sentences.", None),
    ("How fast can a cheetah run?", None),
    ("ok", None),
    ("??? !!! ...", None),
]


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


def raw_index(registry: Registry) -> object:
    """A bare FAISS index of the same kind and vectors as the registry's: the baseline."""
    import faiss

    index = registry.index
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

        def raw_route(query: str, raw: object = raw, k: int = k) -> None:
            vector = embedder.encode([query])
            # The baseline gets the same one-thread search that TaskIndex uses: its fastest setting here.
            faiss.omp_set_num_threads(1)
            raw.search(vector, min(k, raw.ntotal))  # type: ignore[attr-defined]

        for query in queries[:3]:  # warm-up
            registry.route(query)
            raw_route(query)
        ours: list[float] = []
        base: list[float] = []
        for _ in range(repeats):
            for query in queries:  # interleaved, so load on the shared machine hits both alike
                ours.append(timed(lambda q=query, r=registry: r.route(q)))
                base.append(timed(lambda q=query: raw_route(q)))
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


def index_sweep(sizes: list[int]) -> list[str]:
    """Exact against HNSW search on clustered vectors: the measurement behind HNSW_THRESHOLD."""
    rng = np.random.default_rng(0)
    dim, rows = 384, []
    for n in sizes:
        centres = normalise(rng.standard_normal((n // 8, dim)))
        vectors = normalise(np.repeat(centres, 8, axis=0) + 0.08 * rng.standard_normal((n // 8 * 8, dim)))
        queries = normalise(centres[rng.integers(0, len(centres), 200)] + 0.08 * rng.standard_normal((200, dim)))
        timings, tops = {}, {}
        for kind in ("flat", "hnsw"):
            index = TaskIndex(dim, kind=kind)  # type: ignore[arg-type]
            tasks = [(f"t{i}", vectors[i * 8 : i * 8 + 8]) for i in range(n // 8)]
            build = timed(lambda index=index, tasks=tasks: index.add_many(tasks))
            per_query = [timed(lambda q=q, index=index: index.search(q[None], 64)) for q in queries]
            timings[kind] = (statistics.median(per_query) * 1e3, build)
            tops[kind] = [index.search(q[None], 1)[0][0][0] for q in queries]
        recall = np.mean([a == b for a, b in zip(tops["flat"], tops["hnsw"], strict=True)])
        (flat_ms, _), (hnsw_ms, hnsw_build) = timings["flat"], timings["hnsw"]
        rows.append(f"{n:>7d} {flat_ms:>8.3f} {hnsw_ms:>8.3f} {hnsw_build:>8.1f} {recall:>9.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1, 100 and 1,000 tasks, fewer repeats (~1 min)")
    parser.add_argument("--repeats", type=int, default=None, help="passes over the 42 queries per size")
    parser.add_argument(
        "--index-sweep", action="store_true", help="also time exact vs HNSW search from 2k to 40k vectors"
    )
    args = parser.parse_args()
    sizes = [1, 100, 1_000] if args.quick else [1, 100, 10_000]
    repeats = args.repeats or (2 if args.quick else 5)

    start = time.perf_counter()
    embedder = Embedder()
    print(f"embedder {embedder.name} ({embedder.dim}-d) loaded in {time.perf_counter() - start:.1f} s\n")

    print("== accuracy on the labelled set ==")
    print("\n".join(accuracy_report(embedder)), "\n")

    print("== route latency (median per query: embed + refresh check + search + scoring) ==")
    print(f"{'tasks':>7} {'vectors':>8} {'index':>5} {'build_s':>8} {'route_ms':>9} {'raw_ms':>9} {'ratio':>6}")
    print("\n".join(latency_rows(embedder, sizes, repeats)))
    print("raw = embedder.encode + bare FAISS search of the same vectors; target ratio <= 1.2\n")

    if args.index_sweep:
        print("== exact vs HNSW search, one query, k=64 ==")
        print(f"{'vectors':>7} {'flat_ms':>8} {'hnsw_ms':>8} {'build_s':>8} {'recall@1':>9}")
        print("\n".join(index_sweep([2_000, 5_000, 10_000, 20_000, 40_000])))


if __name__ == "__main__":
    main()
