"""The scale benchmark's registry part: start-up time and memory with many profiles, and route latency among them.

Profiles are real profile files (every criterion's [L, E] score matrix at DeepSeek-V3 shape, demo embeddings,
metadata) in a `LocalProfileStore` directory. Their demo embeddings are synthetic: real demo vectors of the reference
tasks (or random ones) plus noise, so that 10,000 x demos need not be embedded; they carry the embedder's name, so
the registry takes them as they are. Start-up and routing run in a fresh process, so that its memory is the
registry's alone; prompts of about 40 tokens are embedded by the real embedder.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ...profiler.criteria import CRITERIA
from ...profiler.profile import Profile
from .tasks import SyntheticTasks

PROMPT_TOKENS = 40


def base_vectors(profiles_dir: str | Path, dim: int, seed: int) -> np.ndarray:
    """Demo embeddings of the reference profiles, to scatter synthetic demos around (random when absent). [n, dim]"""
    found = [Profile.load(p).demo_embeddings for p in sorted(Path(profiles_dir).glob("*.safetensors"))]
    real = [v.numpy() for v in found if v is not None and v.ndim == 2 and v.shape[1] == dim]
    if real:
        return np.concatenate(real).astype(np.float32)
    return _normalise(np.random.default_rng([seed, 0xBA5E]).standard_normal((64, dim)))


def write_profiles(
    directory: Path,
    tasks: SyntheticTasks,
    count: int,
    *,
    moe_layers: tuple[int, ...],
    embedder: str,
    pool: np.ndarray,
    demos_per_task: int,
    seed: int,
) -> int:
    """Write `count` profile files (plain writes: this is set-up, not measured); returns the bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        rng = np.random.default_rng([seed, 0xDE70, i])
        easyep = tasks.scores(i)
        scores = {  # every criterion the profiler stores, each its own matrix as in a real profile
            "easyep": easyep,
            "tcess": _rows(easyep**0.8),
            "reap": _rows(easyep * torch.from_numpy(rng.lognormal(0.0, 0.3, easyep.shape).astype(np.float32))),
            "frequency": (easyep * easyep.shape[1] / 4).clamp(max=1.0),
        }
        base = pool[rng.integers(0, len(pool), demos_per_task)]  # as `bench.route` scatters synthetic tasks
        vectors = _normalise(base + 0.12 * rng.standard_normal(base.shape))
        profile = Profile(
            name=f"task-{i:05d}",
            fingerprint="deepseek-v3-synthetic",
            moe_layers=moe_layers,
            scores={c: scores[c] for c in CRITERIA},
            description=f"synthetic task {i} (domain {tasks.domain(i)})",
            demo_embeddings=torch.from_numpy(vectors),
            embedder=embedder,
            token_count=demos_per_task * 200,
            demos=[f"synthetic demo {j} of task {i}" for j in range(demos_per_task)],
        )
        data = profile.to_bytes()
        (directory / f"{profile.name}.safetensors").write_bytes(data)
        total += len(data)
    return total


