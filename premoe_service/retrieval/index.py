"""The task index: every demo embedding in FAISS (inner product on normalised vectors) with its task."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from ..errors import InvalidArgument

IndexKind = Literal["auto", "flat", "hnsw"]
IndexDevice = Literal["auto", "cpu", "gpu"]

# Vector count at which "auto" switches from exact search to HNSW. Measured on this machine (2 shared
# CPU cores, d=384, one query per search on one thread, k=64, clustered vectors of 8 per task; HNSW
# M=32, efConstruction=64, efSearch=128; `python -m premoe_service.bench.route --index-sweep` reproduces it):
#   n=   2k  flat 0.07 ms  hnsw 0.20 ms  build  0.8 s  recall@1 1.000
#   n=   5k  flat 0.14 ms  hnsw 0.22 ms  build  1.3 s  recall@1 1.000
#   n=  10k  flat 0.26 ms  hnsw 0.57 ms  build  2.8 s  recall@1 1.000
#   n=  20k  flat 0.99 ms  hnsw 0.45 ms  build  4.9 s  recall@1 1.000
#   n=  40k  flat 2.00 ms  hnsw 1.02 ms  build 25   s  recall@1 0.995
# Embedding one query costs 10-20 ms, so exact search stays at or under ~5% of a route up to ~20k
# vectors, while HNSW is no faster below ~15k and its rebuild (on every task removal) costs seconds.
# 20k vectors is ~2,500 tasks of 8 demos; above it exact search grows linearly and HNSW wins.
HNSW_THRESHOLD = 20_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 128
# Below this many queries per search, one thread beats OpenMP fan-out (see `_search`).
_PARALLEL_QUERIES = 16


class TaskIndex:
    """Demo vectors of many tasks in one FAISS index; a search answers (task, similarity) pairs.

    The index keeps each task's vectors next to FAISS so that removing a task, or switching between
    exact and HNSW search, rebuilds from stored vectors and never re-embeds demos.

    Args:
        dim: Vector size.
        kind: "flat" (exact), "hnsw", or "auto" (exact below `hnsw_threshold` vectors, else HNSW).
        hnsw_threshold: Vector count at which "auto" moves to HNSW; it moves back to exact search
            below half of it, so a registry near the boundary does not rebuild the graph on every change.
        device: "cpu", "gpu" (the first GPU; needs a faiss build with GPU support, such as the faiss-gpu wheels),
            or "auto": the GPU when this faiss has one, else the CPU. GPU FAISS has no HNSW: on the GPU the index is
            exact (flat) at every size, and removing a task re-uploads the remaining vectors.
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: IndexKind = "auto",
        hnsw_threshold: int = HNSW_THRESHOLD,
        device: IndexDevice = "auto",
    ) -> None:
        if dim < 1:
            raise InvalidArgument(f"vector size must be positive, got {dim}", field="dim")
        if kind not in ("auto", "flat", "hnsw"):
            raise InvalidArgument(f"index kind must be 'auto', 'flat' or 'hnsw', got {kind!r}", field="kind")
        if hnsw_threshold < 1:
            raise InvalidArgument(f"HNSW threshold must be positive, got {hnsw_threshold}", field="hnsw_threshold")
        if device not in ("auto", "cpu", "gpu"):
            raise InvalidArgument(f"index device must be 'auto', 'cpu' or 'gpu', got {device!r}", field="device")
        gpus = faiss_gpus()
        if device == "gpu" and gpus == 0:
            raise InvalidArgument(
                "a GPU index needs a faiss build with GPU support and a visible GPU (install faiss-gpu in place of "
                "faiss-cpu; see the README)",
                field="device",
            )
        self.on_gpu = device != "cpu" and gpus > 0
        self._gpu_resources: Any = None
        self.dim = dim
        self.kind: IndexKind = kind
        self.hnsw_threshold = hnsw_threshold
        self._vectors: dict[str, np.ndarray] = {}  # task -> [n, dim] float32
        self._task_ids: dict[str, int] = {}  # task -> small integer stored per FAISS row
        self._task_names: dict[int, str] = {}
        self._next_id = 0
        self._row_task = np.zeros(0, dtype=np.int64)  # FAISS row -> task id
        self._faiss: Any = None
        self._uses_hnsw = False
        self._rebuild()

    @property
    def ntotal(self) -> int:
        """Number of demo vectors in the index."""
        return int(self._row_task.shape[0])

    @property
    def device(self) -> str:
        """Where searches run: "gpu" or "cpu"."""
        return "gpu" if self.on_gpu else "cpu"

    @property
    def uses_hnsw(self) -> bool:
        """Whether searches go through the HNSW graph (approximate) rather than exact search."""
        return self._uses_hnsw

    def tasks(self) -> list[str]:
        return sorted(self._vectors)

    def __contains__(self, task: object) -> bool:
        return task in self._vectors

    def __len__(self) -> int:
        return len(self._vectors)

    def demo_count(self, task: str) -> int:
        """Number of demo vectors of `task` (0 when absent)."""
        vectors = self._vectors.get(task)
        return 0 if vectors is None else int(vectors.shape[0])

    def vectors(self, task: str) -> np.ndarray:
        """The stored vectors of `task`. [n, dim] float32"""
        return self._vectors[task]

    def add(self, task: str, vectors: np.ndarray) -> None:
        """Add (or replace) one task's demo vectors. [n, dim]"""
        self.add_many([(task, vectors)])

    def add_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Add (or replace) several tasks at once: one FAISS update instead of one per task."""
        checked = [(task, self.check_vectors(task, vectors)) for task, vectors in items]
        if len({task for task, _ in checked}) != len(checked):
            raise InvalidArgument("the same task appears twice in one add", field="task")
        replaced = [task for task, _ in checked if task in self._vectors]
        if replaced:
            self._drop(replaced)
        for task, vectors in checked:
            self._vectors[task] = vectors
            if task not in self._task_ids:
                self._task_ids[task] = self._next_id
                self._task_names[self._next_id] = task
                self._next_id += 1
        new_total = self.ntotal + sum(v.shape[0] for _, v in checked)
        if replaced or self._wants_hnsw(new_total) != self._uses_hnsw:
            self._rebuild()
            return
        # Appending is cheap for both kinds; HNSW inserts the new nodes into the existing graph.
        for task, vectors in checked:
            self._append(task, vectors)

    def remove(self, task: str) -> bool:
        """Remove a task's vectors; returns False when the task was not indexed."""
        return self.remove_many([task]) == 1

    def remove_many(self, tasks: Iterable[str]) -> int:
        """Remove several tasks with at most one HNSW rebuild; returns how many were indexed."""
        present = [task for task in dict.fromkeys(tasks) if task in self._vectors]
        if not present:
            return 0
        self._drop(present)
        if self._uses_hnsw or self.on_gpu:
            # HNSW cannot delete nodes, nor can a GPU index: rebuild from the stored vectors.
            self._rebuild()
        return len(present)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The `k` nearest demos of each query as (task, similarity), best first. queries: [q, dim]"""
        queries = self._check_queries(queries)
        if k < 1:
            raise InvalidArgument(f"k must be at least 1, got {k}", field="k")
        k = min(k, self.ntotal)
        if k == 0:
            return [[] for _ in range(queries.shape[0])]
        if self._uses_hnsw:
            # efSearch below k would cap the result list; keep it at least k.
            self._faiss.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        scores, rows = self._search(queries, k)  # [q, k], [q, k]
        results: list[list[tuple[str, float]]] = []
        for score_row, id_row in zip(scores, rows, strict=True):
            valid = id_row >= 0  # FAISS pads with -1 when it finds fewer than k
            task_ids = self._row_task[id_row[valid]]
            results.append(
                [(self._task_names[int(t)], float(s)) for t, s in zip(task_ids, score_row[valid], strict=True)]
            )
        return results

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if queries.shape[0] >= _PARALLEL_QUERIES:
            return self._faiss.search(queries, k)
        # FAISS splits even one query over its OpenMP threads; on a busy machine the thread wake-up
        # cost 25-30 ms per search at 10k vectors against 0.3 ms on one thread. The setting is per
        # calling thread in OpenMP, so this does not slow index builds or other threads.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._faiss.search(queries, k)
        finally:
            faiss.omp_set_num_threads(threads)

    def _wants_hnsw(self, total: int) -> bool:
        if self.on_gpu:
            return False  # GPU FAISS has no HNSW; exact search on a GPU stays fast far past the CPU's threshold
        if self.kind != "auto":
            return self.kind == "hnsw"
        # Hysteresis: once on HNSW, stay there until the index shrinks below half the threshold.
        limit = self.hnsw_threshold // 2 if self._uses_hnsw else self.hnsw_threshold
        return total >= limit

    def _drop(self, tasks: list[str]) -> None:
        ids = np.array([self._task_ids[t] for t in tasks], dtype=np.int64)
        keep = ~np.isin(self._row_task, ids)
        if not self._uses_hnsw and not self.on_gpu:
            import faiss

            # IndexFlat compacts in row order, so the row -> task map is compacted with the same mask.
            self._faiss.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(~keep).astype(np.int64)))
        self._row_task = self._row_task[keep]
        for task in tasks:
            del self._vectors[task]
            del self._task_names[self._task_ids.pop(task)]

    def _append(self, task: str, vectors: np.ndarray) -> None:
        self._faiss.add(vectors)
        ids = np.full(vectors.shape[0], self._task_ids[task], dtype=np.int64)
        self._row_task = np.concatenate([self._row_task, ids])

    def _rebuild(self) -> None:
        import faiss

        total = sum(v.shape[0] for v in self._vectors.values())
        self._uses_hnsw = self._wants_hnsw(total)
        index: Any
        if self._uses_hnsw:
            index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        else:
            index = faiss.IndexFlatIP(self.dim)
        parts = [(self._task_ids[t], v) for t, v in self._vectors.items()]
        if parts:
            index.add(np.concatenate([v for _, v in parts]))
            self._row_task = np.concatenate([np.full(v.shape[0], i, dtype=np.int64) for i, v in parts])
        else:
            self._row_task = np.zeros(0, dtype=np.int64)
        if self.on_gpu:
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        self._faiss = index

    def check_vectors(self, task: str, vectors: np.ndarray) -> np.ndarray:
        """`vectors` as contiguous unit rows; InvalidArgument when they cannot be a task's demos. [n, dim]"""
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim or array.shape[0] == 0:
            raise InvalidArgument(
                f"task {task!r} needs demo vectors of shape [n >= 1, {self.dim}], got {tuple(array.shape)}",
                field="demo_embeddings",
            )
        if not np.isfinite(array).all():
            raise InvalidArgument(f"task {task!r} has non-finite demo vectors", field="demo_embeddings")
        # Inner product is cosine similarity only on unit vectors; normalising here is cheap insurance.
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        return np.ascontiguousarray(array / np.maximum(norms, 1e-12), dtype=np.float32)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(queries, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise InvalidArgument(f"queries must have shape [q, {self.dim}], got {tuple(array.shape)}", field="queries")
        return array


def faiss_gpus() -> int:
    """GPUs this faiss build can use (0 for faiss-cpu, or without a visible GPU)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0
