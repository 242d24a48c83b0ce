"""The router's connections to vLLM: an HTTP/1.1 client protocol (httptools) and the per-replica pool of
kept-alive connections.

A connection carries one exchange at a time. It reports the response to that `Exchange` as it is parsed:
`upstream_head(status, content_type)`, `upstream_body(data)` per body chunk (de-chunked by the parser),
`upstream_complete()`, or `upstream_lost(exc)` when vLLM closes it mid-answer. When the answer is complete
and vLLM keeps the connection alive, it goes back to its replica's idle list (`Replica.idle`) for reuse.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from typing import TYPE_CHECKING

import httptools

from loraplane.api.orchestration import DESTINATION_HEADER, FALLBACK_HEADER, METHOD_HEADER
from loraplane.router.replicas import Replica
from loraplane.router.table import BACKEND_HEADER

if TYPE_CHECKING:
    from loraplane.router.exchange import Exchange

log = logging.getLogger("loraplane.router")

# Below uvicorn's default keep-alive timeout (5 s, what vLLM's API server runs with): a pooled connection is
# never one vLLM is just closing.
UPSTREAM_KEEPALIVE = 4.0
DEFAULT_CONTENT_TYPE = b"application/json"  # vLLM's answers are JSON unless they stream


class Upstream(asyncio.Protocol):
    """A kept-alive HTTP/1.1 connection to one vLLM replica, carrying one exchange at a time.

    `send()` writes a request and attaches the exchange that gets the answer; `reusable()` tells whether an
    idle connection may carry the next one; `release()` puts it back into the replica's idle pool.
    """

    def __init__(self, replica: Replica):
        self.replica = replica
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.content_type = DEFAULT_CONTENT_TYPE
        self.idle_since = 0.0  # time.monotonic() when it last went idle
        self.got_bytes = False
        self.probe: select.poll | None = None

    def connection_made(self, transport):
        """asyncio callback: keep the transport, set TCP_NODELAY and make the poll object `reusable` uses."""
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A poll(2) set of this one socket, to look at it before reuse (transports do not allow recv).
            # Not a MSG_PEEK recv on a dup of the socket: on an idle socket that raises BlockingIOError, and
            # the exception cost more than the syscall on the hot path (issue 17).
            self.probe = select.poll()
            self.probe.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    def reusable(self) -> bool:
        """Still open at the other end, with nothing unexpected waiting. vLLM closing an idle connection
        may not have reached our event loop yet: sending there would lose the request after it was written
        (then it may not be resent), while a look costs one syscall (poll(2) with a zero timeout: any event,
        readable, hang-up or error, means the connection is not fit)."""
        if self.transport is None or self.probe is None:
            return False
        try:
            return not self.probe.poll(0)   # nothing to read: open and idle
        except OSError:
            return False

    def connection_lost(self, exc):
        """asyncio callback: tell the exchange in progress (vLLM closed mid-answer), else leave the idle pool."""
        self.transport = None
        self.probe = None   # the transport closes the socket; the poll set holds no descriptor of its own
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.upstream_lost(exc)
        else:
            try:
                self.replica.idle.remove(self)
            except ValueError:
                pass

    def data_received(self, data):
        """asyncio callback: feed the response bytes to the parser; a malformed response closes the connection."""
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            log.warning("replica %s: malformed response (%s)", self.replica.name, exc)
            self.close()

    def send(self, exchange: Exchange, head: bytes, payload: bytes) -> None:
        """Write one request (`head`: request line and headers, ending with the blank line; `payload`: the
        body) and report its answer to `exchange`."""
        self.exchange = exchange
        self.got_bytes = False
        # The parser is the connection's own for its whole life: llhttp starts over after a complete message,
        # and a connection is only reused after one (`on_message_complete`); a new parser per request cost ~1 us.
        self.content_type = DEFAULT_CONTENT_TYPE
        self.transport.write(head + payload)

    def release(self) -> None:
        """Back into the replica's idle pool, kept alive for the next request (see `take_idle`)."""
        self.idle_since = time.monotonic()
        self.replica.idle.append(self)

    def close(self) -> None:
        """Close the connection (vLLM aborts a generation whose connection closes)."""
        if self.transport is not None:
            self.transport.close()

    # ---- parser callbacks ----

    def on_header(self, name: bytes, value: bytes):
        """httptools callback: remember the response's Content-Type."""
        if len(name) == 12 and name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self):
        """httptools callback: report the status code and content type to the exchange."""
        if self.exchange is not None:
            self.exchange.upstream_head(self.parser.get_status_code(), self.content_type)

    def on_body(self, body: bytes):
        """httptools callback: pass one de-chunked body chunk to the exchange."""
        if self.exchange is not None:
            self.exchange.upstream_body(body)

    def on_message_complete(self):
        """httptools callback: the answer is complete; back to the idle pool when vLLM keeps the connection
        alive, else close, then tell the exchange."""
        ex, self.exchange = self.exchange, None
        if self.parser.should_keep_alive() and self.transport is not None:
            self.release()
        else:
            self.close()
        if ex is not None:
            ex.upstream_complete()


