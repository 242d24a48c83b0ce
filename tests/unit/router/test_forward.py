"""External models (issue 15): a public model of another ModelRoute is forwarded, body unchanged, to that
route's router with the client's own Authorization, never this route's engine key.

Stand-ins: `CaptureRouter` (a raw TCP server standing in for another route's router: it records the exact
bytes it receives and answers a canned response) and, for the whole path, a second real router in front of a
StubReplica (tests/support/router_stubs.py).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio

from loraplane.api.wire.serving import ServingTable
from loraplane.router.table import RoutingTable
from support.router_running import running_router
from support.router_stubs import StubReplica

pytestmark = pytest.mark.timeout(60)


def table_with_external(local: dict[str, str], external: dict[str, tuple[str, str]], **router) -> str:
    """A route `a`'s table: local public name -> served name (an adapter, or `base`), and external public name
    -> (route, router URL)."""
    return json.dumps({
        "route": "a", "generation": 1, "base_model": "tiny", "served_model_name": "base",
        "max_lora_rank": 16, "max_loras": 4,
        "models": [{"name": n, "backends": [{"served_name": s, "adapter": None if s == "base" else s,
                                              "weight": 100}]} for n, s in local.items()],
        "external_models": [{"name": n, "route": r, "url": u} for n, (r, u) in external.items()],
        "router": router})


class CaptureRouter:
    """A stand-in for another route's router: records every request's raw bytes and answers `answer`."""

    def __init__(self, answer: bytes | None = None):
        body = b'{"id":"cmpl-x","choices":[{"text":"ok"}],"usage":{"prompt_tokens":2,"total_tokens":5,' \
               b'"completion_tokens":3}}'
        self.answer = answer or (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"X-Loraplane-Backend: sql-v2\r\nX-Other: not-relayed\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            self.received.append(head + await reader.readexactly(length))
            writer.write(self.answer)
            await writer.drain()
        writer.close()

    async def start(self) -> "CaptureRouter":
        async def handle(reader, writer):
            try:
                await self._handle(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest_asyncio.fixture(loop_scope="function")
async def capture():
    c = await CaptureRouter().start()
    yield c
    await c.stop()


def test_compile_external_models_listing_and_conflicts():
    table = ServingTable.model_validate_json(table_with_external(
        {"chat": "chat-v1"},
        {"sql": ("b", "http://b-router.ns.svc:8080"), "chat": ("c", "http://c-router.ns.svc:8080"),
         "bad": ("d", "http://user:pw@d-router.ns.svc:8080/v1"), "bad2": ("e", "https://e:8080")}))
    rt = RoutingTable.compile(table)
    assert list(rt.models) == ["chat"] and list(rt.external) == ["sql"]
    assert rt.external["sql"].url == "http://b-router.ns.svc:8080"
    assert rt.external["sql"].backend.served_name == "route:b" and rt.external["sql"].backend.is_base
    # One bad entry never costs the rest: each is named with why.
    assert len(rt.dropped) == 3
    assert "external_models[1] 'chat': the name is already served here" in rt.dropped[0]
    assert "without credentials, path or query" in rt.dropped[1] and "must be http://" in rt.dropped[2]
    listing = json.loads(rt.models_json)["data"]
    assert [(m["id"], m["owned_by"]) for m in listing] == [("chat", "a"), ("sql", "b")]
    assert rt.served_names() == ["chat", "sql"]


async def test_external_model_is_forwarded_with_the_clients_authorization_never_the_engine_key(tmp_path, capture):
    """The bytes the other route's router receives: the body exactly as the client sent it (no `model`
    rewrite, no stream_options added), the client's Authorization, never this route's engine key."""
    a = await StubReplica("a", adapters={"chat-v1"}).start()
    try:
        async with running_router(tmp_path, [a.spec], table_with_external({"chat": "chat-v1"},
                                                                          {"sql": ("b", capture.url)}),
                                  engine_key="route-a-engine-key") as (_, c):
            body = b'{"model": "sql", "prompt": "select", "stream": false, "x": [1, 2.50]}'
            async with c.post("/v1/completions", data=body, headers={
                    "Authorization": "Bearer client-secret", "X-Request-Id": "r-1", "Content-Type": "application/json"}
                    ) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["X-Loraplane-Backend"] == "sql-v2"     # the other router's, relayed
                assert "X-Other" not in resp.headers
                assert (await resp.json())["choices"][0]["text"] == "ok"
            # And with no Authorization from the client: none at all, still never the engine key.
            async with c.post("/v1/completions", data=body) as resp:
                assert resp.status == 200
            # A request for the route's own model still carries the engine key to vLLM (unchanged path).
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "x"},
                              headers={"Authorization": "Bearer client-secret"}) as resp:
                assert resp.status == 200
            metrics = await (await c.get("/metrics")).text()
        assert len(capture.received) == 2
        first, second = capture.received
        head, sent = first.split(b"\r\n\r\n", 1)
        assert sent == body
        assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert b"\r\nAuthorization: Bearer client-secret" in head and b"X-Request-Id: r-1" in head
        for raw in (first, second):
            assert b"route-a-engine-key" not in raw
        assert b"authorization" not in second.lower()
        assert a.received[-1][2]["Authorization"] == "Bearer route-a-engine-key"
        assert 'loraplane_router_requests_total{backend="route:b",code="200",model="sql"} 2.0' in metrics
        assert 'loraplane_router_prompt_tokens_total{backend="route:b",model="sql"} 4.0' in metrics
    finally:
        await a.stop()


async def test_external_model_through_a_real_second_router_streams_and_uses_its_keys(tmp_path):
    """The whole path: route a's router forwards `sql` to route b's real router (with its own API keys and
    engine key) in front of a stub vLLM; the stream is relayed chunk by chunk, b's engine key reaches b's
    vLLM, a's engine key reaches nothing of b's."""
    b_vllm = await StubReplica("b", base="tiny-b", adapters={"sql-v1"}).start()
    a_vllm = await StubReplica("a", adapters={"chat-v1"}).start()
    keys = tmp_path / "b-keys"
    keys.write_text("client-secret\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    b_table = json.dumps({"route": "b", "generation": 1, "base_model": "tiny", "served_model_name": "tiny-b",
                          "max_lora_rank": 16, "max_loras": 4,
                          "models": [{"name": "sql", "backends": [{"served_name": "sql-v1", "adapter": "sql-v1",
                                                                   "weight": 100}]}]})
    try:
        async with running_router(tmp_path / "b", [b_vllm.spec], b_table, api_keys=keys,
                                  engine_key="route-b-engine-key") as (b_svc, _), \
                running_router(tmp_path / "a", [a_vllm.spec],
                               table_with_external({"chat": "chat-v1"}, {"sql": ("b", b_svc.url)}),
                               engine_key="route-a-engine-key") as (_, c):
            req = {"model": "sql", "prompt": "p", "stream": True}
            async with c.post("/v1/completions", json=req, headers={"Authorization": "Bearer client-secret"}) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                assert r.headers["X-Loraplane-Backend"] == "sql-v1"
                text = await r.text()
            assert text.count("data: ") == 4 and text.endswith("data: [DONE]\n\n")
            # b refuses a client without one of its keys: a forwards b's answer as it is.
            async with c.post("/v1/completions", json=req, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
            # A name neither serves: 404 from a, listing both routes' names.
            async with c.post("/v1/completions", json={"model": "nope", "prompt": "p"}) as r:
                assert r.status == 404 and (await r.json())["error"]["available_models"] == ["chat", "sql"]
        assert [h["Authorization"] for _, _, h in b_vllm.received] == ["Bearer route-b-engine-key"]
        assert a_vllm.received == []
    finally:
        await a_vllm.stop()
        await b_vllm.stop()


async def test_unreachable_external_router_is_a_502_naming_it(tmp_path):
    a = await StubReplica("a", adapters={"chat-v1"}).start()
    try:
        async with running_router(tmp_path, [a.spec], table_with_external(
                {"chat": "chat-v1"}, {"sql": ("b", "http://127.0.0.1:9")})) as (_, c):
            async with c.post("/v1/completions", json={"model": "sql", "prompt": "p"}) as r:
                assert r.status == 502
                err = (await r.json())["error"]
            assert err["code"] == "route_unreachable" and "`sql`" in err["message"]
            # The route's own model is not affected, nor is the pool marked.
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as r:
                assert r.status == 200
    finally:
        await a.stop()


async def test_a_router_refusing_the_first_connection_is_tried_once_more(tmp_path, caplog):
    """Another route's router refuses the first connection (its Service's endpoints changing under it): nothing
    was sent, so the request is sent once more after EXTERNAL_RETRY_DELAY_S, answered, and counted as a retry."""
    import logging

    from loraplane.router.exchange import EXTERNAL_RETRY_DELAY_S
    from support.router_running import metric_samples

    other = await CaptureRouter().start()
    port = other.server.sockets[0].getsockname()[1]
    await other.stop()   # its port now refuses connections
    a = await StubReplica("a").start()
    caplog.set_level(logging.WARNING, "loraplane.router")
    try:
        async with running_router(tmp_path, [a.spec], table_with_external(
                {}, {"sql": ("b", f"http://127.0.0.1:{port}")})) as (_, c):
            answer = asyncio.create_task(c.post("/v1/completions", json={"model": "sql", "prompt": "p"}))
            for _ in range(200):   # the first attempt refused (logged), the second not sent yet
                if any("connection failed" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.005)
            else:
                raise AssertionError("the first connection was not refused")
            assert not answer.done()
            other.server = await asyncio.start_server(other._handle, "127.0.0.1", port)
            async with await asyncio.wait_for(answer, EXTERNAL_RETRY_DELAY_S + 5) as r:
                assert r.status == 200 and r.headers["X-Loraplane-Backend"] == "sql-v2"
            assert len(other.received) == 1
            samples = await metric_samples(c)
            assert samples[("loraplane_router_retries_total", (("backend", "route:b"), ("model", "sql")))] == 1
    finally:
        await a.stop()
        if other.server is not None:
            await other.stop()


async def test_gateway_connections_forward_end_to_end_headers_not_hop_by_hop(tmp_path, capture):
    """Gateway mode (ForwardingConnection): the client's other headers reach the route's router (its sticky
    header, headers its content rules match on); hop-by-hop ones and a second Host/Content-Length do not."""
    from loraplane.router.forward import ForwardingConnection

    a = await StubReplica("a").start()
    try:
        async with running_router(tmp_path, [a.spec], table_with_external({}, {"sql": ("b", capture.url)}),
                                  engine_key="route-key", connection_class=ForwardingConnection) as (svc, _):
            port = svc.port
            body = b'{"model":"sql","prompt":"p"}'
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\nX-User: u-17\r\n"
                         b"X-Team: sql\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\n"
                         b"Authorization: Bearer client-secret\r\nConnection: keep-alive\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b'"completion_tokens":3}}'), 5)
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200 OK")
        head = capture.received[-1].split(b"\r\n\r\n", 1)[0] + b"\r\n"
        assert b"X-User: u-17\r\n" in head and b"X-Team: sql\r\n" in head
        assert b"Authorization: Bearer client-secret\r\n" in head
        for dropped in (b"keep-alive:", b"proxy-authorization", b"host: gw", b"connection:"):
            assert dropped not in head.lower(), head
        assert head.lower().count(b"content-length") == 1 and b"route-key" not in head
    finally:
        await a.stop()


async def test_a_held_request_whose_model_moved_to_another_route_is_forwarded(tmp_path, capture):
    """A request held for a cold start (no replica up) whose public model then belongs to another route (the
    table changed) is released to that route's router, counted as released."""
    a = await StubReplica("a", adapters={"chat-v1"}, engine_ready=False).start()
    try:
        held_table = table_with_external({"chat": "chat-v1"}, {}, cold_start_wait_seconds=20,
                                         cold_start_max_requests=4)
        async with running_router(tmp_path, [a.spec], held_table) as (svc, c):
            pending = asyncio.create_task(c.post("/v1/completions", json={"model": "chat", "prompt": "p"},
                                                 headers={"Authorization": "Bearer client-secret"}))
            for _ in range(200):
                if svc.router.held:
                    break
                await asyncio.sleep(0.02)
            assert svc.router.held
            moved = json.loads(table_with_external({}, {"chat": ("b", capture.url)}, cold_start_wait_seconds=20,
                                                   cold_start_max_requests=4))
            moved["generation"] = 2
            (tmp_path / "serving.json").write_text(json.dumps(moved))
            resp = await asyncio.wait_for(pending, 10)
            assert resp.status == 200 and resp.headers["X-Loraplane-Backend"] == "sql-v2"
            resp.release()
            assert not svc.router.held
            metrics = await (await c.get("/metrics")).text()
        assert b"Authorization: Bearer client-secret" in capture.received[-1]
        assert 'loraplane_router_held_total{result="released"} 1.0' in metrics
    finally:
        await a.stop()


