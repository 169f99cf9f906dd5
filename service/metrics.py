"""Prometheus metrics, in a registry of each app's own (so tests can build many apps in one process)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
        self.inter_token_latency = BatchHistogram(
            "caesar_inter_token_latency_seconds", "between consecutive characters of one request",
            LATENCY_BUCKETS)
        r.register(self.inter_token_latency)
        self.request_duration = Histogram(
            "caesar_request_duration_seconds", "HTTP request duration, streams to their last byte",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("caesar_generated_tokens", "characters generated", registry=r)
        self.disconnects = Counter("caesar_disconnects", "clients that left before their answer was complete",
                                   registry=r)
        r.register(EngineCollector(engine))


class BatchHistogram(Collector):
    """A histogram that takes many observations at once (`observe_many`): a JSON answer's characters,
    whose time gaps become known all together at its end. prometheus_client's Histogram takes one
    observation a call and a lock for each of its counters; 200 characters' gaps cost 0.9 ms of the
    HTTP process's CPU a request that way (caesar-small, 64 requests at a time; issue 18's eleventh
    pass), where this takes one lock for them all.
    Exposed in the same form as a Histogram: _bucket (cumulative, le), _count and _sum."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf's
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Iterable[float]) -> None:
        counts, total, bounds = [0] * len(self.counts), 0.0, self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # the first bound >= value: Prometheus' "le"
            total += value
        with self._lock:
            self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
            self.sum += total

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative, total = list(accumulate(self.counts)), self.sum
        labels = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]
        yield HistogramMetricFamily(self.name, self.documentation,
                                    buckets=list(zip(labels, cumulative, strict=True)), sum_value=total)


class EngineCollector(Collector):
    """The engine process's supervision (service/engine_process.py), read from the engine at each
    scrape: an engine without it (in one process, or a test's fake) reports 0 restarts."""

    def __init__(self, engine: EngineLike) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("caesar_engine_restarts", "engine processes started again after one died",
                                  value=getattr(self.engine, "restarts", 0))
        yield CounterMetricFamily("caesar_engine_restart_failures",
                                  "engine restarts that failed (load, warm-up or timeout)",
                                  value=getattr(self.engine, "restart_failures", 0))
        start_s = getattr(self.engine, "last_start_s", None)
        if start_s is not None:
            yield GaugeMetricFamily("caesar_engine_start_seconds", "how long the engine process serving "
                                    "now took from its start to ready: spawn, load and warm-up",
                                    value=start_s)
