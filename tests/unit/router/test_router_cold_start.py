"""Scale to zero and back, the router's part (issue 16): while no replica is up, requests are held (bounded in
number and time, then 503 with Retry-After), demand is signalled, and held requests go out as soon as a replica
serves their model. Real router over real HTTP; the replicas are in-process stubs (support/router_stubs.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from loraplane.router.hold import COLD_RETRY_AFTER
from loraplane.router.replicas import parse_replica_arg
from support.router_running import labels, metric_samples, running_router, table_json, wait_for
from support.router_stubs import StubReplica

import pytest_asyncio

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture(loop_scope="function")
async def started():
    """`await started(StubReplica(...))`: start a stub replica; it stops after the test."""
    running: list[StubReplica] = []

    async def start(replica: StubReplica) -> StubReplica:
        running.append(await replica.start())
        return replica

    yield start
    for r in running:
        await r.stop()


COLD = {"cold_start_wait_seconds": 20, "cold_start_max_requests": 4}


async def post(client, model="chat"):
    async with client.post("/v1/completions", json={"model": model, "prompt": "p"}) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_held_at_zero_replicas_and_released_when_a_replica_serves(started, tmp_path):
    table = table_json({"chat": [("v1", 100)]}, **COLD)
    async with running_router(tmp_path, [], table) as (svc, c):
        demand = []
        svc.router.on_demand = lambda: demand.append(time.monotonic())
        sent = [asyncio.create_task(post(c)) for _ in range(3)]
        await wait_for(lambda: len(svc.router.held) == 3)
        assert not any(t.done() for t in sent)             # held, not answered 503
        assert len(demand) == 3                            # every hold signals demand (the waker throttles)
        samples = await metric_samples(c)
        assert samples[("loraplane_router_held_requests", ())] == 3   # what KEDA activates on at zero

        # A replica comes up without the adapter yet: the requests stay held (their model is not served)...
        a = await started(StubReplica("a", adapters=set()))
        svc.pool.set_replicas([parse_replica_arg(a.spec)])
        await svc.pool.poll_once(svc._poll_session)
        await asyncio.sleep(0.3)
        assert len(svc.router.held) == 3 and a.received == []
        # ...and a new request waits with them, in order, rather than being refused while the cold start is on.
        sent.append(asyncio.create_task(post(c)))
        await wait_for(lambda: len(svc.router.held) == 4)
        # Its loader reports the adapter Ready: the next poll releases them all.
        a.adapters.add("v1")
        for status, headers, body in await asyncio.gather(*sent):
            assert status == 200 and headers["X-Loraplane-Backend"] == "v1", body
        assert len(a.received) == 4 and not svc.router.held
        samples = await metric_samples(c)
        assert samples[("loraplane_router_held_requests", ())] == 0
        assert samples[("loraplane_router_held_total", labels(result="released"))] == 4
        assert samples[("loraplane_router_hold_seconds_count", ())] == 4


async def test_held_requests_are_bounded_in_number(tmp_path):
    table = table_json({"chat": [("v1", 100)]}, cold_start_wait_seconds=20, cold_start_max_requests=2)
    async with running_router(tmp_path, [], table) as (svc, c):
        held = [asyncio.create_task(post(c)) for _ in range(2)]
        await wait_for(lambda: len(svc.router.held) == 2)
        started_at = time.monotonic()
        status, headers, body = await post(c)
        assert time.monotonic() - started_at < 2             # answered at once, not held
        assert status == 503 and headers["Retry-After"] == str(COLD_RETRY_AFTER)
        assert body["error"]["code"] == "cold_start_queue_full", body
        assert len(svc.router.held) == 2
        for t in held:
            t.cancel()


async def test_held_requests_are_bounded_in_time(tmp_path):
    table = table_json({"chat": [("v1", 100)]}, cold_start_wait_seconds=0.5, cold_start_max_requests=4)
    async with running_router(tmp_path, [], table) as (svc, c):
        started_at = time.monotonic()
        status, headers, body = await post(c)
        waited = time.monotonic() - started_at
        assert 0.45 <= waited < 5, waited
        assert status == 503 and headers["Retry-After"] == str(COLD_RETRY_AFTER)
        assert body["error"]["code"] == "cold_start_timeout" and "0.5 s" in body["error"]["message"], body
        assert not svc.router.held
        samples = await metric_samples(c)
        assert samples[("loraplane_router_held_total", labels(result="timeout"))] == 1
        assert samples[("loraplane_router_requests_total", labels(model="chat", backend="", code="503"))] == 1


async def test_a_client_that_leaves_while_held_is_dropped(tmp_path):
    table = table_json({"chat": [("v1", 100)]}, **COLD)
    async with running_router(tmp_path, [], table) as (svc, c):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        body = b'{"model":"chat","prompt":"p"}'
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await wait_for(lambda: len(svc.router.held) == 1)
        writer.close()
        await wait_for(lambda: not svc.router.held)
        samples = await metric_samples(c)
        assert samples[("loraplane_router_held_total", labels(result="client_closed"))] == 1


async def test_not_held_when_a_replica_is_up_or_holding_is_off(started, tmp_path):
    """Holding is for a cold route: with a replica up that lacks the adapter (it is loading, or failed), the
    answer stays an immediate 503; with cold_start_wait_seconds 0 (fixed replicas: 0) nothing is ever held."""
    a = await started(StubReplica("a", adapters=set()))
    async with running_router(tmp_path, [a.spec], table_json({"chat": [("v1", 100)]}, **COLD)) as (svc, c):
        status, headers, body = await post(c)
        assert status == 503 and body["error"]["code"] == "no_ready_replica" and headers["Retry-After"] == "2"
    async with running_router(tmp_path, [], table_json({"chat": [("v1", 100)]})) as (svc, c):
        status, _, body = await post(c)
        assert status == 503 and body["error"]["code"] == "no_ready_replica"


async def test_held_requests_are_answered_on_shutdown(tmp_path):
    table = table_json({"chat": [("v1", 100)]}, **COLD)
    async with running_router(tmp_path, [], table) as (svc, c):
        held = asyncio.create_task(post(c))
        await wait_for(lambda: len(svc.router.held) == 1)
        await svc.router.drain(1)
        status, headers, body = await held
        assert status == 503 and body["error"]["code"] == "router_shutting_down" and "Retry-After" in headers


async def test_held_request_bodies_are_bounded_in_bytes(tmp_path, monkeypatch):
    """Each held body may be up to router.maxRequestBytes: the total is bounded too (hold.MAX_HELD_BYTES), so a
    queue of big prompts cannot take the router pod past its memory limit."""
    import loraplane.router.server as server

    monkeypatch.setattr(server, "MAX_HELD_BYTES", 100)
    table = table_json({"chat": [("v1", 100)]}, **COLD)
    async with running_router(tmp_path, [], table) as (svc, c):
        held = asyncio.create_task(post(c))                       # ~30 bytes: held
        await wait_for(lambda: len(svc.router.held) == 1)
        async with c.post("/v1/completions", json={"model": "chat", "prompt": "p" * 200}) as resp:
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "cold_start_queue_full"
        assert len(svc.router.held) == 1 and 0 < svc.router.held_bytes <= 100
        held.cancel()
        await wait_for(lambda: not svc.router.held)
        assert svc.router.held_bytes == 0


class FakeScaleApi:
    """Stands in for the API server's deployments/scale: answers GET with `replicas`, records PATCHes."""

    def __init__(self, replicas: int):
        self.replicas = replicas
        self.calls: list[str] = []

    async def request(self, method, path, body=None, **kw):
        self.calls.append(method)
        if method == "GET":
            return {"metadata": {"resourceVersion": "7"}, "spec": {"replicas": self.replicas}}
        assert body == {"metadata": {"resourceVersion": "7"}, "spec": {"replicas": 1}}
        self.replicas = 1
        return None


async def test_the_waker_scales_from_zero_once_and_throttles():
    from loraplane.router.metrics import RouterMetrics
    from loraplane.router.wake import ScaleWaker

    kube = FakeScaleApi(replicas=0)
    waker = ScaleWaker(kube, "ns", "r-engine", RouterMetrics(), interval=60)
    for _ in range(20):          # every held request signals demand...
        waker.demand()
    await waker._task
    assert kube.calls == ["GET", "PATCH"] and kube.replicas == 1   # ...the API server hears it once
    assert await ScaleWaker(kube, "ns", "r-engine", RouterMetrics()).wake() == "not_zero"
