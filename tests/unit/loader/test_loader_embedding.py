"""An embedding route (spec.engine.task embed: vLLM's pooling runner, no LoRA): the loader warms the engine with one
/v1/embeddings request (a pooling engine has no completions endpoint), reports the replica serving after it, and
refuses every adapter a table lists with EmbeddingRouteNoAdapters without fetching it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from support.engine_fakes import WarmingEngine, fake_loader, until
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterState
from loraplane.loader.engine import EngineError, Probe, VllmClient
from loraplane.loader.reconciler import OUTCOMES, WARMUP_PROMPT, Loader

pytestmark = pytest.mark.timeout(30)


class PoolingEngine(WarmingEngine):
    """A pooling vLLM: /v1/embeddings answers, completions are refused as vLLM's pooling runner refuses them."""

    def __init__(self):
        super().__init__()
        self.embedded: list[tuple[str, list[str]]] = []
        self.fail_embeddings = 0
        self.fail_status = 500

    async def probe(self, model: str, prompt: str, max_tokens: int) -> Probe:
        self.events.append(f"complete {model}")
        raise EngineError(400, "The model does not support Completions API")

    async def load(self, name: str, path: str) -> None:
        self.events.append(f"load {name}")
        raise EngineError(400, "LoRA is not enabled")

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        self.embedded.append((model, list(texts)))
        self.events.append(f"embed {model}")
        if self.fail_embeddings > 0:
            self.fail_embeddings -= 1
            raise EngineError(self.fail_status, "EngineCore encountered an issue" if self.fail_status >= 500
                              else "This model's maximum context length is 1 tokens")
        return [[0.6, 0.8] for _ in texts]


def _loader(tmp_path, engine, *names: str, task: str = "embed", resync: float = 0.05) -> Loader:
    return fake_loader(tmp_path, engine, *names, route="embedder", resync=resync, engine_task=task)


async def _running(loader: Loader, predicate) -> None:
    run = asyncio.create_task(loader.run())
    try:
        await until(predicate)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_a_pooling_engine_is_warmed_with_one_embedding_and_then_serves(tmp_path):
    engine = PoolingEngine()
    loader = _loader(tmp_path, engine)
    await _running(loader, lambda: loader.report().engine_ready)
    assert engine.embedded[0] == ("base", [WARMUP_PROMPT])
    assert not any(e.startswith("complete") for e in engine.events)   # no completion/logprobs probe
    assert loader.metrics.engine_ready._value.get() == 1


async def test_the_generate_task_still_warms_with_a_completion(tmp_path):
    """The regression guard the other way round: the default task is unchanged (a completion, no embedding)."""
    engine = PoolingEngine()
    loader = _loader(tmp_path, engine, task="generate")
    await _running(loader, lambda: loader.report().engine_ready)   # its 4xx refusal counts as warm
    assert engine.events[0] == "complete base" and engine.embedded == []


async def test_a_failed_embedding_warm_up_keeps_the_replica_out_until_it_succeeds(tmp_path):
    engine = PoolingEngine()
    engine.fail_embeddings = 1
    loader = _loader(tmp_path, engine, resync=3600.0)
    await loader.reconcile_once()
    await asyncio.wait({loader._warmup})
    assert not loader.report().engine_ready
    assert "warm-up embedding" in loader._warmup_error and "EngineCore" in loader._warmup_error
    loader.resync = 0.05
    loader._warmup_not_before = 0.0
    await _running(loader, lambda: loader.report().engine_ready)
    assert len(engine.embedded) == 2


async def test_an_embedding_refused_with_4xx_counts_as_warm(tmp_path):
    engine = PoolingEngine()
    engine.fail_embeddings, engine.fail_status = 1, 400
    loader = _loader(tmp_path, engine)
    await _running(loader, lambda: loader.report().engine_ready)
    assert len(engine.embedded) == 1


async def test_adapters_on_an_embedding_route_are_refused_without_being_fetched(tmp_path):
    engine = PoolingEngine()
    loader = _loader(tmp_path, engine, "sql", "support")
    await _running(loader, lambda: all(s.settled for s in loader.slots.values()) and loader.report().engine_ready)
    report = loader.report()
    for name in ("sql", "support"):
        a = report.adapters[name]
        assert (a.state, a.reason) == (AdapterState.Incompatible, Reason.EmbeddingRouteNoAdapters)
        assert "spec.engine.task: embed" in a.message and a.attempts == 1
    assert not any(e.startswith("load") for e in engine.events)
    assert loader.cache.total_bytes() == 0   # never fetched
    assert OUTCOMES[Reason.EmbeddingRouteNoAdapters].retry is False


def test_an_unknown_engine_task_is_refused():
    with pytest.raises(ValueError, match="engine_task must be generate or embed"):
        Loader(PoolingEngine(), None, "r", engine_task="classify")


@pytest.mark.parametrize("status,body,error", [
    (200, {"data": [{"index": 1, "embedding": [3.0]}, {"index": 0, "embedding": [1.0, 2.0]}]}, None),
    (200, {"data": [{"index": 0, "embedding": [1.0]}]}, "one embedding per input"),
    (200, {"data": [{"index": 0, "embedding": []}, {"index": 1, "embedding": [1.0]}]}, "one embedding per input"),
    (200, {"object": "list"}, "one embedding per input"),
    (200, [1, 2], "one embedding per input"),
    (200, {"data": [{"index": "x", "embedding": [1.0, 2.0]}, {"embedding": [3.0]}]}, None),
    (400, {"error": {"message": "The model does not support Embeddings API"}}, "does not support Embeddings"),
])
async def test_vllm_client_embed_checks_the_answer(status, body, error):
    seen = []

    async def embeddings(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            engine = VllmClient(str(server.make_url("")).rstrip("/"), session, api_key="k")
            if error is None:
                assert await engine.embed("e5", ["a", "b"]) == [[1.0, 2.0], [3.0]]   # in input order
            else:
                with pytest.raises(EngineError, match=error):
                    await engine.embed("e5", ["a", "b"])
        assert seen == [{"model": "e5", "input": ["a", "b"]}]
    finally:
        await server.close()
