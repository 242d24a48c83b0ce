"""Hostile HTTP from clients, over real sockets (the router parses HTTP/1.1 itself, client_protocol.py): answers
that stay in step with the requests, client strings that crashed an encode, trailer sections, and clients that
pipeline requests without reading the answers. Loopback only; each test a few seconds at most."""

from __future__ import annotations

import asyncio
import http.client
import json

import pytest
import pytest_asyncio

from support.router_running import running_router, table_json
from support.router_stubs import StubReplica

pytestmark = pytest.mark.timeout(60)
KEY = "key-one"


@pytest_asyncio.fixture(loop_scope="function")
async def stub():
    r = await StubReplica("a", adapters={"v1"}).start()
    yield r
    await r.stop()


def keys_dir(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    (d / "k").write_text(KEY + "\n")
    return d


async def read_all(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    """What the router sends until it closes the connection (or `timeout` seconds pass without a byte)."""
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            out += chunk
    except (asyncio.TimeoutError, ConnectionError):
        pass
    return out


def post(body: bytes, extra: bytes = b"", path: bytes = b"/v1/completions") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path, len(body), extra, body)


# ---- HEAD ----

def _one_connection(port: int, calls: list[tuple[str, str]]) -> list[tuple[int, bytes, str | None]]:
    """`calls` (method, path) one after another on one keep-alive connection, read by http.client (which reads
    no body after a HEAD answer): (status, body, Content-Length) each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        out = []
        for method, path in calls:
            conn.request(method, path)
            resp = conn.getresponse()
            out.append((resp.status, resp.read(), resp.getheader("Content-Length")))
        return out
    finally:
        conn.close()


async def test_answers_to_head_requests_have_no_body_and_the_connection_stays_in_step(stub, tmp_path):
    """The router wrote its body after a HEAD answer too (`ok` after HEAD /healthz): a client, or a proxy pooling
    the connection for many clients, reads those bytes as the start of the next answer, so every later answer on
    the connection was off by one (http.client: BadStatusLine on the request after the HEAD)."""
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]})) as (svc, _):
        calls = [("GET", "/healthz"), ("HEAD", "/healthz"), ("HEAD", "/readyz"), ("HEAD", "/v1/models"),
                 ("HEAD", "/nope"), ("HEAD", "/v1/completions"), ("HEAD", "/metrics"), ("GET", "/v1/models")]
        out = await asyncio.to_thread(_one_connection, svc.port, calls)
        assert [s for s, _, _ in out] == [200, 200, 200, 200, 404, 405, 200, 200]
        assert out[0][1] == b"ok" and out[1] == (200, b"", "2")           # same head as GET, no body
        assert all(body == b"" for (method, _), (_, body, _) in zip(calls, out) if method == "HEAD")
        assert json.loads(out[-1][1])["data"][0]["id"] == "chat"          # still in step after five HEADs
        assert int(out[3][2]) == len(out[-1][1])                           # HEAD's Content-Length is GET's


async def test_a_refused_head_request_gets_no_body_either(stub, tmp_path):
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}),
                              api_keys=keys_dir(tmp_path)) as (svc, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        out = await read_all(reader)
        writer.close()
        assert out.startswith(b"HTTP/1.1 401 ") and out.endswith(b"\r\n\r\n"), out


# ---- lone surrogates (JSON strings json.loads accepts) ----

async def test_lone_surrogates_in_a_body_are_answered_not_dropped(stub, tmp_path):
    """A `model` of raw bytes ED A0 80 (a lone surrogate json.loads decodes) and a streamed request with
    stream_options and a `"\\ud800"` prompt made the router raise UnicodeEncodeError in the parser callback:
    the connection was dropped without an answer (and a traceback logged per request)."""
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]})) as (svc, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post(b'{"model":"\xed\xa0\x80","prompt":"p"}', b"Connection: close\r\n"))
        out = await read_all(reader)
        writer.close()
        assert out.startswith(b"HTTP/1.1 404 ") and b"model_not_found" in out, out[:300]
        body = b'{"model":"chat","prompt":"\\ud800","stream":true,"stream_options":{"include_usage":false}}'
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post(body, b"Connection: close\r\n"))
        out = await read_all(reader)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 "), out[:300]
        sent = json.loads(stub.received[-1][1])
        assert sent["prompt"] == "\ud800" and sent["stream_options"]["include_usage"] is True
