"""Hostile HTTP from clients, over real sockets (the router parses HTTP/1.1 itself, client_protocol.py): answers
that stay in step with the requests, client strings that crashed an encode, trailer sections, and clients that
pipeline requests without reading the answers. Loopback only; each test a few seconds at most."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket

import pytest

from support.router_running import keys_dir, running_router, table_json, wait_for

pytestmark = pytest.mark.timeout(60)
KEY = "key-one"


async def read_all(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    """What the router sends until it closes the connection (or `timeout` seconds pass without a byte)."""
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            out += chunk
    except (asyncio.TimeoutError, ConnectionError):
        pass
    return out

async def read_slowly(sock: socket.socket, first_pause: bool = False) -> bytes:
    """Read what the router sends on non-blocking `sock` as a slow client does: up to 512 KiB, then a pause of
    0.3 s (before the first read too with `first_pause`), until the last answer ends in `ok` (the /healthz body),
    a round gets nothing, or 60 rounds passed."""
    loop = asyncio.get_running_loop()
    out = b""
    for _ in range(60):
        if first_pause:
            await asyncio.sleep(0.3)
        got = 0
        try:
            while got < 512 * 1024:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 512 * 1024 - got), 0.05)
                if not chunk:
                    break
                out += chunk
                got += len(chunk)
        except asyncio.TimeoutError:
            pass
        if out.endswith(b"\r\n\r\nok") or not got:
            break
        if not first_pause:
            await asyncio.sleep(0.3)
    return out

async def slow_client(port: int) -> socket.socket:
    """A non-blocking socket connected to the router on `port`, with a 4 KiB receive buffer: a client that reads
    slowly (or not at all) fills it, and the router's send buffer, at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock




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
                              api_keys=keys_dir(tmp_path, KEY)) as (svc, _):
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


# ---- trailer sections of chunked bodies ----

async def test_a_trailer_section_is_bounded_like_headers(stub, tmp_path):
    """After the last chunk of a chunked body come trailer fields, which httptools accumulates like a header. The
    router counted only the request line and headers against --max-header-bytes: a client without a key sent
    `POST /healthz` chunked, `0`, then one endless trailer value, and httptools' copying of the growing value
    froze the event loop (every client of the router) and grew its memory without bound. Now the trailer section
    is counted as a head is: 431 within about one allowance."""
    limit = 4096
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}),
                              max_header_bytes=limit) as (svc, client):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Big: ")
        try:   # 512 KiB, 128 allowances (the old router kept it all, waiting for more); within what a refused
            for _ in range(8):   # connection still reads and drops (client_protocol.LINGER_BYTES)
                writer.write(b"a" * 65536)
                await asyncio.wait_for(writer.drain(), 5)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        out = await read_all(reader)
        writer.close()
        assert out.startswith(b"HTTP/1.1 431 ") and b"trailer section over 4096 bytes" in out, out[:300]
        async with client.get("/healthz") as resp:   # and the router serves others
            assert resp.status == 200


async def test_trailer_fields_are_not_taken_for_headers(stub, tmp_path):
    """A trailer field arrives after `admit` checked the headers: an X-Request-Id there (any length up to the
    header limit) replaced the checked one and went to vLLM. Trailer fields are ignored (RFC 9110 section 6.5.1);
    a chunked body with trailers, and one of many small chunks read at once, are served as before."""
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}),
                              max_header_bytes=4096) as (svc, _):
        body = b'{"model":"chat","prompt":"p"}'
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Request-Id: ok\r\n"
                     b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\nX-Request-Id: %s\r\n\r\n" % (len(body), body, b"r" * 3000))
        out = await read_all(reader)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 "), out[:300]
        assert stub.received[-1][2]["X-Request-Id"] == "ok"
        # 20 KB of 5-byte chunks in one write (many chunk-size lines, each followed by data): not a trailer.
        prompt = b"x" * 20000
        body = b'{"model":"chat","prompt":"' + prompt + b'"}'
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 5]), body[i:i + 5]) for i in range(0, len(body), 5))
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     + chunks + b"0\r\nX-Note: t\r\n\r\n")
        out = await read_all(reader)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 "), out[:300]
        assert json.loads(stub.received[-1][1])["prompt"] == prompt.decode()


# ---- clients that pipeline requests without reading the answers ----

