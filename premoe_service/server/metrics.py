"""Prometheus metrics of the server, on their own registry and port."""

from __future__ import annotations

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
        self.resident = Gauge("premoe_resident_expert_bytes", "Bytes of resident experts", registry=self.registry)
        self.coverage = Gauge(
            "premoe_task_coverage", "Coverage of the last request per task", ["task"], registry=self.registry
        )
        self.server: Any = None

    def request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).observe(seconds)

    def generation(self, task: str, loads: dict[str, int], load_s: float, coverage: float, resident_bytes: int) -> None:
        for tier, count in loads.items():
            if count:
                self.loads.labels(tier=tier).inc(count)
        self.load_seconds.observe(load_s)
        self.coverage.labels(task=task or "(fallback)").set(coverage)
        self.resident.set(resident_bytes)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP exporter; returns the bound port."""
        self.server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self.server.server_port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
