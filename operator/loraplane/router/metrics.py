"""Prometheus metrics of the router, per public model and per backend (vLLM served name).

The hot path touches pre-resolved metric children only (no label lookups per request); per-replica
figures are read from the replica objects at scrape time by a collector, costing nothing per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

# LLM requests take from milliseconds (cached, short) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)
NO_BACKEND = ""  # label value for requests refused before a backend was chosen
UNKNOWN_MODEL = "<unknown>"  # one label value for every unknown name, so clients cannot explode cardinality


class BackendStats:
    """The metric children of one (public model, backend) pair."""

    __slots__ = ("_requests", "_codes", "prompt_tokens", "completion_tokens", "duration", "ttft",
                 "in_flight", "retries", "labels")

    def __init__(self, m: "RouterMetrics", model: str, backend: str):
        self.labels = (model, backend)
        self._requests = m.requests
        self._codes: dict[int, object] = {}
        self.prompt_tokens = m.prompt_tokens.labels(model, backend)
        self.completion_tokens = m.completion_tokens.labels(model, backend)
        self.duration = m.duration.labels(model, backend)
        self.ttft = m.ttft.labels(model, backend)
        self.in_flight = m.in_flight.labels(model, backend)
        self.retries = m.retries.labels(model, backend)

    def count(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._requests.labels(*self.labels, str(code))
        child.inc()


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ("model", "backend")
        self.requests = Counter("loraplane_router_requests", "Requests answered, by HTTP status code.",
                                (*labels, "code"), registry=r)
        self.prompt_tokens = Counter("loraplane_router_prompt_tokens", "Prompt tokens (from responses' usage).",
                                     labels, registry=r)
        self.completion_tokens = Counter("loraplane_router_completion_tokens",
                                         "Completion tokens (from responses' usage, streamed usage included).",
                                         labels, registry=r)
        self.duration = Histogram("loraplane_router_request_duration_seconds",
                                  "Time from request received to the last response byte.", labels,
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplane_router_time_to_first_token_seconds",
                              "Streaming requests: time from request received to the first response chunk.",
                              labels, buckets=TTFT_BUCKETS, registry=r)
        self.in_flight = Gauge("loraplane_router_in_flight", "Requests being answered now (autoscaling signal).",
                               labels, registry=r)
        self.retries = Counter("loraplane_router_retries",
                               "Requests re-sent to another replica (connection failed before any byte).",
                               labels, registry=r)
        self.table_reloads = Counter("loraplane_router_table_reloads", "Routing table loads, by result.",
                                     ("result",), registry=r)
        self.table_generation = Gauge("loraplane_router_table_generation",
                                      "Generation of the routing table in use.", registry=r)
        self._stats: dict[tuple[str, str], BackendStats] = {}
        self._pool = None

    def stats(self, model: str, backend: str) -> BackendStats:
        key = (model, backend)
        s = self._stats.get(key)
        if s is None:
            s = self._stats[key] = BackendStats(self, model, backend)
        return s

    def watch_pool(self, pool) -> None:
        """Export per-replica state from `pool` at scrape time."""
        self._pool = pool
        self.registry.register(_ReplicaCollector(self))


class _ReplicaCollector:
    def __init__(self, metrics: RouterMetrics):
        self._metrics = metrics

    def collect(self):
        pool = self._metrics._pool
        in_flight = GaugeMetricFamily("loraplane_router_replica_in_flight",
                                      "This router's requests open on each replica.", labels=["replica"])
        load = GaugeMetricFamily("loraplane_router_replica_engine_load",
                                 "vLLM running + waiting requests at the last poll.", labels=["replica"])
        up = GaugeMetricFamily("loraplane_router_replica_up",
                               "1 when the replica gets traffic (vLLM up, polled, no recent failure).",
                               labels=["replica"])
        ready = GaugeMetricFamily("loraplane_router_replica_served_names",
                                  "Served names (base + adapters) Ready on the replica.", labels=["replica"])
        for r in list(pool.replicas) if pool else []:
            in_flight.add_metric([r.name], r.in_flight)
            load.add_metric([r.name], r.engine_load)
            up.add_metric([r.name], 1.0 if r.usable() else 0.0)
            ready.add_metric([r.name], len(r.ready))
        return [in_flight, load, up, ready]

    def describe(self):
        return []
