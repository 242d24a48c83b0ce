"""The anchor for bench_operator.py: about the least a kopf operator can do for the same objects.

    KUBECONFIG=... python -m kopf run --standalone --namespace bench tests/bench/minimal_operator.py

For every Adapter and ModelRoute (created or changed) it server-side-applies two small children owned by label
(a ConfigMap and a headless Service) and sets status.observedGeneration: two applies and one status patch
per object, the status patch being the one kopf makes anyway for its own bookkeeping. Tuned the way the
project's kopf throughput measurements found best: uvloop (kopf uses it when installed), quiet logs, no Event posting, and
handler progress and diff-base kept in status (one write fewer per object than annotations).
Not part of the product; tests/bench/bench_operator.py runs it as a separate process.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from pathlib import Path

import aiohttp
import kopf
import yaml

GROUP, VERSION = "loraplane.io", "v1alpha1"
MANAGER = "minimal-bench"
_session: aiohttp.ClientSession | None = None
_server = ""


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_) -> None:
    global _session, _server
    settings.persistence.progress_storage = kopf.StatusProgressStorage()
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage()
    settings.posting.enabled = False
    settings.posting.level = logging.CRITICAL
    settings.watching.server_timeout = 600
    logging.getLogger("kopf").setLevel(logging.WARNING)
    # The test cluster's kubeconfig: one server, a bearer token, TLS unverified (self-signed serving cert).
    cfg = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())
    _server = cfg["clusters"][0]["cluster"]["server"]
    token = cfg["users"][0]["user"]["token"]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"},
                                     connector=aiohttp.TCPConnector(ssl=ctx, limit=20))


@kopf.on.cleanup()
async def close(**_) -> None:
    if _session:
        await _session.close()


async def _apply(path: str, doc: dict) -> None:
    async with _session.patch(f"{_server}{path}", data=json.dumps(doc),
                              params={"fieldManager": MANAGER, "force": "true"},
                              headers={"Content-Type": "application/apply-patch+yaml"}) as r:
        if r.status >= 300:
            raise kopf.TemporaryError(f"apply {path}: {r.status} {await r.text()}", delay=1)


async def reconcile(kind: str, name: str, namespace: str, spec, meta, patch, **_) -> None:
    labels = {"app.kubernetes.io/managed-by": MANAGER, "bench.loraplane.io/owner": f"{kind}.{name}"}
    child = f"{kind}-{name}-min"
    await _apply(f"/api/v1/namespaces/{namespace}/configmaps/{child}", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": child, "namespace": namespace, "labels": labels},
        "data": {"spec.json": json.dumps(dict(spec), sort_keys=True)}})
    await _apply(f"/api/v1/namespaces/{namespace}/services/{child}", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": child, "namespace": namespace, "labels": labels},
        "spec": {"clusterIP": "None", "selector": labels, "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]}})
    patch.status["observedGeneration"] = meta["generation"]  # merged into kopf's own status patch


@kopf.on.create(GROUP, VERSION, "adapters")
@kopf.on.update(GROUP, VERSION, "adapters", field="spec")
async def adapter(**kw) -> None:
    await reconcile("adapter", **kw)


@kopf.on.create(GROUP, VERSION, "modelroutes")
@kopf.on.update(GROUP, VERSION, "modelroutes", field="spec")
async def modelroute(**kw) -> None:
    await reconcile("modelroute", **kw)