# The headers of another route's router's answer that a forwarding router relays to its client: which version
# answered, when to retry, and a content-routing decision made there (api.orchestration's header names).
RELAYED_HEADERS = frozenset(h.lower().encode() for h in (
    BACKEND_HEADER, "Retry-After", DESTINATION_HEADER, METHOD_HEADER, FALLBACK_HEADER))
# At most this many relayed header lines per answer (a router sends one of each): the response parser has no
# header size limit of its own, so an answer of endless such headers would otherwise all be kept.
MAX_RELAYED_HEADERS = 16
_BACKEND_LOWER = BACKEND_HEADER.lower().encode()


class ForwardUpstream(Upstream):
    """A kept-alive connection to another route's router (an external model, router/forward.py): an `Upstream`
    that also relays that router's RELAYED_HEADERS to the client, its X-Loraplane-Backend (the version that
    answered there) in place of this router's `route:<route>`."""

    def __init__(self, replica: Replica):
        super().__init__(replica)
        self.relayed: list[bytes] = []

    def send(self, exchange: Exchange, head: bytes, payload: bytes) -> None:
        """As `Upstream.send`, starting a fresh list of relayed headers."""
        self.relayed = []
        super().send(exchange, head, payload)

    def on_header(self, name: bytes, value: bytes):
        """httptools callback: the Content-Type, and the headers relayed to the client."""
        n = name.lower()
        if n == b"content-type":
            self.content_type = value
        elif n in RELAYED_HEADERS and len(self.relayed) < MAX_RELAYED_HEADERS and len(value) <= 1024:
            self.relayed.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self):
        """httptools callback: hand the relayed headers to the exchange, then as `Upstream`."""
        ex = self.exchange
        if ex is not None and self.relayed:
            lines = b"".join(self.relayed)
            has_backend = any(line.lower().startswith(_BACKEND_LOWER + b":") for line in self.relayed)
            ex.backend_line = lines if has_backend else ex.backend_line + lines
        super().on_headers_complete()


    def on_message_complete(self):
        """httptools callback: as `Upstream`, except that a 502 or 503 of that router (it could not serve) is
        first offered to the exchange (`Exchange.route_failed`: mark the route unavailable, maybe re-send a
        content-routed request to its default) and relayed only when it was not re-sent."""
        ex = self.exchange
        status = self.parser.get_status_code()
        if ex is None or (status != 503 and status != 502):
            super().on_message_complete()
            return
        self.exchange = None
        if self.parser.should_keep_alive() and self.transport is not None:
            self.release()
        else:
            self.close()
        if not ex.route_failed(status):
            ex.upstream_complete()


def take_idle(replica: Replica) -> Upstream | None:
    """A pooled connection to `replica` fit for the next request, or None (then open one).

    The most recently used first; those idle for UPSTREAM_KEEPALIVE seconds or more, or closed by vLLM
    (`Upstream.reusable`), are closed and dropped on the way.
    """
    idle = replica.idle
    now = time.monotonic()
    while idle:
        up = idle.pop()
        if now - up.idle_since < UPSTREAM_KEEPALIVE and up.reusable():
            return up
        up.close()
    return None


async def open_upstream(replica: Replica, timeout: float) -> Upstream:
    """A new connection to `replica`'s vLLM. Raises OSError (refused, unreachable) or asyncio.TimeoutError
    after `timeout` seconds (the router's --connect-timeout); in both cases nothing was sent."""
    loop = asyncio.get_running_loop()
    cls = ForwardUpstream if replica.external else Upstream
    _, up = await asyncio.wait_for(loop.create_connection(lambda: cls(replica), replica.host, replica.port),
                                   timeout)
    return up
