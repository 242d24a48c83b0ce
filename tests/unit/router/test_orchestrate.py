"""Content routing end to end over real HTTP (router/orchestrate.py + dispatch): a real router in front of stub
replicas (tests/support/router_stubs.py) that also answer a classifier's completions, /tokenize and
/v1/embeddings, slowly or wrongly on demand. The real-vLLM version is tests/integration/vllm/test_content_vllm.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from aiohttp import web

from loraplane.api.orchestration import DESTINATION_HEADER, FALLBACK_HEADER, METHOD_HEADER
from loraplane.router.orchestrate import Orchestrator
from loraplane.router.replicas import parse_replica_arg
from support.router_running import labels, metric_samples, running_router, wait_for
from support.router_stubs import StubReplica


pytestmark = pytest.mark.timeout(60)


ADAPTERS = {"support-v1", "sql-v1", "general-v1", "clf-v1"}


@dataclass(eq=False)
class SmartStub(StubReplica):
    """A StubReplica whose classifier adapter answers `answer` (after `delay` s), which counts tokens (one per
    whitespace-separated word) and embeds texts (a 3-vector of keyword counts: support, sql, other)."""

    answer: str = " sql"
    delay: float = 0.0
    embed_delay: float = 0.0
    classifier_served: str = "clf-v1"
    sub_auth: list = field(default_factory=list)   # (path, Authorization) of each classifier/tokenize/embed request

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def complete(self, request: web.Request) -> web.StreamResponse:
        req = json.loads(await request.read())
        if req.get("model") == self.classifier_served:
            self.sub_auth.append((request.path, request.headers.get("Authorization")))
            self.received.append((request.path, await request.read(), request.headers.copy()))
            await asyncio.sleep(self.delay)
            return web.json_response({"choices": [{"index": 0, "text": self.answer}]})
        return await super().complete(request)

    async def tokenize(self, request: web.Request) -> web.Response:
        req = json.loads(await request.read())
        self.sub_auth.append((request.path, request.headers.get("Authorization")))
        return web.json_response({"count": len(req["prompt"].split()), "tokens": []})

    async def embeddings(self, request: web.Request) -> web.Response:
        req = json.loads(await request.read())
        self.sub_auth.append((request.path, request.headers.get("Authorization")))
        await asyncio.sleep(self.embed_delay)
        data = []
        for i, text in enumerate(req["input"]):
            t = text.lower()
            data.append({"index": i, "embedding": [t.count("refund") + 0.01, t.count("select") + 0.01, 0.5]})
        return web.json_response({"data": data})


class CosineIndex:
    """Stands in for router/semantic.py's SemanticIndex (same interface): mean example vector per destination."""

    built = 0

    def __init__(self, centroids):
        self.centroids = centroids

    @classmethod
    async def build(cls, destinations, embed):
        cls.built += 1
        out = {}
        for d in destinations:
            if d.examples:
                vs = await embed(list(d.examples))
                out[d.model] = [sum(col) / len(vs) for col in zip(*vs)]
        return cls(out)

    def nearest(self, vector):
        def cos(a, b):
            return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
        best = max(((m, cos(vector, c)) for m, c in self.centroids.items()), key=lambda p: p[1], default=None)
        return best


def table(content: dict | None = None, external: list | None = None, **router) -> str:
    models = {"support": "support-v1", "sql": "sql-v1", "general": "general-v1", "clf": "clf-v1", "tiny": "base"}
    cm = {"name": "auto", "default": "general", "methods": ["rules"], "destinations": [
        {"model": "support", "label": "support", "rules": {"keywords": ["refund", "invoice"]},
         "examples": ["I want a refund", "refund my order"]},
        {"model": "sql", "label": "sql", "rules": {"pattern": r"(?i)\bselect\b.+\bfrom\b"},
         "examples": ["select name from users", "select count from orders"]},
    ], "classifier": {"model": "clf", "timeout_ms": 300}, "semantic": {"embedding_model": "tiny", "timeout_ms": 500,
                                                                       "min_similarity": 0.9}}
    cm.update(content or {})
    return json.dumps({
        "route": "r", "generation": 1, "base_model": "tiny", "served_model_name": "base", "max_lora_rank": 16,
        "max_loras": 4,
        "models": [{"name": n, "backends": [{"served_name": s, "adapter": None if s == "base" else s, "weight": 100}]}
                   for n, s in models.items()],
        "content_models": [cm], "external_models": external or [], "router": router})


