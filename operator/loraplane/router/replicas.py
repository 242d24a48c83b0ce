"""The vLLM replicas behind a route: discovery, what each has loaded, how busy each is, and the choice.

Each replica is polled every `poll_interval` seconds:
- its loader's `/status` (a `ReplicaReport`: which adapters are Ready, whether vLLM is up), or, for a
  replica given without a loader, vLLM's own `/v1/models` (what it has loaded);
- vLLM's `/metrics` for `vllm:num_requests_running` + `vllm:num_requests_waiting`, which include the
  traffic of the other router replicas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from loraplane.api.wire.serving import ENGINE_PORT, LOADER_PORT, STATUS_MAX_BYTES, AdapterState, ReplicaReport
from loraplane.storage.httpbody import read_bounded

log = logging.getLogger("loraplane.router")

POLL_FAILURES_TO_DOWN = 3
# The most read of vLLM's /v1/models or /metrics answer (storage.httpbody.read_bounded): a replica is a peer the
# router does not trust with its memory. vLLM 0.32's /metrics is ~30 KiB plus ~2 KiB per served adapter name, and
# /v1/models ~300 bytes per model, so 8 MiB is thousands of adapters.
ENGINE_BODY_MAX_BYTES = 8 * 1024 * 1024
# Adapter states (in a loader's report) a request may be sent to.
ROUTABLE_STATES = frozenset({AdapterState.Ready, AdapterState.Draining})

# Only two gauges are needed out of vLLM's ~100 metric families: a line filter is ~100x cheaper than
# the full exposition-format parser on every poll of every replica.
_ENGINE_LOAD = re.compile(rb"^vllm:num_requests_(?:running|waiting)(?:\{[^}\n]*\})? ([0-9.eE+-]+|NaN)\s*$",
                          re.MULTILINE)


def parse_engine_load(metrics_text: bytes) -> int:
    """Requests running + waiting in vLLM, summed over its label sets (engines, model names)."""
    total = 0.0
    for m in _ENGINE_LOAD.finditer(metrics_text):
        value = float(m.group(1))
        if value == value:  # not NaN
            total += value
    return int(total)


@dataclass(eq=False, slots=True)
class Replica:
    """One vLLM server and what the router knows about it."""

    engine_url: str                 # vLLM base URL, e.g. http://10.0.0.7:8000
    status_url: str | None          # loader /status; None: ask vLLM's /v1/models instead
    name: str = ""
    in_flight: int = 0              # this router's requests now open on it
    engine_load: int = 0            # vLLM's running + waiting at the last poll (all routers)
    _own_at_poll: int = 0           # our in_flight when engine_load was sampled
    engine_ready: bool = False
    polled: bool = False            # at least one poll answered
    ready: frozenset[str] = frozenset()  # served names Ready there (base model included when up)
    failed_at: float = 0.0          # monotonic time of the last connection failure while proxying
    last_poll_error: str | None = None
    poll_failures: int = 0          # consecutive
    requests_total: int = 0
    host: str = ""
    port: int = 0
    host_header: bytes = b""
    idle: list = field(default_factory=list)  # kept-alive upstream connections (router.upstream.Upstream)
    # Another route's router (an external model's URL, router/forward.py), not a vLLM replica: never polled nor
    # in a pool; requests carry the client's Authorization, not the engine key, and are not resent elsewhere.
    external: bool = False

    def __post_init__(self):
        self.engine_url = self.engine_url.rstrip("/")
        parts = urlsplit(self.engine_url)
        if parts.scheme != "http":
            raise ValueError(f"replica {self.engine_url}: the router talks plain http to vLLM inside the cluster")
        self.name = self.name or parts.netloc
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = parts.netloc.encode()

    def close_idle(self) -> None:
        """Close the kept-alive connections to this replica (it left the set, or the router drains)."""
        idle, self.idle = self.idle, []
        for up in idle:
            up.close()

    @property
    def load(self) -> int:
        """Requests in flight there: ours now, plus the other routers' as of the last poll."""
        return self.in_flight + max(0, self.engine_load - self._own_at_poll)

    def usable(self) -> bool:
        """vLLM is up as of the last poll, and no connection to it has failed since a poll last reached it
        (see mark_failed): whether it may get traffic."""
        return self.engine_ready and self.failed_at == 0.0