async def test_a_client_that_does_not_read_its_answers_cannot_make_the_router_buffer_them(stub, tmp_path):
    """The router kept reading requests while the client's send buffer was full: a client pipelining requests
    with small requests and large answers (`GET /metrics`, open to all, 35 bytes answered with ~9 KB; here
    `GET /v1/models` of a route without API keys, ~40 KB) and reading nothing made it buffer every answer (a probe:
    10 MB of /metrics requests sent, 1.6 GB buffered). Now it stops reading requests while the client does not read
    (asyncio's pause_writing) and answers nothing more until it does, then every request in order."""
    n = 250   # ~10 MB of answers (the kernel's socket buffers take ~4 MB), fewer than client_protocol.MAX_QUEUED
    loop = asyncio.get_running_loop()
    table = table_json({f"model-{i:04d}": [("v1", 100)] for i in range(400)})
    async with running_router(tmp_path, [stub.spec], table) as (svc, _):
        with await slow_client(svc.port) as sock:
            await wait_for(lambda: len(svc.router.connections) == 1)
            (conn,) = svc.router.connections
            await loop.sock_sendall(sock, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" * n
                                    + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await asyncio.sleep(0.5)   # the old router answered all of it into its buffer meanwhile
            buffered = conn.transport.get_write_buffer_size()
            assert buffered < 512 * 1024, buffered
            out = []   # now read: everything is answered, in order
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10):
                out.append(chunk)
        out = b"".join(out)
        assert out.count(b"HTTP/1.1 200 OK\r\n") == n + 1 and out.endswith(b"\r\n\r\nok"), (len(out), out[-200:])


async def test_hundreds_of_pipelined_requests_answered_at_once_are_answered_in_a_loop(stub, tmp_path):
    """Requests queued behind a proxied one and answered at once (404s here) were dispatched recursively, one
    stack level per request (done -> dispatch -> respond_error -> respond -> done): 250 of them passed Python's
    recursion limit when the proxied answer completed, and the connection hung with the rest unanswered."""
    stub.hold = asyncio.Event()
    n = 250
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]})) as (svc, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post(b'{"model":"chat","prompt":"p"}') + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" * n
                     + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await wait_for(lambda: len(stub.received) == 1)
        await asyncio.sleep(0.2)   # all of it read and queued
        stub.hold.set()
        out = await read_all(reader)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 ") and out.count(b"HTTP/1.1 404 ") == n and out.endswith(b"ok"), \
            (out.count(b"HTTP/1.1 "), out[-200:])


async def test_a_client_pipelining_hundreds_of_requests_in_one_write_is_closed_after_the_answer_in_progress(
        stub, tmp_path):
    """One read (up to 256 KiB) can hold thousands of tiny requests, all kept (about 300 bytes each) behind an
    answer in progress. Past client_protocol.MAX_QUEUED the connection is closed after that answer, and nothing
    more is read or kept."""
    from loraplane.router import client_protocol
    MAX_QUEUED = getattr(client_protocol, "MAX_QUEUED", 256)   # (the router before it kept them all)
    stub.hold = asyncio.Event()
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]})) as (svc, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post(b'{"model":"chat","prompt":"p"}') + b"GET /healthz HTTP/1.1\r\n\r\n" * (MAX_QUEUED + 50))
        await wait_for(lambda: len(svc.router.connections) == 1)
        (conn,) = svc.router.connections
        await wait_for(lambda: conn.closing)
        assert len(conn.pending) == MAX_QUEUED + 1
        stub.hold.set()
        out = await read_all(reader)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 ") and out.count(b"HTTP/1.1 ") == 1, out[:300]


