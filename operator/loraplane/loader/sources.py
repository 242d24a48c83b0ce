"""Where the loader gets its serving table and where it reports: a local file, or the Kubernetes API.

Both table sources are the data plane's one serving-table watcher (loraplane.kube.tablewatch). In a cluster
the loader watches exactly one ConfigMap (`<route>-serving`, key serving.json) through the project's async
KubeClient: its RBAC is get/list/watch on that ConfigMap, nothing else. It writes nothing to the API server: the
operator reads its report from /status and annotates the Pod (controllers/reports.py, docs/security.md).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from loraplane.api.wire.serving import ServingTable
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
    """The loader's one touch point with the API server: its ConfigMap (read only)."""

    def __init__(self, kube: KubeClient, namespace: str, configmap: str):
        self.kube = kube
        self.namespace = namespace
        self.configmap = configmap

    @classmethod
    def from_environment(cls, namespace: str, configmap: str, kubeconfig: str | None = None) -> "KubeBinding":
        """Credentials from `kubeconfig`, else the in-cluster service account (loraplane.kube.config)."""
        return cls(KubeClient.from_environment(kubeconfig), namespace, configmap)

    async def watch_table(self, on_table: TableCallback, on_error: Callable[[str], None]) -> None:
        """Follow the ConfigMap's table until cancelled (resumes, re-lists and backs off on its own)."""
        await follow(watch_configmap_table(self.kube, self.namespace, self.configmap), on_table, on_error)

    async def close(self) -> None:
        """Close the API client's connections."""
        await self.kube.close()
