"""The router end to end over real HTTP, in front of in-process stub replicas (tests/support/router_stubs.py).

Stubs stand in for vLLM + loader so failures can be staged on demand (replica down, stale adapter view,
held requests); the same paths against the real vLLM CPU server are in test_router_vllm.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import time

import aiohttp
import pytest
import pytest_asyncio

from support.router_running import labels, metric_samples, running_router, table_json, wait_for
from support.router_stubs import StubReplica

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture(loop_scope="function")
async def started():
    """`await started(StubReplica(...), ...)`: start stub replicas (one, or a tuple); all stop after the test."""
    running: list[StubReplica] = []

    async def start(*replicas: StubReplica):
        for r in replicas:
            running.append(await r.start())
        return replicas[0] if len(replicas) == 1 else replicas

    yield start
    for r in running:
        await r.stop()


async def test_routes_public_name_and_rewrites_only_model(started, tmp_path):
    a = await started(StubReplica("a", adapters={"chat-v1"}))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("chat-v1", 100)]})) as (_, c):
        body = b'{"model": "chat",  "prompt": "hello", "max_tokens": 3, "x": {"y": [1, 2.50]}}'
        async with c.post("/v1/completions", data=body, headers={"Content-Type": "application/json",
                                                                 "Authorization": "Bearer client-secret",
                                                                 "X-Request-Id": "req-1"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Loraplane-Backend"] == "chat-v1"
            answer = await resp.json()
        assert answer["model"] == "chat-v1"
        path, sent, headers = a.received[-1]
        assert path == "/v1/completions"
        assert sent == body.replace(b'"chat"', b'"chat-v1"')  # byte-identical apart from `model`
        assert "Authorization" not in headers  # the router's API key never reaches vLLM
        assert headers.get("X-Request-Id") == "req-1", headers
        async with c.post("/v1/chat/completions", json={"model": "chat", "messages": []}) as resp:
            assert resp.status == 200
        assert a.received[-1][0] == "/v1/chat/completions"


async def test_the_router_authenticates_to_vllm_with_the_route_engine_key_never_the_clients(started, tmp_path):
    """Issue 12 item 1 (a): vLLM requires the route's engine key; the router sends it (and only it) to vLLM,
    on requests and on its own /v1/models poll of a replica without a loader."""
    a = await started(StubReplica("a", adapters={"chat-v1"}))
    b = await started(StubReplica("b", adapters={"chat-v1"}))
    async with running_router(tmp_path, [a.spec, b.engine_url], table_json({"chat": [("chat-v1", 100)]}),
                              engine_key="route-key-1") as (_, c):
        for _ in range(6):
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "x"},
                              headers={"Authorization": "Bearer client-secret"}) as resp:
                assert resp.status == 200
        sent = [h.get("Authorization") for _, _, h in a.received + b.received]
        assert sent and set(sent) == {"Bearer route-key-1"}
        assert b.models_auth and set(b.models_auth) == {"Bearer route-key-1"}   # b has no loader: polled
    with pytest.raises(ValueError):
        from loraplane.router.server import engine_authorization
        engine_authorization("key\r\nX-Evil: 1")


async def test_models_listing_and_unknown_model_404(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    table = table_json({"chat": [("v1", 100)], "tiny": [("base", 100)]})
    async with running_router(tmp_path, [a.spec], table) as (_, c):
        async with c.get("/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["chat", "tiny"]
        async with c.post("/v1/completions", json={"model": "v1", "prompt": "x"}) as resp:
            # Served names are internal: only public names route.
            assert resp.status == 404
            err = (await resp.json())["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert err["available_models"] == ["chat", "tiny"] and "chat, tiny" in err["message"]
        async with c.post("/v1/completions", data=b"{not json") as resp:
            assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]
        assert a.received == []


async def test_canary_weights_and_stickiness(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1", "v2"}))
    table = table_json({"chat": [("v1", 80), ("v2", 20)]}, sticky_header="X-User")
    async with running_router(tmp_path, [a.spec], table, access_log=False) as (_, c):
        counts = collections.Counter()
        for _ in range(600):
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                counts[resp.headers["X-Loraplane-Backend"]] += 1
        # Binomial(600, 0.2): mean 120, sd ~9.8; fixed seed, 5 sd bounds.
        assert abs(counts["v2"] - 120) < 49, counts
        for user in ("alice", "bob", "carol", "dave", "erin"):
            seen = set()
            for _ in range(8):
                async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"},
                                  headers={"X-User": user}) as resp:
                    seen.add(resp.headers["X-Loraplane-Backend"])
            assert len(seen) == 1, (user, seen)


async def test_prefers_replica_with_adapter_ready_then_least_loaded(started, tmp_path):
    a, b, c_ = await started(StubReplica("a", adapters=set()), StubReplica("b", adapters={"v1"}, engine_load=5),
                           StubReplica("c", adapters={"v1"}, engine_load=0))
    async with running_router(tmp_path, [r.spec for r in (a, b, c_)], table_json({"chat": [("v1", 100)]})) as (svc, c):
        for _ in range(10):
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                assert (await resp.json())["replica"] == "c"  # has it, least busy per vLLM's metrics
        assert a.received == [] and b.received == []
        # The router's own in-flight count: with c held busy, new requests spread to b.
        c_.hold = asyncio.Event()
        held = [asyncio.create_task(c.post("/v1/completions", json={"model": "chat", "prompt": "p"}))
                for _ in range(6)]
        await wait_for(lambda: len(c_.received) + len(b.received) >= 16)
        assert len(b.received) >= 1 and len(c_.received) - 10 >= 1
        c_.hold.set()
        for t in held:
            (await t).release()


async def test_fallback_to_another_version_when_no_replica_has_it(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    table = table_json({"chat": [("v1", 50), ("v2", 50)], "only-v2": [("v2", 100)]})
    async with running_router(tmp_path, [a.spec], table) as (svc, c):
        for _ in range(20):
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                assert resp.headers["X-Loraplane-Backend"] == "v1"  # v2 is loading nowhere yet
        async with c.post("/v1/completions", json={"model": "only-v2", "prompt": "p"}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "2"
            assert (await resp.json())["error"]["code"] == "no_ready_replica"
        a.adapters.add("v2")  # the loader finished: after a poll, v2 gets traffic
        await wait_for(lambda: "v2" in svc.pool.replicas[0].ready)
        async with c.post("/v1/completions", json={"model": "only-v2", "prompt": "p"}) as resp:
            assert resp.status == 200


async def test_stale_adapter_view_is_retried_elsewhere(started, tmp_path):
    a, b = await started(StubReplica("a", adapters={"v1"}, engine_load=0, missing={"v1"}),
                       StubReplica("b", adapters={"v1"}, engine_load=3))
    async with running_router(tmp_path, [a.spec, b.spec], table_json({"chat": [("v1", 100)]})) as (_, c):
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
            assert resp.status == 200 and (await resp.json())["replica"] == "b"
        assert len(a.received) == 1  # vLLM on a said 404: nothing generated, safe to resend


async def test_replica_down_is_retried_and_avoided(started, tmp_path):
    a, b = await started(StubReplica("a", adapters={"v1"}), StubReplica("b", adapters={"v1"}, engine_load=2))
    async with running_router(tmp_path, [a.spec, b.spec], table_json({"chat": [("v1", 100)]}),
                              poll_interval=30) as (svc, c):
        a_name = a.engine_url.split("//")[1]
        await a.stop()  # dies between polls: the router still believes in it
        for _ in range(5):
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                assert resp.status == 200 and (await resp.json())["replica"] == "b"
        m = await metric_samples(c)
        assert m[("loraplane_router_retries_total", (("backend", "v1"), ("model", "chat")))] == 1
        assert m[("loraplane_router_replica_up", (("replica", a_name),))] == 0
        await b.stop()  # nothing left: a clear 502, no hang
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "replica_unreachable"


async def test_polling_removes_and_readds_a_replica(started, tmp_path):
    a, b = await started(StubReplica("a", adapters={"v1"}), StubReplica("b", adapters={"v1"}))
    async with running_router(tmp_path, [a.spec, b.spec], table_json({"chat": [("v1", 100)]})) as (svc, c):
        ra, rb = svc.pool.replicas
        a.engine_ready = False  # the loader reports vLLM down
        await wait_for(lambda: not ra.engine_ready)
        for _ in range(6):
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                assert (await resp.json())["replica"] == "b"
        a.engine_ready, b.engine_ready = True, False
        await wait_for(lambda: ra.engine_ready and not rb.engine_ready)
        for _ in range(6):
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                assert (await resp.json())["replica"] == "a"


async def test_streaming_is_passed_through_unbuffered_with_usage(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    a.stream_gate = asyncio.Event()
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]})) as (_, c):
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p", "stream": True,
                                                   "stream_options": {"include_usage": True}}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            # The stub holds the rest of its stream until we have seen the first event: a buffering
            # proxy would deadlock here (and time out).
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            assert json.loads(first[6:])["choices"][0]["text"] == "a"
            a.stream_gate.set()
            rest = await resp.content.read()
        assert rest.endswith(b"data: [DONE]\n\n") and b'"usage"' in rest
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
            assert resp.status == 200
        m = await metric_samples(c)
        assert m[("loraplane_router_prompt_tokens_total", labels(backend="v1", model="chat"))] == 14  # 7 streamed + 7 plain
        assert m[("loraplane_router_completion_tokens_total", labels(backend="v1", model="chat"))] == 6
        assert m[("loraplane_router_requests_total", labels(backend="v1", model="chat", code="200"))] == 2
        assert m[("loraplane_router_time_to_first_token_seconds_count", labels(backend="v1", model="chat"))] == 1
        assert m[("loraplane_router_request_duration_seconds_count", labels(backend="v1", model="chat"))] == 2
        assert m[("loraplane_router_in_flight", labels(backend="v1", model="chat"))] == 0


@pytest.mark.parametrize("piece", [0, 7], ids=["events", "7-byte-pieces"])
async def test_streams_without_usage_are_counted_and_relayed_unchanged(started, tmp_path, piece):
    # Most chat UIs stream without stream_options.include_usage: the router asks vLLM for usage, counts it
    # and strips the usage chunk, so the client receives exactly what vLLM would have sent it.
    a = await started(StubReplica("a", adapters={"v1"}, stream_piece=piece))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]})) as (_, c):
        asked = [{"prompt": "p", "stream": True},
                 {"prompt": "p", "stream": True, "stream_options": {"include_usage": False,
                                                                    "continuous_usage_stats": True}}]
        for extra in asked:
            async with c.post("/v1/completions", json={"model": "chat", **extra}) as resp:
                assert resp.status == 200
                relayed = await resp.read()
            async with aiohttp.ClientSession() as direct:
                async with direct.post(a.engine_url + "/v1/completions", json={"model": "v1", **extra}) as resp:
                    expected = await resp.read()
            assert relayed == expected and b'"usage"' not in relayed
            assert json.loads(a.received[-2][1])["stream_options"]["include_usage"] is True   # asked upstream
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p", "stream": True,
                                                   "stream_options": {"include_usage": True}}) as resp:
            assert b'"usage"' in await resp.read()   # asked by the client: relayed
        m = await metric_samples(c)
        assert m[("loraplane_router_prompt_tokens_total", labels(backend="v1", model="chat"))] == 21
        assert m[("loraplane_router_completion_tokens_total", labels(backend="v1", model="chat"))] == 9


async def test_an_engine_that_forces_usage_is_not_asked_and_its_usage_is_relayed(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    table = table_json({"chat": [("v1", 100)]}, engine_includes_usage=True)
    async with running_router(tmp_path, [a.spec], table) as (_, c):
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p", "stream": True}) as resp:
            assert resp.status == 200 and b'"usage"' not in await resp.read()   # the stub does not force it
        assert "stream_options" not in json.loads(a.received[-1][1])


async def test_a_token_named_usage_does_not_lose_the_counts(started, tmp_path):
    # vLLM's chat answer puts prompt_logprobs after usage; a prompt token decoding to "usage" came last.
    a = await started(StubReplica("a", adapters={"v1"}, extra_fields={
        "prompt_logprobs": [None, {"42": {"logprob": -1.5, "rank": 1, "decoded_token": "usage"}}]}))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]})) as (_, c):
        async with c.post("/v1/chat/completions", json={"model": "chat", "messages": [], "prompt_logprobs": 1}) as resp:
            assert resp.status == 200 and (await resp.json())["prompt_logprobs"][1]["42"]["decoded_token"] == "usage"
        m = await metric_samples(c)
        assert m[("loraplane_router_prompt_tokens_total", labels(backend="v1", model="chat"))] == 7
        assert m[("loraplane_router_completion_tokens_total", labels(backend="v1", model="chat"))] == 3


async def test_in_flight_gauge_and_hot_reload_without_dropping_requests(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1", "v2"}, hold_models={"v1"}))
    a.hold = asyncio.Event()
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]})) as (svc, c):
        pending = [asyncio.create_task(c.post("/v1/completions", json={"model": "chat", "prompt": "p"}))
                   for _ in range(3)]
        await wait_for(lambda: len(a.received) == 3)
        m = await metric_samples(c)
        assert m[("loraplane_router_in_flight", (("backend", "v1"), ("model", "chat")))] == 3
        # The operator moves all traffic to v2 and adds a model, while three requests are open.
        (tmp_path / "serving.json").write_text(
            table_json({"chat": [("v2", 100)], "new": [("v1", 100)]}, generation=2))
        await wait_for(lambda: svc.router.table.source.generation == 2)
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
            assert resp.status == 200 and resp.headers["X-Loraplane-Backend"] == "v2"
        a.hold.set()
        for t in pending:
            resp = await t
            assert resp.status == 200 and resp.headers["X-Loraplane-Backend"] == "v1"
            resp.release()
        # A broken table is refused and the working one stays.
        (tmp_path / "serving.json").write_text('{"route": "r", "models": 5}')
        errors = svc.router.metrics.table_reloads.labels("error")
        await wait_for(lambda: errors._value.get() == 1)
        assert svc.router.table.source.generation == 2
        async with c.post("/v1/completions", json={"model": "new", "prompt": "p"}) as resp:
            assert resp.status == 200
        m = await metric_samples(c)
        assert m[("loraplane_router_table_reloads_total", (("result", "error"),))] == 1
        assert m[("loraplane_router_table_generation", ())] == 2


async def test_request_size_limit(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]},
                                                             max_request_bytes=2048)) as (_, c):
        big = json.dumps({"model": "chat", "prompt": "x" * 4000}).encode()
        async with c.post("/v1/completions", data=big) as resp:
            assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"

        async def chunked():
            for i in range(0, len(big), 500):
                yield big[i:i + 500]

        async with c.post("/v1/completions", data=chunked()) as resp:  # no Content-Length
            assert resp.status == 413
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "x" * 1000}) as resp:
            assert resp.status == 200
        assert len(a.received) == 1


async def test_api_keys(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "team-a").write_text("# rotated 2026-11\nkey-one\n")
    (keys / "team-b").write_text("key-two\n")
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]}), api_keys=keys) as (svc, c):
        req = {"model": "chat", "prompt": "p"}
        for headers, status in [({}, 401), ({"Authorization": "Bearer nope"}, 401),
                                ({"Authorization": "key-one"}, 401),
                                ({"Authorization": "Bearer key-one"}, 200),
                                ({"Authorization": "Bearer key-two"}, 200)]:
            async with c.post("/v1/completions", json=req, headers=headers) as resp:
                assert resp.status == status, headers
                if status == 401:
                    assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with c.get("/v1/models") as resp:
            assert resp.status == 401
        async with c.get("/metrics") as resp:
            assert resp.status == 200  # scraped in-cluster without a key
        (keys / "team-b").write_text("key-three\n")  # the Secret was rotated
        deadline = time.monotonic() + 15  # picked up within a re-read interval (bounded: CI machines are busy)
        while True:
            async with c.post("/v1/completions", json=req, headers={"Authorization": "Bearer key-two"}) as resp:
                if resp.status == 401 or time.monotonic() > deadline:
                    break
            await asyncio.sleep(0.05)
        assert resp.status == 401
        async with c.post("/v1/completions", json=req, headers={"Authorization": "Bearer key-three"}) as resp:
            assert resp.status == 200


async def test_timeout_gives_504(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    a.hold = asyncio.Event()
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]},
                                                             timeout_seconds=0.3)) as (_, c):
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
            assert resp.status == 504 and (await resp.json())["error"]["code"] == "upstream_timeout"
        assert len(a.received) == 1  # sent once: a timeout is never resent
        a.hold.set()


async def test_proxied_requests_arm_no_timer_and_reuse_the_upstream_parser(started, tmp_path, monkeypatch):
    """Issue 17 (router CPU per request): router.timeoutSeconds is enforced by the router's sweep from each
    exchange's deadline (test_timeout_gives_504), not by a loop timer armed and cancelled per request, and a
    kept-alive connection to vLLM parses every answer with its one parser."""
    from loraplane.router.upstream import Upstream

    a = await started(StubReplica("a", adapters={"v1"}))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]})) as (svc, c):
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
            assert resp.status == 200
        loop = svc.router.loop
        timers, parsers = [], []
        real_call_later, real_call_at = loop.call_later, loop.call_at
        monkeypatch.setattr(loop, "call_later", lambda d, cb, *args, **kw: (timers.append(cb),
                                                                            real_call_later(d, cb, *args, **kw))[1])
        monkeypatch.setattr(loop, "call_at", lambda w, cb, *args, **kw: (timers.append(cb),
                                                                         real_call_at(w, cb, *args, **kw))[1])
        real_send = Upstream.send
        monkeypatch.setattr(Upstream, "send", lambda self, *args: (parsers.append(self.parser),
                                                                   real_send(self, *args))[1])
        for _ in range(5):
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                assert resp.status == 200
        per_request = [cb for cb in timers if getattr(cb, "__self__", None).__class__.__name__ == "Exchange"]
        assert per_request == []
        assert len(parsers) == 5 and len({id(p) for p in parsers}) == 1   # one pooled connection, one parser


async def test_prompts_not_logged_by_default(started, tmp_path, caplog):
    a = await started(StubReplica("a", adapters={"v1"}))
    caplog.set_level("DEBUG")
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]})) as (svc, c):
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "TOP-SECRET-PROMPT"}) as resp:
            assert resp.status == 200
        assert "model=chat backend=v1" in caplog.text  # the access log line is there...
        assert "TOP-SECRET-PROMPT" not in caplog.text  # ...without the prompt
        (tmp_path / "serving.json").write_text(table_json({"chat": [("v1", 100)]}, generation=2,
                                                          log_prompts=True))
        await wait_for(lambda: svc.router.table.source.generation == 2)
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "TOP-SECRET-PROMPT"}) as resp:
            assert resp.status == 200
        assert "TOP-SECRET-PROMPT" in caplog.text  # only when the route asks for it


async def test_replicas_without_loader_use_vllm_model_list(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    async with running_router(tmp_path, [f"{a.engine_url},none"],
                              table_json({"chat": [("v1", 100)], "tiny": [("base", 100)]})) as (_, c):
        for model in ("chat", "tiny"):
            async with c.post("/v1/completions", json={"model": model, "prompt": "p"}) as resp:
                assert resp.status == 200


async def test_cli_runs_as_a_process(started, tmp_path):
    """`python -m loraplane.router` starts, serves, and stops cleanly on SIGTERM."""
    import os
    import signal
    import socket
    import sys

    a = await started(StubReplica("a", adapters={"v1"}))
    (tmp_path / "serving.json").write_text(table_json({"chat": [("v1", 100)]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loraplane.router", "--table", str(tmp_path / "serving.json"),
        "--replica", a.spec, "--host", "127.0.0.1", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ})
    try:
        async with aiohttp.ClientSession() as c:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with c.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "router did not start"
                await asyncio.sleep(0.1)
            async with c.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "chat", "prompt": "p"}) as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_rejects_bad_arguments():
    import sys

    for args, fragment in [(["--replica", "http://x:8000"], b"--table FILE or --configmap"),
                           (["--table", "t.json"], b"--replica URL"),
                           (["--table", "t.json", "--replica", "x:8000"], b"ENGINE_URL[,STATUS_URL]"),
                           (["--table", "t.json", "--replica", "http://x:8000", "--idle-timeout", "0"],
                            b"--idle-timeout must be > 0"),
                           (["--table", "t.json", "--replica", "http://x:8000", "--max-header-bytes", "10"],
                            b"--max-header-bytes >= 1024")]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "loraplane.router", *args,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 2 and fragment in err, err


# ---- HTTP edge cases, over raw sockets (the router parses HTTP with httptools on its own connections) ----

async def raw_exchange(service, data: bytes, read_until_close: bool = True, timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(data)
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(), timeout)
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


def post(body: bytes, extra: str = "", path: str = "/v1/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def test_pipelined_requests_are_answered_in_order_and_connection_close_is_honoured(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)], "other": [("base", 100)]})) as (svc, _):
        body1 = b'{"model":"chat","prompt":"one"}'
        body2 = b'{"model":"nope","prompt":"two"}'
        body3 = b'{"model":"other","prompt":"three"}'
        out = await raw_exchange(svc, post(body1) + post(body2) + post(body3, "Connection: close\r\n"))
        statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", out)]
        assert statuses == [200, 404, 200]
        assert b"Connection: close" in out.rsplit(b"HTTP/1.1 ", 1)[1]  # and the router closed it (read() ended)
        assert [json.loads(r[1])["prompt"] for r in a.received] == ["one", "three"]


async def test_http_errors_methods_paths_expect(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]}, max_request_bytes=1024)) as (svc, c):
        out = await raw_exchange(svc, b"GARBAGE\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 ") and b"malformed HTTP request" in out
        async with c.get("/v1/completions") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
        async with c.get("/v1/engines") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
        # curl sends Expect: 100-continue for bodies over 1 KiB: a too-large body is refused before it is sent.
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                b"Expect: 100-continue\r\n\r\n")
        out = await raw_exchange(svc, head)
        assert out.startswith(b"HTTP/1.1 413 ")
        body = b'{"model":"chat","prompt":"ok"}'
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post(body, "Expect: 100-continue\r\n")[:-len(body)])
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()


async def test_client_leaving_closes_the_upstream_request(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    a.hold = asyncio.Event()
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]})) as (svc, c):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post(b'{"model":"chat","prompt":"long"}'))
        await wait_for(lambda: len(a.received) == 1)
        replica = svc.pool.replicas[0]
        assert replica.in_flight == 1
        writer.close()  # the client gives up
        await wait_for(lambda: replica.in_flight == 0)
        m = await metric_samples(c)
        assert m[("loraplane_router_requests_total", labels(backend="v1", model="chat", code="499"))] == 1
        assert m[("loraplane_router_in_flight", labels(backend="v1", model="chat"))] == 0
        assert replica.idle == []  # the connection to vLLM was closed (vLLM aborts), not pooled
        a.hold.set()


async def test_pooled_connection_closed_by_the_replica_is_not_reused():
    """vLLM closing an idle keep-alive connection (its keep-alive timeout, a restart) can race a new request:
    the close may sit in the socket before the event loop has seen it. Such a connection must not be used,
    because a request written to it would be lost after it was sent (and is then never resent)."""
    import socket

    from loraplane.router.replicas import Replica
    from loraplane.router.upstream import Upstream

    accepted = []
    server = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    replica = Replica(f"http://127.0.0.1:{port}", None)
    try:
        _, up = await asyncio.get_running_loop().create_connection(lambda: Upstream(replica), "127.0.0.1", port)
        await wait_for(lambda: accepted)
        assert up.reusable()
        accepted[0].get_extra_info("socket").shutdown(socket.SHUT_RDWR)  # the replica closes it...
        time.sleep(0.05)  # ...and the FIN arrives while the loop is busy (blocking sleep: no callbacks run)
        assert up.transport is not None  # the loop has not noticed
        assert not up.reusable()
    finally:
        server.close()


async def test_a_version_draining_on_its_replica_still_serves_a_router_whose_table_names_it(started, tmp_path):
    """Make-before-break (issue 14): the loader keeps a version that left the table loaded while it drains
    (state Draining); a router that has not read the new table yet still reaches it instead of answering 503."""
    a = await started(StubReplica("a", adapters={"v2"}, draining={"v1"}))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]}), poll_interval=300) as (svc, c):
        await svc.pool.poll_once(svc._poll_session)
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
            assert resp.status == 200 and resp.headers["X-Loraplane-Backend"] == "v1"


async def test_one_failed_status_poll_does_not_take_a_replica_out(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]}), poll_interval=300) as (svc, c):
        a.status_fails = True
        for polls in range(1, 4):
            await svc.pool.poll_once(svc._poll_session)
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                # Two failures in a row: the last known state stands. The third: out of rotation.
                assert resp.status == (200 if polls < 3 else 503), polls
        a.status_fails = False
        await svc.pool.poll_once(svc._poll_session)
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
            assert resp.status == 200


async def test_replica_whose_vllm_is_unreachable_is_down_even_without_traffic(started, tmp_path):
    """Its loader still says vLLM is up (same pod, so it can reach it) but the router cannot: the poll alone
    takes it out, before any request pays for finding out, and the up gauge says so."""
    from loraplane.local.processes import free_port

    a, b = await started(StubReplica("a", adapters={"v1"}), StubReplica("b", adapters={"v1"}))
    unreachable = f"http://127.0.0.1:{free_port()},{a.status_url}"  # nothing listens on the engine port
    async with running_router(tmp_path, [unreachable, b.spec], table_json({"chat": [("v1", 100)]}),
                              poll_interval=300) as (svc, c):
        await svc.pool.poll_once(svc._poll_session)
        m = await metric_samples(c)
        dead = svc.pool.replicas[0].name
        assert m[("loraplane_router_replica_up", labels(replica=dead))] == 0
        assert m[("loraplane_router_replica_up", labels(replica=b.server.make_url("").host + ":" +
                                                        str(b.server.port)))] == 1
        for _ in range(4):
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                assert resp.status == 200 and (await resp.json())["replica"] == "b"
        m = await metric_samples(c)
        assert m.get(("loraplane_router_retries_total", labels(backend="v1", model="chat")), 0) == 0  # none tried it
        # vLLM answers again on the next poll (here: the replica is now reachable through b): back in rotation.
        svc.pool.replicas[0].engine_url = b.engine_url
        svc.pool.replicas[0].host, svc.pool.replicas[0].port = "127.0.0.1", b.server.port
        await svc.pool.poll_once(svc._poll_session)
        assert svc.pool.replicas[0].usable()


async def test_slow_client_pauses_the_replica_instead_of_buffering(started, tmp_path):
    a = await started(StubReplica("a", adapters={"v1"}, big_stream=200))  # 12.5 MiB of events
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]})) as (svc, c):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port, limit=1 << 20)
        writer.transport.pause_reading()  # a client that does not read
        writer.write(post(b'{"model":"chat","prompt":"p","stream":true}'))
        await wait_for(lambda: len(a.received) == 1)
        await wait_for(lambda: any(c.paused_upstream is not None for c in svc.router.connections))
        conn = next(iter(svc.router.connections))
        # The router holds at most about its write buffer's high-water mark, not the 12.5 MiB on offer.
        assert conn.transport.get_write_buffer_size() < 2 * 1024 * 1024
        assert conn.paused_upstream is not None
        writer.transport.resume_reading()
        total = 0
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            total += len(chunk)
            if chunk.endswith(b"0\r\n\r\n"):
                break
        assert total > 200 * 65536
        writer.close()