@pytest_asyncio.fixture(loop_scope="function")
async def stub():
    s = await SmartStub("a", adapters=set(ADAPTERS)).start()
    yield s
    await s.stop()


async def ask(c, model: str, prompt: str = "hello", *, chat: bool = False, headers=None, **extra):
    if chat:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
        path = "/v1/chat/completions"
    else:
        body, path = {"model": model, "prompt": prompt, **extra}, "/v1/completions"
    async with c.post(path, json=body, headers=headers or {}) as resp:
        raw = await resp.read()
        return resp.status, dict(resp.headers), raw


def served(stub: SmartStub) -> str:
    """The model of the last proxied (not sub-) request the stub received."""
    return json.loads(stub.received[-1][1])["model"]


async def test_rules_route_each_kind_and_say_so(stub, tmp_path):
    async with running_router(tmp_path, [stub.spec], table()) as (svc, c):
        for prompt, dest, backend in (("I need a REFUND now", "support", "support-v1"),
                                      ("select name from users", "sql", "sql-v1")):
            status, headers, _ = await ask(c, "auto", prompt)
            assert status == 200, headers
            assert headers[DESTINATION_HEADER] == dest and headers[METHOD_HEADER] == "rules"
            assert FALLBACK_HEADER not in headers and headers["X-Loraplane-Backend"] == backend
            assert served(stub) == backend
        status, headers, _ = await ask(c, "auto", "tell me a story", chat=True)
        assert status == 200 and served(stub) == "general-v1"
        assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER], headers[FALLBACK_HEADER]) == \
            ("general", "default", "no-match")
        # A request naming a public model directly: today's path, no decision headers.
        status, headers, _ = await ask(c, "sql", "refund")
        assert status == 200 and DESTINATION_HEADER not in headers and served(stub) == "sql-v1"
        async with c.get("/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["support", "sql", "general", "clf", "tiny",
                                                                        "auto"]
        m = await metric_samples(c)
        assert m[("loraplane_router_content_decisions_total", labels(model="auto", destination="support",
                                                                    method="rules"))] == 1
        assert m[("loraplane_router_content_decisions_total", labels(model="auto", destination="general",
                                                                    method="default"))] == 1
        assert m[("loraplane_router_content_fallbacks_total", labels(model="auto", method="rules",
                                                                    reason="no-match"))] == 1
        # The decision latency per destination and method, as the counter (issue 15).
        for dest, method in (("support", "rules"), ("sql", "rules"), ("general", "default")):
            assert m[("loraplane_router_content_decision_seconds_count",
                      labels(model="auto", destination=dest, method=method))] == 1, (dest, method)
        # The named path's own metrics count the destination as usual (public model = the destination).
        assert m[("loraplane_router_requests_total", labels(model="support", backend="support-v1", code="200"))] == 1


