"""The router's HTTP data path: OpenAI-compatible endpoints proxied to the chosen vLLM replica.

Per request: authenticate, read the body (size-limited), find `model`, pick a backend (weights or
sticky header), pick a replica (has that backend Ready, least loaded), rewrite only `model`, forward on a
kept-alive connection, relay the answer (SSE chunk by chunk as it arrives), count status, tokens,
latency, TTFT.

Why asyncio protocols with httptools (the llhttp parser, as uvicorn uses) rather than aiohttp's web
server and client here: on the 2-core reference machine aiohttp's server alone costs ~140 us of CPU per
request and its client as much again, several times the CPU of the Rust vllm-router for a whole proxied
request. Driven by parser callbacks, a proxied request costs one parse each way, no per-request task
(unless a new upstream connection must be opened) and no re-framing beyond SSE chunking. aiohttp
remains the client for everything off the hot path (replica polling).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplane.router.auth import ApiKeys
from loraplane.router.client_protocol import JSON, STATUS_PHRASES, ClientConnection, Request
from loraplane.router.metrics import NO_BACKEND, UNKNOWN_MODEL, RouterMetrics
from loraplane.router.replicas import Replica, ReplicaPool
from loraplane.router.table import BackendRoute, BadRequest, RoutingTable, read_model, rewrite_model
from loraplane.router.upstream import Upstream, open_upstream, take_idle
from loraplane.api.wire.serving import ServingTable

log = logging.getLogger("loraplane.router")

BACKEND_HEADER = "X-Loraplane-Backend"  # tells the caller which version answered (canaries, debugging)
_BACKEND_HEADER = BACKEND_HEADER.encode()
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_USAGE_SPAN = 600  # bytes after `"usage"` that hold its token counts
_COMPLETIONS, _CHAT, _MODELS = b"/v1/completions", b"/v1/chat/completions", b"/v1/models"
_CLIENT_CLOSED = 499  # nginx's code for "the client went away first"
_STREAM_BROKEN = 599  # the replica failed after the stream had started: the client got a truncated stream


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
    """One proxied request, driven by callbacks from the upstream and client connections."""

    __slots__ = ("router", "conn", "req", "model", "backend", "stats", "replica", "payload", "head", "tried",
                 "upstream", "status", "streaming", "chunks", "tail", "first_byte", "timer", "finished",
                 "retry_404", "path", "ctype", "attempt_open")

    def __init__(self, router: "Router", conn: ClientConnection, req: Request, model: str, backend: BackendRoute,
                 replica: Replica, payload: bytes, chat: bool):
        self.router, self.conn, self.req, self.model = router, conn, req, model
        self.backend, self.stats, self.replica, self.payload = backend, backend.stats, replica, payload
        self.path = _CHAT if chat else _COMPLETIONS
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
        self.head = b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (
            len(payload), b"X-Request-Id: " + rid + b"\r\n" if rid else b"")

    def start(self) -> None:
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
            self._finish(_STREAM_BROKEN)
            t = self.conn.transport
            if t is not None:
                t.close()  # no terminating chunk: the client sees a truncated stream, not a complete one
            return
        self.fail(502, "the replica closed the connection before answering", "bad_gateway", "replica_failed")

    # ---- client / timer events ----

    def client_lost(self) -> None:
        if not self.finished:
            self._finish(_CLIENT_CLOSED)
            self._drop_upstream()  # closing it makes vLLM abort the generation

    def timed_out(self) -> None:
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


class Router:
    """State shared by the connections: the routing table (swapped whole on reload), replicas, metrics."""

    def __init__(self, pool: ReplicaPool, *, metrics: RouterMetrics | None = None, api_keys: ApiKeys | None = None,
                 connect_timeout: float = 3.0, max_attempts: int = 3, access_log: bool = False,
                 rng: random.Random | None = None):
        self.pool = pool
        self.metrics = metrics or RouterMetrics()
        self.metrics.watch_pool(pool)
        self.api_keys = api_keys
        self.connect_timeout = connect_timeout
        self.max_attempts = max(1, max_attempts)
        self.access_log = access_log
        self.rng = rng or random.Random()
        self.table: RoutingTable | None = None
        self.sticky_header_lower: bytes | None = None
        self.max_request_bytes = 4 * 1024 * 1024
        self.timeout_seconds = 600.0
        self.log_prompts = False
        self.connections: set[ClientConnection] = set()
        self.active = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.Server | None = None

    # ---- configuration ----

    def set_table(self, table: ServingTable) -> None:
        """Use a new table from the next request on; requests in flight finish on the one they started with."""
        compiled = RoutingTable.compile(table)
        for route in compiled.models.values():
            for b in route.backends:
                b.stats = self.metrics.stats(route.name, b.served_name)
        rs = table.router
        self.sticky_header_lower = rs.sticky_header.lower().encode() if rs.sticky_header else None
        self.max_request_bytes = rs.max_request_bytes
        self.timeout_seconds = rs.timeout_seconds
        self.log_prompts = rs.log_prompts
        self.pool.base_served_name = table.served_model_name
        self.table = compiled
        self.metrics.table_generation.set(table.generation)
        log.info("routing table generation %d: %s", table.generation,
                 ", ".join(f"{m.name} -> " + "/".join(f"{b.served_name}:{b.weight}" for b in m.backends)
                           for m in table.models) or "no models")

    # ---- lifecycle ----

    async def start_server(self, host: str, port: int) -> int:
        self.loop = asyncio.get_running_loop()
        self.server = await self.loop.create_server(lambda: ClientConnection(self), host, port, backlog=2048,
                                                    reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    async def drain(self, seconds: float) -> None:
        """Stop accepting; close idle client connections; let answers in flight finish (up to `seconds`)."""
        if self.server is not None:
            self.server.close()
        for c in list(self.connections):
            c.closing = True
            if not c.busy and c.transport is not None:
                c.transport.close()
        deadline = time.monotonic() + seconds
        while self.active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        for r in self.pool.replicas:
            r.close_idle()

    # ---- dispatch ----

    def dispatch(self, conn: ClientConnection, req: Request) -> None:
        path = req.path
        if path == _COMPLETIONS or path == _CHAT:
            if req.method != b"POST":
                conn.respond_error(405, f"use POST for {path.decode()}", "invalid_request_error",
                                   extra=b"Allow: POST\r\n", close=not req.keep_alive)
                return
            self.proxy(conn, req, path == _CHAT)
        elif path == _MODELS:
            if self.api_keys is not None and not self.api_keys.check(req.authorization):
                self._unauthorized(conn, req)
            elif self.table is None:
                conn.respond_error(503, "no routing table loaded yet", "service_unavailable",
                                   close=not req.keep_alive)
            else:
                conn.respond(200, self.table.models_json, keep_alive=req.keep_alive)
        elif path == b"/metrics":
            conn.respond(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode(),
                         keep_alive=req.keep_alive)
        elif path == b"/healthz":
            conn.respond(200, b"ok", b"text/plain", keep_alive=req.keep_alive)
        elif path == b"/readyz":
            if self.table is None:
                conn.respond(503, b"no routing table loaded yet", b"text/plain", keep_alive=req.keep_alive)
            else:
                conn.respond(200, b"ok", b"text/plain", keep_alive=req.keep_alive)
        else:
            conn.respond_error(404, f"no such endpoint: {path.decode('latin-1')} (this router serves "
                                    "/v1/completions, /v1/chat/completions, /v1/models)", "invalid_request_error",
                               "not_found", close=not req.keep_alive)

    def _unauthorized(self, conn: ClientConnection, req: Request) -> None:
        self.metrics.count_refused(NO_BACKEND, 401)
        conn.respond_error(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           "invalid_request_error", "invalid_api_key", close=not req.keep_alive)

    def proxy(self, conn: ClientConnection, req: Request, chat: bool) -> None:
        table = self.table
        close = not req.keep_alive
        if table is None:
            conn.respond_error(503, "no routing table loaded yet", "service_unavailable", close=close)
            return
        if self.api_keys is not None and not self.api_keys.check(req.authorization):
            self._unauthorized(conn, req)
            return
        if req.too_large:
            self.metrics.count_refused(NO_BACKEND, 413)
            conn.respond_error(413, f"request body over {self.max_request_bytes} bytes (the route's "
                                    "router.maxRequestBytes)", "invalid_request_error", "request_too_large",
                               close=True)
            return
        body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
        try:
            model, handle = read_model(body)
        except BadRequest as exc:
            self.metrics.count_refused(NO_BACKEND, 400)
            conn.respond_error(400, str(exc), "invalid_request_error", None, exc.param, close=close)
            return
        route = table.models.get(model)
        if route is None:
            self.metrics.count_refused(UNKNOWN_MODEL, 404)
            names = list(table.models)
            conn.respond_error(404, f"The model `{model}` does not exist. Served models: {', '.join(names)}",
                               "NotFoundError", "model_not_found", "model", close=close, available_models=names)
            return
        if self.log_prompts:
            log.info("request body (router.logPrompts is on): %s", body.decode("utf-8", "replace"))
        sticky = req.sticky
        # A backend with no usable replica is skipped; its weight goes to the others.
        rng, pool = self.rng, self.pool
        backend = route.pick(rng, sticky)
        replica = pool.choose(backend.served_name) if backend is not None else None
        if replica is None:
            skipped = set()
            while backend is not None and replica is None:
                skipped.add(backend)
                backend = route.pick(rng, sticky, skipped)
                replica = pool.choose(backend.served_name) if backend is not None else None
            if replica is None:
                self.metrics.count_refused(model, 503)
                conn.respond_error(
                    503, f"no replica is ready to serve `{model}` (backends: "
                         f"{', '.join(b.served_name for b in route.backends)}); adapters may still be loading",
                    "service_unavailable", "no_ready_replica", extra=b"Retry-After: 2\r\n", close=close)
                return
        ex = Exchange(self, conn, req, model, backend, replica, rewrite_model(body, handle, backend), chat)
        conn.exchange = ex
        ex.start()

