"""The loader's own Prometheus metrics (one registry per loader, so tests and embedded runs do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loraplane.api.wire.serving import AdapterState


class LoaderMetrics:
    """The loader's metrics, registered in `registry` (a new one when None); served on the loader's /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.loads = Counter("loraplane_loader_loads", "Adapters loaded into vLLM and verified Ready.",
                             registry=r)
        self.failures = Counter("loraplane_loader_failures", "Failed attempts and refusals, by reason.",
                                ["reason"], registry=r)
        self.unloads = Counter("loraplane_loader_unloads", "Adapters unloaded from vLLM.", registry=r)
        self.load_seconds = Histogram(
            "loraplane_loader_load_seconds", "Time of each step of bringing an adapter up (fetch, gate, load, "
            "probe), of the whole (total), and of the engine's warm-up completion (warmup).", ["step"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.cache_bytes = Gauge("loraplane_loader_cache_bytes", "Bytes of verified artifacts in the cache.",
                                 registry=r)
        self.adapters = Gauge("loraplane_loader_adapters", "Desired adapters by state.", ["state"], registry=r)
        self.engine_ready = Gauge("loraplane_loader_engine_ready", "1 when vLLM answers /health and has completed "
                                  "the loader's warm-up completion (the replica serves).", registry=r)
        self.engine_restarts = Counter("loraplane_loader_engine_restarts",
                                       "Times the engine came back without the adapters it had.", registry=r)
        self.table_errors = Counter("loraplane_loader_table_errors", "Serving tables that could not be read.",
                                    registry=r)
        for state in AdapterState:   # every state is exported, 0 included
            self.adapters.labels(state).set(0)
