"""One proxied request: sending it to a vLLM replica (retried elsewhere while that is safe), relaying the
answer (Server-Sent Events chunk by chunk as they arrive), and accounting for it (status, latency, TTFT, tokens).

An `Exchange` is driven by callbacks: from its `Upstream` (the answer's head, body chunks, end, or a lost
connection), from its `ClientConnection` (the client left) and from its timer (router.timeoutSeconds). It
never blocks and has no task of its own, except while a new connection to vLLM is being opened.

When a request is resent: the connection failed before anything was sent (the replica is marked failed),
or vLLM answered 404 for an adapter (our view of what is loaded was stale: nothing was generated), at most
`router.max_attempts` attempts in all. Once vLLM has the request it is never resent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING

from loraplane.router.client_protocol import JSON, STATUS_PHRASES, ClientConnection, Request
from loraplane.router.replicas import Replica
from loraplane.router.table import BackendRoute
from loraplane.router.upstream import Upstream, open_upstream, take_idle

if TYPE_CHECKING:
    from loraplane.router.server import Router

log = logging.getLogger("loraplane.router")

BACKEND_HEADER = "X-Loraplane-Backend"  # tells the caller which version answered (canaries, debugging)
_BACKEND_HEADER = BACKEND_HEADER.encode()
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_USAGE_SPAN = 600  # bytes after `"usage"` that hold its token counts
CLIENT_CLOSED = 499  # nginx's code for "the client went away first"
STREAM_BROKEN = 599  # the replica failed after the stream had started: the client got a truncated stream


def parse_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last `usage` object in a response body or SSE tail.

    The last occurrence is the final total in a stream (and the only one in a plain answer); generated
    text cannot fake it, because quotes inside JSON strings are escaped.
    """
    i = data.rfind(b'"usage"')
    if i < 0:
        return None
    end = i + _USAGE_SPAN
    p = _PROMPT_TOKENS.search(data, i, end)
    c = _COMPLETION_TOKENS.search(data, i, end)
    if p is None and c is None:
        return None
    return (int(p.group(1)) if p else 0, int(c.group(1)) if c else 0)


