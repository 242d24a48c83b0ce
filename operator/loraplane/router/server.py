"""The router's HTTP server: OpenAI-compatible endpoints proxied to the chosen vLLM replica.

Per request: authenticate, read the body (size-limited), find `model`, pick a backend (weights or
sticky header), pick a replica (has that backend Ready, least loaded), rewrite only `model`, forward,
relay the answer (SSE chunk by chunk as it arrives), count status, tokens, latency, TTFT.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplane.router.metrics import NO_BACKEND, UNKNOWN_MODEL, RouterMetrics
from loraplane.router.replicas import Replica, ReplicaPool
from loraplane.router.table import BadRequest, RoutingTable, read_model, rewrite_model
from loraplane.servingtable import ServingTable

log = logging.getLogger("loraplane.router")

BACKEND_HEADER = "X-Loraplane-Backend"  # tells the caller which version answered (canaries, debugging)
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_JSON = "application/json"


def parse_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last `usage` object in a response body or SSE tail.

    The last occurrence is the final total in a stream (and the only one in a plain answer); generated
    text cannot fake it, because quotes inside JSON strings are escaped.
    """
    i = data.rfind(b'"usage"')
    if i < 0:
        return None
    window = data[i:i + 600]
    p = _PROMPT_TOKENS.search(window)
    c = _COMPLETION_TOKENS.search(window)
    if p is None and c is None:
        return None
    return (int(p.group(1)) if p else 0, int(c.group(1)) if c else 0)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None, **extra) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    err = {"message": message, "type": type_, "param": param, "code": code, **extra}
    return json.dumps({"error": err}, separators=(",", ":")).encode()


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None, **extra) -> web.Response:
    return web.Response(status=status, body=error_body(message, type_, code, param, **extra),
                        content_type=_JSON, headers=headers)