async def test_the_other_routers_refusal_is_relayed_with_its_retry_after(tmp_path):
    """A 503 of the route's router (no replica ready) reaches the client as it was, Retry-After included, and
    keeps this router's `route:<route>` backend header (that router named no version)."""
    body = b'{"error":{"message":"no replica is ready","code":"no_ready_replica"}}'
    busy = await CaptureRouter(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                               b"Retry-After: 2\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)).start()
    a = await StubReplica("a").start()
    try:
        async with running_router(tmp_path, [a.spec], table_with_external({}, {"sql": ("b", busy.url)})) as (_, c):
            async with c.post("/v1/completions", json={"model": "sql", "prompt": "p"}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "2"
                assert resp.headers["X-Loraplane-Backend"] == "route:b"
                assert (await resp.read()) == body
    finally:
        await a.stop()
        await busy.stop()


async def test_a_huge_whole_answer_is_relayed_as_it_arrives_not_collected(tmp_path):
    """A whole (not SSE) answer bigger than MAX_BUFFERED_ANSWER (an embeddings batch of many inputs; here another
    route's router) used to be collected entirely before the client got a byte: one request could make the router
    hold gigabytes. Past the bound it is relayed as it arrives (chunked, under flow control): the client has the
    head and the first part while the other side still holds the rest back, and the whole arrives unchanged, its
    usage counted."""
    from loraplane.router.exchange import MAX_BUFFERED_ANSWER

    first = b'{"data":[' + b'"' + b"x" * (MAX_BUFFERED_ANSWER + (1 << 20)) + b'"'
    rest = b'],"usage":{"prompt_tokens":5,"total_tokens":5,"completion_tokens":0}}'
    go_on = asyncio.Event()

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % (len(first) + len(rest)) + first)
        await writer.drain()
        await go_on.wait()
        writer.write(rest)
        await writer.drain()
        writer.close()

    other = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{other.sockets[0].getsockname()[1]}"
    a = await StubReplica("a").start()
    try:
        async with running_router(tmp_path, [a.spec], table_with_external({}, {"emb": ("b", url)})) as (svc, c):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            body = b'{"model":"emb","input":["a"]}'
            writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)   # before the rest was sent
            assert head.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in head
            assert b"X-Loraplane-Backend: route:b" in head
            go_on.set()
            received = b""
            while True:
                size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).strip(), 16)
                received += await reader.readexactly(size + 2)
                if size == 0:
                    break
                received = received[:-2]
            writer.close()
            assert received[:-2] == first + rest
            metrics = await (await c.get("/metrics")).text()
        assert 'loraplane_router_prompt_tokens_total{backend="route:b",model="emb"} 5.0' in metrics
    finally:
        other.close()
        await a.stop()


