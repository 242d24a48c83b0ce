"""Issue 12 item 1 (a): the loader authenticates to vLLM with the route's engine key on every call."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from loraplane.loader.engine import EngineError, VllmClient


async def test_the_loader_sends_the_engine_key_to_vllm():
    seen: list[tuple[str, str | None]] = []

    async def guarded(request: web.Request) -> web.Response:
        # vLLM's AuthenticationMiddleware: /v1/* needs the key, /health does not.
        seen.append((request.path, request.headers.get("Authorization")))
        if request.path.startswith("/v1") and request.headers.get("Authorization") != "Bearer k-1":
            return web.json_response({"error": "Unauthorized"}, status=401)
        if request.path == "/v1/models":
            return web.json_response({"data": [{"id": "a", "root": "/cache/a", "parent": "base"}]})
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", guarded)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url("")).rstrip("/")
            engine = VllmClient(url, session, api_key="k-1")
            assert await engine.healthy()
            assert await engine.loaded_adapters() == {"a": "/cache/a"}
            await engine.load("a", "/cache/a")
            await engine.unload("a")
            assert {auth for path, auth in seen if path.startswith("/v1")} == {"Bearer k-1"}
            keyless = VllmClient(url, session)
            try:
                await keyless.load("a", "/cache/a")
                raise AssertionError("a keyless load must be refused")
            except EngineError as exc:
                assert exc.status == 401
    finally:
        await server.close()
