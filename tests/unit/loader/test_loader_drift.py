"""Issue 12 item 1 (c): the loader checks that what vLLM serves under an adapter's name is what it loaded (name
AND path: a /v1/models card's `root` is the path it was loaded from) and repairs a replacement."""

from __future__ import annotations

import asyncio

import pytest

from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterState
from support.engine_fakes import WarmingEngine, fake_loader, until
from unit.loader.test_loader_warmup import _state

pytestmark = pytest.mark.timeout(30)


class RecordingEngine(WarmingEngine):
    def __init__(self):
        super().__init__()
        self.unloads: list[str] = []

    async def unload(self, name: str) -> None:
        self.unloads.append(name)
        await super().unload(name)


async def test_an_adapter_replaced_under_its_name_is_unloaded_and_loaded_again_from_its_artifact(tmp_path):
    engine = RecordingEngine()
    loader = fake_loader(tmp_path, engine, "a")
    reasons: list[str] = []

    async def sink(report):
        reasons.append(report.adapters["a"].reason)

    loader.report_sinks.append(sink)
    run = asyncio.create_task(loader.run())
    try:
        await until(lambda: _state(loader, "a")[0] == AdapterState.Ready)
        own = engine.loaded["a"]
        # Another pod calls /v1/unload_lora_adapter and /v1/load_lora_adapter with its own weights, same name.
        engine.loaded["a"] = "/tmp/attacker-weights"
        await until(lambda: Reason.AdapterReplaced in reasons)
        await until(lambda: _state(loader, "a")[0] == AdapterState.Ready and engine.loaded.get("a") == own)
        assert "a" in engine.unloads and engine.events.count("load a") == 2
        assert _state(loader, "a")[1] == Reason.Loaded
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