def parse_replica_arg(value: str) -> tuple[str, str | None]:
    """`ENGINE_URL[,STATUS_URL]` -> (engine base URL, loader status URL or None).

    Without STATUS_URL the loader is assumed beside vLLM on the standard ports (engine on ENGINE_PORT ->
    loader /status on LOADER_PORT); on another port the replica has no loader and vLLM's /v1/models tells
    what is loaded. STATUS_URL `none` forces the latter.
    """
    engine, _, status = value.partition(",")
    parts = urlsplit(engine.strip())
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--replica {value!r}: expected ENGINE_URL[,STATUS_URL] with an http:// ENGINE_URL, "
                         f"e.g. http://10.0.0.7:{ENGINE_PORT}")
    status = status.strip()
    if status.lower() == "none":
        return engine.strip(), None
    if status:
        if urlsplit(status).scheme not in ("http", "https"):
            raise ValueError(f"--replica {value!r}: STATUS_URL must be an http(s) URL or 'none'")
        return engine.strip(), status
    if parts.port == ENGINE_PORT:
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        return engine.strip(), urlunsplit((parts.scheme, f"{host}:{LOADER_PORT}", "/status", "", ""))
    return engine.strip(), None


@dataclass(eq=False)
class ReplicaPool:
    """The replicas, kept fresh by polling; `choose` is the hot path."""

    poll_interval: float = 1.0
    poll_timeout: float = 2.0
    replicas: list[Replica] = field(default_factory=list)
    base_served_name: str = ""
    # Headers of the router's own requests to vLLM (/v1/models needs the route's engine key: Router.engine_key).
    engine_headers: dict[str, str] = field(default_factory=dict)
    # Called after every poll (of all replicas, or of new ones): the router releases held requests there.
    listeners: list[Callable[[], None]] = field(default_factory=list)
    _rr: int = 0

    def any_usable(self) -> bool:
        """Whether some replica may get traffic now (see Replica.usable); False at zero replicas."""
        return any(r.engine_ready and not r.failed_at for r in self.replicas)

    def notify(self) -> None:
        """Tell the listeners the replicas' state may have changed (after a poll)."""
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # one listener's bug must not stop polling
                log.exception("a replica pool listener failed")

    def set_replicas(self, specs: list[tuple[str, str | None]]) -> None:
        """Replace the replica set, keeping what is known about those that stay."""
        current = {(r.engine_url, r.status_url): r for r in self.replicas}
        fresh = []
        for engine, status in specs:
            key = (engine.rstrip("/"), status)
            fresh.append(current.pop(key, None) or Replica(engine, status))
        for gone in current.values():
            log.info("replica %s removed", gone.name)
            gone.close_idle()
        for r in fresh:
            if not r.polled:
                log.info("replica %s added (status from %s)", r.name, r.status_url or "vLLM /v1/models")
        self.replicas = fresh

    def choose(self, served_name: str, exclude: tuple[Replica, ...] = ()) -> Replica | None:
        """The least loaded usable replica that has `served_name` Ready (ties: round robin)."""
        best: Replica | None = None
        best_load = 1 << 62
        n = len(self.replicas)
        if n == 0:
            return None
        self._rr = start = (self._rr + 1) % n
        replicas = self.replicas
        for k in range(n):
            r = replicas[(start + k) % n]
            if r.failed_at or not r.engine_ready or served_name not in r.ready or r in exclude:
                continue
            load = r.in_flight + (r.engine_load - r._own_at_poll if r.engine_load > r._own_at_poll else 0)
            if load < best_load:
                best, best_load = r, load
        return best

    def serves(self, served_name: str) -> bool:
        """Whether some usable replica has `served_name` Ready (what `choose` needs to answer one), without
        choosing one (the round robin does not move). For content routing's check of a destination."""
        for r in self.replicas:
            if served_name in r.ready and r.engine_ready and not r.failed_at:
                return True
        return False

    def mark_failed(self, replica: Replica) -> None:
        """A connection to it failed: skip it until a poll started after now answers."""
        replica.failed_at = time.monotonic()

    def mark_missing(self, replica: Replica, served_name: str) -> None:
        """vLLM said it does not have `served_name` (our view was stale): skip it there until the next poll."""
        replica.ready = replica.ready - {served_name}

    # ---- polling -------------------------------------------------------------------------------------

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        """Poll every replica once, concurrently (each request bounded by the session's timeout)."""
        await asyncio.gather(*(self._poll(session, r) for r in list(self.replicas)))
        self.notify()

    async def _poll(self, session: aiohttp.ClientSession, r: Replica) -> None:
        started = time.monotonic()
        engine_reached = False  # vLLM itself answered (not only its loader)
        try:
            if r.status_url:
                async with session.get(r.status_url, allow_redirects=False) as resp:
                    resp.raise_for_status()
                    report = ReplicaReport.model_validate_json(
                        await read_bounded(resp, STATUS_MAX_BYTES, r.status_url))
                engine_ready = report.engine_ready
                # A Draining adapter left the table but is still loaded: a router that has not read the new table
                # yet may still send to it (its loader keeps it while requests run).
                ready = {name for name, a in report.adapters.items() if a.state in ROUTABLE_STATES}
                if engine_ready and self.base_served_name:
                    ready.add(self.base_served_name)
            else:
                url = r.engine_url + "/v1/models"
                async with session.get(url, headers=self.engine_headers, allow_redirects=False) as resp:
                    resp.raise_for_status()
                    listing = json.loads(await read_bounded(resp, ENGINE_BODY_MAX_BYTES, url))
                data = listing.get("data") if isinstance(listing, dict) else None
                if not isinstance(data, list):
                    raise ValueError(f"{url}: not a model list")
                engine_ready = engine_reached = True
                ready = {m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)}
            load = r.engine_load
            own = r.in_flight
            if engine_ready:
                try:
                    url = r.engine_url + "/metrics"
                    async with session.get(url, allow_redirects=False) as resp:
                        engine_reached = True
                        if resp.status == 200:
                            load = parse_engine_load(await read_bounded(resp, ENGINE_BODY_MAX_BYTES, url))
                except aiohttp.ClientConnectorError:
                    # The loader answers but vLLM cannot be reached from here (its port closed, a network
                    # policy): out of rotation now, as a refused proxy connection would do; a later poll
                    # that reaches vLLM brings it back. Without this a replica traffic never tries stays "up".
                    if not r.failed_at:
                        log.warning("replica %s: its loader answers but vLLM does not; not routing to it", r.name)
                    r.failed_at = time.monotonic()
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    pass  # the load figure is advisory (too large: unknown); readiness came from the status above
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            # One slow or failed poll is not a dead replica (a busy node, a restarting sidecar): it keeps
            # its last known state until POLL_FAILURES_TO_DOWN polls in a row fail. A dead vLLM is caught
            # sooner by the proxy itself (a refused connection takes the replica out at once).
            r.poll_failures += 1
            r.polled = True
            r.last_poll_error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if r.poll_failures == POLL_FAILURES_TO_DOWN:
                log.warning("replica %s: %d status polls failed (last: %s); not routing to it", r.name,
                            r.poll_failures, r.last_poll_error)
            if r.poll_failures >= POLL_FAILURES_TO_DOWN:
                r.engine_ready = False
            return
        if not r.engine_ready and engine_ready:
            log.info("replica %s ready: %d served names", r.name, len(ready))
        r.engine_ready = engine_ready
        r.ready = frozenset(ready)
        r.engine_load, r._own_at_poll = load, own
        r.polled = True
        r.last_poll_error = None
        r.poll_failures = 0
        # After a failed connection, only an answer from vLLM itself, not just from its loader, brings it back.
        if r.failed_at and r.failed_at < started and engine_reached:
            r.failed_at = 0.0

    async def run_polling(self, session: aiohttp.ClientSession) -> None:
        """Poll every `poll_interval`, starting one interval from now (the caller polls once first)."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_once(session)
            except Exception:  # never let one bad answer stop the loop
                log.exception("replica polling failed")


async def resolve_replicas(host: str, engine_port: int = ENGINE_PORT,
                           loader_port: int | None = LOADER_PORT) -> list[tuple[str, str | None]]:
    """The pods behind a headless Service: one replica per address its DNS name resolves to."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, engine_port, type=socket.SOCK_STREAM)
    addresses = sorted({info[4][0] for info in infos})
    specs = []
    for addr in addresses:
        h = f"[{addr}]" if ":" in addr else addr
        specs.append((f"http://{h}:{engine_port}",
                      f"http://{h}:{loader_port}/status" if loader_port else None))
    return specs


