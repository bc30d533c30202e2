"""The service's stats: per-task counts (fed by the engine loop's counting policy) and the GetStats snapshot."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TaskCounters:
    requests: int = 0
    coverage_sum: float = 0.0


@dataclass(frozen=True)
class ServiceStats:
    """A snapshot of the service: residency, expert loads, per-task requests, the engine loop's load."""

    resident_experts: int
    capacity_experts: int
    resident_bytes: int
    budget_bytes: int
    loads: dict[str, int]  # expert loads served per tier: device, cache, disk
    loaded_bytes: int  # bytes read from the cache and the disk
    evictions: int
    tasks: dict[str, tuple[int, float]]  # task -> (requests, mean coverage)
    cache_health: str  # ok | degraded
    in_flight: int
    queued: int
    generated_tokens: int
    lent_slots: int = 0  # full-precision slots lent to the demotion precision now (`runtime.lending`)
    demoted_experts: int = 0  # experts resident in lent slots now