async def test_the_body_is_unchanged_but_for_model(stub, tmp_path):
    async with running_router(tmp_path, [stub.spec], table()) as (svc, c):
        body = b'{"model": "auto",  "prompt": "refund \\u00e9", "max_tokens": 3, "x": {"y": [1, 2.50]}}'
        async with c.post("/v1/completions", data=body, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200
        assert stub.received[-1][1] == body.replace(b'"auto"', b'"support-v1"')


async def test_header_rules_are_exact_and_names_case_insensitive(stub, tmp_path):
    content = {"destinations": [{"model": "sql", "rules": {"headers": {"X-Team": "data"}}}]}
    async with running_router(tmp_path, [stub.spec], table(content)) as (svc, c):
        status, headers, _ = await ask(c, "auto", headers={"x-team": "data"})
        assert headers[DESTINATION_HEADER] == "sql"
        status, headers, _ = await ask(c, "auto", headers={"X-Team": "Data"})
        assert headers[DESTINATION_HEADER] == "general"


async def test_token_bounds_ask_the_route_tokenizer_only_when_set(stub, tmp_path):
    content = {"destinations": [{"model": "support", "rules": {"keywords": ["refund"]}},
                                {"model": "sql", "rules": {"min_prompt_tokens": 5, "max_prompt_tokens": 6}}]}
    async with running_router(tmp_path, [stub.spec], table(content)) as (svc, c):
        await ask(c, "auto", "refund")
        assert stub.sub_auth == []   # decided before any rule with token bounds
        for prompt, dest in (("one two three four five", "sql"), ("one two three", "general"),
                             ("1 2 3 4 5 6 7", "general")):
            _, headers, _ = await ask(c, "auto", prompt)
            assert headers[DESTINATION_HEADER] == dest, prompt
        assert [p for p, _ in stub.sub_auth] == ["/tokenize"] * 3


async def test_streamed_answers_and_errors_after_the_decision_carry_the_headers(stub, tmp_path):
    stub.adapters -= {"sql-v1", "general-v1"}   # the SQL destination and the default have no replica
    async with running_router(tmp_path, [stub.spec], table()) as (svc, c):
        status, headers, raw = await ask(c, "auto", "refund", stream=True)
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        assert headers[DESTINATION_HEADER] == "support" and raw.endswith(b"data: [DONE]\n\n")
        # The default cannot serve either: the destination answers as it would (its 503), with the headers.
        status, headers, raw = await ask(c, "auto", "select a from b")
        assert status == 503 and json.loads(raw)["error"]["code"] == "no_ready_replica"
        assert headers[DESTINATION_HEADER] == "sql" and headers[METHOD_HEADER] == "rules"
        assert FALLBACK_HEADER not in headers


async def test_a_destination_without_a_usable_replica_falls_back_to_the_default_counted(stub, tmp_path):
    """Issue 15: a route outage falls back to the default and says so. `sql` (its adapter on no replica) is
    chosen by the rules: the default serves it with fallback `unavailable`, counted for the rules method; once
    the adapter is back the destination serves again."""
    stub.adapters.discard("sql-v1")
    async with running_router(tmp_path, [stub.spec], table({"methods": ["classifier"]})) as (svc, c):
        for prompt in ("select a from b", "x"):   # the classifier answers sql whatever the prompt
            status, headers, _ = await ask(c, "auto", prompt)
            assert status == 200 and served(stub) == "general-v1"
            assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER], headers[FALLBACK_HEADER]) == \
                ("general", "default", "unavailable")
        m = await metric_samples(c)
        assert m[("loraplane_router_content_fallbacks_total",
                  labels(model="auto", method="classifier", reason="unavailable"))] == 2
        assert m[("loraplane_router_content_decisions_total",
                  labels(model="auto", destination="general", method="default"))] == 2
        stub.adapters.add("sql-v1")
        await wait_for(lambda: all("sql-v1" in r.ready for r in svc.pool.replicas))
        status, headers, _ = await ask(c, "auto", "x")
        assert status == 200 and served(stub) == "sql-v1" and headers[DESTINATION_HEADER] == "sql"
        assert FALLBACK_HEADER not in headers
    # The rules' no-I/O path (decide_now) checks too.
    stub.adapters.discard("sql-v1")
    async with running_router(tmp_path, [stub.spec], table()) as (svc, c):
        status, headers, _ = await ask(c, "auto", "select a from b")
        assert status == 200 and served(stub) == "general-v1" and headers[FALLBACK_HEADER] == "unavailable"
        m = await metric_samples(c)
        assert m[("loraplane_router_content_fallbacks_total",
                  labels(model="auto", method="rules", reason="unavailable"))] == 1


