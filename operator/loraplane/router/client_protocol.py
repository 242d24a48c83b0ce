"""The router's server side of HTTP/1.1: clients' keep-alive connections, parsed with httptools (llhttp, the
parser uvicorn uses), answered in order.

The parser's callbacks fill one `Request` per message: the few headers the router reads (Authorization, the
route's sticky header, X-Request-Id, Expect, Content-Length) and the body, size-limited to the route's
`router.maxRequestBytes` while it arrives. A complete request goes to `router.dispatch(conn, req)`; whoever
answers it calls `respond`/`respond_error`, or writes the answer itself and then calls `done`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from http import HTTPStatus
from typing import TYPE_CHECKING

import httptools

from loraplane.router.metrics import NO_BACKEND

if TYPE_CHECKING:
    from loraplane.router.exchange import Exchange
    from loraplane.router.server import Router

JSON = b"application/json"
STATUS_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}  # 404 -> b"Not Found"
MAX_HEADER_BYTES = 64 * 1024  # names + values of one request's headers; over it: 400, connection closed
MAX_PIPELINED = 8  # requests parsed ahead of the one being answered before the router stops reading


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None, **extra) -> bytes:
    """The OpenAI API's error object as a JSON body: `{"error": {"message", "type", "param", "code", **extra}}`."""
    err = {"message": message, "type": type_, "param": param, "code": code, **extra}
    return json.dumps({"error": err}, separators=(",", ":")).encode()


class Request:
    """One parsed client request (the parser's callbacks fill it).

    `method` and `path` (without the query) are bytes; `authorization`, `sticky` (the route's sticky header),
    `request_id` (X-Request-Id) and `expect` (lower-cased) are raw header values or None; `body` is the list of
    received chunks (None once the body went over the limit: `too_large`), `size` its length in bytes;
    `started` is time.perf_counter() at the first byte, what latency and TTFT are measured from.
    """

    __slots__ = ("method", "path", "authorization", "sticky", "request_id", "expect", "content_length",
                 "body", "size", "too_large", "keep_alive", "started")

    def __init__(self):
        self.authorization = self.sticky = self.request_id = self.expect = None
        self.content_length = None
        self.body: list[bytes] | None = []
        self.size = 0
        self.too_large = False
        self.keep_alive = True
        self.started = time.perf_counter()