async def test_clients_that_never_read_do_not_hold_their_connections_for_ever(stub, tmp_path):
    """A connection whose client reads nothing was exempt from every timeout: stalled behind its unread
    answers, or idle with them still buffered (asyncio's close() waits for them to be sent). A few such
    clients without a key held --max-connections for ever, and every other client was answered 503. A client
    that reads nothing of what was sent to it for --idle-timeout seconds is now disconnected."""
    loop = asyncio.get_running_loop()
    table = table_json({f"model-{i:04d}": [("v1", 100)] for i in range(400)})   # /v1/models: ~40 KB
    async with running_router(tmp_path, [stub.spec], table, max_connections=3,
                              header_timeout=0.6, body_timeout=0.6, idle_timeout=0.6) as (svc, _):
        socks = []
        for _ in range(3):
            sock = await slow_client(svc.port)
            await loop.sock_sendall(sock, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
            socks.append(sock)
        await wait_for(lambda: len(svc.router.connections) == 3)
        await asyncio.sleep(0.6 + 2.0)   # the idle timeout and the sweep's slack
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            out = await read_all(reader)
            writer.close()
        finally:
            for sock in socks:
                sock.close()
        assert out.startswith(b"HTTP/1.1 200 "), out[:200]


async def test_a_slow_reader_of_its_answers_is_not_cut_off(stub, tmp_path):
    """The other side of the test above: a client that takes longer than --idle-timeout to read one answer, but
    reads, keeps its connection until everything is answered."""
    loop = asyncio.get_running_loop()
    table = table_json({f"model-{i:05d}": [("v1", 100)] for i in range(60000)})   # /v1/models: ~6 MB (more than
    # the kernel's socket buffers take)
    async with running_router(tmp_path, [stub.spec], table, header_timeout=0.6, body_timeout=0.6,
                              idle_timeout=0.6) as (svc, _):
        with await slow_client(svc.port) as sock:
            await loop.sock_sendall(sock, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            # up to 512 KiB every 0.3 s: ~3.5 s for the answer, the idle timeout is 0.6 s
            out = await read_slowly(sock, first_pause=True)
        assert out.count(b"HTTP/1.1 200 OK\r\n") == 2 and out.endswith(b"ok"), (len(out), out[-100:])


async def test_a_pipelined_request_behind_unread_answers_is_not_refused_for_the_time_the_router_did_not_read(
        stub, tmp_path):
    """Attack round 3: while its client does not read (pause_writing) the router stops reading from it. A
    pipelining client whose next request's head was cut by that pause had the rest of it sent, but unread by the
    router, while the header deadline ran: 408 and the connection closed, though the client sent in time and read
    its answers (slowly). While the router does not read, the client is judged by whether it reads, as a stalled
    connection is (timed_out), and the request is answered once it does."""
    loop = asyncio.get_running_loop()
    table = table_json({f"model-{i:05d}": [("v1", 100)] for i in range(60000)})   # /v1/models: ~6 MB
    async with running_router(tmp_path, [stub.spec], table, header_timeout=0.6, body_timeout=0.6,
                              idle_timeout=0.6) as (svc, _):
        with await slow_client(svc.port) as sock:
            await wait_for(lambda: len(svc.router.connections) == 1)
            (conn,) = svc.router.connections
            await loop.sock_sendall(sock, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
            await wait_for(lambda: conn.writing_paused)
            await loop.sock_sendall(sock, b"st: x\r\nConnection: close\r\n\r\n")   # sent; the router reads no more
            await asyncio.sleep(1.0)   # past the header timeout (0.6 s and the sweep's slack), reading nothing
            out = await read_slowly(sock)   # then reading: up to 512 KiB every 0.3 s
        assert out.count(b"HTTP/1.1 200 OK\r\n") == 2 and out.endswith(b"ok"), (len(out), out[-200:])


async def test_a_stream_cut_while_its_client_does_not_read_does_not_hold_the_connection(stub, tmp_path):
    """Attack round 3: a stream that ends cut (router.timeoutSeconds passed, or vLLM closed mid-stream) closed the
    client's transport but left the connection busy with its finished exchange: exempt from every read deadline,
    and close() waits to send what is buffered to a client that reads nothing. Such clients held
    --max-connections for ever. The cut stream now ends the answer (`done`), and the connection is judged as
    any other whose client does not read."""
    stub.big_stream = 400   # 25 MB of events: more than the socket buffers take
    loop = asyncio.get_running_loop()
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}), header_timeout=0.6,
                              body_timeout=0.6, idle_timeout=0.6) as (svc, _):
        svc.router.timeout_seconds = 1.0
        with await slow_client(svc.port) as sock:
            await loop.sock_sendall(sock, post(b'{"model":"chat","prompt":"p","stream":true}'))
            await wait_for(lambda: len(svc.router.connections) == 1)
            (conn,) = svc.router.connections
            await wait_for(lambda: conn.writing_paused)
            # the timeout (1 s), then the idle deadline twice (0.6 s each) and the sweep's slack
            await wait_for(lambda: not svc.router.connections, timeout=6)
