"""How many CPUs this process may use: what the thread defaults are counted from.

`os.cpu_count()` counts the host's CPUs. A process pinned to some of them (`taskset`, a scheduler's affinity), or
a container given a CPU quota (`docker run --cpus 2`, a Kubernetes CPU limit: the cgroup's `cpu.max`), may use
fewer, and torch's thread pools sized from the host's count then oversubscribe the quota: every parallel region
waits for threads that the quota has stopped. joblib (through loky) reads the affinity mask, the cgroup quota (v1
and v2) and `LOKY_MAX_CPU_COUNT`, and returns the smallest.
"""

from __future__ import annotations


def usable_cores() -> int:
    """CPUs this process may use: the least of the host's, its affinity mask's and its cgroup quota's (at least 1)."""
    import joblib

    return max(1, int(joblib.cpu_count()))


def default_engine_threads() -> int:
    """The engine's intra-op threads by default: all usable cores but one (at least one), leaving a core to the
    doors, the embedder's callers and the loader (docs/serving.md, "Threads")."""
    return max(1, usable_cores() - 1)