async def test_gateway_drops_headers_the_clients_connection_header_names(tmp_path, capture):
    """A header the client's Connection header names is hop-by-hop (RFC 9110 section 7.6.1), wherever it
    appears: the gateway does not pass it on to the route's router; other end-to-end headers still go."""
    from loraplane.router.forward import ForwardingConnection

    a = await StubReplica("a").start()
    try:
        async with running_router(tmp_path, [a.spec], table_with_external({}, {"sql": ("b", capture.url)}),
                                  connection_class=ForwardingConnection) as (svc, _):
            body = b'{"model":"sql","prompt":"p"}'
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\nX-Hop: secret\r\n"
                         b"X-Keep: 1\r\nConnection: keep-alive, X-Hop ,x-other-hop\r\nX-Other-Hop: 2\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b'"completion_tokens":3}}'), 5)
            writer.close()
        head = capture.received[-1].split(b"\r\n\r\n", 1)[0].lower() + b"\r\n"
        assert b"x-keep: 1\r\n" in head
        assert b"x-hop" not in head and b"secret" not in head and b"x-other-hop" not in head, head
    finally:
        await a.stop()


async def test_the_relayed_headers_of_another_router_are_bounded(tmp_path):
    """The response parser keeps no header size limit: an answer with endless relayed headers (Retry-After)
    reaches the client with at most MAX_RELAYED_HEADERS of them, none over 1 KiB."""
    from loraplane.router.upstream import MAX_RELAYED_HEADERS

    body = b'{"ok":true}'
    many = b"".join(b"Retry-After: %d\r\n" % i for i in range(2000)) + b"X-Loraplane-Backend: " + b"v" * 5000 + b"\r\n"
    flood = await CaptureRouter(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                                % (many, len(body), body)).start()
    a = await StubReplica("a").start()
    try:
        async with running_router(tmp_path, [a.spec], table_with_external({}, {"sql": ("b", flood.url)})) as (_, c):
            async with c.post("/v1/completions", json={"model": "sql", "prompt": "p"}) as resp:
                assert resp.status == 200 and (await resp.read()) == body
                assert len(resp.headers.getall("Retry-After")) == MAX_RELAYED_HEADERS
                assert resp.headers["X-Loraplane-Backend"] == "route:b"
    finally:
        await a.stop()
        await flood.stop()


