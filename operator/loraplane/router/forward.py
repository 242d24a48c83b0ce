"""Forwarding a request to another route's router: the external models of a table (issue 15).

A public model of another ModelRoute in the namespace (`ServingTable.external_models`: a content model's
destination, or every name in gateway mode) is served by that route's router. This router forwards the request
there with the body unchanged, through the same machinery as a request to vLLM (`Exchange`: pooled kept-alive
connections, streaming relay, router.timeoutSeconds, status/latency/token metrics under the backend label
`route:<route>`), with one difference in what it sends: the **client's own** `Authorization` header, never this
route's engine key (`Router.engine_auth` is for this route's vLLM only; the other router checks the client's
key against its own API keys). The other router then does its own weights, replica choice and metrics.

Entry point for the dispatch code: `forward_external` (dispatch.proxy calls it for a name in
`RoutingTable.external`; content routing calls it after rewriting `model` to an external destination).

Gateway mode (`loraplane router --gateway`, router/gateway.py) accepts client connections with
`ForwardingConnection`, which keeps every end-to-end request header so the route's router sees what the client
sent (its sticky header, headers its content-routing rules match on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraplane.api.orchestration import FORWARD_HOPS_HEADER, MAX_FORWARD_HOPS
from loraplane.router.client_protocol import HEAD, TRAILER, ClientConnection, Request
from loraplane.router.exchange import Exchange
from loraplane.router.table import ExternalRoute

if TYPE_CHECKING:
    from loraplane.router.hold import Hold
    from loraplane.router.server import Router

# Never forwarded as client headers: hop-by-hop headers (RFC 9110 section 7.6.1), those the exchange writes
# itself (Host, Content-Type, Content-Length, X-Request-Id, Authorization, the hop count), and Expect (answered
# here).
NOT_FORWARDED = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate", b"host", b"content-type", b"content-length",
    b"x-request-id", b"authorization", b"expect", FORWARD_HOPS_HEADER.lower().encode()))
_HOPS = FORWARD_HOPS_HEADER.encode()


class ForwardingRequest(Request):
    """A `Request` that also keeps its end-to-end headers (`headers`: (name, value) raw bytes, in order), for
    forwarding them to a route's router (gateway mode). Bounded by the router's --max-header-bytes."""

    __slots__ = ("headers", "connection_named")

    def __init__(self):
        super().__init__()
        self.headers: list[tuple[bytes, bytes]] = []
        # Lower-case names the client's Connection header lists: hop-by-hop too (RFC 9110 section 7.6.1), so
        # never forwarded, wherever they appear among the headers.
        self.connection_named: frozenset[bytes] = frozenset()


class ForwardingConnection(ClientConnection):
    """A client connection whose requests keep every end-to-end header (`ForwardingRequest`): the gateway's.
    A route's own router uses plain `ClientConnection` (no per-header cost on its hot path)."""

    def on_message_begin(self):
        """httptools callback: as ClientConnection.on_message_begin, with a ForwardingRequest."""
        self.req = ForwardingRequest()
        self.url = b""
        self.phase = HEAD
        self.deadline = 0.0

    def on_header(self, name: bytes, value: bytes):
        """httptools callback: as ClientConnection, and keep the header unless NOT_FORWARDED (a trailer field
        is neither read nor forwarded, as there)."""
        if self.phase == TRAILER:
            return
        super().on_header(name, value)
        lower = name.lower()
        if lower == b"connection":
            self.req.connection_named |= {t.strip().lower() for t in value.split(b",") if t.strip()}
        elif lower not in NOT_FORWARDED:
            self.req.headers.append((name, value))


def _header_safe(value: bytes) -> bool:
    # httptools refuses CR/LF in header values already; checked again because these bytes go out verbatim.
    return b"\r" not in value and b"\n" not in value and b"\x00" not in value


def forwarded_headers(router: Router, req: Request) -> bytes:
    """The header lines (each with CRLF) a forwarded request carries besides Host, Content-Type, Content-Length
    and X-Request-Id: FORWARD_HOPS_HEADER (the hops it arrived with, plus this one), the client's `Authorization` exactly as it sent it (none when it sent none), then the
    client's other end-to-end headers (a ForwardingRequest; not those its Connection header names), or else this route's sticky header with its value.
    Never this route's engine key."""
    parts = [b"%s: %d\r\n" % (_HOPS, req.hops + 1)]
    if req.authorization and _header_safe(req.authorization):
        parts.append(b"Authorization: %s\r\n" % req.authorization)
    headers = getattr(req, "headers", None)
    if headers is not None:
        named = req.connection_named
        parts.extend(b"%s: %s\r\n" % (n, v) for n, v in headers
                     if _header_safe(n) and _header_safe(v) and (not named or n.lower() not in named))
    elif req.sticky is not None and router.sticky_header_lower and _header_safe(req.sticky):
        parts.append(b"%s: %s\r\n" % (router.sticky_header_lower, req.sticky))
    return b"".join(parts)


def forward_external(router: Router, conn: ClientConnection, req: Request, ext: ExternalRoute, body: bytes,
                     hold: Hold | None = None, extra_headers: bytes = b"") -> bool:
    """Forward one /v1/completions or /v1/chat/completions request for `ext.name` (an entry of
    `router.table.external`) to that route's router, `body` sent as given (the client's bytes; content routing
    passes the body whose `model` it rewrote), with `forwarded_headers` (the client's Authorization, never the
    engine key). `hold`: the request's Hold when a held request is being released (dispatch.proxy), marked
    released here. `extra_headers`: header lines (each with CRLF) added to the answer, e.g. a content-routing
    decision's. Answers the client through the `Exchange`: the other router's answer relayed (its status, body
    or stream, and its X-Loraplane-Backend/Retry-After/routing headers), 502 when its router cannot be reached or
    fails before answering, 504 after router.timeoutSeconds. Counted under (ext.name, `route:<route>`). Never
    resent: the other router does its own retries. Returns True (the request is answered or on its way), as
    dispatch.proxy does. A request that arrived forwarded MAX_FORWARD_HOPS times already is answered 508 (Loop
    Detected) instead: two routers' tables disagree about who serves the name (it is moving between routes)."""
    if hold is not None:
        hold.released()
    if req.hops >= MAX_FORWARD_HOPS:
        router.metrics.count_refused(ext.name, 508)
        conn.respond_error(508, f"`{ext.name}` was forwarded {req.hops} times between routers already (this one "
                           f"would send it to route {ext.route} again): the routes' tables disagree about who "
                           "serves it, e.g. while it moves from one ModelRoute to another; retry shortly",
                           "loop_detected", "forwarding_loop", "model", close=not req.keep_alive)
        return True
    ex = Exchange(router, conn, req, ext.name, ext.backend, ext.replica, body, req.path,
                  forward=forwarded_headers(router, req), extra_headers=extra_headers)
    conn.exchange = ex
    ex.start()
    return True
