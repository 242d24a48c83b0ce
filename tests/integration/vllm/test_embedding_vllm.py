"""An embedding ModelRoute for real (issue 15): the tiny model served with vLLM's pooling runner (spec.engine.task
embed, from the builders' own command), warmed and reported serving by the loader with one /v1/embeddings request,
and a SemanticIndex built from its embeddings routing held-out prompts of three kinds.

The tiny model is a 2-layer Llama pretrained for seconds on a toy corpus, not an embedding model: what it gives
is a measurement, printed, not a quality claim. Asserted is only what must hold for any model: exact behaviour
for prompts identical to an example, and better than chance on the held-out split.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import urllib.error
import urllib.request
from collections import Counter

import pytest

from support.adapters import write_adapter
from support.loader_run import LoaderRun, desired
from support.orchestration_data import LABELS, examples, split
from support.router_running import running_router, table_json
from support.vllm_server import VllmServer, tiny_route
from loraplane.api.orchestration import WireDestination
from loraplane.loader.reconciler import WARMUP_PROMPT
from loraplane.router.semantic import EMBED_BATCH, SemanticIndex

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def embedding_server(tiny_model_dir, tmp_path_factory):
    """vLLM serving the tiny model as an embedding model, started from the builders' command for a route with
    spec.engine.task embed (`--runner pooling`, no LoRA flags)."""
    route = tiny_route(tiny_model_dir, name="tiny-embed", task="embed")
    server = VllmServer(route, tiny_model_dir, tmp_path_factory.mktemp("vllm-embed"))
    assert "--runner" in server.argv and "--enable-lora" not in server.argv
    try:
        print(f"\nvLLM (pooling) started in {server.start():.0f}s on {server.base_url}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def loader(embedding_server, tmp_path_factory):
    run = LoaderRun(embedding_server, tmp_path_factory.mktemp("loader-embed"), "--engine-task", "embed")
    run.start()
    yield run
    run.stop()


def post(server: VllmServer, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def embeddings(server: VllmServer, texts: list[str]) -> list[list[float]]:
    status, body = post(server, "/v1/embeddings", {"model": server.served_name, "input": texts})
    assert status == 200, body
    return [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]


def test_the_loader_warms_a_pooling_engine_with_an_embedding_and_reports_it_serving(embedding_server, loader):
    status = loader.wait(lambda s: s is not None and s["engine_ready"], timeout=120)
    assert status["adapters"] == {}
    metrics = loader.get("/metrics")
    assert re.search(r'^loraplane_loader_load_seconds_count\{step="warmup"\} 1\.0$', metrics, re.M), metrics
    assert "first embedding took" in loader.log_path.read_text()

    vectors = embeddings(embedding_server, [WARMUP_PROMPT, "where is my order?", WARMUP_PROMPT])
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 1
    assert all(math.isfinite(x) for v in vectors for x in v)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]   # deterministic, and text-dependent
    # A pooling engine has no completions endpoint: what the warm-up must not rely on.
    status_code, _ = post(embedding_server, "/v1/completions",
                          {"model": embedding_server.served_name, "prompt": "hi", "max_tokens": 1})
    assert 400 <= status_code < 500


def test_adapters_on_the_embedding_route_are_refused_and_never_reach_vllm(embedding_server, loader, tmp_path):
    loader.set_table([desired("sql", write_adapter(tmp_path / "sql"))])
    status = loader.wait_settled()
    report = status["adapters"]["sql--v1"]
    assert (report["state"], report["reason"]) == ("Incompatible", "EmbeddingRouteNoAdapters"), report
    assert status["engine_ready"]
    models = json.loads(urllib.request.urlopen(embedding_server.base_url + "/v1/models", timeout=10).read())
    assert [m["id"] for m in models["data"]] == [embedding_server.served_name]
    loader.set_table([])


async def test_a_semantic_index_over_the_tiny_embedding_model_routes_held_out_prompts(embedding_server, loader,
                                                                                       tmp_path):
    """Through the route's router (client -> router -> pooling vLLM, the replica's readiness from the loader),
    as semantic routing reaches another route's embedding model."""
    loader.wait(lambda s: s is not None and s["engine_ready"], timeout=120)
    train, held_out = split()
    destinations = [WireDestination(model=label, examples=examples(label, train)) for label in LABELS]
    table = table_json({"embedder": [(embedding_server.served_name, 100)]}, base=embedding_server.served_name)
    replica = f"{embedding_server.base_url},{loader.url}/status"
    async with running_router(tmp_path, [replica], table) as (_, client):
        batches: list[int] = []

        async def embed(texts: list[str]) -> list[list[float]]:
            batches.append(len(texts))
            async with client.post("/v1/embeddings", json={"model": "embedder", "input": texts}) as resp:
                body = await resp.json()
                assert resp.status == 200, body
                assert resp.headers["X-Loraplane-Backend"] == embedding_server.served_name
                return [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]

        for _ in range(100):   # the router's first poll of the loader's report
            async with client.post("/v1/embeddings", json={"model": "embedder", "input": ["hi"]}) as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.1)
        index = await SemanticIndex.build(destinations, embed)
        assert max(batches) <= EMBED_BATCH and len(index) == sum(len(d.examples) for d in destinations)
        queries = [p.text for p in held_out]
        vectors = [v for i in range(0, len(queries), EMBED_BATCH) for v in await embed(queries[i:i + EMBED_BATCH])]
        # Exact behaviour: a request identical to an example goes to that example's destination, similarity 1.
        for d in destinations:
            for text, vector in zip(d.examples, await embed(d.examples)):
                model, similarity = index.nearest(vector)
                assert model == d.model and similarity == pytest.approx(1.0, abs=1e-4), (text, model, similarity)
        # The router relays vLLM's vectors unchanged.
        assert await embed(queries[:2]) == embeddings(embedding_server, queries[:2])

    chosen = [index.nearest(v)[0] for v in vectors]
    right = Counter(p.label for p, c in zip(held_out, chosen) if p.label == c)
    per_label = {label: right[label] / sum(p.label == label for p in held_out) for label in LABELS}
    accuracy = sum(right.values()) / len(held_out)
    print(f"\nsemantic routing with the tiny model as the embedding model: held-out accuracy {accuracy:.2f} "
          f"({sum(right.values())}/{len(held_out)}; per destination "
          + ", ".join(f"{k} {v:.2f}" for k, v in per_label.items()) + f"; chance {1 / len(LABELS):.2f})")
    assert accuracy > 1 / len(LABELS)


def test_loraplane_run_serves_an_embedding_route(tiny_model_dir, tmp_path):
    """The local runner (`loraplane run`) starts an embedding route from the same builders (pooling vLLM, the
    loader with --engine-task embed, the router) and asks it for embeddings instead of completions."""
    import io

    from loraplane.local import pipeline

    spec = tmp_path / "embedder.yaml"
    spec.write_text(json.dumps({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "embedder"},
        "spec": {"baseModel": {"uri": str(tiny_model_dir)}, "servedModelName": "tiny-embed", "replicas": 1,
                 "engine": {"task": "embed", "dtype": "float32", "maxModelLen": 256, "gpus": 0},
                 "routes": [{"name": "embedder", "backends": [{"base": True}]}]}}))
    out = io.StringIO()
    assert pipeline.run(spec, tmp_path / "work", prompts=["where is my order?"], out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert re.search(r"embedder → '128 numbers \[", text), text
    loader_log = (tmp_path / "work" / "routes" / "embedder" / "loader.log").read_text()
    assert "first embedding took" in loader_log, loader_log[-2000:]
