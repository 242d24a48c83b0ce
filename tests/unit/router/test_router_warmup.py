"""The router and a real loader's report: a replica whose vLLM answers /health but has not completed the
loader's warm-up completion gets no traffic, neither base-model nor adapter requests (docs/loader.md)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestServer

from support.adapters import write_adapter
from support.engine_fakes import WarmingEngine
from support.router_running import running_router, table_json
from support.router_stubs import StubReplica
from loraplane.api.wire.serving import AdapterState, DesiredAdapter, ServingTable
from loraplane.loader.reconciler import Loader
from loraplane.loader.server import make_app
from loraplane.storage.cache import ArtifactCache

pytestmark = pytest.mark.timeout(60)


async def until(predicate, what, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not reached: {what}")


async def test_no_traffic_to_a_replica_before_its_engine_is_warm(tmp_path):
    # vLLM's HTTP side (what the router proxies to) is a stub; its /status comes from a real Loader whose
    # engine client holds the warm-up completion, as a cold vLLM's first request does.
    vllm = await StubReplica("a", adapters={"chat-v1"}).start()
    engine = WarmingEngine(base="base")
    engine.hold = asyncio.Event()
    loader = Loader(engine, ArtifactCache(tmp_path / "cache", 1 << 30), "replica-0", resync=0.05)
    loader.set_table(ServingTable(
        route="r", base_model="loraplane/tiny-llama", served_model_name="base", max_lora_rank=16, max_loras=4,
        adapters=[DesiredAdapter(served_name="chat-v1", adapter="chat", uri=str(write_adapter(tmp_path / "a")),
                                 base_model="loraplane/tiny-llama")]))
    status = TestServer(make_app(loader))
    await status.start_server()
    run = asyncio.create_task(loader.run())
    spec = f"{vllm.engine_url},{status.make_url('/status')}"
    table = table_json({"base": [("base", 100)], "chat": [("chat-v1", 100)]})
    try:
        async with running_router(tmp_path, [spec], table) as (svc, client):
            replica = svc.pool.replicas[0]
            # vLLM answers /health and the loader's /status answers; the warm-up has not completed.
            await until(lambda: replica.polled and engine.calls, "the warm-up was sent")
            await asyncio.sleep(0.3)   # several polls of a not-yet-warm replica
            assert loader.engine_ready and not replica.engine_ready
            for model in ("base", "chat"):
                async with client.post("/v1/completions", json={"model": model, "prompt": "p"}) as resp:
                    assert resp.status == 503, await resp.text()
            assert vllm.received == []   # nothing reached the cold engine through the router

            engine.hold.set()
            await until(lambda: "chat-v1" in replica.ready and replica.engine_ready,
                        "the replica serves the adapter")
            assert loader.report().adapters["chat-v1"].state == AdapterState.Ready
            for model in ("base", "chat"):
                async with client.post("/v1/completions", json={"model": model, "prompt": "p"}) as resp:
                    assert resp.status == 200, await resp.text()
            assert len(vllm.received) == 2
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await status.close()
        await vllm.stop()
