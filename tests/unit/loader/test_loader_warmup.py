"""The loader's warm-up: a replica is reported serving (`engine_ready`) only after vLLM completed one warm-up
completion, which runs while the first adapter is fetched and gated and before anything is loaded or probed."""

from __future__ import annotations

import asyncio

import pytest

from support.engine_fakes import WarmingEngine, fake_loader, until
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterState
from loraplane.loader.reconciler import WARMUP_TOKENS, Loader

pytestmark = pytest.mark.timeout(30)


def _state(loader: Loader, name: str) -> tuple[AdapterState, str, str]:
    a = loader.report().adapters[name]
    return a.state, a.reason, a.message


async def test_the_replica_serves_only_after_the_warm_up_which_overlaps_the_first_fetch(tmp_path):
    engine = WarmingEngine()
    engine.hold = asyncio.Event()             # the cold engine's first completion takes long
    loader = fake_loader(tmp_path, engine, "a")
    run = asyncio.create_task(loader.run())
    try:
        # The warm-up is the first request: a one-token base completion; meanwhile the adapter was fetched
        # and gated and now waits, and the replica is not reported ready though vLLM answers /health.
        await until(lambda: "waiting for vLLM's warm-up" in _state(loader, "a")[2])
        assert engine.calls == [("base", WARMUP_TOKENS)]
        assert loader.engine_ready and not loader.report().engine_ready
        assert loader.metrics.engine_ready._value.get() == 0
        assert _state(loader, "a")[0] == AdapterState.Loading
        assert loader.slots["a"].artifact is not None        # fetched during the warm-up
        assert engine.events == ["complete base"]            # nothing loaded or probed yet

        engine.hold.set()
        await until(lambda: _state(loader, "a")[0] == AdapterState.Ready)
        report = loader.report()
        assert report.engine_ready and loader.metrics.engine_ready._value.get() == 1
        # load and smoke test only after the warm-up answered; it is sent once
        assert engine.events[:2] == ["complete base", "load a"], engine.events
        assert engine.calls.count(("base", WARMUP_TOKENS)) == 1
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_a_failed_warm_up_keeps_the_replica_out_and_is_retried(tmp_path):
    engine = WarmingEngine()
    engine.fail_completions = 1
    # The retry waits `resync` seconds: an hour, so the second pass below always comes before it however slow
    # the machine is; the retry is then let due at once, so the loop retries without waiting for the clock.
    loader = fake_loader(tmp_path, engine, "a", resync=3600.0)
    await loader.reconcile_once()
    await asyncio.wait({loader._warmup})
    await loader.reconcile_once()
    state, reason, message = _state(loader, "a")
    assert (state, reason) == (AdapterState.Pending, Reason.EngineUnavailable)
    assert "warm-up" in message and "EngineCore encountered an issue" in message
    assert loader.slots["a"].attempts == 0                # not counted against the adapter
    assert not loader.report().engine_ready

    loader.resync = 0.05
    loader._warmup_not_before = 0.0                        # the retry is due (the hour above has "passed")
    loader.slots["a"].next_try = 0.0
    run = asyncio.create_task(loader.run())
    try:
        await until(lambda: _state(loader, "a")[0] == AdapterState.Ready)
        assert loader.report().engine_ready
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_an_engine_restart_makes_the_replica_cold_again(tmp_path):
    engine = WarmingEngine()
    loader = fake_loader(tmp_path, engine, "a")
    run = asyncio.create_task(loader.run())
    try:
        await until(lambda: _state(loader, "a")[0] == AdapterState.Ready and loader.report().engine_ready)
        engine.hold = asyncio.Event()
        engine.loaded.clear()                             # vLLM restarted between two passes: adapters gone
        await until(lambda: engine.calls.count(("base", WARMUP_TOKENS)) == 2)
        assert not loader.report().engine_ready
        engine.hold.set()
        await until(lambda: _state(loader, "a")[0] == AdapterState.Ready and loader.report().engine_ready)

        engine.is_healthy = False                         # vLLM down: not serving, and cold when it is back
        await until(lambda: not loader.report().engine_ready and not loader.engine_warm)
        engine.hold = asyncio.Event()
        engine.is_healthy = True
        await until(lambda: engine.calls.count(("base", WARMUP_TOKENS)) == 3)
        assert not loader.report().engine_ready
        engine.hold.set()
        await until(lambda: loader.report().engine_ready)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_a_refused_warm_up_request_does_not_wedge_the_replica(tmp_path):
    # vLLM is up but refuses the request itself (HTTP 4xx, e.g. extraArgs --max-logprobs 0): the replica
    # serves without the warm-up instead of staying out forever.
    engine = WarmingEngine()
    engine.fail_completions, engine.fail_status = 1, 400
    loader = fake_loader(tmp_path, engine)
    await loader.reconcile_once()
    await asyncio.wait({loader._warmup})
    assert loader.report().engine_ready