async def test_invalid_bodies_are_refused_before_deciding(stub, tmp_path):
    async with running_router(tmp_path, [stub.spec], table()) as (svc, c):
        deep = b'{"model": "auto", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"   # json's decoder recurses
        for body in (b'{"model": "auto", "prompt": "\xff\xfe bad utf-8"}', b'{"model": "auto", "prompt": }', deep):
            async with c.post("/v1/completions", data=body) as resp:
                assert resp.status == 400 and DESTINATION_HEADER not in resp.headers
        m = await metric_samples(c)
        assert not any(k[0] == "loraplane_router_content_decisions_total" for k in m)
        # Not a chat or completion shape the decision reads: the empty text, the default serves.
        status, headers, _ = await ask(c, "auto", chat=True, messages=[{"role": "user", "content": [1, 2]}])
        assert status == 200 and headers[DESTINATION_HEADER] == "general"


async def test_classifier_answers_route_and_failures_fall_back_counted(stub, tmp_path):
    content = {"methods": ["classifier"]}
    async with running_router(tmp_path, [stub.spec], table(content)) as (svc, c):
        stub.answer = " SQL\n"
        _, headers, _ = await ask(c, "auto", "anything")
        assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER]) == ("sql", "classifier")
        path, body, sub_headers = stub.received[-2]   # the classifier's request, then the proxied one
        sent = json.loads(body)
        assert sent["model"] == "clf-v1" and sent["temperature"] == 0 and sent["max_tokens"] <= 9
        assert sent["prompt"] == "Classify this request.\nRequest: anything\nLabel:"
        stub.answer = " poetry"
        _, headers, _ = await ask(c, "auto", "anything")
        assert (headers[DESTINATION_HEADER], headers[FALLBACK_HEADER]) == ("general", "invalid-answer")
        stub.answer, stub.delay = " sql", 2.0
        started = time.perf_counter()
        status, headers, _ = await ask(c, "auto", "anything")
        assert status == 200 and time.perf_counter() - started < 1.5   # the 300 ms budget, not the 2 s answer
        assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER], headers[FALLBACK_HEADER]) == \
            ("general", "default", "timeout")
        stub.delay = 0.0
        stub.adapters.discard("clf-v1")   # the classifier's adapter is on no replica: unavailable at once
        await wait_for(lambda: all("clf-v1" not in r.ready for r in svc.pool.replicas))
        _, headers, _ = await ask(c, "auto", "anything")
        assert (headers[DESTINATION_HEADER], headers[FALLBACK_HEADER]) == ("general", "unavailable")
        m = await metric_samples(c)
        for reason in ("invalid-answer", "timeout", "unavailable"):
            assert m[("loraplane_router_content_fallbacks_total",
                      labels(model="auto", method="classifier", reason=reason))] == 1, reason
        assert m[("loraplane_router_content_decisions_total",
                  labels(model="auto", destination="general", method="default"))] == 3


async def test_a_failing_method_hands_over_to_the_next_and_the_header_says_the_first_failure(stub, tmp_path):
    content = {"methods": ["classifier", "rules"]}
    stub.answer = " nonsense"
    async with running_router(tmp_path, [stub.spec], table(content)) as (svc, c):
        _, headers, _ = await ask(c, "auto", "refund please")
        assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER]) == ("support", "rules")
        assert FALLBACK_HEADER not in headers
        _, headers, _ = await ask(c, "auto", "hello")
        assert (headers[DESTINATION_HEADER], headers[FALLBACK_HEADER]) == ("general", "invalid-answer")


