"""Where the loader gets its serving table and where it reports: a local file, or the Kubernetes API.

In a cluster the loader watches exactly one ConfigMap (`<route>-serving`, key serving.json) and patches one
annotation (`loraplane.io/adapters`) on its own Pod: its RBAC needs get/list/watch on that ConfigMap and
patch on pods, nothing else. The kubernetes client is synchronous; its calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from loraplane.api.wire.serving import CONFIGMAP_KEY, REPORT_ANNOTATION, ReplicaReport, ServingTable

log = logging.getLogger(__name__)

TableCallback = Callable[[ServingTable], None]


def parse_table(text: str, where: str) -> ServingTable:
    """Raises ValueError naming the source and the bad field."""
    try:
        return ServingTable.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{where}: not a valid serving table: {problems}") from exc


async def watch_file(path: Path, on_table: TableCallback, on_error: Callable[[str], None],
                     interval: float = 0.1) -> None:
    """Call `on_table` with the file's table now and whenever it changes; a stat per tick, a read on change."""
    last: str | None = None
    seen: tuple | None = None
    while True:
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            text = path.read_text() if stamp != seen else last
            seen = stamp
        except OSError as exc:
            text, seen = None, None
            if last != f"missing:{exc}":
                on_error(f"{path}: {exc}")
                last = f"missing:{exc}"
        if text is not None and text != last:
            last = text
            try:
                on_table(parse_table(text, str(path)))
            except ValueError as exc:
                on_error(str(exc))
        await asyncio.sleep(interval)


class KubeBinding:
    """The loader's two touch points with the API server: its ConfigMap (read) and its Pod (annotate)."""

    def __init__(self, api_client, namespace: str, configmap: str, pod_name: str | None):
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.configmap = configmap
        self.pod_name = pod_name
        self._stop = threading.Event()

    @classmethod
    def from_environment(cls, namespace: str, configmap: str, pod_name: str | None,
                         kubeconfig: str | None = None) -> "KubeBinding":
        from kubernetes import config

        if kubeconfig:
            api_client = config.new_client_from_config(config_file=kubeconfig)
        else:
            config.load_incluster_config()
            from kubernetes import client

            api_client = client.ApiClient()
        return cls(api_client, namespace, configmap, pod_name)

    def _table_of(self, cm, on_table: TableCallback, on_error: Callable[[str], None]) -> None:
        text = (cm.data or {}).get(CONFIGMAP_KEY)
        where = f"ConfigMap {self.namespace}/{self.configmap} key {CONFIGMAP_KEY}"
        if text is None:
            on_error(f"{where} is missing")
            return
        try:
            on_table(parse_table(text, where))
        except ValueError as exc:
            on_error(str(exc))

    def _watch_forever(self, loop: asyncio.AbstractEventLoop, on_table: TableCallback,
                       on_error: Callable[[str], None]) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        def deliver(fn, *args):
            loop.call_soon_threadsafe(fn, *args)

        selector = f"metadata.name={self.configmap}"
        backoff = 1.0
        while not self._stop.is_set():
            try:
                listing = self.core.list_namespaced_config_map(self.namespace, field_selector=selector)
                for cm in listing.items:
                    self._table_of(cm, lambda t: deliver(on_table, t), lambda m: deliver(on_error, m))
                version = listing.metadata.resource_version
                w = watch.Watch()
                for event in w.stream(self.core.list_namespaced_config_map, self.namespace,
                                      field_selector=selector, resource_version=version, timeout_seconds=60):
                    if self._stop.is_set():
                        w.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._table_of(event["object"], lambda t: deliver(on_table, t),
                                       lambda m: deliver(on_error, m))
                    elif event["type"] == "DELETED":
                        # The route is going away; its pods follow. Keep serving what is loaded meanwhile.
                        deliver(on_error, f"ConfigMap {self.namespace}/{self.configmap} was deleted")
                backoff = 1.0
            except ApiException as exc:
                deliver(on_error, f"watching ConfigMap {self.namespace}/{self.configmap}: HTTP {exc.status} "
                                  f"{exc.reason}")
                self._stop.wait(backoff)
                backoff = min(30.0, backoff * 2)
            except Exception as exc:  # noqa: BLE001 - connection drops: relist and watch again
                log.warning("ConfigMap watch interrupted: %s", exc)
                self._stop.wait(backoff)
                backoff = min(30.0, backoff * 2)

    async def watch_table(self, on_table: TableCallback, on_error: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._watch_forever, args=(loop, on_table, on_error),
                                  name="configmap-watch", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                await asyncio.sleep(1)
        finally:
            self._stop.set()

    def stop(self) -> None:
        self._stop.set()

    async def report(self, report: ReplicaReport) -> None:
        """Write the report into the Pod's annotation (the operator aggregates it into CR status)."""
        if not self.pod_name:
            return
        body = {"metadata": {"annotations": {REPORT_ANNOTATION: report.to_annotation()}}}
        await asyncio.to_thread(self.core.patch_namespaced_pod, self.pod_name, self.namespace, body)
