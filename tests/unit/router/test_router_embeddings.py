"""An embedding route's router (spec.engine.task embed) serves POST /v1/embeddings like a completion: API key,
body limit, `model` rewritten to the served name, replica choice, token metrics. Semantic content routing
reaches another route's embedding model through that route's router (issue 15), so it must answer there."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from support.router_running import running_router, table_json
from support.router_stubs import StubReplica

pytestmark = pytest.mark.timeout(60)


class EmbeddingStub(StubReplica):
    """A pooling vLLM: /v1/embeddings answers with one vector per input."""

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/embeddings", self.embed)
        return app

    async def embed(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((request.path, body, request.headers.copy()))
        req = json.loads(body)
        inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
        return web.json_response({
            "object": "list", "model": req["model"],
            "data": [{"object": "embedding", "index": i, "embedding": [0.6, 0.8]} for i, _ in enumerate(inputs)],
            "usage": {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0}})


async def test_embeddings_are_proxied_with_the_model_rewritten_and_counted(tmp_path):
    stub = await EmbeddingStub("a").start()
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "team").write_text("key-one\n")
    try:
        table = table_json({"embedder": [("base", 100)]}, max_request_bytes=2048)
        async with running_router(tmp_path, [stub.spec], table, api_keys=keys) as (_, c):
            auth = {"Authorization": "Bearer key-one"}
            body = {"model": "embedder", "input": ["where is my order?", "count users by country"]}
            async with c.post("/v1/embeddings", json=body, headers=auth) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["X-Loraplane-Backend"] == "base"
                answer = await resp.json()
            assert [d["embedding"] for d in answer["data"]] == [[0.6, 0.8], [0.6, 0.8]]
            path, sent, headers = stub.received[-1]
            assert path == "/v1/embeddings" and json.loads(sent)["model"] == "base"
            assert "Authorization" not in headers   # the client's key never reaches vLLM

            async with c.post("/v1/embeddings", json=body) as resp:          # keyed like completions
                assert resp.status == 401
            async with c.post("/v1/embeddings", json={**body, "input": "x" * 4000}, headers=auth) as resp:
                assert resp.status == 413                                     # router.maxRequestBytes
            async with c.get("/v1/embeddings", headers=auth) as resp:
                assert resp.status == 405 and resp.headers["Allow"] == "POST"
            async with c.post("/v1/embeddings", json={**body, "model": "nope"}, headers=auth) as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
            async with c.get("/v1/engines") as resp:
                assert resp.status == 404 and "/v1/embeddings" in (await resp.json())["error"]["message"]
            async with c.get("/metrics") as resp:
                metrics = await resp.text()
            assert 'loraplane_router_prompt_tokens_total{backend="base",model="embedder"} 4.0' in metrics
            assert 'loraplane_router_requests_total{backend="base",code="200",model="embedder"} 1.0' in metrics
    finally:
        await stub.stop()