async def test_external_classifier_gets_the_clients_authorization_never_the_engine_key(stub, tmp_path):
    other = await SmartStub("other", adapters=set()).start()
    other.classifier_served = "remote-clf"   # the other route's router is asked by public name
    try:
        content = {"methods": ["classifier"], "classifier": {"model": "remote-clf", "timeout_ms": 2000}}
        ext = [{"name": "remote-clf", "route": "other", "url": other.engine_url}]
        async with running_router(tmp_path, [stub.spec], table(content, ext)) as (svc, c):
            svc.router.pool.engine_headers = {"Authorization": "Bearer ENGINE-KEY"}
            _, headers, _ = await ask(c, "auto", "x", headers={"Authorization": "Bearer client-key"})
            assert headers[DESTINATION_HEADER] == "sql"
            assert other.sub_auth == [("/v1/completions", "Bearer client-key")]
            _, headers, _ = await ask(c, "remote-clf", "x", headers={"Authorization": "Bearer client-key"})
            assert headers.get(DESTINATION_HEADER) is None   # a direct request for an external name
    finally:
        await other.stop()


async def test_local_classifier_gets_the_engine_key(stub, tmp_path):
    async with running_router(tmp_path, [stub.spec], table({"methods": ["classifier"]})) as (svc, c):
        svc.router.pool.engine_headers = {"Authorization": "Bearer ENGINE-KEY"}
        await ask(c, "auto", "x", headers={"Authorization": "Bearer client-key"})
        assert stub.sub_auth == [("/v1/completions", "Bearer ENGINE-KEY")]


async def test_external_destination_is_left_to_the_forwarding_path_with_the_headers(stub, tmp_path):
    content = {"destinations": [{"model": "docs", "rules": {"keywords": ["docs"]}}]}
    other = await SmartStub("other", adapters={"docs"}).start()
    try:
        ext = [{"name": "docs", "route": "other", "url": other.engine_url}]
        async with running_router(tmp_path, [stub.spec], table(content, ext)) as (svc, c):
            status, headers, raw = await ask(c, "auto", "read the docs")
            assert headers[DESTINATION_HEADER] == "docs" and status == 200, raw
            assert json.loads(other.received[-1][1])["model"] == "docs"
    finally:
        await other.stop()


class OutageRouter:
    """Another route's router that answers 503 (Retry-After `retry_after`) while `down`, else 200; counts asks."""

    def __init__(self, retry_after: str | None = "2", status: int = 503):
        self.down, self.retry_after, self.asked, self.status = True, retry_after, 0, status
        self.runner = None

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.asked += 1
        if self.down:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response({"error": {"code": "no_ready_replica"}}, status=self.status, headers=headers)
        return web.json_response({"choices": [{"index": 0, "text": "remote"}]})

    async def start(self) -> "OutageRouter":
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


async def test_an_external_destination_at_zero_replicas_falls_back_to_the_default_and_is_marked(stub, tmp_path):
    """Issue 15: the destination's route answers 503 (no ready replica): that request itself is sent to the
    default (nothing reached the client yet), and for its Retry-After the route is not asked again: the
    default serves at once; afterwards the route gets content-routed requests again."""
    other = await OutageRouter(retry_after="1").start()
    try:
        content = {"destinations": [{"model": "docs", "rules": {"keywords": ["docs"]}}]}
        ext = [{"name": "docs", "route": "other", "url": other.url}]
        async with running_router(tmp_path, [stub.spec], table(content, ext)) as (svc, c):
            for n in range(3):
                status, headers, raw = await ask(c, "auto", "read the docs")
                assert status == 200 and served(stub) == "general-v1", raw
                assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER], headers[FALLBACK_HEADER]) == \
                    ("general", "default", "unavailable")
            assert other.asked == 1   # marked after the first 503: the next two never went there
            m = await metric_samples(c)
            assert m[("loraplane_router_content_fallbacks_total",
                      labels(model="auto", method="rules", reason="unavailable"))] == 3
            # A request naming the external model is forwarded as before (the mark is content routing's).
            status, _, _ = await ask(c, "docs", "x")
            assert status == 503 and other.asked == 2
            other.down = False
            await asyncio.sleep(1.1)   # its Retry-After: 1
            status, headers, raw = await ask(c, "auto", "read the docs")
            assert status == 200 and headers[DESTINATION_HEADER] == "docs" and FALLBACK_HEADER not in headers
            assert json.loads(raw)["choices"][0]["text"] == "remote"
    finally:
        await other.stop()


