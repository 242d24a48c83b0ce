"""Dispatch: which endpoint answers a client request and, for an inference request, which backend (vLLM
served name) and which replica get it.

The choices themselves live beside their data: `PublicRoute.pick` (weights, sticky header) in
table.py and `ReplicaPool.choose` (Ready there, least loaded) in replicas.py; this module applies them to
one request and answers what the router refuses itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplane.router.client_protocol import ClientConnection, Request
from loraplane.router.content import CompiledContentModel, decision_text
from loraplane.router.exchange import Exchange, ask_for_usage
from loraplane.router.forward import forward_external
from loraplane.router.hold import Hold
from loraplane.router.metrics import NO_BACKEND, UNKNOWN_MODEL
from loraplane.router.orchestrate import Decision, Pending
from loraplane.router.table import BackendRoute, BadRequest, PublicRoute, read_model, rewrite_model

if TYPE_CHECKING:
    from loraplane.router.server import Router

# How long after a table switch a request may still go to its model's previous backends (seconds): the
# loaders drain a replaced version for at least 5 s (loader --drain-seconds); the router polls them every 1 s.
SWITCH_GRACE_S = 5.0

log = logging.getLogger("loraplane.router")

# The OpenAI API endpoints served (vLLM serves the same paths).
COMPLETIONS, CHAT_COMPLETIONS, MODELS = b"/v1/completions", b"/v1/chat/completions", b"/v1/models"
# An embedding route's endpoint (spec.engine.task embed: vLLM's pooling runner); proxied like a completion
# (`model` rewritten, replica choice, metrics). A generation engine answers it with vLLM's own error.
EMBEDDINGS = b"/v1/embeddings"
# json.loads' own decoder (no options), for route_by_content's UTF-8 bodies.
_JSON = json.JSONDecoder()
# Every path `proxy` serves.
INFERENCE_PATHS = frozenset((COMPLETIONS, CHAT_COMPLETIONS, EMBEDDINGS))


# Paths that need an API key (when keys are set); /metrics, /healthz and /readyz are open to probes.
KEYED_PATHS = INFERENCE_PATHS | {MODELS}
# Paths whose requests have a body (up to router.maxRequestBytes). Every other request must have none: a body
# there is refused before it is read, so a client without a key cannot make the router buffer bodies on an
# open path (/healthz, an unknown path) either.
BODY_PATHS = INFERENCE_PATHS
# X-Request-Id is forwarded to vLLM, which logs it (and with --enable-request-id-headers uses it as the
# request's id): longer values are refused rather than passed on or cut.
MAX_REQUEST_ID_BYTES = 256


def admit(router: Router, conn: ClientConnection, req: Request) -> bool:
    """Whether to read the body of a request whose headers are complete; False when it was refused: 401
    without an accepted API key (on KEYED_PATHS), 413 when its Content-Length is over
    router.maxRequestBytes, 400 for a body on a path not in BODY_PATHS, 400 for an X-Request-Id over MAX_REQUEST_ID_BYTES. A refused request's body
    is never read or buffered, with or without `Expect: 100-continue` (see ClientConnection.refuse).
    Bound as `Router.admit`."""
    if router.api_keys is not None and req.path in KEYED_PATHS and not router.api_keys.check(req.authorization):
        router.metrics.count_refused(NO_BACKEND, 401)
        conn.refuse(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                    "invalid_request_error", "invalid_api_key")
        return False
    req.body_limit = router.max_request_bytes if req.path in BODY_PATHS else 0
    if req.content_length is not None and req.content_length > req.body_limit:
        router.metrics.count_refused(NO_BACKEND, 413 if req.body_limit else 400)
        if req.body_limit:
            conn.refuse_too_large()
        else:
            conn.refuse_no_body()
        return False
    if req.request_id is not None and len(req.request_id) > MAX_REQUEST_ID_BYTES:
        router.metrics.count_refused(NO_BACKEND, 400)
        conn.refuse(400, f"X-Request-Id is over {MAX_REQUEST_ID_BYTES} bytes: send a shorter id (or none)",
                    "invalid_request_error", "invalid_request_id", "X-Request-Id")
        return False
    return True


def dispatch(router: Router, conn: ClientConnection, req: Request) -> None:
    """Answer one complete client request: proxy the OpenAI inference endpoints (POST only), answer
    /v1/models (the public model names; the API key was checked by `admit`), /metrics (Prometheus text
    format), /healthz (the process runs) and /readyz (503 until a routing table is loaded); 404 otherwise.
    Bound as `Router.dispatch`, which `ClientConnection` calls. The answer to a HEAD request is its head only
    (`ClientConnection.head_only`)."""
    path = req.path
    if path in INFERENCE_PATHS and req.method == b"POST":
        proxy(router, conn, req)
        return
    # Every other request is answered here, at once, by `respond`: to a HEAD request without the body (RFC 9110
    # section 9.3.2). A body after a HEAD answer is read by the client (or a proxy pooling the connection) as the
    # start of the next answer: every later answer on the connection would be off by one.
    conn.head_only = req.method == b"HEAD"
    if path in INFERENCE_PATHS:
        conn.respond_error(405, f"use POST for {path.decode()}", "invalid_request_error",
                           extra=b"Allow: POST\r\n", close=not req.keep_alive)
    elif path == MODELS:
        if router.table is None:
            conn.respond_error(503, "no routing table loaded yet", "service_unavailable",
                               close=not req.keep_alive)
        else:
            conn.respond(200, router.table.models_json, keep_alive=req.keep_alive)
    elif path == b"/metrics":
        conn.respond(200, generate_latest(router.metrics.registry), CONTENT_TYPE_LATEST.encode(),
                     keep_alive=req.keep_alive)
    elif path == b"/healthz":
        conn.respond(200, b"ok", b"text/plain", keep_alive=req.keep_alive)
    elif path == b"/readyz":
        if router.table is None:
            conn.respond(503, b"no routing table loaded yet", b"text/plain", keep_alive=req.keep_alive)
        else:
            conn.respond(200, b"ok", b"text/plain", keep_alive=req.keep_alive)
    else:
        conn.respond_error(404, f"no such endpoint: {path.decode('latin-1')} (this router serves "
                                "/v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models)",
                           "invalid_request_error",
                           "not_found", close=not req.keep_alive)

def proxy(router: Router, conn: ClientConnection, req: Request, hold: Hold | None = None) -> bool:
    """Route one /v1/completions, /v1/chat/completions or /v1/embeddings request and start its `Exchange`. Returns False
    only when `hold` (the request's `Hold`, when it is being released: see hold.py) is given and still no
    replica serves its model: it stays held.

    The API key and the body size were checked before the body was read (`admit`, `on_body`). Refuses
    with an OpenAI error, before any backend is chosen: 503 without a routing table, 400 for a body
    without a usable `model` (or one that vLLM could read differently: see table.read_model), 404 for
    a model the route does not serve (a public model of another route, `table.external`, is forwarded to that
    route's router by `forward.forward_external`, body unchanged), 503 (Retry-After: 2) when no backend of the model has a usable
    replica, unless the router holds it for a cold start (hold.py). Otherwise picks a backend (weights, or
    sticky by the route's header), skipping backends with no usable replica (their weight goes to the
    others), and the least loaded replica that has it Ready.
    """
    table = router.table
    close = not req.keep_alive
    if table is None:
        conn.respond_error(503, "no routing table loaded yet", "service_unavailable", close=close)
        return True
    body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
    try:
        model, handle = read_model(body)
    except BadRequest as exc:
        router.metrics.count_refused(NO_BACKEND, 400)
        conn.respond_error(400, str(exc), "invalid_request_error", None, exc.param, close=close)
        return True
    route = table.models.get(model)
    if route is None:
        # Not a public model of this route: only now (a miss) are content-routed and external names looked up,
        # so a request naming a public model pays nothing for them.
        content = table.content.get(model)
        if content is not None and not req.routed:
            route_by_content(router, conn, req, content, body, handle)
            return True
        external = table.external.get(model)
        if external is not None:
            return forward_external(router, conn, req, external, body, hold, req.routed)
        router.metrics.count_refused(UNKNOWN_MODEL, 404)
        names = table.served_names()
        conn.respond_error(404, f"The model `{model}` does not exist. Served models: {', '.join(names)}",
                           "NotFoundError", "model_not_found", "model", extra=req.routed, close=close,
                           available_models=names)
        return True
    return send_named(router, conn, req, model, route, body, handle, hold)


def send_named(router: Router, conn: ClientConnection, req: Request, model: str, route: PublicRoute, body: bytes,
               handle: object, hold: Hold | None = None, renamed: BackendRoute | None = None) -> bool:
    """The named-model part of `proxy`: `route` (the public model `model` of the current table) picks the backend
    and replica, and `body`'s `model` (located by `handle`, read_model's) is rewritten to the backend's served
    name. `renamed`: a content-routing decision's destination (`body` still names the content-routed model):
    the body is rewritten to name it only where it is kept (a held request is proxied again from `req.body`) or
    logged, so a decided request is read and rewritten once, as a named one is. Returns as `proxy`."""
    close = not req.keep_alive
    if router.log_prompts and hold is None:
        if renamed is not None:
            body, handle, renamed = _renamed(req, body, handle, renamed)
        log.info("request body (router.logPrompts is on): %s", body.decode("utf-8", "replace"))
    sticky = req.sticky
    # A backend with no usable replica is skipped; its weight goes to the others.
    rng, pool = router.rng, router.pool
    backend = route.pick(rng, sticky)
    replica = pool.choose(backend.served_name) if backend is not None else None
    if replica is None:
        skipped = set()
        while backend is not None and replica is None:
            skipped.add(backend)
            backend = route.pick(rng, sticky, skipped)
            replica = pool.choose(backend.served_name) if backend is not None else None
        if replica is None and router.previous_table is not None \
                and time.monotonic() - router.replaced_at < SWITCH_GRACE_S:
            previous = router.previous_table.models.get(model)
            prev_backend = previous.pick(rng, sticky) if previous is not None else None
            replica = pool.choose(prev_backend.served_name) if prev_backend is not None else None
            if replica is not None:
                backend = prev_backend
        if replica is None:
            if hold is not None:
                return False   # still cold: stays held until a replica serves it or its time is up
            if router.cold_start_wait > 0 and (router.held or not router.pool.any_usable()):
                if renamed is not None:
                    _renamed(req, body, handle, renamed)
                router.hold(conn, req, model)
                return True
            router.metrics.count_refused(model, 503)
            conn.respond_error(
                503, f"no replica is ready to serve `{model}` (backends: "
                     f"{', '.join(b.served_name for b in route.backends)}); adapters may still be loading",
                "service_unavailable", "no_ready_replica", extra=b"Retry-After: 2\r\n" + req.routed, close=close)
            return True
    if hold is not None:
        hold.released()
    payload = rewrite_model(body, handle, backend)
    # A stream that does not ask for usage gets it from vLLM anyway (stripped before the client sees it), so
    # its tokens are counted: most chat UIs stream without stream_options.
    with_usage = ask_for_usage(payload) if router.ask_usage else None
    ex = Exchange(router, conn, req, model, backend, replica, payload if with_usage is None else with_usage,
                  req.path, strip_usage=with_usage is not None)
    conn.exchange = ex
    ex.start()
    return True



# ---- content routing (issue 15): decide, rewrite `model` to the destination, then the named-model path ----


class Deciding:
    """Stands in the connection's `exchange` slot while a content-routing decision runs (it has no upstream and
    no deadline of its own: each method's budget bounds it). A client that leaves cancels the decision (499)."""

    __slots__ = ("router", "model", "task")
    upstream = None
    deadline = 0.0

    def __init__(self, router: Router, model: str):
        self.router, self.model = router, model
        self.task: asyncio.Task | None = None

    def client_lost(self) -> None:
        """The client closed its connection mid-decision: stop deciding, count 499."""
        if self.task is not None:
            self.task.cancel()
        self.router.metrics.count_refused(self.model, 499)


def route_by_content(router: Router, conn: ClientConnection, req: Request, content: CompiledContentModel,
                     body: bytes, handle: object) -> None:
    """Decide where a request for a content-routed model goes (orchestrate.py, async), then send it down the
    named-model path (`proxy`) with its body's `model` rewritten to the destination's public name and the
    decision's response headers (`req.routed`) on whatever answers it. 400 for a body that is not JSON: the
    decision reads the messages or prompt (content.decision_text)."""
    if type(handle) is dict:
        obj = handle
    else:
        try:
            # json.loads(body) without its wrapper's encoding detection where that detection says UTF-8 (a body
            # that starts `{` and a byte other than NUL): the same decoding, ~0.5 us less per request.
            obj = _JSON.decode(body.decode("utf-8", "surrogatepass")) \
                if body[:1] == b"{" and body[1:2] not in (b"\x00", b"") else json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            router.metrics.count_refused(content.name, 400)
            why = "nests arrays or objects too deeply to be read" if isinstance(exc, RecursionError) else \
                f"is not valid JSON: {exc}"
            conn.respond_error(400, f"the request body {why}", "invalid_request_error", close=not req.keep_alive)
            return
    text = decision_text(obj, req.path == CHAT_COMPLETIONS)
    headers = getattr(req, "rule_headers", None)   # unset unless a rule's header arrived
    decision = router.orchestrator.decide_now(content, text, headers)
    if type(decision) is Decision:   # rules decided without I/O: no task, no event-loop round trip
        send_decided(router, conn, req, body, handle, decision, content)
        return
    deciding = Deciding(router, content.name)
    conn.exchange = deciding
    router.active += 1   # a draining router waits for it, as for a proxied request
    deciding.task = router.loop.create_task(_decide_and_send(router, conn, req, content, body, handle, text,
                                                             headers, decision, deciding))


def send_decided(router: Router, conn: ClientConnection, req: Request, body: bytes, handle: object,
                 decision: Decision, content: CompiledContentModel | None = None) -> None:
    """Send a decided request down the named-model path: its body's `model` rewritten to the destination (only
    that changes) and the decision's header lines on whatever answers it. A method's choice of an external
    destination gets `req.fallback` (with `content`): if that route turns out unavailable before any byte reached
    the client (exchange.py), the request is sent to the default instead, once."""
    req.routed = decision.head
    if content is not None and decision.fallback is None and decision.destination in router.table.external:
        def fallback() -> bool:
            default = router.orchestrator.fall_back(content, decision)
            if default is None:
                return False
            send_decided(router, conn, req, body, handle, default)
            return True
        req.fallback = fallback
    else:
        req.fallback = None
    table = router.table
    route = table.models.get(decision.destination) if table is not None else None
    if route is not None:   # a public model of this route: straight to its backend, the body read once
        send_named(router, conn, req, decision.destination, route, body, handle, None, decision.rewrite)
        return
    payload = rewrite_model(body, handle, decision.rewrite)   # another route's model (or none): proxy decides
    req.body = [payload]
    req.size = len(payload)
    proxy(router, conn, req)


def _renamed(req: Request, body: bytes, handle: object, renamed: BackendRoute) -> tuple[bytes, object, None]:
    """`body` rewritten to name `renamed` (a decision's destination), kept as `req.body`: (the new body, its
    handle, None). Only for the rare paths that keep or log a decided request's body."""
    payload = rewrite_model(body, handle, renamed)
    req.body = [payload]
    req.size = len(payload)
    _, new_handle = read_model(payload)
    return payload, new_handle, None


async def _decide_and_send(router: Router, conn: ClientConnection, req: Request, content: CompiledContentModel,
                           body: bytes, handle: object, text: bytes, headers: dict[bytes, bytes] | None,
                           pending: Pending, deciding: Deciding) -> None:
    try:
        decision = await router.orchestrator.decide(content, text, headers, req.authorization, pending)
    except asyncio.CancelledError:
        return
    except Exception:   # decide() counts its methods' failures itself; this is a bug: answer, never hang
        log.exception("content routing of %s failed", content.name)
        if conn.exchange is deciding:
            conn.exchange = None
            router.metrics.count_refused(content.name, 500)
            conn.respond_error(500, "content routing failed (see the router's log)", "internal_error",
                               close=not req.keep_alive)
        return
    finally:
        router.active -= 1
    if conn.exchange is not deciding or conn.transport is None:
        return   # the client left meanwhile (counted by Deciding.client_lost)
    conn.exchange = None
    send_decided(router, conn, req, body, handle, decision, content)

