"""Prometheus metrics of one server (``GET /metrics``, via ``prometheus-client``): request counts, latency
histograms per route, the engine's queue depth and the numbers of sessions, models and stored futures.

Each server has its own ``CollectorRegistry``, so several servers in one process (tests) do not share counters.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("losskit_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("losskit_request_seconds", "HTTP request latency (seconds)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        Gauge("losskit_queue_depth", "queued and running units of work", registry=self.registry).set_function(
            engine.queue_depth)
        Gauge("losskit_sessions", "open sessions", registry=self.registry).set_function(lambda: len(engine.sessions))
        Gauge("losskit_models", "training models", registry=self.registry).set_function(lambda: len(engine.models))
        Gauge("losskit_futures", "stored futures", registry=self.registry).set_function(
            lambda: engine.futures.stats()["futures"])

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