async def test_an_unreachable_external_destination_falls_back_to_the_default(stub, tmp_path):
    content = {"destinations": [{"model": "docs", "rules": {"keywords": ["docs"]}}]}
    ext = [{"name": "docs", "route": "other", "url": "http://127.0.0.1:9"}]
    async with running_router(tmp_path, [stub.spec], table(content, ext)) as (svc, c):
        for _ in range(2):
            status, headers, raw = await ask(c, "auto", "read the docs", stream=True)
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n") and served(stub) == "general-v1"
            assert (headers[DESTINATION_HEADER], headers[FALLBACK_HEADER]) == ("general", "unavailable")


async def test_an_external_outage_with_the_default_unavailable_too_is_relayed(stub, tmp_path):
    stub.adapters.discard("general-v1")
    other = await OutageRouter(retry_after=None).start()
    try:
        content = {"destinations": [{"model": "docs", "rules": {"keywords": ["docs"]}}]}
        ext = [{"name": "docs", "route": "other", "url": other.url}]
        async with running_router(tmp_path, [stub.spec], table(content, ext)) as (svc, c):
            for n in (1, 2):
                status, headers, _ = await ask(c, "auto", "read the docs")
                assert status == 503 and headers[DESTINATION_HEADER] == "docs" and other.asked == n
                assert FALLBACK_HEADER not in headers
    finally:
        await other.stop()


async def test_an_external_502_is_relayed_and_later_requests_go_to_the_default(stub, tmp_path):
    """A 502 of the route's router may come after its vLLM got the request: that one is not re-sent, but the
    route is marked and the next request goes to the default."""
    other = await OutageRouter(retry_after=None, status=502).start()
    try:
        content = {"destinations": [{"model": "docs", "rules": {"keywords": ["docs"]}}]}
        ext = [{"name": "docs", "route": "other", "url": other.url}]
        async with running_router(tmp_path, [stub.spec], table(content, ext)) as (svc, c):
            status, headers, _ = await ask(c, "auto", "read the docs")
            assert status == 502 and headers[DESTINATION_HEADER] == "docs" and other.asked == 1
            status, headers, _ = await ask(c, "auto", "read the docs")
            assert status == 200 and headers[FALLBACK_HEADER] == "unavailable" and other.asked == 1
            assert served(stub) == "general-v1"
    finally:
        await other.stop()


def test_mark_unavailable_reads_retry_after_capped():
    from loraplane.router.orchestrate import EXTERNAL_DOWN_DEFAULT_S, EXTERNAL_DOWN_MAX_S
    o = Orchestrator.__new__(Orchestrator)
    o._down = {}
    assert o.mark_unavailable("a", b" 3") == 3.0
    assert o.mark_unavailable("a", b"3600") == EXTERNAL_DOWN_MAX_S
    assert o.mark_unavailable("a", b"Wed, 21 Oct 2015 07:28:00 GMT") == EXTERNAL_DOWN_DEFAULT_S
    assert o.mark_unavailable("a", None) == EXTERNAL_DOWN_DEFAULT_S
    assert o.mark_unavailable("a", b"-5") == 0.0


async def test_semantic_routes_by_similarity_with_the_index_built_once(stub, tmp_path):
    CosineIndex.built = 0
    content = {"methods": ["semantic"]}
    async with running_router(tmp_path, [stub.spec], table(content)) as (svc, c):
        svc.router._orchestrator = Orchestrator(svc.router, index_class=lambda: CosineIndex)
        for prompt, dest, method in (("refund refund", "support", "semantic"), ("SELECT select", "sql", "semantic"),
                                     ("the weather", "general", "default")):
            _, headers, _ = await ask(c, "auto", prompt)
            assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER]) == (dest, method), prompt
        assert CosineIndex.built == 1
        assert [p for p, _ in stub.sub_auth].count("/v1/embeddings") == 2 + 3   # each destination's examples once, then 3 texts


