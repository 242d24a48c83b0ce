"""What a client without an API key can make the router spend (issue 12, item 2): every phase of reading
a request is bounded in size and time, the key is checked before the body is read, connections are capped,
and a normal client is served meanwhile. Loopback only, a handful of connections, sub-second timeouts.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from support.router_running import keys_dir, running_router, table_json

pytestmark = pytest.mark.timeout(60)

KEY = "key-one"
# Short limits so the test runs in seconds; the sweep checks deadlines every timeout/4 here.
LIMITS = dict(header_timeout=0.6, body_timeout=0.6, idle_timeout=0.6, max_header_bytes=4096)
SLACK = 2.0  # a cut-off may come this much after its timeout on a busy machine (sweep interval + scheduling)


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, float]:
    """Everything the router sends until it ends the connection, and how long that took."""
    t0 = time.monotonic()
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            data += chunk
    except ConnectionError:  # reset (or the client's own send failed) after the router closed
        pass
    return data, time.monotonic() - t0


async def test_api_key_is_checked_before_the_body_is_read(stub, tmp_path):
    """401 as soon as the headers are complete, with or without Expect: 100-continue; the body (announced,
    never sent) is not waited for, and the connection ends."""
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}),
                              api_keys=keys_dir(tmp_path, KEY)) as (svc, _):
        for extra in (b"", b"Expect: 100-continue\r\n", b"Authorization: Bearer wrong\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 3000000\r\n" + extra + b"\r\n")
            out, _ = await read_answer(reader, 5)  # old router: waits for 3 MB that never come
            writer.close()
            assert out.startswith(b"HTTP/1.1 401 "), out
            assert b"100 Continue" not in out and b"Connection: close" in out
            assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "invalid_api_key"
        # A refused client still sending its body is not buffered: the router answers, then drops and closes.
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n")
        try:
            for _ in range(64):
                writer.write(b"x" * 65536)
                await asyncio.wait_for(writer.drain(), 5)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        out, _ = await read_answer(reader, 10)
        writer.close()
        assert out.startswith(b"HTTP/1.1 401 ") or out == b""  # answered, or reset while still sending
        # With the key, the same route works.
        body = b'{"model":"chat","prompt":"p"}'
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (KEY.encode(), len(body), body))
        out, _ = await read_answer(reader, 5)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 "), out
        assert len(stub.received) == 1


async def test_slow_huge_and_idle_clients_are_cut_off_while_a_normal_client_is_served(stub, tmp_path):
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}),
                              api_keys=keys_dir(tmp_path, KEY), **LIMITS) as (svc, client):
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                b"\r\nContent-Length: 1000\r\n\r\n")

        async def trickle(first: bytes, drip: bytes):
            """Send `first`, then one byte of `drip` every 0.1 s until the router ends the connection."""
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(first)
            t0 = time.monotonic()

            async def drip_bytes():
                try:
                    for i in range(len(drip)):
                        await asyncio.sleep(0.1)
                        writer.write(drip[i:i + 1])
                        await writer.drain()
                except ConnectionError:
                    pass

            dripping = asyncio.create_task(drip_bytes())
            out, _ = await read_answer(reader, 15)
            dripping.cancel()
            writer.close()
            return out, time.monotonic() - t0

        async def idle(first: bytes = b""):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(first)
            t0 = time.monotonic()
            out, _ = await read_answer(reader, 15)
            writer.close()
            return out, time.monotonic() - t0

        async def huge_header():
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
            t0 = time.monotonic()
            try:
                for _ in range(16):  # up to 1 MiB of one header value, never ended
                    writer.write(b"a" * 65536)
                    await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, asyncio.TimeoutError):
                pass
            out, _ = await read_answer(reader, 15)
            writer.close()
            return out, time.monotonic() - t0

        async def normal_client():
            """Requests one after another while the others are being cut off: every one is answered 200."""
            statuses = []
            t_end = time.monotonic() + LIMITS["idle_timeout"] + 1.0
            while time.monotonic() < t_end:
                async with client.post("/v1/completions", json={"model": "chat", "prompt": "p"},
                                       headers={"Authorization": f"Bearer {KEY}"}) as resp:
                    statuses.append(resp.status)
                await asyncio.sleep(0.05)
            return statuses

        one = (b'{"model":"chat","prompt":"p"}', )
        keep_alive_request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (KEY.encode(), len(one[0]), one[0]))
        (slow_head, t_head), (slow_body, t_body), (idle_out, t_idle), (after, t_after), (huge, _), statuses = \
            await asyncio.gather(
                trickle(b"POST /v1/completions HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200),  # slowloris
                trickle(head, b"b" * 200),                                                 # slow body
                idle(),                                                 # connects, never sends a byte
                idle(keep_alive_request),                               # one request, then idles
                huge_header(),
                normal_client())

        t_head_max = LIMITS["header_timeout"] + SLACK
        assert slow_head.startswith(b"HTTP/1.1 408 ") and b"--header-timeout" in slow_head, slow_head
        assert LIMITS["header_timeout"] - 0.1 <= t_head <= t_head_max, t_head
        assert slow_body.startswith(b"HTTP/1.1 408 ") and b"--body-timeout" in slow_body, slow_body
        assert LIMITS["body_timeout"] - 0.1 <= t_body <= LIMITS["body_timeout"] + SLACK, t_body
        assert idle_out == b"" and LIMITS["idle_timeout"] - 0.1 <= t_idle <= LIMITS["idle_timeout"] + SLACK
        assert after.startswith(b"HTTP/1.1 200 ") and after.count(b"HTTP/1.1 ") == 1, after  # then closed
        assert t_after <= LIMITS["idle_timeout"] + SLACK, t_after
        assert huge.startswith(b"HTTP/1.1 431 ") or huge == b"", huge[:200]  # answered, or reset mid-send
        assert statuses and set(statuses) == {200}, statuses
        # Nothing is left open but the normal client's connection.
        assert len(svc.router.connections) <= 1


async def test_header_size_is_capped_while_it_arrives(stub, tmp_path):
    """A request line plus headers over max_header_bytes is refused with 431 before it ends, and one just
    under it (with a body, pipelined behind another request in the same packet) is served."""
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}),
                              max_header_bytes=4096) as (svc, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000)  # no end of headers
        out, _ = await read_answer(reader, 5)  # old router: waits for the end of the header forever
        writer.close()
        assert out.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in out, out
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"GET /" + b"u" * 5000 + b" HTTP/1.1\r\n")  # an endless request line
        out, _ = await read_answer(reader, 5)
        writer.close()
        assert out.startswith(b"HTTP/1.1 431 "), out
        body = b'{"model":"chat","prompt":"' + b"p" * 20000 + b'"}'
        ok = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 3500 +
              b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(ok * 3 + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        out, _ = await read_answer(reader, 10)
        writer.close()
        assert out.count(b"HTTP/1.1 200 ") == 4, out[:300]


async def test_chunked_body_over_the_limit_is_refused_without_reading_the_rest(stub, tmp_path):
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]},
                                                                max_request_bytes=2048)) as (svc, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"1000\r\n" + b"x" * 4096 + b"\r\n")  # over the limit, and the body never ends
        out, _ = await read_answer(reader, 5)  # old router: waits for the end of the body
        writer.close()
        assert out.startswith(b"HTTP/1.1 413 ") and b"request_too_large" in out, out
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")  # no body
        out, _ = await read_answer(reader, 5)
        writer.close()
        assert out.startswith(b"HTTP/1.1 413 "), out
        assert stub.received == []


async def test_connections_are_capped(stub, tmp_path):
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}),
                              max_connections=3) as (svc, _):
        held = [await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        out, _ = await read_answer(reader, 5)  # old router: accepts and waits
        writer.close()
        assert out.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in out, out
        assert svc.router.refused_connections == 1
        held.pop()[1].close()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        out, _ = await read_answer(reader, 5)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 "), out
        for _, w in held:
            w.close()


async def test_duplicate_model_keys_are_refused_before_anything_reaches_vllm(stub, tmp_path):
    """Issue 12 item 8 over HTTP: routed as `chat` while vLLM would serve `v1` directly."""
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]})) as (_, client):
        body = b'{"model": "chat", "mod\\u0065l": "v1", "prompt": "p"}'
        async with client.post("/v1/completions", data=body,
                               headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            err = (await resp.json())["error"]
        assert err["param"] == "model" and "more than once" not in err["message"]
        assert "appears 2 times" in err["message"]
        assert stub.received == []


async def test_request_ids_and_sticky_values_from_clients_are_bounded(stub, tmp_path):
    """Router input that is kept or passed on: an X-Request-Id over 256 bytes is refused (vLLM logs it),
    and a long sticky header value is routed but not cached (the cache's keys are client-chosen)."""
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}, sticky_header="X-User")) \
            as (svc, client):
        req = {"model": "chat", "prompt": "p"}
        async with client.post("/v1/completions", json=req, headers={"X-Request-Id": "r" * 257}) as resp:
            assert resp.status == 400
            err = (await resp.json())["error"]
        assert err["param"] == "X-Request-Id" and err["code"] == "invalid_request_id"
        async with client.post("/v1/completions", json=req, headers={"X-Request-Id": "r" * 256,
                                                                      "X-User": "u" * 4000}) as resp:
            assert resp.status == 200
        assert stub.received[-1][2]["X-Request-Id"] == "r" * 256
        route = svc.router.table.models["chat"]
        assert route._sticky == {}  # routed, not cached
        async with client.post("/v1/completions", json=req, headers={"X-User": "u1"}) as resp:
            assert resp.status == 200
        assert list(route._sticky) == [b"u1"]


