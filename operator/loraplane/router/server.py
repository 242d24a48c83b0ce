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
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplane.router.auth import ApiKeys
from loraplane.router.client_protocol import ClientConnection, Request
from loraplane.router.exchange import Exchange
from loraplane.router.metrics import NO_BACKEND, UNKNOWN_MODEL, RouterMetrics
from loraplane.router.replicas import ReplicaPool
from loraplane.router.table import BadRequest, RoutingTable, read_model, rewrite_model
from loraplane.api.wire.serving import ServingTable

log = logging.getLogger("loraplane.router")

_COMPLETIONS, _CHAT, _MODELS = b"/v1/completions", b"/v1/chat/completions", b"/v1/models"


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
            self.proxy(conn, req)
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

    def proxy(self, conn: ClientConnection, req: Request) -> None:
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
        ex = Exchange(self, conn, req, model, backend, replica, rewrite_model(body, handle, backend), req.path)
        conn.exchange = ex
        ex.start()