async def test_semantic_without_an_index_or_past_its_budget_falls_back(stub, tmp_path):
    content = {"methods": ["semantic"]}
    async with running_router(tmp_path, [stub.spec], table(content)) as (svc, c):
        svc.router._orchestrator = Orchestrator(svc.router, index_class=lambda: None)
        _, headers, _ = await ask(c, "auto", "refund")
        assert headers[FALLBACK_HEADER] == "unavailable"
        svc.router._orchestrator = Orchestrator(svc.router, index_class=lambda: CosineIndex)
        stub.embed_delay = 1.0
        _, headers, _ = await ask(c, "auto", "refund")
        assert headers[FALLBACK_HEADER] == "timeout"
        stub.embed_delay = 0.0
        await asyncio.sleep(1.2)   # the build went on after the request stopped waiting: the index is there now
        _, headers, _ = await ask(c, "auto", "refund")
        assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER]) == ("support", "semantic")


async def test_a_client_leaving_mid_decision_is_counted_and_frees_everything(stub, tmp_path):
    stub.delay = 2.0
    async with running_router(tmp_path, [stub.spec], table({"methods": ["classifier"],
                                                            "classifier": {"model": "clf", "timeout_ms": 5000}})) as (svc, c):
        client = asyncio.ensure_future(ask(c, "auto", "x"))
        # The client leaves once the decision is under way (the classifier was asked), whatever the machine's load.
        await wait_for(lambda: len(stub.received) == 1)
        client.cancel()
        with pytest.raises(asyncio.CancelledError):
            await client
        await wait_for(lambda: svc.router.active == 0)
        m = await metric_samples(c)
        assert m[("loraplane_router_requests_total", labels(model="auto", backend="", code="499"))] == 1
        await asyncio.sleep(0.3)
        assert [json.loads(b)["model"] for _, b, _ in stub.received] == ["clf-v1"]   # never proxied


async def test_decision_log_is_off_by_default_and_never_has_the_prompt(stub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="loraplane.router")
    async with running_router(tmp_path, [stub.spec], table(), access_log=False) as (svc, c):
        await ask(c, "auto", "secret refund text")
    assert "content routing:" not in caplog.text
    caplog.clear()
    async with running_router(tmp_path, [stub.spec], table({"log_decisions": True}), access_log=False) as (svc, c):
        await ask(c, "auto", "secret refund text")
    lines = [r.getMessage() for r in caplog.records if "content routing:" in r.getMessage()]
    assert len(lines) == 1 and "destination=support method=rules" in lines[0] and "secret" not in caplog.text


async def test_semantic_with_router_semantic_index(stub, tmp_path):
    # The real index (router/semantic.py, orch-semantic's), imported lazily by the orchestrator as in production.
    pytest.importorskip("loraplane.router.semantic")
    async with running_router(tmp_path, [stub.spec], table({"methods": ["semantic"]})) as (svc, c):
        for prompt, dest, method in (("refund refund", "support", "semantic"), ("SELECT select", "sql", "semantic"),
                                     ("the weather", "general", "default")):
            _, headers, _ = await ask(c, "auto", prompt)
            assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER]) == (dest, method), prompt


async def test_rules_without_token_bounds_decide_without_a_task(stub, tmp_path, monkeypatch):
    # The common case (rules on text and headers) is decided synchronously in the dispatch; only methods that
    # need I/O (here a rule with token bounds) go through the async decide().
    calls = []
    real = Orchestrator.decide

    async def spy(self, *args, **kwargs):
        calls.append(args[0].name)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Orchestrator, "decide", spy)
    content = {"destinations": [{"model": "support", "rules": {"keywords": ["refund"]}},
                                {"model": "sql", "rules": {"keywords": ["long"], "min_prompt_tokens": 2}}]}
    async with running_router(tmp_path, [stub.spec], table(content)) as (svc, c):
        for prompt in ("refund", "hello"):
            _, headers, _ = await ask(c, "auto", prompt)
            assert headers[DESTINATION_HEADER] in ("support", "general")
        assert calls == []
        _, headers, _ = await ask(c, "auto", "a long text")
        assert headers[DESTINATION_HEADER] == "sql" and calls == ["auto"]


