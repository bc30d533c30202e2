"""Per-replica stats shared through Redis: each engine replica publishes its `ServingCore.stats()` under its own key
(with a TTL, so a replica that is gone drops out), and GetStats sums them. Serve cannot address one replica from
outside, so this is how a caller sees the whole deployment. JSON values only."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from ..serving import ServiceStats

PREFIX = "premoe-ray"


def stats_key(app: str, replica: str) -> str:
    return f"{PREFIX}:{app}:replica:{replica}"


def publish(client: Any, app: str, replica: str, stats: ServiceStats, ttl_s: float, **extra: Any) -> None:
    """Store one replica's stats (with `extra` JSON values) for `ttl_s` seconds."""
    record = {**dataclasses.asdict(stats), **extra, "replica": replica, "published": time.time()}
    client.set(stats_key(app, replica), json.dumps(record), px=int(ttl_s * 1000))


def gather(client: Any, app: str) -> list[dict[str, Any]]:
    """Every live replica's last published stats, sorted by replica id."""
    keys = sorted(client.scan_iter(match=stats_key(app, "*"), count=100))
    values = client.mget(keys) if keys else []
    records = [json.loads(v) for v in values if v is not None]
    return sorted(records, key=lambda r: str(r["replica"]))


def merge(records: list[dict[str, Any]]) -> ServiceStats:
    """The deployment's `ServiceStats`: counts summed, per-task coverage averaged by
    requests, the cache health degraded when any replica's is."""
    total: dict[str, Any] = {
        "resident_experts": 0,
        "capacity_experts": 0,
        "resident_bytes": 0,
        "budget_bytes": 0,
        "loads": {"device": 0, "cache": 0, "disk": 0},
        "loaded_bytes": 0,
        "evictions": 0,
        "tasks": {},
        "cache_health": "ok",
        "in_flight": 0,
        "queued": 0,
        "generated_tokens": 0,
        "lent_slots": 0,
        "demoted_experts": 0,
    }
    coverage: dict[str, float] = {}
    for record in records:
        for name in ("resident_experts", "capacity_experts", "resident_bytes", "budget_bytes", "loaded_bytes"):
            total[name] += int(record[name])
        for name in ("evictions", "in_flight", "queued", "generated_tokens"):
            total[name] += int(record[name])
        for name in ("lent_slots", "demoted_experts"):  # records of replicas that predate demotion lack them
            total[name] += int(record.get(name, 0))
        for tier in total["loads"]:
            total["loads"][tier] += int(record["loads"][tier])
        if record["cache_health"] != "ok":
            total["cache_health"] = record["cache_health"]
        for task, (requests, mean) in record["tasks"].items():
            done, _ = total["tasks"].get(task, (0, 0.0))
            total["tasks"][task] = (done + int(requests), 0.0)
            coverage[task] = coverage.get(task, 0.0) + float(mean) * int(requests)
    for task, (requests, _) in total["tasks"].items():
        total["tasks"][task] = (requests, coverage[task] / max(requests, 1))
    return ServiceStats(**total)
