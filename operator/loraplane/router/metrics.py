"""Prometheus metrics of the router, per public model and per backend (vLLM served name).

The hot path only adds to plain integers and floats on a `BackendStats` (all on the event loop's
thread); a collector turns them into Prometheus families when /metrics is scraped. This costs a few
hundred nanoseconds per request, where prometheus-client's locked Counter/Histogram children cost
~10 us for the same set of updates.
"""

from __future__ import annotations

import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# LLM requests take from milliseconds (cached, short) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)
# Content-routing decisions (issue 15): from microseconds (rules) to a classifier's or embedding's round trip.
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                    10, 30, 60)
NO_BACKEND = ""  # label value for requests refused before a backend was chosen
UNKNOWN_MODEL = "<unknown>"  # one label value for every unknown name, so clients cannot explode cardinality
# A series of a (model, backend) pair or of a content model that the routing table in use no longer feeds is
# still exported for this long (seconds), so scrapes see its last increments (Prometheus itself marks a series
# stale 5 minutes after it stops appearing), then dropped. Each adapter version has its own served name: a router
# that kept every pair it ever served would grow /metrics without bound over months of releases.
RETIRED_SERIES_SECONDS = 900.0


class Hist:
    """A histogram's state: counts per bucket (non-cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (seconds, for the router's histograms)."""
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "less or equal").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative counts per upper bound (`le` label values, "+Inf" last), as Prometheus exposes them."""
        out, acc = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            acc += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        return out


class DecisionCount:
    """The decisions of one (content model, destination, method) and their latency histogram: held by the
    compiled content model, so a decision does no label lookup."""

    __slots__ = ("n", "hist")

    def __init__(self, hist: Hist):
        self.n = 0
        self.hist = hist

    def count(self, seconds: float) -> None:
        """Count one decision that took `seconds`."""
        self.n += 1
        self.hist.observe(seconds)


class BackendStats:
    """The figures of one (public model, backend) pair."""

    __slots__ = ("labels", "codes", "prompt_tokens", "completion_tokens", "duration", "ttft", "in_flight",
                 "retries")

    def __init__(self, model: str, backend: str):
        self.labels = (model, backend)
        self.codes: dict[int, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.duration = Hist(LATENCY_BUCKETS)
        self.ttft = Hist(TTFT_BUCKETS)
        self.in_flight = 0
        self.retries = 0

    def count(self, code: int) -> None:
        """Count one answered request by HTTP status code (499 and 599 included, see the requests metric)."""
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1


class RouterMetrics:
    """The router's Prometheus registry: per-(model, backend) `BackendStats` turned into families at scrape
    time, per-replica state from the watched pool, and the routing table's reloads and generation."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._stats: dict[tuple[str, str], BackendStats] = {}
        self._pool = None
        self.table_reloads = Counter("loraplane_router_table_reloads", "Routing table loads, by result.",
                                     ("result",), registry=self.registry)
        self.table_generation = Gauge("loraplane_router_table_generation",
                                      "Generation of the routing table in use.", registry=self.registry)
        self.table_dropped_entries = Gauge("loraplane_router_table_dropped_entries",
                                           "Entries of the routing table in use that were left out (a duplicate "
                                           "public name, no backend with weight); the log names them.",
                                           registry=self.registry)
        # Cold start (router/hold.py): requests held now (KEDA activates the route on it), how long released
        # ones waited, and how each hold ended.
        self.held_results: dict[str, int] = {}
        self.hold_wait = Hist(LATENCY_BUCKETS)
        # Content routing (router/orchestrate.py): decisions and their latency per (content model, destination,
        # method) (issue 15: a counter and a latency histogram per destination and per method), and methods that
        # did not choose per (content model, method, why).
        # Label values come from the table (names, methods) and orchestrate.Fallback: bounded.
        self.decisions: dict[tuple[str, str, str], DecisionCount] = {}   # each holds its latency histogram
        self.fallbacks: dict[tuple[str, str, str], int] = {}
        self._router = None
        # What the routing table in use feeds (`feeds`), and since when (time.monotonic) each series it no longer
        # feeds has been left (`expire`). None: no table yet, nothing expires.
        self._fed: tuple[set[tuple[str, str]], dict[str, set[str]]] | None = None
        self._left: dict[tuple, float] = {}
        self.clock = time.monotonic   # seconds; replaced by tests
        self.scale_wakeups = Counter("loraplane_router_scale_wakeups", "Scale-subresource wake-ups of the engine "
                                     "Deployment from zero replicas, by result (scaled, not_zero, conflict, "
                                     "error).", ("result",), registry=self.registry)
        self.registry.register(_Collector(self))

    def count_held_result(self, result: str) -> None:
        """Count a held request by how its hold ended: released, timeout, queue_full, client_closed, shutdown."""
        self.held_results[result] = self.held_results.get(result, 0) + 1

    def held_released(self, seconds: float) -> None:
        """A held request was sent to a replica after `seconds` held."""
        self.count_held_result("released")
        self.hold_wait.observe(seconds)

    def decision_count(self, model: str, destination: str, method: str) -> DecisionCount:
        """The counter and latency histogram of content-routing decisions for `model` (the content-routed name)
        that chose `destination` by `method`, created on first use and kept (a new table keeps counting on it)."""
        key = (model, destination, method)
        count = self.decisions.get(key)
        if count is None:
            count = self.decisions[key] = DecisionCount(Hist(DECISION_BUCKETS))
        return count

    def count_decision(self, model: str, destination: str, method: str, seconds: float) -> None:
        """Count one content-routing decision for `model` (the content-routed name) and its latency."""
        self.decision_count(model, destination, method).count(seconds)

    def count_fallback(self, model: str, method: str, reason: str) -> None:
        """Count a method that did not choose a destination for `model`, and why (orchestrate.Fallback)."""
        key = (model, method, reason)
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def watch_router(self, router) -> None:
        """Export the router's held requests at scrape time."""
        self._router = router

    def stats(self, model: str, backend: str) -> BackendStats:
        """The figures of (public model, backend served name), created on first use and kept (a new table
        does not reset the counters of pairs it keeps)."""
        key = (model, backend)
        s = self._stats.get(key)
        if s is None:
            s = self._stats[key] = BackendStats(model, backend)
        return s

    def feeds(self, pairs: set[tuple[str, str]], content: dict[str, set[str]]) -> None:
        """The routing table now in use feeds these series: `pairs`, its (public model, backend served name)
        pairs (a public name with NO_BACKEND for what the router refuses itself is always fed while the name is
        in the table), and `content`, content model name -> its destinations and default. The others are
        dropped RETIRED_SERIES_SECONDS after they were last fed (`expire`)."""
        self._fed = (pairs, content)

    def expire(self) -> None:
        """Drop the series the routing table has not fed for RETIRED_SERIES_SECONDS (a pair with requests still
        in flight stays): at scrape time, so each is exported a last time with its final values first, and on
        each table change (Router.set_table), so a router nobody scrapes does not keep them either."""
        if self._fed is None:
            return
        now = self.clock()
        pairs, content = self._fed
        names = {m for m, _ in pairs} | set(content)
        left = self._left

        def gone(key: tuple, fed: bool) -> bool:
            if fed:
                left.pop(key, None)
                return False
            return now - left.setdefault(key, now) >= RETIRED_SERIES_SECONDS

        for key, s in list(self._stats.items()):
            fed = key in pairs or (key[1] == NO_BACKEND and (key[0] in names or key[0] in (UNKNOWN_MODEL, NO_BACKEND)))
            if gone(("stats", *key), fed) and s.in_flight <= 0:
                del self._stats[key]
                left.pop(("stats", *key), None)
        for key in list(self.decisions):
            if gone(("decision", *key), key[1] in content.get(key[0], ())):
                del self.decisions[key]
                left.pop(("decision", *key), None)
        for key in list(self.fallbacks):
            if gone(("fallback", *key), key[0] in content):
                del self.fallbacks[key]
                left.pop(("fallback", *key), None)

    def count_refused(self, model: str, status: int) -> None:
        """Count a request the router answered itself with `status`, before any backend was chosen (label
        backend=NO_BACKEND; `model` is the public name, UNKNOWN_MODEL, or NO_BACKEND before it was read)."""
        self.stats(model, NO_BACKEND).count(status)

    def watch_pool(self, pool) -> None:
        """Export per-replica state from `pool` at scrape time."""
        self._pool = pool


