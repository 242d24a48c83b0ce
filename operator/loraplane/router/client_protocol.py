"""The router's server side of HTTP/1.1: clients' keep-alive connections, parsed with httptools (llhttp, the
parser uvicorn uses), answered in order.

The parser's callbacks fill one `Request` per message: the few headers the router reads (Authorization, the
route's sticky header, X-Request-Id, Expect, Content-Length) and the body, size-limited to the route's
`router.maxRequestBytes` while it arrives. When the headers are complete, `router.admit(conn, req)` may
refuse the request (no API key, body announced too large) before a byte of its body is read. A complete
request goes to `router.dispatch(conn, req)`; whoever answers it calls `respond`/`respond_error`, or
writes the answer itself and then calls `done`.

Every phase of reading a request is bounded, so a client without a key cannot hold the router's memory or
connections (issue: slow-header, slow-body, huge-header and idle clients):
- size: the request line and headers together at most `router.max_header_bytes`, counted on the raw bytes
  as they arrive (httptools would otherwise accumulate one endless header value), and so is a chunked body's
  trailer section; the body at most `router.max_request_bytes`;
- time: each connection is in one read phase (IDLE between requests, HEAD, BODY, TRAILER, LINGER after a
  refusal) with a deadline that `Router.sweep` checks about once a second (the hot path only stores the phase);
- count: at most `router.max_connections` client connections; more are answered 503 and closed;
- answers not read: while the client's send buffer is full (asyncio's pause_writing: the client reads slower
  than the router answers), the router reads no more requests from it and answers none of those it already
  read (`stalled`), so a client pipelining requests without reading cannot make it buffer their answers (one
  `GET /metrics` line is answered with kilobytes); at most MAX_QUEUED requests are kept unanswered.
A refusal before the request was read whole answers, half-closes (FIN after the answer) and then discards,
never buffers, what the client still sends, for at most LINGER_SECONDS / LINGER_BYTES: closing at once
would make the kernel reset the connection and the client could lose the answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from http import HTTPStatus
from typing import TYPE_CHECKING

import httptools

from loraplane.api.orchestration import FORWARD_HOPS_HEADER
from loraplane.router.metrics import NO_BACKEND

if TYPE_CHECKING:
    from loraplane.router.exchange import Exchange
    from loraplane.router.server import Router

JSON = b"application/json"
STATUS_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}  # 404 -> b"Not Found"
_HOPS_LOWER = FORWARD_HOPS_HEADER.lower().encode()
MAX_PIPELINED = 8  # requests parsed ahead of the one being answered before the router stops reading
# ... and the most kept: reading stops past MAX_PIPELINED, but one read (up to 256 KiB) can hold thousands of tiny
# requests; past this many the connection is closed after the answer in progress (HTTP/1.1 pipelining is rare:
# browsers never, curl and the Python clients no longer do it).
MAX_QUEUED = 256
# After a refusal mid-request: how long and how much of what the client still sends is read and dropped
# (so the client can finish sending and read the answer) before the connection is closed.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
# Read phases (ClientConnection.phase); Router.sweep applies each one's timeout. TRAILER: after a chunk-size line,
# until its data begins (on_body) or the message ends: the trailer section after the last (0) chunk, whose bytes
# count against max_header_bytes as a head's do, within the body's deadline.
IDLE, HEAD, BODY, LINGER, TRAILER = 0, 1, 2, 3, 4


class _Stop(Exception):
    """Raised in a parser callback after the request was refused: stops httptools from parsing further."""


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None, **extra) -> bytes:
    """The OpenAI API's error object as a JSON body: `{"error": {"message", "type", "param", "code", **extra}}`."""
    err = {"message": message, "type": type_, "param": param, "code": code, **extra}
    return json.dumps({"error": err}, separators=(",", ":")).encode()


_TOO_MANY = error_body("the router has too many client connections; retry", "service_unavailable",
                       "too_many_connections")


