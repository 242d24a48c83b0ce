"""The loader's HTTP endpoints: /status (the ReplicaReport the router polls), /metrics, /healthz, and vLLM's own
metrics at ENGINE_METRICS_PATH (read over localhost, so Prometheus never needs to reach vLLM's port)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplane.api.paths import ENGINE_METRICS_PATH
from loraplane.api.wire.serving import STATUS_BOUNDED_QUERY
from loraplane.loader.engine import EngineError
from loraplane.loader.reconciler import Loader

LOADER_KEY = web.AppKey("loader", Loader)
# /healthz fails when the control loop has not ticked for this long (a wedged loop gets restarted). The loop
# ticks while it waits and while a download or load runs (Loader.heartbeat), so a slow rollout never trips it.
STALL_SECONDS = 120


async def status(request: web.Request) -> web.Response:
    """GET /status: the loader's ReplicaReport as JSON (what the router polls to choose replicas). With
    `?form=annotation` (STATUS_BOUNDED_QUERY, what the operator's report relay asks) the bounded form,
    ReplicaReport.to_annotation(), at most REPORT_MAX_BYTES whatever the number of adapters."""
    loader = request.app[LOADER_KEY]
    report = loader.report()
    key, _, value = STATUS_BOUNDED_QUERY.partition("=")
    if request.query.get(key) == value:
        return web.Response(text=report.to_annotation(), content_type="application/json")
    return web.json_response(report.model_dump(mode="json", exclude_none=True))


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: the loader's Prometheus metrics."""
    body = generate_latest(request.app[LOADER_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def engine_metrics(request: web.Request) -> web.Response:
    """GET ENGINE_METRICS_PATH: vLLM's /metrics as vLLM serves it (Prometheus text, at most
    engine.METRICS_MAX_BYTES), read over localhost with the engine key; 503 while vLLM cannot be read. What the
    engine PodMonitor scrapes: the route's NetworkPolicy then lets nothing but its routers reach vLLM's port."""
    try:
        text = await request.app[LOADER_KEY].engine.metrics_text()
    except (EngineError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return web.Response(status=503, text=f"vLLM's metrics cannot be read: {type(exc).__name__}: {exc}\n"[:600])
    return web.Response(text=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz (the liveness probe): 200 while the control loop is alive, 503 when its task ended or it has
    not ticked for STALL_SECONDS. It never depends on adapters being loaded: a download that outlasts
    STALL_SECONDS runs in its own task while the loop keeps ticking (docs/loader.md)."""
    problem = request.app[LOADER_KEY].stalled(STALL_SECONDS)
    if problem:
        return web.Response(status=503, text=problem + "\n")
    return web.Response(text="ok\n")


def make_app(loader: Loader) -> web.Application:
    """The loader's aiohttp application serving /status, /metrics, /healthz and ENGINE_METRICS_PATH for `loader`."""
    app = web.Application()
    app[LOADER_KEY] = loader
    app.add_routes([web.get("/status", status), web.get("/metrics", metrics), web.get("/healthz", healthz),
                    web.get(ENGINE_METRICS_PATH, engine_metrics)])
    return app
