"""The running router: HTTP server plus its background loops (table source, replica polling, DNS discovery).

Table sources:
- a file (`--table`), checked every `reload_interval` seconds; a mounted ConfigMap arrives this way, but
  the kubelet refreshes such volumes only on its sync period plus its cache TTL (typically 60-90 s);
- the ConfigMap itself (`--configmap`), watched through the API: changes arrive within a second, which
  matters when the operator shifts canary weights or retires a version. Needs get/list/watch on it.
An invalid table is refused with the fields named in the log, and the previous one stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from pydantic import ValidationError

from loraplane.router.files import file_stamp
from loraplane.router.replicas import ReplicaPool, run_dns_discovery
from loraplane.router.server import Router
from loraplane.api.wire.serving import CONFIGMAP_KEY, ServingTable

log = logging.getLogger("loraplane.router")


def describe_table_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        from loraplane.api.validation import format_validation_error

        return "\n" + format_validation_error(exc, "  ")
    return str(exc)


@dataclass(eq=False)
class RouterService:
    router: Router
    table_path: Path | None = None
    configmap: tuple[str, str] | None = None        # (namespace, name)
    kubeconfig: Path | None = None                   # outside a pod; in one, the service account is used
    replicas_dns: str | None = None
    dns_interval: float = 5.0
    reload_interval: float = 1.0
    host: str = "0.0.0.0"
    port: int = 8080
    drain_seconds: float = 30.0
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _poll_session: aiohttp.ClientSession | None = None
    _table_stamp: tuple | None = None
    _applied_text: str | None = None
    _stop_watch: threading.Event = field(default_factory=threading.Event)

    @property
    def pool(self) -> ReplicaPool:
        return self.router.pool

    # ---- table ---------------------------------------------------------------------------------------

    def apply_table_text(self, text: str, origin: str) -> bool:
        """Parse, check and swap in a table; on error keep the current one."""
        if text == self._applied_text:
            return False
        try:
            table = ServingTable.model_validate_json(text)
            self.router.set_table(table)
        except (ValidationError, ValueError) as exc:
            self.router.metrics.table_reloads.labels("error").inc()
            keep = "keeping the previous table" if self.router.table else "no table in use yet"
            log.error("routing table from %s refused (%s): %s", origin, keep, describe_table_error(exc))
            self._applied_text = text  # do not log the same bad table every second
            return False
        self.router.metrics.table_reloads.labels("ok").inc()
        self._applied_text = text
        return True

    def check_table_file(self) -> bool:
        stamp = file_stamp(self.table_path)
        if stamp == self._table_stamp:
            return False
        self._table_stamp = stamp
        if stamp is None:
            log.warning("routing table %s does not exist (yet)", self.table_path)
            return False
        try:
            text = self.table_path.read_text()
        except OSError as exc:
            log.error("routing table %s unreadable: %s", self.table_path, exc)
            return False
        return self.apply_table_text(text, str(self.table_path))

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                self.check_table_file()
                if self.router.api_keys is not None:
                    self.router.api_keys.reload()
            except Exception:
                log.exception("checking the routing table failed")

    def _watch_configmap(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in a thread: the kubernetes client's watch is synchronous, and idle between events."""
        from kubernetes import client, config, watch

        namespace, name = self.configmap
        if self.kubeconfig is not None:
            api_client = config.new_client_from_config(config_file=str(self.kubeconfig))
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = None
        api = client.CoreV1Api(api_client)
        while not self._stop_watch.is_set():
            try:
                w = watch.Watch()
                # Each (re)start lists the current object first (ADDED), so no resourceVersion bookkeeping.
                for event in w.stream(api.list_namespaced_config_map, namespace,
                                      field_selector=f"metadata.name={name}", timeout_seconds=60):
                    if self._stop_watch.is_set():
                        w.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        text = (event["object"].data or {}).get(CONFIGMAP_KEY)
                        if text is None:
                            log.error("ConfigMap %s/%s has no key %s", namespace, name, CONFIGMAP_KEY)
                            continue
                        loop.call_soon_threadsafe(self.apply_table_text, text, f"ConfigMap {namespace}/{name}")
            except Exception as exc:
                log.warning("watching ConfigMap %s/%s: %s; retrying", namespace, name, exc)
                self._stop_watch.wait(2)

    # ---- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._poll_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.pool.poll_timeout),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4))
        if self.table_path is not None:
            self.check_table_file()
            self._tasks.append(asyncio.create_task(self._watch_file()))
        elif self.router.api_keys is not None:
            self._tasks.append(asyncio.create_task(self._watch_file()))
        if self.configmap is not None:
            threading.Thread(target=self._watch_configmap, args=(loop,), daemon=True,
                             name="configmap-watch").start()
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
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to drain_seconds), then stop the loops."""
        self._stop_watch.set()
        await self.router.drain(self.drain_seconds)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._poll_session is not None:
            await self._poll_session.close()
