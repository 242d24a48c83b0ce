"""A stand-in for the loader's VllmClient whose completions can be held, failed and counted: for the tests of
the loader's warm-up (the replica serves only after vLLM's first completion) and of the router acting on it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from loraplane.api.wire.serving import DesiredAdapter, ServingTable
from loraplane.loader.engine import EngineError, Probe
from loraplane.loader.reconciler import Loader
from loraplane.storage.cache import ArtifactCache
from support.adapters import write_adapter

BASE = "loraplane/tiny-llama"


class WarmingEngine:
    """Just enough of VllmClient. Every completion is recorded in `calls` as (model, max_tokens) when it
    starts; while `hold` is set, completions wait for it (the cold engine's slow first request); while
    `fail_completions` > 0, completions raise an EngineError with `fail_status` (and count it down)."""

    base_url = "http://fake-vllm"

    def __init__(self, base: str = "base"):
        self.base = base
        self.is_healthy = True
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, int]] = []
        self.events: list[str] = []               # "load NAME" and "complete MODEL", in order
        self.hold: asyncio.Event | None = None
        self.fail_completions = 0
        self.fail_status = 500

    async def healthy(self) -> bool:
        return self.is_healthy

    async def loaded_adapters(self) -> dict[str, str]:
        return dict(self.loaded)

    async def load(self, name: str, path: str) -> None:
        self.events.append(f"load {name}")
        self.loaded[name] = path

    async def unload(self, name: str) -> None:
        self.loaded.pop(name, None)

    async def probe(self, model: str, prompt: str, max_tokens: int) -> Probe:
        self.calls.append((model, max_tokens))
        self.events.append(f"complete {model}")
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_completions > 0:
            self.fail_completions -= 1
            raise EngineError(self.fail_status, "EngineCore encountered an issue" if self.fail_status >= 500
                              else "Requested sample logprobs of 1, which is greater than max allowed: 0")
        return Probe(text=model, tokens=(model,), logprobs=(0.0,))


def fake_loader(tmp_path: Path, engine, *names: str, route: str = "r", resync: float = 0.05, **loader_kw) -> Loader:
    """A Loader on `engine` (a stand-in such as WarmingEngine) whose table lists one written test adapter per name
    (served name = adapter name, base model BASE), with a real artifact cache under `tmp_path`, two attempts and
    no back-off; `loader_kw` go to Loader (e.g. engine_task)."""
    loader = Loader(engine, ArtifactCache(tmp_path / "cache", 1 << 30), "replica-0", max_attempts=2,
                    backoff_base=0.0, resync=resync, **loader_kw)
    loader.set_table(ServingTable(
        route=route, base_model=BASE, served_model_name="base", max_lora_rank=16, max_loras=4,
        adapters=[DesiredAdapter(served_name=n, adapter=n, uri=str(write_adapter(tmp_path / n, seed=i)),
                                 base_model=BASE) for i, n in enumerate(names)]))
    return loader


async def until(predicate, timeout: float = 10.0) -> None:
    """Poll `predicate` every 10 ms until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