class Request:
    """One parsed client request (the parser's callbacks fill it).

    `method` and `path` (without the query) are bytes; `authorization`, `sticky` (the route's sticky header),
    `request_id` (X-Request-Id) and `expect` (lower-cased) are raw header values or None; `body` is the list of
    received chunks, `size` its length in bytes (a body over the limit is refused, never kept);
    `started` is time.perf_counter() at the first byte, what latency and TTFT are measured from.
    `routed`: the response header lines of a content-routing decision (b"" for a request naming a public model;
    see dispatch.route_by_content), put on whatever answers it. `rule_headers` (lower-cased name -> value) holds
    the headers content rules read, and is set only when one arrives (`router.rule_headers`). `fallback` (set
    only on a content-routed request sent to an external destination: dispatch.send_decided) re-sends it to its
    content model's default when that route is unavailable before any byte reached the client (exchange.py).
    """

    __slots__ = ("method", "path", "authorization", "sticky", "request_id", "expect", "content_length",
                 "body", "size", "keep_alive", "started", "body_limit", "routed", "rule_headers", "hops",
                 "fallback")

    def __init__(self):
        self.authorization = self.sticky = self.request_id = self.expect = None
        self.content_length = None
        self.body: list[bytes] = []
        self.size = 0
        self.keep_alive = True
        self.started = time.perf_counter()
        # Bytes of body this request may have (set by `router.admit`: max_request_bytes on the paths that take
        # a body, 0 elsewhere); over it the request is refused as soon as a byte too many arrives.
        self.body_limit = 0
        self.routed = b""
        # FORWARD_HOPS_HEADER: how many routers forwarded it here already (router/forward.py); 0 from a client.
        self.hops = 0


