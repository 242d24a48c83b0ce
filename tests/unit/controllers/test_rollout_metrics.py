"""controllers.rollout_metrics: the router's own /metrics exposition read back into rollout windows."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from prometheus_client import generate_latest

from loraplane.builders.rollout import measured
from loraplane.controllers import rollout_metrics
from loraplane.controllers.rollout_metrics import RouterMetricsReader, parse_router_metrics, window_between
from loraplane.router.metrics import RouterMetrics

CAND, STABLE = "sql--v2", "sql--v1"


def router_text(m: RouterMetrics) -> str:
    return generate_latest(m.registry).decode()


def serve(m: RouterMetrics, model: str, backend: str, code: int, seconds: float, ttft: float | None = None):
    s = m.stats(model, backend)
    s.count(code)
    s.duration.observe(seconds)
    if ttft is not None:
        s.ttft.observe(ttft)


def test_the_routers_exposition_gives_requests_errors_and_percentiles_per_served_name():
    m = RouterMetrics()
    for i in range(20):   # two public models back the candidate: summed
        serve(m, "sql" if i % 2 else "analytics", CAND, 500 if i < 5 else 200, 0.3, ttft=0.05)
    for _ in range(10):
        serve(m, "sql", STABLE, 200, 0.04)
    serve(m, "sql", STABLE, 499, 0.04)     # client left: counted, not an error
    m.count_refused("sql", 429)            # refused before a backend: neither version's
    reading = parse_router_metrics(router_text(m), [CAND, STABLE, "other--v1"])
    assert set(reading) == {CAND, STABLE}
    c, s = measured(reading[CAND]), measured(reading[STABLE])
    assert (c.requests, c.errors, c.error_rate) == (20, 5, 0.25)
    assert 0.25 < c.p95_latency_seconds <= 0.5 and 0.025 < c.p95_time_to_first_token_seconds <= 0.05
    assert (s.requests, s.errors, s.p95_time_to_first_token_seconds) == (11, 0, None)


def test_window_between_two_readings_per_router_and_restarts():
    a, b = RouterMetrics(), RouterMetrics()
    serve(a, "sql", CAND, 200, 0.1)
    before = {"r-a": parse_router_metrics(router_text(a), [CAND, STABLE])}
    for _ in range(4):
        serve(a, "sql", CAND, 503, 0.1)
    serve(b, "sql", CAND, 200, 0.1)            # a router that appeared in between counts whole
    after = {"r-a": parse_router_metrics(router_text(a), [CAND, STABLE]),
             "r-b": parse_router_metrics(router_text(b), [CAND, STABLE])}
    w = window_between(before, after, CAND, STABLE, 30)
    assert (w.candidate.requests, w.candidate.errors, w.seconds) == (5, 4, 30)
    assert w.stable.requests == 0


def test_garbage_is_a_value_error():
    with pytest.raises(ValueError):
        parse_router_metrics("loraplane_router_requests_total{backend=\"x\" 1\n", [CAND])


def test_the_reader_bounds_size_and_time_and_skips_pods_it_cannot_read(monkeypatch):
    m = RouterMetrics()
    serve(m, "sql", CAND, 200, 0.1)

    async def main():
        async def ok(_):
            return web.Response(body=generate_latest(m.registry))

        async def huge(_):
            return web.Response(body=b"#" * (128 * 1024))

        async def slow(_):
            await asyncio.sleep(2)
            return web.Response(text="")

        runners = []
        ports = []
        for handler in (ok, huge, slow):
            app = web.Application()
            app.router.add_get("/metrics", handler)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            ports.append(site._server.sockets[0].getsockname()[1])
        monkeypatch.setattr(rollout_metrics, "MAX_METRICS_BYTES", 64 * 1024)
        try:
            out = {}
            for name, port in zip(("ok", "huge", "slow"), ports):
                reader = RouterMetricsReader(port=port, timeout=0.5)
                pod = {"metadata": {"name": name}, "status": {"phase": "Running", "podIP": "127.0.0.1"}}
                out.update(await reader.read([pod, {"metadata": {"name": "no-ip"}, "status": {}}], [CAND]))
            return out
        finally:
            for r in runners:
                await r.cleanup()

    out = asyncio.run(main())
    assert set(out) == {"ok"} and out["ok"][CAND].requests == 1