# Seconds between re-resolutions while no replica may get traffic (none found, or none usable): the first
# replica's pod is then reachable within this, not within --dns-interval (issue 11's e2e benchmark measured up to
# the full 5 s of the default between the adapter being Ready and the route's first answer). Cheap: a hosts/DNS
# lookup, only while the route cannot serve anyway.
DNS_RETRY_WITHOUT_REPLICAS = 0.5


async def run_dns_discovery(pool: ReplicaPool, host: str, interval: float,
                            session: aiohttp.ClientSession) -> None:
    """Re-resolve the headless Service every `interval` seconds, or every DNS_RETRY_WITHOUT_REPLICAS while no
    replica is usable; a new replica is polled before it gets traffic."""
    while True:
        try:
            specs = await resolve_replicas(host)
            before = {r.engine_url for r in pool.replicas}
            pool.set_replicas(specs)
            new = [r for r in pool.replicas if r.engine_url not in before]
            if new:
                await asyncio.gather(*(pool._poll(session, r) for r in new))
                pool.notify()
        except socket.gaierror as exc:
            # No pods yet (or scaled to zero): an empty set, not an error that stops discovery.
            if pool.replicas:
                log.warning("replicas DNS %s: %s; no replicas", host, exc)
            pool.set_replicas([])
        except Exception:
            log.exception("replica discovery failed")
        serving = any(r.usable() for r in pool.replicas)
        await asyncio.sleep(interval if serving else min(interval, DNS_RETRY_WITHOUT_REPLICAS))
