"""Requests held while no replica is up: the route is scaled to zero, or every replica is (re)starting.

A request for which no replica serves any backend of its model is held instead of being answered 503 at once,
when the route's table allows it (`RouterSettings.cold_start_wait_seconds` > 0) and either no replica at all is
usable (a cold route) or requests are already held (the same cold start is still under way). Holding is bounded:
- in number: at most `cold_start_max_requests` per router, and at most MAX_HELD_BYTES of request bodies; one more
  is answered 503 (`cold_start_queue_full`) with Retry-After at once;
- in time: a held request is answered 503 (`cold_start_timeout`) with Retry-After when no replica serves its
  model within `cold_start_wait_seconds`.
Each new hold signals demand (`Router.on_demand`: the scale subresource wake-up, service.py) and the held count
is exported (`loraplane_router_held_requests`, what KEDA activates on). Held requests are released, oldest first,
as soon as a poll finds a replica serving their model (`Router.release_held`, called after every replica poll).

Why here, not in a separate queueing proxy (KEDA's HTTP add-on interceptor): the router already sits in front of
every replica and stays up at zero, so holding costs no extra hop on the hot path.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplane.router.client_protocol import ClientConnection, Request
    from loraplane.router.server import Router

# Request bodies held at once, in bytes, whatever cold_start_max_requests says: each body may be up to the
# route's router.maxRequestBytes (4 MiB by default), and 100 such would be 400 MiB of a router pod whose default
# memory limit is 1 GiB. Past it: 503 cold_start_queue_full, as past the count.
MAX_HELD_BYTES = 64 * 1024 * 1024
# What a 503 past the bounds tells the client to wait (seconds): a replica's start takes minutes, a retry
# sooner would only be held again.
COLD_RETRY_AFTER = 15
RETRY_AFTER_HEADER = b"Retry-After: %d\r\n" % COLD_RETRY_AFTER


class Hold:
    """One held request: its connection, the parsed request, the public model it asked for and its deadline.

    Stands in the connection's `exchange` slot while held, so a client that leaves is noticed (`client_lost`,
    counted 499); `upstream` is None (nothing is read from a replica yet)."""

    __slots__ = ("router", "conn", "req", "model", "since", "timer")
    upstream = None
    deadline = 0.0   # not Router.sweep's to enforce: the hold's own timer (`expire`) ends it

    def __init__(self, router: Router, conn: ClientConnection, req: Request, model: str):
        self.router, self.conn, self.req, self.model = router, conn, req, model
        self.since = time.perf_counter()
        self.timer: asyncio.TimerHandle | None = router.loop.call_later(router.cold_start_wait, self.expire)

    def end(self) -> None:
        """No longer held (sent, answered or dropped): leave the held set, stop the timer, free the slot."""
        if self.router.held.pop(self, self) is None:   # it was held until now (the dict's values are None)
            self.router.held_bytes -= self.req.size
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.conn.exchange is self:
            self.conn.exchange = None

    def released(self) -> None:
        """A replica serves the model: the request goes on (the caller starts its exchange)."""
        self.end()
        self.router.metrics.held_released(time.perf_counter() - self.since)

    def client_lost(self) -> None:
        """The client closed its connection while held: drop it, count 499."""
        self.end()
        self.router.metrics.count_held_result("client_closed")
        self.router.metrics.count_refused(self.model, 499)

    def expire(self) -> None:
        """cold_start_wait_seconds passed without a replica serving the model: 503 with Retry-After."""
        self.timer = None
        self.end()
        self.router.metrics.count_held_result("timeout")
        self.refuse(f"no replica came up to serve `{self.model}` within {self.router.cold_start_wait:g} s "
                    "(the route is scaled to zero or its replicas are starting; router.coldStart.maxWaitSeconds)",
                    "cold_start_timeout")

    def refuse(self, message: str, code: str) -> None:
        """Answer 503 with Retry-After (the request was held and is answered without a replica)."""
        self.router.metrics.count_refused(self.model, 503)
        self.conn.respond_error(503, message, "service_unavailable", code, extra=RETRY_AFTER_HEADER + self.req.routed,
                                close=not self.req.keep_alive)