class _Collector:
    def __init__(self, metrics: RouterMetrics):
        self._m = metrics

    def describe(self):
        return []

    def collect(self):
        self._m.expire()
        labels = ["model", "backend"]
        requests = CounterMetricFamily("loraplane_router_requests", "Requests answered, by HTTP status code "
                                       "(499: client left first; 599: stream broken after it started).",
                                       labels=[*labels, "code"])
        prompt = CounterMetricFamily("loraplane_router_prompt_tokens", "Prompt tokens (from responses' usage).",
                                     labels=labels)
        completion = CounterMetricFamily("loraplane_router_completion_tokens",
                                         "Completion tokens (from responses' usage, streamed usage included).",
                                         labels=labels)
        duration = HistogramMetricFamily("loraplane_router_request_duration_seconds",
                                         "Time from request received to the last response byte.", labels=labels)
        ttft = HistogramMetricFamily("loraplane_router_time_to_first_token_seconds",
                                     "Streaming requests: time from request received to the first response chunk.",
                                     labels=labels)
        in_flight = GaugeMetricFamily("loraplane_router_in_flight",
                                      "Requests being answered now (an autoscaling signal).", labels=labels)
        retries = CounterMetricFamily("loraplane_router_retries",
                                      "Requests re-sent to another replica (connection failed before any byte, "
                                      "or vLLM did not have the adapter).", labels=labels)
        for (model, backend), s in list(self._m._stats.items()):
            lv = [model, backend]
            for code, n in sorted(s.codes.items()):
                requests.add_metric([*lv, str(code)], n)
            if backend:
                prompt.add_metric(lv, s.prompt_tokens)
                completion.add_metric(lv, s.completion_tokens)
                duration.add_metric(lv, s.duration.buckets(), s.duration.sum)
                ttft.add_metric(lv, s.ttft.buckets(), s.ttft.sum)
                in_flight.add_metric(lv, s.in_flight)
                retries.add_metric(lv, s.retries)
        yield from (requests, prompt, completion, duration, ttft, in_flight, retries)

        pool = self._m._pool
        r_in_flight = GaugeMetricFamily("loraplane_router_replica_in_flight",
                                        "This router's requests open on each replica.", labels=["replica"])
        r_load = GaugeMetricFamily("loraplane_router_replica_engine_load",
                                   "vLLM running + waiting requests at the last poll.", labels=["replica"])
        r_up = GaugeMetricFamily("loraplane_router_replica_up",
                                 "1 when the replica gets traffic (vLLM up, polled, no recent failure).",
                                 labels=["replica"])
        r_ready = GaugeMetricFamily("loraplane_router_replica_served_names",
                                    "Served names (base + adapters) Ready on the replica.", labels=["replica"])
        for r in list(pool.replicas) if pool else []:
            r_in_flight.add_metric([r.name], r.in_flight)
            r_load.add_metric([r.name], r.engine_load)
            r_up.add_metric([r.name], 1.0 if r.usable() else 0.0)
            r_ready.add_metric([r.name], len(r.ready))
        yield from (r_in_flight, r_load, r_up, r_ready)

        router = self._m._router
        held = GaugeMetricFamily("loraplane_router_held_requests",
                                 "Requests held now because no replica is up (a cold start); what KEDA activates "
                                 "a route at zero replicas on.")
        held.add_metric([], len(router.held) if router is not None else 0)
        results = CounterMetricFamily("loraplane_router_held", "Held requests by how the hold ended (released, "
                                      "timeout, queue_full, client_closed, shutdown).", labels=["result"])
        for result, n in sorted(self._m.held_results.items()):
            results.add_metric([result], n)
        wait = HistogramMetricFamily("loraplane_router_hold_seconds",
                                     "How long released requests were held for a replica (cold start wait).")
        wait.add_metric([], self._m.hold_wait.buckets(), self._m.hold_wait.sum)
        yield from (held, results, wait)

        m = self._m
        decisions = CounterMetricFamily("loraplane_router_content_decisions",
                                        "Content-routing decisions, by content-routed model, destination and the "
                                        "method that chose it (`default`: none chose).",
                                        labels=["model", "destination", "method"])
        seconds = HistogramMetricFamily("loraplane_router_content_decision_seconds",
                                        "Time a content-routing decision took, by content-routed model, "
                                        "destination and the method that chose it (`default`: none chose).",
                                        labels=["model", "destination", "method"])
        for key, count in sorted(m.decisions.items()):
            decisions.add_metric(list(key), count.n)
            seconds.add_metric(list(key), count.hist.buckets(), count.hist.sum)
        fallbacks = CounterMetricFamily("loraplane_router_content_fallbacks",
                                        "Content-routing methods that did not choose a destination, by why: "
                                        "no-match, timeout, unavailable, invalid-answer.",
                                        labels=["model", "method", "reason"])
        for key, n in sorted(m.fallbacks.items()):
            fallbacks.add_metric(list(key), n)
        yield from (decisions, seconds, fallbacks)
