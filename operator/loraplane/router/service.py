"""The running router: HTTP server plus its background loops (table source, replica polling, DNS discovery).

Table sources, both the data plane's one serving-table watcher (loraplane.kube.tablewatch):
- a file (`--table`), checked every `reload_interval` seconds; a mounted ConfigMap arrives this way, but
  the kubelet refreshes such volumes only on its sync period plus its cache TTL (typically 60-90 s);
- the ConfigMap itself (`--configmap`), watched through the API: changes arrive within a second, which
  matters when the operator shifts canary weights or retires a version. Needs get/list/watch on it.
In gateway mode (`--gateway`) the table is synthesised from the namespace's ModelRoutes (router/gateway.py).
An invalid table is refused with the fields named in the log, and the previous one stays in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from loraplane.kube.client import KubeClient
from loraplane.kube.tablewatch import TableRead, watch_configmap_table, watch_table_file
from loraplane.router.gateway import watch_gateway_table
from loraplane.router.replicas import ReplicaPool, run_dns_discovery
from loraplane.router.server import Router
from loraplane.router.wake import ScaleWaker

log = logging.getLogger("loraplane.router")


@dataclass(eq=False)
class RouterService:
    """The running router: the Router, its table source (`table_path` or `configmap` (namespace, name)),
    replica discovery (`replicas_dns`, every `dns_interval` seconds) and the address it listens on;
    `drain_seconds` bounds the shutdown drain."""

    router: Router
    table_path: Path | None = None
    configmap: tuple[str, str] | None = None        # (namespace, name)
    kubeconfig: Path | None = None                   # outside a pod; in one, the service account is used
    replicas_dns: str | None = None
    dns_interval: float = 5.0
    reload_interval: float = 1.0                     # table file and API key files are checked this often
    host: str = "0.0.0.0"
    port: int = 8080
    drain_seconds: float = 30.0
    # The engine Deployment to wake from zero through its scale subresource when requests are held (wake.py);
    # None: the router only exports its held requests (KEDA wakes the route on them).
    wake_deployment: str | None = None
    wake_namespace: str | None = None
    # Gateway mode (router/gateway.py): (namespace, label selector or None) of the ModelRoutes whose public names
    # this router forwards to their routers; the table comes from that watch instead of a file or ConfigMap.
    gateway: tuple[str, str | None] | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _poll_session: aiohttp.ClientSession | None = None
    _kube: KubeClient | None = None

    @property
    def pool(self) -> ReplicaPool:
        """The router's replica pool."""
        return self.router.pool

    # ---- table ---------------------------------------------------------------------------------------

    def apply_read(self, read: TableRead) -> bool:
        """Swap in the table of one read of the source; on a problem keep the current table. An invalid
        table (or one the router cannot compile) counts as a reload error; a missing source only logs."""
        keep = "keeping the previous table" if self.router.table else "no table in use yet"
        if read.table is None and not read.invalid:
            log.warning("routing table %s (%s)", read.describe(), keep)
            return False
        problem = read.problem
        if read.table is not None:
            try:
                self.router.set_table(read.table)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            self.router.metrics.table_reloads.labels("error").inc()
            log.error("routing table from %s refused (%s): %s", read.origin, keep, problem)
            return False
        self.router.metrics.table_reloads.labels("ok").inc()
        return True

    async def _follow(self, reads: AsyncIterator[TableRead]) -> None:
        # aclosing: on cancellation the source's own cleanup (the gateway's watch task) runs now, not at GC.
        async with contextlib.aclosing(reads):
            async for read in reads:
                try:
                    self.apply_read(read)
                except Exception:
                    log.exception("applying the routing table from %s failed", read.origin)

    async def _reload_api_keys(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                self.router.api_keys.reload()
            except Exception:
                log.exception("reloading the API keys failed")

    # ---- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the first table and poll the replicas once, then open the port (so the first requests are
        routed) and start the table, API key, DNS and polling loops; `port` becomes the port actually bound."""
        self._poll_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.pool.poll_timeout),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4))
        if self.table_path is not None:
            reads = watch_table_file(self.table_path, self.reload_interval)
            self.apply_read(await anext(reads))  # the first table is in use before the port opens
            self._tasks.append(asyncio.create_task(self._follow(reads)))
        if self.configmap is not None:
            self._kube = KubeClient.from_environment(str(self.kubeconfig) if self.kubeconfig else None)
            namespace, name = self.configmap
            self._tasks.append(asyncio.create_task(self._follow(watch_configmap_table(self._kube, namespace, name))))
        if self.gateway is not None:
            if self._kube is None:
                self._kube = KubeClient.from_environment(str(self.kubeconfig) if self.kubeconfig else None)
            namespace, selector = self.gateway
            self._tasks.append(asyncio.create_task(self._follow(watch_gateway_table(self._kube, namespace,
                                                                                    selector))))
        if self.wake_deployment:
            if self._kube is None:
                self._kube = KubeClient.from_environment(str(self.kubeconfig) if self.kubeconfig else None)
            waker = ScaleWaker(self._kube, self.wake_namespace or (self.configmap or ("default",))[0],
                               self.wake_deployment, self.router.metrics)
            self.router.on_demand = waker.demand
        if self.router.api_keys is not None:
            self._tasks.append(asyncio.create_task(self._reload_api_keys()))
        if self.replicas_dns:
            self._tasks.append(asyncio.create_task(
                run_dns_discovery(self.pool, self.replicas_dns, self.dns_interval, self._poll_session)))
        # The first poll happens before the port opens, so the first requests already see the replicas.
        await self.pool.poll_once(self._poll_session)
        self._tasks.append(asyncio.create_task(self.pool.run_polling(self._poll_session)))
        self.port = await self.router.start_server(self.host, self.port)
        log.info("router listening on %s:%d", self.host, self.port)

    @property
    def url(self) -> str:
        """The router's base URL (loopback when it listens on every address)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to drain_seconds), then stop the loops."""
        await self.router.drain(self.drain_seconds)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._kube is not None:
            await self._kube.close()
            self._kube = None
        if self._poll_session is not None:
            await self._poll_session.close()