async def _reload(svc, path, text: str, generation: int) -> None:
    table = json.loads(text)
    table["generation"] = generation
    path.write_text(json.dumps(table))
    for _ in range(200):
        if svc.router.table is not None and svc.router.table.source.generation == generation:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the table was not reloaded")


async def test_two_routers_whose_tables_disagree_cannot_pass_a_request_back_and_forth(tmp_path):
    """While a public name moves between routes, router A may still forward it to B while B forwards it to A:
    each forward used to be a new request, endlessly. Each forward now carries its hop count; a router refuses to
    forward a request that already made MAX_FORWARD_HOPS (508, naming the model). The legitimate longest chain,
    the gateway then a route's router forwarding to the route that serves it, still answers."""
    from loraplane.router.forward import ForwardingConnection

    served = await StubReplica("c", adapters={"sql-v1"}).start()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir(), (tmp_path / "g").mkdir()
    try:
        async with running_router(tmp_path / "a", [served.spec], table_with_external({}, {})) as (a, ca), \
                running_router(tmp_path / "b", [served.spec], table_with_external({}, {"sql": ("a", a.url)})) as (b, _), \
                running_router(tmp_path / "c", [served.spec], table_with_external({"sql": "sql-v1"}, {})) as (c, _), \
                running_router(tmp_path / "g", [served.spec], table_with_external({}, {"sql": ("a", a.url)}),
                               connection_class=ForwardingConnection) as (_, cg):
            await _reload(a, tmp_path / "a" / "serving.json", table_with_external({}, {"sql": ("b", b.url)}), 2)
            async with ca.post("/v1/completions", json={"model": "sql", "prompt": "p"},
                               headers={"Authorization": "Bearer k"}) as resp:
                assert resp.status == 508, await resp.text()
                err = (await resp.json())["error"]
                assert err["code"] == "forwarding_loop" and "`sql` was forwarded 2 times" in err["message"]
            # A -> C (serves it): gateway -> A -> C is two forwards and answers.
            await _reload(a, tmp_path / "a" / "serving.json", table_with_external({}, {"sql": ("c", c.url)}), 3)
            async with cg.post("/v1/completions", json={"model": "sql", "prompt": "p"}) as resp:
                assert resp.status == 200, await resp.text()
            # Back to the loop, through the gateway, with the client claiming no hops: its header is replaced by
            # the gateway's count, never passed on beside it, and the loop still ends.
            await _reload(a, tmp_path / "a" / "serving.json", table_with_external({}, {"sql": ("b", b.url)}), 4)
            async with cg.post("/v1/completions", json={"model": "sql", "prompt": "p"},
                               headers={"X-Loraplane-Hops": "0"}) as resp:
                assert resp.status == 508
    finally:
        await served.stop()
