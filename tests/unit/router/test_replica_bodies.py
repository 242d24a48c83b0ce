"""What a replica answers the router's polls is untrusted (issue 12): the loader's /status, vLLM's /v1/models and
/metrics are read through storage.httpbody.read_bounded, the operator's report relay's reader. A replica that
answers a body over the limit (here a valid report or model list, so only the size is wrong) or something that
is not the expected JSON shape is a failed poll (out of rotation after POLL_FAILURES_TO_DOWN), never a body held
whole in memory nor an exception that escapes the poll."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loraplane.api.wire.serving import STATUS_MAX_BYTES, ReplicaReport
from loraplane.router.replicas import ENGINE_BODY_MAX_BYTES, POLL_FAILURES_TO_DOWN, ReplicaPool


def big_report() -> bytes:
    """A valid ReplicaReport over STATUS_MAX_BYTES: one Ready adapter with many names' worth of entries."""
    entry = {"state": "Ready", "reason": "Loaded", "since": "2026-01-01T00:00:00Z"}
    adapters = {f"a{i:06d}--v1-{'x' * 200}": entry for i in range(STATUS_MAX_BYTES // 200)}
    body = json.dumps({"replica": "p", "route": "r", "generation": 1, "engine_ready": True,
                       "adapters": adapters, "updated_at": "2026-01-01T00:00:00Z"}).encode()
    ReplicaReport.model_validate_json(body)   # valid: only its size is wrong
    assert len(body) > STATUS_MAX_BYTES
    return body


async def serve(routes: dict[str, bytes], chunked: bool = True) -> TestServer:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = routes[request.path]
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if chunked:
            resp.enable_chunked_encoding()       # no Content-Length: only the running total can bound it
        else:
            resp.content_length = len(body)
        await resp.prepare(request)
        for i in range(0, len(body), 1 << 20):
            await resp.write(body[i:i + (1 << 20)])
        return resp

    app = web.Application()
    for path in routes:
        app.router.add_get(path, handler)
    server = TestServer(app)
    await server.start_server()
    return server


async def poll(pool: ReplicaPool, times: int) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(times):
            await pool.poll_once(session)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_an_oversized_status_is_a_failed_poll(chunked):
    server = await serve({"/status": big_report(), "/metrics": b""}, chunked)
    try:
        base = str(server.make_url("")).rstrip("/")
        pool = ReplicaPool(base_served_name="base")
        pool.set_replicas([(base, base + "/status")])
        await poll(pool, POLL_FAILURES_TO_DOWN)
        replica = pool.replicas[0]
        assert not replica.engine_ready and not replica.ready
        assert "limit" in (replica.last_poll_error or ""), replica.last_poll_error
    finally:
        await server.close()


async def test_an_oversized_model_list_is_a_failed_poll():
    models = json.dumps({"data": [{"id": f"m{i}-{'x' * 100}"} for i in range(ENGINE_BODY_MAX_BYTES // 100)]})
    server = await serve({"/v1/models": models.encode(), "/metrics": b""})
    try:
        base = str(server.make_url("")).rstrip("/")
        pool = ReplicaPool()
        pool.set_replicas([(base, None)])
        await poll(pool, POLL_FAILURES_TO_DOWN)
        assert not pool.replicas[0].engine_ready and "limit" in (pool.replicas[0].last_poll_error or "")
    finally:
        await server.close()


@pytest.mark.parametrize("answer", [b"[]", b'{"data": {"id": "x"}}', b'"x"', b"\xff"])
async def test_a_model_list_of_the_wrong_shape_is_a_failed_poll(answer):
    server = await serve({"/v1/models": answer, "/metrics": b""})
    try:
        base = str(server.make_url("")).rstrip("/")
        pool = ReplicaPool()
        pool.set_replicas([(base, None)])
        await poll(pool, POLL_FAILURES_TO_DOWN)
        assert not pool.replicas[0].engine_ready and pool.replicas[0].poll_failures == POLL_FAILURES_TO_DOWN
    finally:
        await server.close()