@pytest.mark.parametrize("path", [b"/healthz", b"/metrics", b"/nope", b"/v1/models"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_on_a_path_that_takes_none_is_refused_unread(stub, tmp_path, path, framing):
    """Issue 12 review: the key was checked before the body only on the keyed paths; on an open path (/healthz,
    /metrics, an unknown one) a client without a key could make the router read and buffer a body of up to
    maxRequestBytes on each of max_connections connections (4 MiB x 4096 by default). Only the two inference
    paths take a body now: elsewhere it is refused (400) before it is read, announced or chunked."""
    async with running_router(tmp_path, [stub.spec], table_json({"chat": [("v1", 100)]}),
                              api_keys=keys_dir(tmp_path, KEY), **LIMITS) as (svc, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        auth = f"Authorization: Bearer {KEY}\r\n".encode() if path == b"/v1/models" else b""
        if framing == "length":   # announced, never sent: the answer must not wait for it
            writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 3000000\r\n\r\n")
        else:                     # chunked: the first chunk is refused
            writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + auth
                         + b"Transfer-Encoding: chunked\r\n\r\n10000\r\n" + b"x" * 0x10000 + b"\r\n")
        await writer.drain()
        data, took = await read_answer(reader, LIMITS["body_timeout"] * 0.5 + SLACK)
        writer.close()
        assert data.startswith(b"HTTP/1.1 400 "), data[:200]
        assert b"takes no request body" in data and took < LIMITS["body_timeout"]