def probe(directory: str, threads: int, rounds: int, prompts: list[str]) -> dict[str, Any]:
    """Start a registry on `directory` in this (fresh) process and route `prompts`; returns the measurements."""
    torch.set_num_threads(threads)
    import faiss

    from ...retrieval import Embedder, LocalProfileStore, Registry, Router

    faiss.omp_set_num_threads(threads)
    rss_start = _rss()
    start = time.perf_counter()
    embedder = Embedder()
    embedder_s = time.perf_counter() - start
    rss_embedder = _rss()
    start = time.perf_counter()
    registry = Registry(LocalProfileStore(directory), embedder=embedder, strict=True)
    startup_s = time.perf_counter() - start
    rss_registry = _rss()
    router = Router(embedder, registry.index, registry.policy)
    timed = _TimedEmbedder(embedder)
    registry.embedder = cast(Embedder, timed)  # the same model, its time inside each route recorded
    raw = registry.index._faiss  # the same FAISS index, searched bare: the baseline (a second HNSW build costs minutes)
    k = min(registry.policy.neighbours, registry.index.ntotal)
    timings: dict[str, list[float]] = {"route": [], "overhead": [], "embed": [], "decide": [], "raw_search": []}
    for prompt in prompts[:3]:  # warm-up
        registry.route(prompt)
    matched = 0
    for _ in range(rounds):
        for prompt in prompts:  # interleaved, so a busy moment hits every measurement alike
            start = time.perf_counter()
            decision = registry.route(prompt)
            timings["route"].append(time.perf_counter() - start)
            timings["overhead"].append(timings["route"][-1] - timed.seconds)
            matched += decision.matched
            start = time.perf_counter()
            query = embedder.encode([prompt])
            timings["embed"].append(time.perf_counter() - start)
            start = time.perf_counter()
            router.decide_embedded(query)
            timings["decide"].append(time.perf_counter() - start)
            faiss.omp_set_num_threads(1)  # as `TaskIndex` searches one query
            start = time.perf_counter()
            raw.search(query, k)
            timings["raw_search"].append(time.perf_counter() - start)
            faiss.omp_set_num_threads(threads)
    median = {name: statistics.median(values) * 1e3 for name, values in timings.items()}
    return {
        "tasks": len(registry),
        "vectors": registry.index.ntotal,
        "index": "hnsw" if registry.index.uses_hnsw else "flat",
        "threads": threads,
        "embedder_load_s": embedder_s,
        "startup_s": startup_s,
        "rss_before_mib": rss_embedder / 2**20,
        "rss_after_mib": rss_registry / 2**20,
        "registry_mib": (rss_registry - rss_embedder) / 2**20,
        "embedder_mib": (rss_embedder - rss_start) / 2**20,
        "prompts": len(prompts),
        "rounds": rounds,
        "matched_share": matched / (rounds * len(prompts)),
        "route_ms": median["route"],
        "embed_ms": median["embed"],
        "decide_ms": median["decide"],
        "raw_search_ms": median["raw_search"],
        "overhead_ms": median["overhead"],
        "route_over_raw": median["route"] / (median["embed"] + median["raw_search"]),
    }


class _TimedEmbedder:
    """The registry's embedder, timed: what a route spends beyond it is the routing overhead, call by call."""

    def __init__(self, embedder: Any) -> None:
        self.inner, self.name, self.dim, self.seconds = embedder, embedder.name, embedder.dim, 0.0

    def encode(self, texts: Any, **kwargs: Any) -> np.ndarray:
        start = time.perf_counter()
        try:
            return np.asarray(self.inner.encode(texts, **kwargs))
        finally:
            self.seconds = time.perf_counter() - start


def measure(directory: Path, threads: int, rounds: int, prompts: list[str]) -> dict[str, Any]:
    """`probe` in a fresh Python process (clean memory figures); returns its measurements."""
    code = (
        "import json, sys; from premoe_service.bench.scale.registry import probe; "
        "a = json.loads(sys.stdin.read()); print('RESULT ' + json.dumps(probe(**a)))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    args = {"directory": str(directory), "threads": threads, "rounds": rounds, "prompts": prompts}
    done = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(args), capture_output=True, text=True, env=env, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"registry probe failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def prompts_of(data_dir: str | Path, count: int, seed: int) -> list[str]:
    """Prompts of about `PROMPT_TOKENS` tokens (the embedder's tokenizer) cut from the reference tasks' eval texts."""
    from tokenizers import Tokenizer

    from ...retrieval import default_model_path

    texts = []
    for path in sorted(Path(data_dir).glob("*/eval.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        texts += [r.get("text") or r.get("prompt") or "" for r in records]
    if not texts:
        from ..route.tasks import HELD_OUT

        texts = [" ".join(q for q, _ in HELD_OUT[i : i + 4]) for i in range(len(HELD_OUT))]
    tokenizer = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    prompts = []
    for i in rng.permutation(len(texts)):  # texts of at least PROMPT_TOKENS tokens, cut there
        ids = tokenizer.encode(texts[i], add_special_tokens=False).ids
        if len(ids) >= PROMPT_TOKENS:
            prompts.append(tokenizer.decode(ids[:PROMPT_TOKENS]))
        if len(prompts) == count:
            break
    return prompts


def _rows(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1e-30)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