class ClientConnection(asyncio.Protocol):
    """One client's keep-alive connection. Requests are answered in order, one at a time; pipelined ones wait
    in `pending` (over MAX_PIPELINED the router stops reading from the client).

    Reads from `router`: `connections` (it registers itself there), `sticky_header_lower`,
    `max_request_bytes`, `metrics`, and `dispatch(conn, req)`, which answers a complete request.
    `exchange` is the proxied exchange in progress, if any: told when the client leaves, and the connection
    to vLLM whose reading pauses while the client reads slower than vLLM streams (transport flow control).
    """

    def __init__(self, router: Router):
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req: Request | None = None
        self.pending: list[Request] = []
        self.exchange: Exchange | None = None
        self.busy = False
        self.closing = False
        self.paused_upstream: asyncio.Transport | None = None
        self.header_bytes = 0
        self.url = b""

    # ---- transport events ----

    def connection_made(self, transport):
        """asyncio callback: keep the transport, set TCP_NODELAY (streamed tokens go out at once) and
        register with the router."""
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.router.connections.add(self)

    def connection_lost(self, exc):
        """asyncio callback: unregister and tell the exchange in progress that its client left."""
        self.router.connections.discard(self)
        self.transport = None
        if self.exchange is not None:
            self.exchange.client_lost()

    def data_received(self, data):
        """asyncio callback: feed the bytes to the parser; a malformed request or an upgrade is answered
        400 (or, mid-response, the connection closed)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.respond_error(400, "protocol upgrades are not supported", "invalid_request_error", close=True)
        except httptools.HttpParserError as exc:
            if self.transport is not None and not self.busy:
                self.respond_error(400, f"malformed HTTP request: {exc}", "invalid_request_error", close=True)
            elif self.transport is not None:
                self.transport.close()

    def pause_writing(self):
        """asyncio flow control: the client's send buffer is full; pause reading from the replica."""
        # The client reads slower than the replica streams: stop reading from the replica.
        ex = self.exchange
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            self.paused_upstream = ex.upstream.transport
            self.paused_upstream.pause_reading()

    def resume_writing(self):
        """asyncio flow control: the client drained its buffer; resume reading from the replica."""
        if self.paused_upstream is not None:
            try:
                self.paused_upstream.resume_reading()
            except Exception:  # that connection has closed meanwhile: nothing to resume
                pass
            self.paused_upstream = None

    # ---- parser callbacks ----

    def on_message_begin(self):
        """httptools callback: a new request starts."""
        self.req = Request()
        self.url = b""
        self.header_bytes = 0

    def on_url(self, url: bytes):
        """httptools callback: a piece of the request target (it may arrive in several)."""
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        """httptools callback: keep the headers the router reads; raises HttpParserError past MAX_HEADER_BYTES."""
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError("headers too large")
        n = name.lower()
        req = self.req
        if n == b"authorization":
            req.authorization = value
        elif n == b"content-length":
            req.content_length = int(value) if value.isdigit() else None
        elif n == b"x-request-id":
            req.request_id = value
        elif n == b"expect":
            req.expect = value.lower()
        elif n == self.router.sticky_header_lower:
            req.sticky = value

    def on_headers_complete(self):
        """httptools callback: method, path and keep-alive are known; a Content-Length over
        max_request_bytes marks the request too large, and `Expect: 100-continue` is answered (413 or 100)."""
        req = self.req
        req.method = self.parser.get_method()
        q = self.url.find(b"?")
        req.path = self.url if q < 0 else self.url[:q]
        req.keep_alive = self.parser.should_keep_alive()
        limit = self.router.max_request_bytes
        if req.content_length is not None and req.content_length > limit:
            req.too_large, req.body = True, None
        if req.expect == b"100-continue" and not self.busy:
            if req.too_large:  # refuse before the client sends the body
                self.router.metrics.count_refused(NO_BACKEND, 413)
                self.busy = True
                self.respond_error(413, f"request body over {limit} bytes (the route's router.maxRequestBytes)",
                                   "invalid_request_error", "request_too_large", close=True)
            else:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes):
        """httptools callback: collect a body chunk until max_request_bytes is exceeded (then too_large)."""
        req = self.req
        if req.too_large:
            return
        req.size += len(body)
        if req.size > self.router.max_request_bytes:
            req.too_large, req.body = True, None
        else:
            req.body.append(body)

    def on_message_complete(self):
        """httptools callback: dispatch the request, or queue it behind the one being answered (reading
        pauses past MAX_PIPELINED queued)."""
        req, self.req = self.req, None
        if self.busy:
            self.pending.append(req)
            if len(self.pending) > MAX_PIPELINED:  # a client pipelining without reading: stop reading from it
                self.transport.pause_reading()
            return
        self.busy = True
        self.router.dispatch(self, req)

    # ---- answering ----

    def done(self, keep_alive: bool) -> None:
        """The current response is complete: close, or go on with the next pipelined request."""
        self.exchange = None
        self.busy = False
        if self.transport is None:
            return
        if not keep_alive or self.closing:
            self.transport.close()
            return
        if self.pending:
            req = self.pending.pop(0)
            if len(self.pending) <= MAX_PIPELINED:
                self.transport.resume_reading()
            self.busy = True
            self.router.dispatch(self, req)

    def respond(self, status: int, body: bytes, content_type: bytes = JSON, extra: bytes = b"",
                keep_alive: bool = True) -> None:
        """Answer the current request with a complete response: `extra` is more header lines (each ending in
        CRLF); without `keep_alive` the answer says `Connection: close` and the connection closes after it."""
        t = self.transport
        if t is not None:
            t.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
                status, STATUS_PHRASES.get(status, b"Unknown"), content_type, len(body), extra,
                b"" if keep_alive else b"Connection: close\r\n", body))
        self.done(keep_alive)

    def respond_error(self, status: int, message: str, type_: str, code: str | None = None,
                      param: str | None = None, extra: bytes = b"", close: bool = False, **fields) -> None:
        """Answer with an OpenAI API error object (see `error_body`; `fields` go into it too)."""
        self.respond(status, error_body(message, type_, code, param, **fields), extra=extra,
                     keep_alive=not close)
