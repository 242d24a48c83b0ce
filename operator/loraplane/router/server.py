"""The router's HTTP data path: OpenAI-compatible endpoints proxied to the chosen vLLM replica.

Per request: authenticate, read the body (size-limited), find `model`, pick a backend (weights or
sticky header), pick a replica (has that backend Ready, least loaded), rewrite only `model`, forward on a
kept-alive connection, relay the answer (SSE chunk by chunk as it arrives), count status, tokens,
latency, TTFT. One module per concern:

- server.py (here): `Router`, the state the connections share (table, replicas, settings), its lifecycle;
- client_protocol.py: the clients' HTTP/1.1 connections (parsing, answering, pipelining);
- dispatch.py: which endpoint answers, which backend and replica get an inference request;
- exchange.py: one proxied request (retries, streaming relay, usage and latency accounting);
- upstream.py: the connections to vLLM and their keep-alive pool;
- content.py + orchestrate.py: content routing (issue 15): a content-routed name (e.g. `auto`) is decided per
  request (rules, classifier, semantic; budgets, fallbacks), then served as the destination's request;
- auth.py (API keys), kube/mounted.py (change detection of re-read files), table.py (the routing table,
  `model` rewriting), replicas.py (polling, choice), metrics.py (Prometheus), service.py (table sources,
  background loops), cli.py (the command line).

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
from collections.abc import Callable

from loraplane.router.auth import ApiKeys
from loraplane.router.client_protocol import BODY, HEAD, IDLE, LINGER, LINGER_SECONDS, TRAILER, ClientConnection
from loraplane.router.dispatch import admit, dispatch, proxy
from loraplane.router.hold import MAX_HELD_BYTES, RETRY_AFTER_HEADER, Hold
from loraplane.router.metrics import NO_BACKEND, RouterMetrics
from loraplane.router.orchestrate import Orchestrator
from loraplane.router.replicas import Replica, ReplicaPool
from loraplane.router.table import RoutingTable
from loraplane.api.wire.serving import ServingTable

log = logging.getLogger("loraplane.router")


def engine_authorization(key: str | None) -> bytes:
    """The `Authorization: Bearer <key>` header line (with CRLF) for requests to vLLM, b"" without a key.
    Raises ValueError when the key holds anything but visible ASCII (it would break or inject header lines)."""
    if not key:
        return b""
    if not all(0x21 <= ord(ch) <= 0x7e for ch in key):
        raise ValueError("the engine key must be visible ASCII characters only")
    return b"Authorization: Bearer " + key.encode("ascii") + b"\r\n"


class Router:
    """State shared by the connections: the routing table (swapped whole on reload), replicas, metrics.

    `connect_timeout` (seconds) bounds opening a connection to vLLM; `max_attempts` is how many replicas
    one request may be sent to (see exchange.py for when a request is resent); `access_log` logs every
    request (failures are always logged). The route's own settings (sticky header, body limit, timeout,
    prompt logging) come with each table: `set_table`.

    Client connections are bounded (see client_protocol.py): `max_connections` at once, `max_header_bytes`
    of request line and headers, `header_timeout` seconds from a request's first byte to its last header,
    `body_timeout` seconds from then to its last body byte, `idle_timeout` seconds of keep-alive between
    requests. `sweep` enforces the timeouts, and each proxied request's router.timeoutSeconds (its
    `Exchange.deadline`), every `sweep_interval` seconds (at most 1 s, a quarter of the shortest timeout when
    that is shorter), so each is met within one interval. `connection_class` accepts the client connections
    (forward.ForwardingConnection in gateway mode).
    """

    # Answers one complete request; ClientConnection calls `router.dispatch(conn, req)`. Defined in
    # dispatch.py and bound here as a method, so the hot path pays no extra call.
    dispatch = dispatch
    # May refuse a request when its headers are complete (API key, announced body size); see dispatch.py.
    admit = admit

    def __init__(self, pool: ReplicaPool, *, metrics: RouterMetrics | None = None, api_keys: ApiKeys | None = None,
                 connect_timeout: float = 3.0, max_attempts: int = 3, access_log: bool = False,
                 rng: random.Random | None = None, max_connections: int = 4096,
                 max_header_bytes: int = 64 * 1024, header_timeout: float = 10.0, body_timeout: float = 60.0,
                 idle_timeout: float = 75.0, engine_key: str | None = None,
                 connection_class: type[ClientConnection] = ClientConnection):
        self.pool = pool
        # The route's engine key, sent to vLLM on every request as `Authorization: Bearer` (never a client's
        # key: the client's headers are not forwarded to vLLM). Never sent anywhere else: a request forwarded to
        # another route's router carries the client's own key (router/forward.py). Raises ValueError for a key
        # that is not one header token.
        self.engine_auth = engine_authorization(engine_key)
        if engine_key:
            pool.engine_headers = {"Authorization": f"Bearer {engine_key}"}
        self.metrics = metrics or RouterMetrics()
        self.metrics.watch_pool(pool)
        self.metrics.watch_router(self)
        self.api_keys = api_keys
        self.connect_timeout = connect_timeout
        self.max_attempts = max(1, max_attempts)
        self.access_log = access_log
        self.rng = rng or random.Random()
        self.table: RoutingTable | None = None
        # The table before the current one and when it was replaced (monotonic s): for SWITCH_GRACE_S after a
        # switch, a model whose new backends no replica reports Ready yet (this router's poll of the loaders lags
        # the table by up to a poll interval) is served by its previous backends, which the loaders keep loaded
        # (Draining) for at least that long: make-before-break holds at the router too (issue 14).
        self.previous_table: RoutingTable | None = None
        self.replaced_at = 0.0
        self.sticky_header_lower: bytes | None = None
        # Request headers content-routing rules read (lower-cased), from the table: the client connections keep
        # these beside the few they always read.
        self.rule_headers: frozenset[bytes] = frozenset()
        # The headers a client connection keeps besides its fixed few: the sticky header and rule_headers (one set
        # lookup per other header, as the one comparison with the sticky header's name cost before).
        self.watched_headers: frozenset[bytes] = frozenset()
        self._orchestrator: Orchestrator | None = None
        self.max_request_bytes = 4 * 1024 * 1024
        self.timeout_seconds = 600.0
        self.log_prompts = False
        self.ask_usage = True   # add stream_options.include_usage to streams without it (see exchange.ask_for_usage)
        # Cold start (hold.py): seconds a request may be held while no replica is up (0: never held), how many
        # at once, the held ones in arrival order, and what is called when one more is held (demand signal).
        self.cold_start_wait = 0.0
        self.cold_start_max = 0
        self.held: dict[Hold, None] = {}
        self.held_bytes = 0   # request bodies of the held requests (bounded by hold.MAX_HELD_BYTES)
        self.on_demand: Callable[[], None] | None = None
        pool.listeners.append(self.release_held)
        self.connections: set[ClientConnection] = set()
        # What accepts client connections: forward.ForwardingConnection in gateway mode (keeps every header).
        self.connection_class = connection_class
        # External models' upstreams (another route's router, router/forward.py) by URL: kept across tables so
        # their kept-alive connections are reused.
        self.external_upstreams: dict[str, Replica] = {}
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.header_timeout, self.body_timeout, self.idle_timeout = header_timeout, body_timeout, idle_timeout
        self._client_sweep_interval = max(0.02, min(1.0, header_timeout / 4, body_timeout / 4, idle_timeout / 4))
        self.sweep_interval = self._client_sweep_interval
        self._phase_timeouts = {IDLE: idle_timeout, HEAD: header_timeout, BODY: body_timeout,
                                LINGER: LINGER_SECONDS, TRAILER: body_timeout}
        self._sweeper: asyncio.TimerHandle | None = None
        self._refused_logged = 0.0
        self.refused_connections = 0
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
        upstreams: dict[str, Replica] = {}
        for ext in compiled.external.values():
            up = upstreams.get(ext.url) or self.external_upstreams.get(ext.url) or Replica(ext.url, None,
                                                                                          external=True)
            upstreams[ext.url] = ext.replica = up
            ext.backend.stats = self.metrics.stats(ext.name, ext.backend.served_name)
        for url, up in self.external_upstreams.items():
            if url not in upstreams:
                up.close_idle()
        self.external_upstreams = upstreams
        rs = table.router
        self.sticky_header_lower = rs.sticky_header.lower().encode() if rs.sticky_header else None
        self.max_request_bytes = rs.max_request_bytes
        self.timeout_seconds = rs.timeout_seconds
        # The sweep also ends proxied requests past their deadline: within a quarter of the timeout.
        self.sweep_interval = max(0.02, min(self._client_sweep_interval, rs.timeout_seconds / 4))
        self.log_prompts = rs.log_prompts
        self.ask_usage = not rs.engine_includes_usage
        self.cold_start_wait = rs.cold_start_wait_seconds
        self.cold_start_max = rs.cold_start_max_requests
        self.pool.base_served_name = table.served_model_name
        if self.table is not None:
            self.previous_table, self.replaced_at = self.table, time.monotonic()
        self.table = compiled
        self.rule_headers = compiled.rule_headers
        self.watched_headers = compiled.rule_headers | (
            {self.sticky_header_lower} if self.sticky_header_lower else set())
        if self._orchestrator is not None:
            self._orchestrator.forget_unused({c.semantic_key for c in compiled.content.values()})
        # Every public name feeds its refusals (backend NO_BACKEND), a name without backends too: the router
        # answers it 503 itself while it is in the table.
        self.metrics.feeds({(name, b.served_name) for name, r in compiled.models.items() for b in r.backends}
                           | {(name, NO_BACKEND) for name in compiled.models}
                           | {(name, e.backend.served_name) for name, e in compiled.external.items()},
                           {name: {c.source.default, *(d.model for d in c.source.destinations)}
                            for name, c in compiled.content.items()})
        # Each release is a table change: expire here too, not only at scrape time, so a router nobody scrapes
        # does not keep a series per adapter version it ever served.
        self.metrics.expire()
        self.metrics.table_generation.set(table.generation)
        self.metrics.table_dropped_entries.set(len(compiled.dropped))
        for problem in compiled.dropped:
            log.error("routing table generation %d: left out %s (every other name is served)",
                      table.generation, problem)
        log.info("routing table generation %d: %s", table.generation,
                 ", ".join(f"{m.name} -> " + "/".join(f"{b.served_name}:{b.weight}" for b in m.backends)
                           for m in table.models) or "no models")
        if compiled.external:
            log.info("routing table generation %d: forwarded to other routes' routers: %s", table.generation,
                     ", ".join(f"{e.name} -> {e.route} ({e.url})" for e in compiled.external.values()))
        for note in compiled.warnings:
            log.warning("routing table generation %d: %s", table.generation, note)
        for c in compiled.content.values():
            log.info("content-routed model %s: methods %s, destinations %s, default %s", c.name,
                     "/".join(c.source.methods), ", ".join(d.model for d in c.source.destinations), c.source.default)

    @property
    def orchestrator(self):
        """The content-routing decisions' runner (router/orchestrate.py), made on first use."""
        if self._orchestrator is None:
            self._orchestrator = Orchestrator(self)
        return self._orchestrator

    # ---- cold start (hold.py) ----

    def hold(self, conn, req, model: str) -> None:
        """Hold a request no replica can serve while the route is cold (dispatch.proxy decided), or answer 503
        with Retry-After when cold_start_max requests are already held. Signals demand (`on_demand`)."""
        if len(self.held) >= self.cold_start_max or self.held_bytes + req.size > MAX_HELD_BYTES:
            self.metrics.count_held_result("queue_full")
            self.metrics.count_refused(model, 503)
            conn.respond_error(503, f"no replica is up to serve `{model}` and {len(self.held)} requests "
                                    f"({self.held_bytes} bytes) already wait for one (router.coldStart.maxRequests); "
                                    "retry later",
                               "service_unavailable", "cold_start_queue_full", extra=RETRY_AFTER_HEADER + req.routed,
                               close=not req.keep_alive)
            return
        h = Hold(self, conn, req, model)
        self.held[h] = None
        self.held_bytes += req.size
        conn.exchange = h
        if len(self.held) == 1:
            log.info("no replica is up: holding requests (up to %d for %g s) until one serves them",
                     self.cold_start_max, self.cold_start_wait)
        if self.on_demand is not None:
            try:
                self.on_demand()
            except Exception:  # the signal is best effort; the held request still waits
                log.exception("signalling demand failed")

    def release_held(self) -> None:
        """Send the held requests, oldest first, whose model a replica now serves (called after each poll);
        the others stay held, in order."""
        if not self.held:
            return
        waiting = list(self.held)
        for h in waiting:
            if h not in self.held:   # its client left, or its time ran out meanwhile
                continue
            if proxy(self, h.conn, h.req, h):
                h.end()             # sent, or answered (the table changed meanwhile): no longer held
        if not self.held:
            log.info("released %d held requests", len(waiting))

    # ---- lifecycle ----

    async def start_server(self, host: str, port: int) -> int:
        """Listen on `host`:`port` (0: any free port) on the running loop; returns the bound port."""
        self.loop = asyncio.get_running_loop()
        cls = self.connection_class
        self.server = await self.loop.create_server(lambda: cls(self), host, port, backlog=2048,
                                                    reuse_address=True)
        self._sweeper = self.loop.call_later(self.sweep_interval, self.sweep)
        return self.server.sockets[0].getsockname()[1]

    def sweep(self) -> None:
        """Enforce the client connections' read deadlines (runs every sweep_interval seconds).

        A connection's phase change only stores the phase and clears its deadline (the hot path pays no
        clock read or timer); the first sweep that sees the phase arms the deadline, a later one past it
        calls `ClientConnection.timed_out`. No read deadline runs while a request is being answered
        (router.timeoutSeconds bounds that) unless the client started sending another one.
        A connection stalled behind answers its client does not read has the idle deadline (timed_out).
        A proxied request past its `deadline` (router.timeoutSeconds after it was sent) is ended here too
        (`Exchange.timed_out`: 504, or a cut stream): the hot path arms no timer per request.
        """
        now = time.perf_counter()
        timeouts = self._phase_timeouts
        for c in list(self.connections):
            ex = c.exchange
            if ex is not None and ex.deadline and now >= ex.deadline:
                try:
                    ex.timed_out()
                except Exception:  # one bad exchange must not stop the sweep for the others
                    log.exception("ending a timed-out request failed")
                    if c.transport is not None:
                        c.transport.abort()
            phase = c.phase
            if phase == IDLE and c.busy and not c.stalled:   # stalled: its client reads nothing, see timed_out
                continue
            if c.deadline == 0.0:   # while the client does not read, its reads wait: the idle (send) deadline
                c.deadline = now + timeouts[IDLE if c.writing_paused and phase != LINGER else phase]
            elif now >= c.deadline:
                try:
                    c.timed_out()
                except Exception:  # one bad connection must not stop the sweep for the others
                    log.exception("closing a timed-out client connection failed")
                    if c.transport is not None:
                        c.transport.abort()
        self._sweeper = self.loop.call_later(self.sweep_interval, self.sweep)

    def connection_refused(self) -> None:
        """A client connection over max_connections was refused: count it, log at most every 10 s."""
        self.refused_connections += 1
        now = time.monotonic()
        if now - self._refused_logged >= 10.0:
            self._refused_logged = now
            log.warning("refusing client connections: %d open (--max-connections); %d refused so far",
                        len(self.connections), self.refused_connections)

    async def drain(self, seconds: float) -> None:
        """Stop accepting; answer held requests 503 (Retry-After: another router pod may serve them); close
        idle client connections; let answers in flight finish (up to `seconds`)."""
        if self.server is not None:
            self.server.close()
        for h in list(self.held):
            h.end()
            self.metrics.count_held_result("shutdown")
            h.refuse("the router is shutting down; retry", "router_shutting_down")
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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
        for r in (*self.pool.replicas, *self.external_upstreams.values()):
            r.close_idle()
        if self._orchestrator is not None:
            await self._orchestrator.close()