class ClientConnection(asyncio.Protocol):
    """One client's keep-alive connection. Requests are answered in order, one at a time; pipelined ones wait
    in `pending` (over MAX_PIPELINED the router stops reading from the client, over MAX_QUEUED it closes the
    connection after the answer in progress), and while the client does not read what was sent (`writing_paused`)
    the router reads none and answers none (`stalled`).

    Reads from `router`: `connections` (it registers itself there), `max_connections`, `max_header_bytes`,
    `sticky_header_lower` and `watched_headers` (it and the headers content rules read), `max_request_bytes`,
    `metrics`, `admit(conn, req)`, which may refuse a request
    once its headers are complete, and `dispatch(conn, req)`, which answers a complete request.
    `phase` (IDLE, HEAD, BODY, TRAILER, LINGER) and `deadline` (time.perf_counter() seconds; 0.0: not armed yet) are
    the read phase and its deadline, armed and enforced by `Router.sweep`; `refused` is set once the
    connection answered a refusal and only drops what else arrives.
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
        self.head_bytes = 0  # raw bytes of the request line and headers received so far
        self.heads = 0  # headers completed on this connection (tells _feed_capped where a head ended)
        self.url = b""
        self.phase = IDLE
        self.deadline = 0.0
        self.refused = False
        self.dropped = 0  # bytes discarded while lingering
        self.head_only = False  # the answer `respond` writes next is to a HEAD request: its head only
        self.writing_paused = False  # between asyncio's pause_writing and resume_writing
        self.stalled = False  # an answer is complete but the next waits for resume_writing (see `done`)
        self.answering = False  # _answer_queued is dispatching queued requests
        self.unsent = 0  # answer bytes not yet sent when an idle timeout last looked (timed_out)

    # ---- transport events ----

    def connection_made(self, transport):
        """asyncio callback: keep the transport, set TCP_NODELAY (streamed tokens go out at once) and
        register with the router; over `router.max_connections` answer 503 and close instead."""
        self.transport = transport
        router = self.router
        if len(router.connections) >= router.max_connections:
            self.refused = True
            router.connection_refused()
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (
                                len(_TOO_MANY), _TOO_MANY))
            transport.close()
            return
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
        """asyncio callback: feed the bytes to the parser, counting the raw bytes of a request line and
        headers against `router.max_header_bytes` (431 past it); a malformed request or an upgrade is
        answered 400 (or, mid-response, the connection closed)."""
        try:
            if self.phase != BODY:
                if self.refused:  # lingering after a refusal: drop, never parse or keep
                    self.dropped += len(data)
                    if self.dropped > LINGER_BYTES and self.transport is not None:
                        self.transport.close()
                    return
                n = self.head_bytes + len(data)
                if n > self.router.max_header_bytes:
                    self._feed_capped(data)
                    return
                self.head_bytes = n
            elif len(data) > self.router.max_header_bytes:  # the body may end in it and a head begin
                self._feed_capped(data)
                return
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.refuse(400, "protocol upgrades are not supported", "invalid_request_error")
        except httptools.HttpParserError as exc:
            if self.refused:  # a callback refused the request and stopped the parser: answered already
                return
            if self.transport is not None and not self.busy:
                self.refuse(400, f"malformed HTTP request: {exc}", "invalid_request_error")
            elif self.transport is not None:
                self.transport.close()

    def _feed_capped(self, data: bytes) -> None:
        """Feed `data` when it would take a request head past max_header_bytes, or is a body piece larger
        than that: a head gets only as much as it may still have (again after each head that completes:
        pipelined requests), and 431 when it does not complete within its allowance; a body goes in pieces
        of max_header_bytes, so a head that begins where a body ends has at most that much uncounted. The
        parser never holds more than two allowances of one head."""
        view = memoryview(data)
        pos, size = 0, len(view)
        limit = self.router.max_header_bytes
        while pos < size:
            if self.refused:
                return
            if self.phase == BODY:
                piece = view[pos:pos + limit]
                self.parser.feed_data(piece)
                pos += len(piece)
                continue
            room = limit - self.head_bytes
            if room <= 0:
                self.router.metrics.count_refused(NO_BACKEND, 431)
                what = "trailer section" if self.phase == TRAILER else "request line and headers"
                self.refuse(431, f"{what} over {limit} bytes (the router's --max-header-bytes)",
                            "invalid_request_error", "headers_too_large")
                return
            piece = view[pos:pos + room]
            heads = self.heads
            self.parser.feed_data(piece)
            pos += len(piece)
            if self.heads == heads:  # still within the same head
                self.head_bytes += len(piece)

    def pause_writing(self):
        """asyncio flow control: the client's send buffer is full (over the transport's high-water mark, 64 KiB):
        stop reading requests from the client (their answers would pile up in memory: `done` stalls) and pause
        reading from the replica (the client reads slower than it streams)."""
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        ex = self.exchange
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            self.paused_upstream = ex.upstream.transport
            self.paused_upstream.pause_reading()

    def resume_writing(self):
        """asyncio flow control: the client drained its buffer: resume reading from the replica, go on with the
        next request if `done` stalled, and read requests again (unless MAX_PIPELINED are queued or the
        connection is closing)."""
        self.writing_paused = False
        self.unsent = 0   # the next stall's first look always gives a period (timed_out)
        if self.paused_upstream is not None:
            try:
                self.paused_upstream.resume_reading()
            except Exception:  # that connection has closed meanwhile: nothing to resume
                pass
            self.paused_upstream = None
        if self.stalled:
            self.stalled = False
            self.done(True)   # stalled only on a kept-alive connection; may pause writing again
        t = self.transport
        if t is not None and not self.writing_paused and not self.closing and len(self.pending) <= MAX_PIPELINED:
            t.resume_reading()

    # ---- parser callbacks ----

    def on_message_begin(self):
        """httptools callback: a new request starts (its header-read deadline is armed by the sweep)."""
        self.req = Request()
        self.url = b""
        self.phase = HEAD
        self.deadline = 0.0

    def on_url(self, url: bytes):
        """httptools callback: a piece of the request target (it may arrive in several)."""
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        """httptools callback: keep the headers the router reads (their size is capped in data_received).
        Fields of a chunked body's trailer section (httptools reports them here too) are ignored: RFC 9110
        section 6.5.1 forbids merging them into the header section, and they arrive after `admit` checked the
        headers (an X-Request-Id there went to vLLM unchecked)."""
        if self.phase == TRAILER:   # ~10 ns per header
            return
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
        elif n in self.router.watched_headers:   # the sticky header and those content rules read (often none)
            if n == self.router.sticky_header_lower:
                req.sticky = value
            else:
                try:
                    req.rule_headers.setdefault(n, value)
                except AttributeError:   # the first one (the slot is left unset otherwise: no work per request)
                    req.rule_headers = {n: value}
        elif n == _HOPS_LOWER:
            req.hops = int(value) if value.isdigit() and len(value) <= 3 else 0

    def on_headers_complete(self):
        """httptools callback: method, path and keep-alive are known. `router.admit` may refuse the request
        now (no API key, Content-Length over max_request_bytes): answered before its body is read, and the
        parser is stopped. Otherwise `Expect: 100-continue` is answered 100 and the body phase begins."""
        req = self.req
        req.method = self.parser.get_method()
        q = self.url.find(b"?")
        req.path = self.url if q < 0 else self.url[:q]
        req.keep_alive = self.parser.should_keep_alive()
        self.head_bytes = 0
        self.heads += 1
        self.phase = BODY
        self.deadline = 0.0
        if not self.router.admit(self, req):
            raise _Stop
        if req.expect == b"100-continue" and not self.busy:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_chunk_header(self):
        """httptools callback (chunked bodies only): a chunk-size line was read. The last chunk's is followed by
        the trailer section: TRAILER until the chunk's data begins (`on_body`), its bytes counted as a head's
        (a new allowance: `heads` tells _feed_capped that the count restarted)."""
        self.phase = TRAILER
        self.head_bytes = 0
        self.heads += 1

    def on_body(self, body: bytes):
        """httptools callback: collect a body chunk; past the request's body_limit (max_request_bytes, 0 on a
        path that takes no body; a chunked body: its length was not announced) refuse at once (413, or 400 for
        a body where none belongs), without reading the rest."""
        self.phase = BODY   # after a chunk-size line (TRAILER) the chunk's data: a body again
        req = self.req
        req.size += len(body)
        if req.size > req.body_limit:
            req.body = []
            self.router.metrics.count_refused(NO_BACKEND, 413 if req.body_limit else 400)
            if req.body_limit:
                self.refuse_too_large()
            else:   # a path that takes no body (a chunked one: its length was not announced)
                self.refuse_no_body()
            raise _Stop
        req.body.append(body)

    def on_message_complete(self):
        """httptools callback: dispatch the request, or queue it behind the one being answered (reading
        pauses past MAX_PIPELINED queued)."""
        req, self.req = self.req, None
        self.phase = IDLE
        self.deadline = 0.0
        if self.busy:
            self.pending.append(req)
            if len(self.pending) > MAX_PIPELINED:  # a client pipelining without reading: stop reading from it
                self.transport.pause_reading()
                if len(self.pending) > MAX_QUEUED:   # within one read: keep no more, close after the answer
                    self.refuse(400, "too many pipelined requests", "invalid_request_error")
                    raise _Stop
            return
        self.busy = True
        self.router.dispatch(self, req)

    # ---- answering ----

    def done(self, keep_alive: bool) -> None:
        """The current response is complete: close, or go on with the next pipelined request (`_answer_queued`),
        unless the client has not read what was sent so far (`stalled` until resume_writing)."""
        self.exchange = None
        self.busy = False
        t = self.transport
        if t is None:
            return
        if not keep_alive or self.closing:
            self.closing = True   # what is still queued is not answered
            t.close()
            return
        if self.phase == IDLE:
            self.deadline = 0.0  # the keep-alive idle time starts now, not when the request arrived
        if self.writing_paused:
            # The client has not read what was sent so far: the next request (queued, or read later in the same
            # data) waits for resume_writing, as behind an answer in progress; one attribute test per request.
            self.busy = self.stalled = True
            return
        if self.pending and not self.answering:
            self._answer_queued()

    def _answer_queued(self) -> None:
        """Dispatch the queued (pipelined) requests in order until one is answered later (`busy` stays set: its
        `done` goes on from there), the connection stalls, or it closes. A loop, not recursion: a request answered
        at once calls `done` from within `dispatch`, which returns here (`answering`); a few hundred queued
        requests answered at once used to recurse past Python's limit (RecursionError: the connection hung)."""
        self.answering = True
        try:
            while self.pending and not self.busy and not self.closing and self.transport is not None:
                req = self.pending.pop(0)
                if len(self.pending) <= MAX_PIPELINED:
                    self.transport.resume_reading()
                self.busy = True
                self.router.dispatch(self, req)
        finally:
            self.answering = False

    def respond(self, status: int, body: bytes, content_type: bytes = JSON, extra: bytes = b"",
                keep_alive: bool = True) -> None:
        """Answer the current request with a complete response: `extra` is more header lines (each ending in
        CRLF); without `keep_alive` the answer says `Connection: close` and the connection closes after it. When
        `head_only` is set (dispatch: a HEAD request) the body is left out, its Content-Length kept (RFC 9110
        section 9.3.2), and the flag cleared."""
        t = self.transport
        if t is not None:
            t.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
                status, STATUS_PHRASES.get(status, b"Unknown"), content_type, len(body), extra,
                b"" if keep_alive else b"Connection: close\r\n", b"" if self.head_only else body))
        self.head_only = False
        self.done(keep_alive)

    def refuse_no_body(self) -> None:
        """Refuse (400) a request with a body on a path that takes none; the body is never read."""
        self.refuse(400, f"{(self.req.path if self.req and self.req.path else b'').decode('latin-1')} takes no "
                    "request body", "invalid_request_error", "unexpected_body")

    def refuse(self, status: int, message: str, type_: str, code: str | None = None,
               param: str | None = None, extra: bytes = b"") -> None:
        """Refuse the request being read (not read whole yet) with an OpenAI error and end the connection:
        answer with `Connection: close`, half-close, and drop what the client still sends (LINGER phase,
        until it closes, LINGER_SECONDS or LINGER_BYTES). While an earlier request's answer is still going
        out, nothing can be written in between: reading stops and the connection closes after that answer."""
        self.refused = True
        t = self.transport
        if t is None:
            return
        if self.busy:
            self.closing = True
            t.pause_reading()
            return
        body = error_body(message, type_, code, param)
        head = getattr(self.req, "method", None) == b"HEAD"   # known once its headers are complete
        t.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
                b"Connection: close\r\n\r\n%s" % (status, STATUS_PHRASES.get(status, b"Unknown"), len(body),
                                                   extra, b"" if head else body))
        self.busy = True  # nothing else is dispatched on this connection
        self.pending.clear()
        self.phase = LINGER
        self.deadline = 0.0
        if t.can_write_eof():
            t.write_eof()
        else:
            t.close()

    def refuse_too_large(self) -> None:
        """413 for a body over the route's router.maxRequestBytes (announced or counted), before it is read."""
        self.refuse(413, f"request body over {self.router.max_request_bytes} bytes (the route's "
                         "router.maxRequestBytes)", "invalid_request_error", "request_too_large")

    def timed_out(self) -> None:
        """The read phase's deadline passed (Router.sweep): an idle keep-alive connection or a lingering one is
        closed; a request whose headers or body did not arrive in time is answered 408, unless the router stopped
        reading it because its client does not read (`writing_paused`). An idle one (or one stalled behind
        answers its client does not read, or with reading so paused) with answers still unsent gets another period while
        its client reads them (the unsent bytes went down since the last look, as nginx's send_timeout), else
        is aborted: close() would wait for a client that reads nothing, and hold the connection for ever."""
        t = self.transport
        if t is None:
            return
        phase = self.phase
        if (phase == HEAD or phase == BODY or phase == TRAILER) and not self.writing_paused:
            self.router.metrics.count_refused(NO_BACKEND, 408)
            what, flag = ("headers", "--header-timeout") if phase == HEAD else ("body", "--body-timeout")
            self.refuse(408, f"the request {what} did not arrive in time (the router's {flag})",
                        "invalid_request_error", "request_timeout")
            if self.busy and self.closing:
                self.phase, self.deadline = IDLE, 0.0  # closes once the answer in progress is sent
            return
        # Idle, lingering, or reading paused while the client does not read (then the rest of a pipelined
        # request may be waiting, sent, in the socket: judging its head or body by the read deadline refused 408
        # a client that sent in time; it is judged by whether it reads what was sent to it).
        unsent = t.get_write_buffer_size()
        if not unsent:
            t.close()
        elif (phase == IDLE or (self.writing_paused and phase != LINGER)) and unsent != self.unsent:
            # the client reads (or this is the first look): another period
            self.unsent = unsent
            self.deadline = 0.0   # re-armed by the next sweep
        else:
            t.abort()

    def respond_error(self, status: int, message: str, type_: str, code: str | None = None,
                      param: str | None = None, extra: bytes = b"", close: bool = False, **fields) -> None:
        """Answer with an OpenAI API error object (see `error_body`; `fields` go into it too)."""
        self.respond(status, error_body(message, type_, code, param, **fields), extra=extra,
                     keep_alive=not close)