class Exchange:
    """One proxied request, driven by callbacks from the upstream and client connections.

    `payload` is the body to send (the client's, with only `model` rewritten to `backend.served_name`),
    `path` the endpoint (b"/v1/completions" or b"/v1/chat/completions"). Answers the client exactly once:
    the relayed answer (with an X-Loraplane-Backend header naming the served name), or an OpenAI error:
    502 (no replica could be reached, or vLLM closed the connection before answering), 503 (the adapter is
    on no replica any more), 504 (router.timeoutSeconds passed). Counted in `backend.stats` by final
    status, 499 when the client left first, 599 when vLLM failed after a stream had started.
    """

    __slots__ = ("router", "conn", "req", "model", "backend", "stats", "replica", "payload", "head", "tried",
                 "upstream", "status", "streaming", "chunks", "tail", "first_byte", "timer", "finished",
                 "retry_404", "path", "ctype", "attempt_open")

    def __init__(self, router: Router, conn: ClientConnection, req: Request, model: str, backend: BackendRoute,
                 replica: Replica, payload: bytes, path: bytes):
        self.router, self.conn, self.req, self.model = router, conn, req, model
        self.backend, self.stats, self.replica, self.payload = backend, backend.stats, replica, payload
        self.path = path
        self.ctype = JSON
        self.attempt_open = False
        self.tried: tuple[Replica, ...] = ()
        self.upstream: Upstream | None = None
        self.status = 0
        self.streaming = False
        self.chunks: list[bytes] = []
        self.tail = b""
        self.first_byte = True
        self.timer = None
        self.finished = False
        self.retry_404 = False
        rid = req.request_id
        # Everything after the Host line; the client's own headers (its API key above all) stay here.
        self.head = b"Content-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n" % (
            len(payload), b"X-Request-Id: " + rid + b"\r\n" if rid else b"", router.engine_auth)

    def start(self) -> None:
        """Count it in flight, arm the timeout and send it to `replica`."""
        self.stats.in_flight += 1
        self.router.active += 1
        self.timer = self.router.loop.call_later(self.router.timeout_seconds, self.timed_out)
        self.send()

    def _release_attempt(self) -> None:
        if self.attempt_open:
            self.attempt_open = False
            self.replica.in_flight -= 1

    def _request_head(self, replica: Replica) -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: %s\r\n%s" % (self.path, replica.host_header, self.head)

    def send(self) -> None:
        """Send to `self.replica` on a pooled connection, or on a new one (opened in a task)."""
        replica = self.replica
        replica.in_flight += 1
        self.attempt_open = True
        up = take_idle(replica)
        if up is not None:
            self.upstream = up
            up.send(self, self._request_head(replica), self.payload)
            return
        self.router.loop.create_task(self._connect(replica))

    async def _connect(self, replica: Replica) -> None:
        try:
            up = await open_upstream(replica, self.router.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.connect_failed(replica, exc)
            return
        if self.finished:  # the client left or the request timed out while connecting
            up.release()
            return
        self.upstream = up
        up.send(self, self._request_head(replica), self.payload)

    def connect_failed(self, replica: Replica, exc: BaseException) -> None:
        """Nothing reached vLLM: safe to send elsewhere."""
        if self.finished:
            return
        self._release_attempt()
        self.router.pool.mark_failed(replica)
        log.warning("replica %s: connection failed (%s); not routing to it until it answers a poll", replica.name,
                    exc or type(exc).__name__)
        self.tried += (replica,)
        nxt = (self.router.pool.choose(self.backend.served_name, self.tried)
               if len(self.tried) < self.router.max_attempts else None)
        if nxt is None:
            self.fail(502, f"could not connect to a replica serving `{self.backend.served_name}`", "bad_gateway",
                      "replica_unreachable")
            return
        self.stats.retries += 1
        self.replica = nxt
        self.send()

    # ---- upstream callbacks ----

    def upstream_head(self, status: int, content_type: bytes) -> None:
        """vLLM's status line and headers arrived: a 200 event stream is relayed from here on (chunked);
        anything else is collected and answered whole; a 404 for an adapter is resent elsewhere."""
        self.status = status
        if (status == 404 and not self.backend.is_base and len(self.tried) + 1 < self.router.max_attempts):
            # vLLM does not have the adapter (our view was stale): nothing was generated, resend elsewhere.
            self.retry_404 = True
            return
        if content_type.startswith(b"text/event-stream") and status == 200:
            self.streaming = True
            t = self.conn.transport
            if t is not None:
                t.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nCache-Control: no-cache\r\n%s: %s\r\n"
                        b"Transfer-Encoding: chunked\r\n%s\r\n" % (
                            content_type, _BACKEND_HEADER, self.backend.served_json,
                            b"" if self.req.keep_alive else b"Connection: close\r\n"))
        else:
            self.ctype = content_type

    def upstream_body(self, data: bytes) -> None:
        """One piece of vLLM's answer body (de-chunked): relayed at once when streaming, else collected."""
        if self.streaming:
            if self.first_byte:
                self.first_byte = False
                self.stats.ttft.observe(time.perf_counter() - self.req.started)
            t = self.conn.transport
            if t is not None:
                t.write(b"%x\r\n%s\r\n" % (len(data), data))
            # Keep the end of the stream: the usage chunk comes last.
            self.tail = data if len(data) >= 2048 else (self.tail + data)[-4096:]
        elif not self.retry_404:
            self.chunks.append(data)

    def upstream_complete(self) -> None:
        """vLLM's answer is complete: finish the client's answer, count status and usage tokens."""
        self.upstream = None
        if self.finished:
            return
        if self.retry_404:
            self.retry_404 = False
            replica = self.replica
            self._release_attempt()
            self.router.pool.mark_missing(replica, self.backend.served_name)
            self.tried += (replica,)
            nxt = self.router.pool.choose(self.backend.served_name, self.tried)
            if nxt is None:
                self.fail(503, f"`{self.backend.served_name}` is not loaded on any replica yet", "service_unavailable",
                          "adapter_not_loaded", extra=b"Retry-After: 2\r\n")
                return
            self.stats.retries += 1
            self.replica = nxt
            self.send()
            return
        stats = self.stats
        if self.streaming:
            t = self.conn.transport
            if t is not None:
                t.write(b"0\r\n\r\n")
            usage = parse_usage(self.tail)
        else:
            body = b"".join(self.chunks)
            t = self.conn.transport
            if t is not None:
                t.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s: %s\r\n%s\r\n%s" % (
                    self.status, STATUS_PHRASES.get(self.status, b"Unknown"), self.ctype, len(body),
                    _BACKEND_HEADER, self.backend.served_json,
                    b"" if self.req.keep_alive else b"Connection: close\r\n", body))
            usage = parse_usage(body) if self.status == 200 else None
        if usage is not None:
            stats.prompt_tokens += usage[0]
            stats.completion_tokens += usage[1]
        self.replica.requests_total += 1
        self._finish(self.status)
        self.conn.done(self.req.keep_alive)

    def upstream_lost(self, exc: BaseException | None) -> None:
        """The replica closed the connection mid-answer. The request reached it: never resent."""
        self.upstream = None
        if self.finished:
            return
        log.warning("replica %s: connection lost mid-request (%s)", self.replica.name, exc or "closed")
        if self.streaming:
            self._finish(STREAM_BROKEN)
            t = self.conn.transport
            if t is not None:
                t.close()  # no terminating chunk: the client sees a truncated stream, not a complete one
            return
        self.fail(502, "the replica closed the connection before answering", "bad_gateway", "replica_failed")

    # ---- client / timer events ----

    def client_lost(self) -> None:
        """The client closed its connection: count 499 and close the connection to vLLM (it aborts)."""
        if not self.finished:
            self._finish(CLIENT_CLOSED)
            self._drop_upstream()  # closing it makes vLLM abort the generation

    def timed_out(self) -> None:
        """router.timeoutSeconds passed without a complete answer: 504 (or a cut stream if one started)."""
        if self.finished:
            return
        self.timer = None
        log.warning("replica %s: no complete answer within %ss", self.replica.name, self.router.timeout_seconds)
        if self.streaming:
            self._finish(504)
            self._drop_upstream()
            if self.conn.transport is not None:
                self.conn.transport.close()
            return
        self._drop_upstream()
        self.fail(504, "the replica did not answer in time (router.timeoutSeconds)", "timeout", "upstream_timeout")

    def fail(self, status: int, message: str, type_: str, code: str, extra: bytes = b"") -> None:
        """Finish with an OpenAI error answer (nothing was sent to the client yet)."""
        self._finish(status, log_always=True)
        self.conn.respond_error(status, message, type_, code, extra=extra, close=not self.req.keep_alive)

    def _drop_upstream(self) -> None:
        up, self.upstream = self.upstream, None
        if up is not None:
            up.exchange = None
            up.close()

    def _finish(self, status: int, log_always: bool = False) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._release_attempt()
        self.router.active -= 1
        stats = self.stats
        stats.in_flight -= 1
        stats.count(status)
        elapsed = time.perf_counter() - self.req.started
        stats.duration.observe(elapsed)
        if self.router.access_log or log_always or status >= 500:
            log.info("%s %s model=%s backend=%s replica=%s status=%d %.1fms", self.req.method.decode(),
                     self.req.path.decode(), self.model, self.backend.served_name, self.replica.name, status,
                     elapsed * 1000)
