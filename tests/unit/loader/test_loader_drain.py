"""Issue 14 item 1, the loader's side of make-before-break: a version that served drains before it is unloaded
(in-flight requests finish), and a serving version is never reloaded because its table entry's metadata changed."""

from __future__ import annotations

import asyncio

from support.adapters import write_adapter
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterState, DesiredAdapter, ServingTable
from loraplane.loader.engine import parse_adapters_in_use
from loraplane.loader.reconciler import Loader
from loraplane.storage.cache import ArtifactCache
from test_loader_states import BASE, FakeEngine


class DrainEngine(FakeEngine):
    """FakeEngine whose /metrics says which adapters have requests running (None: unreadable)."""

    def __init__(self):
        super().__init__()
        self.in_use: frozenset[str] | None = frozenset()
        self.unloads: list[str] = []

    async def adapters_in_use(self):
        return self.in_use

    async def unload(self, name: str) -> None:
        self.unloads.append(name)
        await super().unload(name)


def _table(*adapters: DesiredAdapter, timeout: float = 600) -> ServingTable:
    return ServingTable(route="r", base_model=BASE, served_model_name="base", max_lora_rank=16, max_loras=4,
                        adapters=list(adapters), router={"timeout_seconds": timeout})


def _want(name: str, uri: str, **kw) -> DesiredAdapter:
    return DesiredAdapter(served_name=name, adapter="a", uri=uri, base_model=BASE, **kw)


def _loader(tmp_path, engine, drain: float) -> Loader:
    return Loader(engine, ArtifactCache(tmp_path / "cache", 1 << 30), "replica-0", backoff_base=0.0,
                  drain_seconds=drain)


def test_a_version_that_served_drains_until_no_request_runs_with_it(tmp_path):
    engine = DrainEngine()
    loader = _loader(tmp_path, engine, drain=0.0)
    v1 = _want("a--1", str(write_adapter(tmp_path / "v1")))
    v2 = _want("a--2", str(write_adapter(tmp_path / "v2", seed=2)))
    loader.set_table(_table(v1, v2))
    asyncio.run(loader.reconcile_once())
    assert set(engine.loaded) == {"a--1", "a--2"}
    loader.set_table(_table(v2))     # v2 promoted: v1 left the table
    engine.in_use = frozenset({"a--1"})
    asyncio.run(loader.reconcile_once())
    assert "a--1" in engine.loaded and engine.unloads == []     # before: unloaded at once
    entry = loader.report().adapters["a--1"]
    assert (entry.state, entry.reason) == (AdapterState.Draining, Reason.Draining)
    engine.in_use = None             # metrics unreadable: nothing known, keep it (bounded by the timeout)
    asyncio.run(loader.reconcile_once())
    assert "a--1" in engine.loaded
    engine.in_use = frozenset({"a--2"})
    asyncio.run(loader.reconcile_once())
    assert engine.unloads == ["a--1"] and "a--1" not in loader.report().adapters


def test_draining_lasts_at_least_drain_seconds_and_at_most_the_router_timeout_more(tmp_path):
    engine = DrainEngine()
    loader = _loader(tmp_path, engine, drain=3600.0)
    v1 = _want("a--1", str(write_adapter(tmp_path / "v1")))
    loader.set_table(_table(v1))
    asyncio.run(loader.reconcile_once())
    loader.set_table(_table())
    asyncio.run(loader.reconcile_once())
    assert "a--1" in engine.loaded                   # nothing runs, but a router may still send to it
    loader.drain_seconds = 0.0
    loader.set_table(_table(timeout=0.0))
    engine.in_use = frozenset({"a--1"})              # still in use, but past the bound: no request lasts longer
    asyncio.run(loader.reconcile_once())
    assert engine.unloads == ["a--1"]


def test_an_adapter_that_never_served_is_unloaded_without_draining(tmp_path):
    engine = DrainEngine()
    loader = _loader(tmp_path, engine, drain=3600.0)
    engine.loaded["stray"] = "/somewhere"            # loaded by someone else, not in the table
    loader.set_table(_table())
    asyncio.run(loader.reconcile_once())
    assert engine.unloads == ["stray"]


def test_a_serving_version_is_not_reloaded_when_only_its_entry_metadata_changes(tmp_path):
    engine = FakeEngine()
    loader = _loader(tmp_path, engine, drain=0.0)
    uri = str(write_adapter(tmp_path / "v1"))
    loader.set_table(_table(_want("a--1", uri, version="1", rank=8)))
    asyncio.run(loader.reconcile_once())
    assert engine.loads == 1
    # The serving version is described from the Adapter's status now (no declared rank, another Secret).
    loader.set_table(_table(_want("a--1", uri, version="1", credentials_secret="s")))
    asyncio.run(loader.reconcile_once())
    assert engine.loads == 1 and loader.report().adapters["a--1"].state == AdapterState.Ready
    # Another artifact under the same name is still reloaded.
    loader.set_table(_table(_want("a--1", str(write_adapter(tmp_path / "other", seed=3)), version="1")))
    asyncio.run(loader.reconcile_once())
    assert engine.loads == 2


def test_adapters_in_use_from_vllm_metrics():
    idle = 'vllm:num_requests_running{engine="0"} 0.0\nvllm:num_requests_waiting{engine="0"} 0.0\n' \
           'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a--1",waiting_lora_adapters=""} 5.0\n'
    assert parse_adapters_in_use(idle) == frozenset()   # a stale series: nothing runs
    busy = 'vllm:num_requests_running{engine="0"} 2.0\nvllm:num_requests_waiting{engine="0"} 1.0\n' \
           'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a--1",waiting_lora_adapters=""} 5.0\n' \
           'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a--2,b--1",waiting_lora_adapters="c--1"} 9.0\n'
    assert parse_adapters_in_use(busy) == {"a--2", "b--1", "c--1"}
    assert parse_adapters_in_use("# nothing\n") is None
