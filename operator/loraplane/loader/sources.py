"""Where the loader gets its serving table and where it reports: a local file, or the Kubernetes API.

Both table sources are the data plane's one serving-table watcher (loraplane.kube.tablewatch). In a cluster
the loader watches exactly one ConfigMap (`<route>-serving`, key serving.json) and patches one annotation
(`loraplane.io/adapters`) on its own Pod, through the project's async KubeClient: its RBAC needs
get/list/watch on that ConfigMap and patch on pods, nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from loraplane.api.wire.serving import REPORT_ANNOTATION, ReplicaReport, ServingTable
from loraplane.kube.client import KubeClient
from loraplane.kube.tablewatch import TableRead, watch_configmap_table, watch_table_file

log = logging.getLogger(__name__)

TableCallback = Callable[[ServingTable], None]


async def follow(reads: AsyncIterator[TableRead], on_table: TableCallback,
                 on_error: Callable[[str], None]) -> None:
    """Hand each table of a source to `on_table` and each problem (`origin: problem`) to `on_error`; the
    loader keeps its previous table on a problem. Runs until the source ends or the task is cancelled."""
    async for read in reads:
        if read.table is not None:
            on_table(read.table)
        else:
            on_error(read.describe())


async def watch_file(path: Path, on_table: TableCallback, on_error: Callable[[str], None],
                     interval: float = 0.1) -> None:
    """Follow a table file (`--table`): its table now and whenever it changes (a stat every `interval` s)."""
    await follow(watch_table_file(path, interval), on_table, on_error)


class KubeBinding:
    """The loader's two touch points with the API server: its ConfigMap (read) and its Pod (annotate)."""

    def __init__(self, kube: KubeClient, namespace: str, configmap: str, pod_name: str | None):
        self.kube = kube
        self.namespace = namespace
        self.configmap = configmap
        self.pod_name = pod_name

    @classmethod
    def from_environment(cls, namespace: str, configmap: str, pod_name: str | None,
                         kubeconfig: str | None = None) -> "KubeBinding":
        """Credentials from `kubeconfig`, else the in-cluster service account (loraplane.kube.config)."""
        return cls(KubeClient.from_environment(kubeconfig), namespace, configmap, pod_name)

    async def watch_table(self, on_table: TableCallback, on_error: Callable[[str], None]) -> None:
        """Follow the ConfigMap's table until cancelled (resumes, re-lists and backs off on its own)."""
        await follow(watch_configmap_table(self.kube, self.namespace, self.configmap), on_table, on_error)

    async def report(self, report: ReplicaReport) -> None:
        """Write the report into the Pod's annotation (the operator aggregates it into CR status)."""
        if not self.pod_name:
            return
        body = {"metadata": {"annotations": {REPORT_ANNOTATION: report.to_annotation()}}}
        await self.kube.merge_patch("v1", "Pod", self.namespace, self.pod_name, body, result=False)

    async def close(self) -> None:
        """Close the API client's connections."""
        await self.kube.close()
