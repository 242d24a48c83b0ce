"""vLLM's /metrics served by the loader (ENGINE_METRICS_PATH on the loader's port): what the engine PodMonitor
scrapes, so nothing but the route's routers ever needs to reach vLLM's port (docs/security.md, NetworkPolicy)."""

from __future__ import annotations

import types

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from loraplane.api.paths import ENGINE_METRICS_PATH
from loraplane.loader import engine, server

METRICS = 'vllm:num_requests_waiting{model_name="base"} 3.0\n'


async def _vllm(body: bytes, status: int = 200, key: str = "k") -> TestServer:
    async def metrics(request: web.Request) -> web.Response:
        assert request.headers.get("Authorization") == f"Bearer {key}"   # sent like every loader call
        return web.Response(body=body, status=status, content_type="text/plain")

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics)])
    srv = TestServer(app)
    await srv.start_server()
    return srv


async def _scrape(base_url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        loader = types.SimpleNamespace(engine=engine.VllmClient(base_url, session, request_timeout=5, api_key="k"))
        async with TestClient(TestServer(server.make_app(loader))) as client:
            resp = await client.get(ENGINE_METRICS_PATH)
            return resp.status, await resp.text()


async def test_the_loader_serves_vllms_metrics_as_vllm_writes_them():
    # Several hundred KB, as vLLM's histograms with many adapters are: more than one read of the stream returns.
    big = METRICS + "".join(f'vllm:e2e_request_latency_seconds_bucket{{le="{i}"}} {i}.0\n' for i in range(20000))
    for body in (METRICS, big):
        vllm = await _vllm(body.encode())
        try:
            status, text = await _scrape(str(vllm.make_url("")))
        finally:
            await vllm.close()
        assert (status, text) == (200, body)


async def test_vllm_down_failing_or_answering_too_much_is_503_never_unbounded(monkeypatch):
    monkeypatch.setattr(engine, "METRICS_MAX_BYTES", 1024)
    monkeypatch.setattr(engine.VllmClient.metrics_text, "__defaults__", (1024,))
    for body, code in ((b"x" * 2048, 200), (b"boom", 500)):
        vllm = await _vllm(body, code)
        try:
            status, text = await _scrape(str(vllm.make_url("")))
        finally:
            await vllm.close()
        assert status == 503 and "vLLM's metrics cannot be read" in text and len(text) <= 600
    status, _ = await _scrape("http://127.0.0.1:9")   # nothing listens: connection refused
    assert status == 503
