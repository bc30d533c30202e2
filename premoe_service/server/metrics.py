"""Prometheus metrics of the server, on their own registry and port."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Request latency, time to first token, expert loads by tier, resident bytes, coverage per task."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "premoe_request_seconds", "RPC latency", ["method", "code"], registry=self.registry, buckets=LATENCY_BUCKETS
        )
        self.ttft = Histogram(
            "premoe_time_to_first_token_seconds", "Time to first token", registry=self.registry, buckets=LATENCY_BUCKETS
        )
        self.loads = Counter("premoe_expert_loads_total", "Experts loaded, by tier", ["tier"], registry=self.registry)
        self.load_seconds = Histogram(
            "premoe_expert_load_seconds",
            "Time to load a request's missing experts",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_seconds = Histogram(
            "premoe_queue_seconds",
            "Time from arrival until a request's experts were resident (slots and loads)",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.resident = Gauge("premoe_resident_expert_bytes", "Bytes of resident experts", registry=self.registry)
        self.in_progress = Gauge(
            "premoe_calls_in_progress", "gRPC calls the door is handling now", registry=self.registry
        )
        self.coverage = Gauge(
            "premoe_task_coverage", "Coverage of the last request per task", ["task"], registry=self.registry
        )
        self.server: Any = None

    def watch_engine(self, stats: Any, residency_stats: Any) -> None:
        """Gauges and counters read at every scrape from the engine loop's live figures (`engine.LoopStats`)
        and the residency's counters."""
        gauges = {
            "premoe_inflight_requests": ("Requests queued or decoding", lambda: stats.rows + stats.queued),
            "premoe_batch_rows": ("Requests in the running batch", lambda: stats.rows),
            "premoe_queue_waiting_slots": ("Requests waiting for slots pinned by others", lambda: stats.waiting_slots),
            "premoe_queue_loading": ("Requests waiting for their experts to load", lambda: stats.loading),
            "premoe_queue_ready": ("Requests with resident experts waiting for a batch row", lambda: stats.ready),
            "premoe_engine_step_seconds_last": ("Duration of the last engine step", lambda: stats.last_step_s),
            "premoe_loader_backlog_jobs": ("Expert load jobs queued or in flight", lambda: stats.loader_backlog),
            "premoe_loader_bytes_in_flight": ("Expert bytes queued or being copied", lambda: stats.bytes_in_flight),
            "premoe_kv_blocks": ("Blocks of the KV pool (16 tokens each), held or free", lambda: stats.kv_blocks),
            "premoe_kv_blocks_held": ("KV pool blocks the running requests hold", lambda: stats.kv_blocks_held),
            "premoe_kv_pool_bytes": ("Bytes of the KV pool's tensors", lambda: stats.kv_bytes),
            "premoe_kv_reserved_tokens": (
                "KV tokens the running requests reserve under --max-kv-tokens (prompt + max_new_tokens, in blocks)",
                lambda: stats.kv_reserved_tokens,
            ),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=self.registry).set_function(read)
        counters = {
            "premoe_engine_steps": ("Engine steps that ran a forward pass", lambda: stats.steps),
            "premoe_engine_step_seconds": ("Time spent in engine steps", lambda: stats.step_seconds),
            "premoe_generated_tokens": ("Tokens generated", lambda: stats.tokens),
            "premoe_expert_evictions": ("Experts evicted from their slots", lambda: residency_stats.evictions),
        }
        for name, (doc, read) in counters.items():
            _CallbackCounter(name, doc, read, self.registry)

    def request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).observe(seconds)

    def generation(
        self, task: str, loads: dict[str, int], timings_ms: dict[str, float], coverage: float, resident_bytes: int
    ) -> None:
        for tier, count in loads.items():
            if count:
                self.loads.labels(tier=tier).inc(count)
        self.load_seconds.observe(timings_ms.get("load_ms", 0.0) / 1e3)
        self.queue_seconds.observe(timings_ms.get("queue_ms", 0.0) / 1e3)
        self.coverage.labels(task=task or "(fallback)").set(coverage)
        self.resident.set(resident_bytes)

    def forget_task(self, task: str) -> None:
        """Drop a deleted task's series."""
        with contextlib.suppress(KeyError):  # a task that never served has no series
            self.coverage.remove(task)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP exporter; returns the bound port."""
        self.server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self.server.server_port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


class _CallbackCounter:
    """A counter whose value is read from a callback at scrape time (the loop owns the count)."""

    def __init__(self, name: str, documentation: str, read: Any, registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.read = name, documentation, read
        registry.register(self)

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily(self.name, self.documentation, value=float(self.read()))

    def describe(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily(self.name, self.documentation)
