"""Issue 12, item 5: the loader's /healthz means "the control loop is alive", never "every adapter is loaded".
A rollout whose download outlasts the stall threshold keeps /healthz 200 (the loop ticks while the download runs
in its own task); a loop that is really wedged, or whose task ended, turns it 503."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from support.adapters import write_adapter
from support.engine_fakes import WarmingEngine
from loraplane.api.wire.serving import AdapterState, DesiredAdapter, ServingTable
from loraplane.loader import server
from loraplane.loader.reconciler import Loader
from loraplane.storage.cache import ArtifactCache

pytestmark = pytest.mark.timeout(30)
BASE = "loraplane/tiny-llama"
STALL = 1.0   # seconds: far above the heartbeat interval (0.02 s), so a busy test machine cannot trip it


def _table(*adapters: DesiredAdapter) -> ServingTable:
    return ServingTable(route="r", base_model=BASE, served_model_name="base", max_lora_rank=16, max_loras=4,
                        adapters=list(adapters))


def _loader(tmp_path, engine) -> Loader:
    loader = Loader(engine, ArtifactCache(tmp_path / "cache", 1 << 30), "replica-0", max_attempts=2,
                    backoff_base=0.0, resync=0.05)
    loader.heartbeat_interval = 0.02
    return loader


async def _healthz(client: TestClient) -> int:
    async with client.get("/healthz") as resp:
        return resp.status


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_download_longer_than_the_stall_threshold_keeps_the_loader_live(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "STALL_SECONDS", STALL)
    loader = _loader(tmp_path, WarmingEngine())
    fetch = loader.cache.fetch
    slow = 3 * STALL

    async def slow_fetch(*args, **kwargs):
        await asyncio.sleep(slow)          # a large adapter on a slow link
        return await fetch(*args, **kwargs)

    monkeypatch.setattr(loader.cache, "fetch", slow_fetch)
    loader.set_table(_table())
    async with TestClient(TestServer(server.make_app(loader))) as client:
        loop = asyncio.create_task(loader.run())
        try:
            await _until(lambda: loader.last_pass > 0)          # one pass done: the old check was armed
            loader.set_table(_table(DesiredAdapter(served_name="a", adapter="a", base_model=BASE,
                                                   uri=str(write_adapter(tmp_path / "a")))))
            await _until(lambda: loader.report().adapters["a"].state == AdapterState.Fetching)
            statuses = []
            while loader.report().adapters["a"].state != AdapterState.Ready:
                statuses.append(await _healthz(client))
                await asyncio.sleep(STALL / 6)
            assert len(statuses) >= 5             # the probe ran throughout the download
            assert set(statuses) == {200}
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)


class WedgedEngine(WarmingEngine):
    """vLLM's /health never answers and nothing times out: the loop itself is stuck (a bug), not a step."""

    def __init__(self):
        super().__init__()
        self.stuck = False

    async def healthy(self) -> bool:
        if self.stuck:
            await asyncio.Event().wait()
        return True


async def test_a_wedged_or_dead_loop_fails_the_liveness_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "STALL_SECONDS", STALL)
    engine = WedgedEngine()
    loader = _loader(tmp_path, engine)
    loader.set_table(_table())
    async with TestClient(TestServer(server.make_app(loader))) as client:
        loop = asyncio.create_task(loader.run())
        try:
            await _until(lambda: loader.last_pass > 0)
            assert await _healthz(client) == 200
            engine.stuck = True
            await asyncio.sleep(2 * STALL)
            async with client.get("/healthz") as resp:
                assert resp.status == 503
                assert "not ticked" in await resp.text()
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    # A loop task that ended (here cancelled; a crash alike) is dead at once, whatever its last tick.
    dead = _loader(tmp_path, WarmingEngine())
    dead.set_table(_table())
    async with TestClient(TestServer(server.make_app(dead))) as client:
        loop = asyncio.create_task(dead.run())
        await _until(lambda: dead.last_pass > 0)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        assert await _healthz(client) == 503