async def test_a_deeply_nested_named_request_is_answered_400_not_disconnected(stub, tmp_path):
    # `model` spelled with an escape takes read_model's parse; before, its RecursionError closed the connection.
    async with running_router(tmp_path, [stub.spec], table()) as (svc, c):
        body = b'{"mod\\u0065l": "sql", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        async with c.post("/v1/completions", data=body) as resp:
            assert resp.status == 400
            assert "too deeply" in (await resp.json())["error"]["message"]


# ---- the decided path's cost (issue 15: rules add less than 5% router CPU per request) ----


async def test_a_rules_routed_request_reads_its_body_once_as_a_named_one(stub, tmp_path, monkeypatch):
    # Before, the decided request was rewritten to name its destination and read again (read_model, a regex scan
    # of the whole body) before the named-model path rewrote it once more to the served name.
    import loraplane.router.dispatch as dispatch
    calls = []
    real = dispatch.read_model

    def spy(body):
        calls.append(body)
        return real(body)

    monkeypatch.setattr(dispatch, "read_model", spy)
    async with running_router(tmp_path, [stub.spec], table()) as (svc, c):
        for prompt, backend in (("refund please", "support-v1"), ("tell me a story", "general-v1")):
            calls.clear()
            status, headers, _ = await ask(c, "auto", prompt)
            assert status == 200 and headers["X-Loraplane-Backend"] == backend and served(stub) == backend
            assert len(calls) == 1, calls
        calls.clear()
        status, _, _ = await ask(c, "sql", "refund")
        assert status == 200 and len(calls) == 1


async def test_a_decided_request_held_for_a_cold_start_is_released_to_its_destination(tmp_path):
    # The decided request skips the rewrite to its destination's name; where it is kept (held until a replica
    # serves it, then proxied again from req.body) it must still name the destination, never `auto`.
    async with running_router(tmp_path, [], table(cold_start_wait_seconds=20, cold_start_max_requests=4)) as \
            (svc, c):
        sent = asyncio.create_task(ask(c, "auto", "refund please"))
        await wait_for(lambda: len(svc.router.held) == 1)
        (held,) = svc.router.held
        assert json.loads(b"".join(held.req.body))["model"] == "support" and held.req.size == len(held.req.body[0])
        s = await SmartStub("a", adapters=set(ADAPTERS)).start()
        try:
            svc.pool.set_replicas([parse_replica_arg(s.spec)])
            await svc.pool.poll_once(svc._poll_session)
            status, headers, _ = await sent
            assert status == 200 and headers[DESTINATION_HEADER] == "support", headers
            assert headers["X-Loraplane-Backend"] == "support-v1" and served(s) == "support-v1"
        finally:
            await s.stop()


async def test_prompt_logging_of_a_decided_request_logs_the_body_naming_its_destination(stub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="loraplane.router")
    async with running_router(tmp_path, [stub.spec], table(log_prompts=True)) as (svc, c):
        status, _, _ = await ask(c, "auto", "refund please")
        assert status == 200 and served(stub) == "support-v1"
    logged = [r.getMessage() for r in caplog.records if "logPrompts" in r.getMessage()]
    assert len(logged) == 1 and '"model": "support"' in logged[0] and "refund please" in logged[0], logged


async def test_utf16_and_bom_bodies_are_still_decided(stub, tmp_path):
    # route_by_content decodes UTF-8 bodies itself; every other encoding json.loads reads goes to json.loads.
    async with running_router(tmp_path, [stub.spec], table()) as (svc, c):
        text = json.dumps({"model": "auto", "prompt": "refund please"})
        for body in (text.encode("utf-16"), b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16-le"),
                     b" " + text.encode()):
            async with c.post("/v1/completions", data=body, headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 200, (body[:8], await resp.text())
                assert resp.headers[DESTINATION_HEADER] == "support"
        async with c.post("/v1/completions", data=b'{"model": "auto", "prompt": "x",}') as resp:
            assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]
