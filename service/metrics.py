"""Prometheus metrics, in a registry of each app's own (so tests can build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.engine import EngineLike

# 1 ms to 30 s: a character takes milliseconds, a long request tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    def __init__(self, engine: EngineLike) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("caesar_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.queue_size = Gauge("caesar_queue_size", "requests waiting for a KV-cache row", registry=r)
        self.queue_size.set_function(lambda: engine.queue_size)
        self.running_rows = Gauge("caesar_running_rows", "KV-cache rows generating now", registry=r)
        self.running_rows.set_function(lambda: engine.running_rows)
        self.time_to_first_token = Histogram(
            "caesar_time_to_first_token_seconds", "from submission to the first character sampled",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "caesar_inter_token_latency_seconds", "between consecutive characters of one request",
            buckets=LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram(
            "caesar_request_duration_seconds", "HTTP request duration, streams to their last byte",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("caesar_generated_tokens", "characters generated", registry=r)
        self.disconnects = Counter("caesar_disconnects", "clients that left before their answer was complete",
                                   registry=r)
