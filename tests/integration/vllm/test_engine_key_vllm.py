"""The installed vLLM's API key check, which the route's engine key relies on (issue 12 item 1 a): with a key
(--api-key, or VLLM_API_KEY as the engine pod sets it), the runtime LoRA endpoints refuse a request without
`Authorization: Bearer <key>`. Runs vLLM's own middleware in-process (no server needed), so a vLLM upgrade that
changes which paths are guarded fails here."""

from __future__ import annotations

import asyncio

import pytest

from loraplane.api.paths import ENGINE_API_KEY_ENV

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(120)]


def status_of(path: str, auth: str | None) -> int:
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    async def inner(scope, receive, send):   # what vLLM's routes would answer when let through
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guarded = AuthenticationMiddleware(inner, tokens=["route-key"])
    headers = [(b"authorization", auth.encode())] if auth else []
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": headers,
             "query_string": b""}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(guarded(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/completions",
                                  "/v1/chat/completions", "/v1/models"])
def test_vllm_refuses_the_lora_and_openai_endpoints_without_the_route_key(path):
    assert status_of(path, None) == 401
    assert status_of(path, "Bearer someone-elses-key") == 401
    assert status_of(path, "Bearer route-key") == 200


def test_vllm_reads_the_key_from_the_variable_the_engine_pod_sets(monkeypatch):
    import vllm.envs as envs

    monkeypatch.setenv(ENGINE_API_KEY_ENV, "from-env")
    assert envs.VLLM_API_KEY == "from-env"
    # /health stays open (the kubelet's probes carry no key); NetworkPolicy guards what the key does not.
    assert status_of("/health", None) == 200