class ApiKeys:
    """Accepted API keys from a file (one per line) or a folder (a mounted Secret: one or more keys per
    file). Re-read when it changes, so a rotated Secret applies without a restart. Only SHA-256 digests
    are kept in memory and compared."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._digests: frozenset[bytes] = frozenset()
        self._stamp: tuple | None = None
        self.reload()
        if not self._digests:
            raise ValueError(f"--api-keys-file {self.path}: no keys found (one key per line; '#' comments); "
                             "omit the option to run without API keys")

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))
        return [self.path]

    def reload(self) -> bool:
        files = self._files()
        stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
        if stamp == self._stamp:
            return False
        keys = set()
        for p in files:
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.add(hashlib.sha256(line.encode()).digest())
        self._digests, self._stamp = frozenset(keys), stamp
        log.info("API keys loaded: %d", len(keys))
        return True

    def check(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        return hashlib.sha256(authorization[7:].strip().encode()).digest() in self._digests


class Router:
    """State shared by the handlers: the routing table (swapped whole on reload), replicas, metrics."""

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
        self.session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=600, sock_connect=connect_timeout)

    # ---- configuration -------------------------------------------------------------------------------

    def set_table(self, table: ServingTable) -> None:
        """Use a new table from the next request on; requests in flight finish on the one they started with."""
        compiled = RoutingTable.compile(table)
        for route in compiled.models.values():
            for b in route.backends:
                b.stats = self.metrics.stats(route.name, b.served_name)
        self._timeout = aiohttp.ClientTimeout(total=table.router.timeout_seconds, sock_connect=self.connect_timeout)
        self.pool.base_served_name = table.served_model_name
        self.table = compiled
        self.metrics.table_generation.set(table.generation)
        log.info("routing table generation %d: %s", table.generation,
                 ", ".join(f"{m.name} -> " + "/".join(f"{b.served_name}:{b.weight}" for b in m.backends)
                           for m in table.models) or "no models")

    def make_app(self) -> web.Application:
        # The size limit is enforced per request from the table (it can change at run time); aiohttp's own
        # limit only stops absurd bodies.
        app = web.Application(client_max_size=1 << 34, handler_args={"max_field_size": 16384})
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.on_startup.append(self._open_session)
        app.on_cleanup.append(self._close_session)
        return app

    async def _open_session(self, app=None) -> None:
        # keepalive below uvicorn's 5 s so a pooled connection is never one vLLM has just closed; no
        # auto-decompression: bytes pass through as they are.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4, ttl_dns_cache=10)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def _close_session(self, app=None) -> None:
        if self.session is not None:
            await self.session.close()

    # ---- small endpoints -----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.table is None:
            return web.Response(status=503, text="no routing table loaded yet")
        return web.Response(text="ok")

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_models(self, request: web.Request) -> web.Response:
        if self.api_keys is not None and not self.api_keys.check(request.headers.get("Authorization")):
            return self._unauthorized()
        if self.table is None:
            return error_response(503, "no routing table loaded yet", "service_unavailable")
        return web.Response(body=self.table.models_json, content_type=_JSON)

    def _unauthorized(self) -> web.Response:
        self.metrics.stats(NO_BACKEND, NO_BACKEND).count(401)
        return error_response(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                              "invalid_request_error", "invalid_api_key")

    # ---- the proxy -----------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, True)

    async def _read_body(self, request: web.Request, limit: int) -> bytes | None:
        """The body, or None when it is over `limit` bytes."""
        length = request.content_length
        if length is not None:
            return None if length > limit else await request.read()
        chunks, size = [], 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _proxy(self, request: web.Request, chat: bool) -> web.StreamResponse:
        started = time.perf_counter()
        table = self.table
        if table is None:
            return error_response(503, "no routing table loaded yet", "service_unavailable")
        if self.api_keys is not None and not self.api_keys.check(request.headers.get("Authorization")):
            return self._unauthorized()
        limit = table.source.router.max_request_bytes
        body = await self._read_body(request, limit)
        if body is None:
            self.metrics.stats(NO_BACKEND, NO_BACKEND).count(413)
            return error_response(413, f"request body over {limit} bytes (the route's router.maxRequestBytes)",
                                  "invalid_request_error", "request_too_large")
        try:
            model, handle = read_model(body)
        except BadRequest as exc:
            self.metrics.stats(NO_BACKEND, NO_BACKEND).count(400)
            return error_response(400, str(exc), "invalid_request_error", None, exc.param)
        route = table.models.get(model)
        if route is None:
            self.metrics.stats(UNKNOWN_MODEL, NO_BACKEND).count(404)
            names = list(table.models)
            return error_response(404, f"The model `{model}` does not exist. Served models: {', '.join(names)}",
                                  "NotFoundError", "model_not_found", "model", available_models=names)
        if table.source.router.log_prompts:
            log.info("request body (router.logPrompts is on): %s", body.decode("utf-8", "replace"))
        sticky_header = table.source.router.sticky_header
        sticky = None
        if sticky_header:
            value = request.headers.get(sticky_header)
            if value:
                sticky = value.encode()

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
                self.metrics.stats(model, NO_BACKEND).count(503)
                return error_response(
                    503, f"no replica is ready to serve `{model}` (backends: "
                         f"{', '.join(b.served_name for b in route.backends)}); adapters may still be loading",
                    "service_unavailable", "no_ready_replica", headers={"Retry-After": "2"})

        payload = rewrite_model(body, handle, backend)
        stats = backend.stats
        request_id = request.headers.get("X-Request-Id")
        headers = {"Content-Type": _JSON, "X-Request-Id": request_id} if request_id else {"Content-Type": _JSON}
        stats.in_flight.inc()
        try:
            return await self._forward(request, chat, payload, headers, backend, replica, started)
        finally:
            stats.in_flight.dec()

    async def _forward(self, request, chat, payload, headers, backend, replica: Replica, started):
        stats = backend.stats
        tried: tuple[Replica, ...] = ()
        attempt = 0
        while True:
            attempt += 1
            replica.in_flight += 1
            released = False
            try:
                try:
                    upstream = await self.session.post(replica.chat_url if chat else replica.completions_url,
                                                       data=payload, headers=headers, timeout=self._timeout)
                except aiohttp.ClientConnectorError as exc:
                    # Nothing reached vLLM: safe to send elsewhere.
                    self.pool.mark_failed(replica)
                    log.warning("replica %s: connection failed (%s); not routing to it until it answers a poll",
                                replica.name, exc.os_error or exc)
                    replica.in_flight -= 1
                    released = True
                    tried += (replica,)
                    nxt = self.pool.choose(backend.served_name, tried) if attempt < self.max_attempts else None
                    if nxt is None:
                        return self._finish_error(request, stats, started, 502,
                                                  f"could not connect to a replica serving `{backend.served_name}`",
                                                  "bad_gateway", "replica_unreachable")
                    stats.retries.inc()
                    replica = nxt
                    continue
                except asyncio.TimeoutError:
                    return self._finish_error(request, stats, started, 504,
                                              "the replica did not answer in time (router.timeoutSeconds)",
                                              "timeout", "upstream_timeout")
                except aiohttp.ClientError as exc:
                    # The request may have reached vLLM (a generation may be running): never resent.
                    return self._finish_error(request, stats, started, 502, f"the replica failed: {exc}",
                                              "bad_gateway", "replica_failed")
                try:
                    if (upstream.status == 404 and not backend.is_base and attempt < self.max_attempts):
                        # vLLM does not have the adapter (our view of it was stale): nothing was generated.
                        await upstream.read()
                        self.pool.mark_missing(replica, backend.served_name)
                        tried += (replica,)
                        nxt = self.pool.choose(backend.served_name, tried)
                        if nxt is not None:
                            stats.retries.inc()
                            replica.in_flight -= 1
                            released = True
                            replica = nxt
                            continue
                        upstream.release()
                        return self._finish_error(request, stats, started, 503,
                                                  f"`{backend.served_name}` is not loaded on any replica yet",
                                                  "service_unavailable", "adapter_not_loaded",
                                                  headers={"Retry-After": "2"})
                    return await self._relay(request, upstream, backend, replica, started)
                finally:
                    upstream.release()
            finally:
                if not released:
                    replica.in_flight -= 1

    def _finish_error(self, request, stats, started, status, message, type_, code, headers=None) -> web.Response:
        stats.count(status)
        stats.duration.observe(time.perf_counter() - started)
        self._log_access(request, stats, None, status, started)
        return error_response(status, message, type_, code, headers=headers)

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse, backend, replica: Replica,
                     started: float) -> web.StreamResponse:
        stats = backend.stats
        content_type = upstream.headers.get("Content-Type", _JSON)
        status = upstream.status
        if content_type.startswith("text/event-stream"):
            out = web.StreamResponse(status=status, headers={"Content-Type": content_type,
                                                             "Cache-Control": "no-cache",
                                                             BACKEND_HEADER: backend.served_name})
            await out.prepare(request)
            first = True
            prev = last = b""
            try:
                async for chunk in upstream.content.iter_any():
                    if first:
                        stats.ttft.observe(time.perf_counter() - started)
                        first = False
                    await out.write(chunk)
                    prev, last = last, chunk
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # Bytes already went to the client: end the stream, never retry.
                log.warning("replica %s: stream broke after it started (%s)", replica.name, exc)
                stats.count(599)
                stats.duration.observe(time.perf_counter() - started)
                self._log_access(request, stats, replica, 599, started)
                raise  # aiohttp closes the client connection: the client sees a truncated stream
            await out.write_eof()
            usage = parse_usage(prev[-2048:] + last if len(last) < 2048 else last)
        else:
            data = await upstream.read()
            out = web.Response(body=data, status=status, headers={"Content-Type": content_type,
                                                                  BACKEND_HEADER: backend.served_name})
            usage = parse_usage(data) if status == 200 else None
        if usage is not None:
            stats.prompt_tokens.inc(usage[0])
            stats.completion_tokens.inc(usage[1])
        stats.count(status)
        stats.duration.observe(time.perf_counter() - started)
        replica.requests_total += 1
        if self.access_log:
            self._log_access(request, stats, replica, status, started)
        return out

    def _log_access(self, request, stats, replica, status, started) -> None:
        if self.access_log or status >= 500:
            log.info("%s %s model=%s backend=%s replica=%s status=%d %.1fms", request.method, request.path,
                     stats.labels[0], stats.labels[1], replica.name if replica else "-", status,
                     (time.perf_counter() - started) * 1000)


def load_table_file(path: Path) -> ServingTable:
    """The table from a file (a mounted ConfigMap key, or a local file)."""
    return ServingTable.load(path)


def file_stamp(path: Path) -> tuple | None:
    """What changes when the file does, including a kubelet's atomic swap of a ConfigMap volume."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
