"""The operator's state: stores fed by kopf's watches, one work queue per kind, the applier, metrics and
the /metrics + /healthz server."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import typing

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily

from loraplane.api.common import API_VERSION
from loraplane.api.adapter import AdapterStatus
from loraplane.api.finetunejob import FineTuneJob, FineTuneJobStatus
from loraplane.api.modelroute import ModelRoute, ModelRouteStatus
from loraplane.builders import finetunejob
from loraplane.builders.common import COMPONENT_LABEL, FINETUNEJOB_LABEL
from loraplane.builders.resolution import Verdict
from loraplane.controllers import adapter as adapter_ctl
from loraplane.controllers import finetunejob as ftj_ctl
from loraplane.controllers import modelroute as route_ctl
from loraplane.kube.client import KubeClient, WatchExpired
from loraplane.controllers.runtime import Applier, Events, Key, OperatorSettings, Store, WorkQueue, key_of
from loraplane.api.wire.serving import CONFIGMAP_KEY, REPORT_ANNOTATION, ROUTE_LABEL, configmap_name

log = logging.getLogger("loraplane.operator")
API = API_VERSION
# How long adapter changes are gathered before the routes of their namespace re-resolve their tables.
ROUTE_BATCH_SECONDS = 0.5


def _label(name: str):
    return lambda obj: ((obj.get("metadata") or {}).get("labels") or {}).get(name)


class Operator:
    def __init__(self, settings: OperatorSettings, kube: KubeClient):
        self.settings = settings
        self.kube = kube
        self.applier = Applier(kube)
        self.applier_epoch = 0  # bumped when the applier's memory is dropped (resync): children are re-read
        self.events = Events(kube)
        self.ftjs = Store()
        self.adapters = Store()
        self.routes = Store()
        self.jobs = Store(group_by=_label(FINETUNEJOB_LABEL))
        self.train_pods = Store(group_by=_label(FINETUNEJOB_LABEL))
        self.engine_pods = Store(group_by=_label(ROUTE_LABEL))
        self.deployments = Store(group_by=_label(ROUTE_LABEL))
        d = settings.coalesce_seconds
        self.ftj_queue = WorkQueue("FineTuneJob", lambda k: ftj_ctl.reconcile(self, k), d)
        self.route_queue = WorkQueue("ModelRoute", lambda k: route_ctl.reconcile(self, k), d)
        self.adapter_queue = WorkQueue("Adapter", lambda k: adapter_ctl.reconcile(self, k), d)
        self.resolutions: dict[Key, object] = {}
        self.route_selected: dict[Key, dict[str, Verdict]] = {}
        self.route_applied: dict[Key, tuple] = {}
        self.adapter_rejections: dict[Key, Verdict] = {}
        self._accepted_ftj: dict[tuple[str, str, str], dict] = {}
        self._accepted_route: dict[tuple[str, str, str], tuple[str, str | None]] = {}
        self.primed = asyncio.Event()
        self.started_at = time.time()
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None

    # ---- watch events (kopf) -> stores -> queues -------------------------------------------------------

    def in_scope(self, obj: dict) -> bool:
        return not self.settings.namespaces or key_of(obj)[0] in self.settings.namespaces

    def on_event(self, kind: str, event_type: str | None, obj: dict) -> None:
        if not self.in_scope(obj):
            return
        store = self._store(kind)
        deleted = event_type == "DELETED"
        old = store.remove(obj) if deleted else store.put(obj)
        if not self.primed.is_set():
            return  # the startup pass schedules everything once the stores are full
        self._schedule_for(kind, obj, None if deleted else old)

    def _store(self, kind: str) -> Store:
        return {"FineTuneJob": self.ftjs, "Adapter": self.adapters, "ModelRoute": self.routes, "Job": self.jobs,
                "TrainPod": self.train_pods, "EnginePod": self.engine_pods, "Deployment": self.deployments}[kind]

    def _schedule_for(self, kind: str, obj: dict, old: dict | None) -> None:
        """Schedule the reconciles `obj`'s change affects; `old` is its previous state, None when it
        appeared or disappeared (then everything that may depend on it is scheduled)."""
        ns, name = key_of(obj)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if kind == "FineTuneJob":
            self.ftj_queue.schedule((ns, name))
        elif kind in ("Job", "TrainPod"):
            if owner := labels.get(FINETUNEJOB_LABEL):
                self.ftj_queue.schedule((ns, owner))
        elif kind == "ModelRoute":
            self.route_queue.schedule((ns, name))
            if old is None or (old.get("spec") != obj.get("spec")):
                self.schedule_adapters(ns)  # which adapters it selects may have changed
        elif kind == "Adapter":
            self.adapter_queue.schedule((ns, name))
            before = old or {}
            if (before.get("spec") != obj.get("spec") or (before.get("metadata") or {}).get("labels")
                    != labels or old is None or (before.get("status") or {}).get("artifact")
                    != (obj.get("status") or {}).get("artifact")):
                # Batched: a burst of adapter changes re-resolves each route once, not once per adapter.
                self.schedule_routes(ns, delay=ROUTE_BATCH_SECONDS)
            if labels.get(FINETUNEJOB_LABEL):  # a produced adapter changed: its job may be waiting for it
                self.ftj_queue.schedule((ns, labels[FINETUNEJOB_LABEL]))
        elif kind == "EnginePod":
            if route := labels.get(ROUTE_LABEL):
                self.route_queue.schedule((ns, route))
            for pod in (obj, old):
                served = _report_names(pod)
                for adapter in served:
                    self.adapter_queue.schedule((ns, adapter))
        elif kind == "Deployment":
            if route := labels.get(ROUTE_LABEL):
                self.route_queue.schedule((ns, route))

    def schedule_routes(self, ns: str, delay: float | None = None) -> None:
        for key in list(self.routes.objects):
            if key[0] == ns:
                self.route_queue.schedule(key, delay)

    def schedule_adapters(self, ns: str) -> None:
        for key in list(self.adapters.objects):
            if key[0] == ns:
                self.adapter_queue.schedule(key)

    def schedule_all(self) -> None:
        for key in list(self.ftjs.objects):
            self.ftj_queue.schedule(key)
        for key in list(self.routes.objects):
            self.route_queue.schedule(key)
        for key in list(self.adapters.objects):
            self.adapter_queue.schedule(key)

    def rejected_adapters(self, ns: str) -> dict[str, Verdict]:
        return {k[1]: v for k, v in self.adapter_rejections.items() if k[0] == ns}

    # ---- accepted (running) specs, for immutability checks ----------------------------------------------

    async def accepted_ftj_spec(self, ftj: FineTuneJob) -> dict | None:
        """The spec the job's Job runs with: from memory, else from its config ConfigMap."""
        ident = (ftj.metadata.namespace or "", ftj.metadata.name or "", ftj.metadata.uid or "")
        if ident in self._accepted_ftj:
            return self._accepted_ftj[ident]
        cm = await self.kube.get("v1", "ConfigMap", ident[0], finetunejob.config_name(ftj))
        if cm is None or not _owned_by(cm, ident[2]):
            return None
        try:
            spec = json.loads((cm.get("data") or {}).get(finetunejob.CONFIG_KEY, ""))["spec"]
        except (ValueError, KeyError, TypeError):
            return None
        self._accepted_ftj[ident] = spec
        return spec

    def remember_ftj_spec(self, ftj: FineTuneJob, spec: dict) -> None:
        self._accepted_ftj[(ftj.metadata.namespace or "", ftj.metadata.name or "", ftj.metadata.uid or "")] = spec

    async def accepted_route_base(self, route: ModelRoute) -> tuple[str, str | None] | None:
        ident = (route.metadata.namespace or "", route.metadata.name or "", route.metadata.uid or "")
        if ident in self._accepted_route:
            return self._accepted_route[ident]
        cm = await self.kube.get("v1", "ConfigMap", ident[0], configmap_name(ident[1]))
        if cm is None or not _owned_by(cm, ident[2]):
            return None
        base = route_ctl.accepted_base((cm.get("data") or {}).get(CONFIGMAP_KEY))
        if base is not None:
            self._accepted_route[ident] = base
        return base

    def remember_route_base(self, route: ModelRoute, base: tuple[str, str | None]) -> None:
        self._accepted_route[(route.metadata.namespace or "", route.metadata.name or "",
                              route.metadata.uid or "")] = base

    def forget(self, key: Key) -> None:
        """Drop what was remembered about a deleted object and its children (a later GET re-learns it)."""
        for cache in (self._accepted_ftj, self._accepted_route):
            for ident in [i for i in cache if i[:2] == key]:
                del cache[ident]
        self.applier.forget(key[0], f"{key[1]}-")

    # ---- lifecycle ---------------------------------------------------------------------------------------

    LISTS = [
        ("FineTuneJob", API, "FineTuneJob", None), ("Adapter", API, "Adapter", None),
        ("ModelRoute", API, "ModelRoute", None), ("Job", "batch/v1", "Job", FINETUNEJOB_LABEL),
        ("TrainPod", "v1", "Pod", FINETUNEJOB_LABEL),
        ("EnginePod", "v1", "Pod", f"{ROUTE_LABEL},{COMPONENT_LABEL}=engine"),
        ("Deployment", "apps/v1", "Deployment", f"{ROUTE_LABEL},{COMPONENT_LABEL}=engine"),
    ]

    # Children the operator watches itself, with a server-side label selector (kopf watches the CRDs).
    WATCHED_HERE = ("Job", "TrainPod", "EnginePod", "Deployment")

    async def watch_children(self, store_kind: str, namespace: str | None) -> None:
        """LIST + WATCH one child kind (label-selected on the server, so the API server sends only our pods,
        not every pod of the cluster) into its store; resumes from the last resourceVersion seen (bookmarks
        keep it fresh) and LISTs again when it expired. Runs until cancelled."""
        _, api, kind, selector = next(entry for entry in self.LISTS if entry[0] == store_kind)
        rv, backoff = None, 1.0
        while True:
            try:
                if rv is None:
                    items, rv = await self.kube.list_with_version(api, kind, namespace, selector)
                    self._sync_listed(store_kind, namespace, items, rv, update=True)
                async for event_type, obj in self.kube.watch(api, kind, namespace, selector, rv):
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if event_type != "BOOKMARK":
                        self.on_event(store_kind, event_type, obj)
                backoff = 1.0  # the server ended the watch (timeoutSeconds): resume from rv
            except asyncio.CancelledError:
                raise
            except WatchExpired:
                rv = None
            except Exception as exc:  # API server restarts, network: retry with backoff, from the same rv
                log.warning("watching %s failed (%s); retrying in %.0f s", store_kind, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _sync_listed(self, store_kind: str, namespace: str | None, items: list[dict], list_rv: str,
                     update: bool) -> int:
        """Make the store match a LIST: add what is missing (and, with `update`, refresh what changed), drop
        what the server no longer has. Returns how many were dropped."""
        store = self._store(store_kind)
        seen, dropped = set(), 0
        for item in items:
            key = key_of(item)
            seen.add(key)
            stored = store.objects.get(key)
            if stored is None or update and (stored.get("metadata") or {}).get("resourceVersion") != (
                    item.get("metadata") or {}).get("resourceVersion"):
                self.on_event(store_kind, None, item)
        for key, obj in list(store.objects.items()):
            if (namespace is None or key[0] == namespace) and key not in seen and _older(obj, list_rv):
                store.remove(obj)
                dropped += 1
                if self.primed.is_set():
                    self._schedule_for(store_kind, obj, None)
        return dropped

    async def relist(self) -> int:
        """LIST every kind into the stores; drop objects the server no longer has (a deletion whose watch
        event was lost). Returns how many were dropped."""
        dropped = 0
        for ns in list(self.settings.namespaces) or [None]:
            results = await asyncio.gather(*(self.kube.list_with_version(api, kind, ns, selector)
                                             for _, api, kind, selector in self.LISTS))
            for (store_kind, *_), (items, list_rv) in zip(self.LISTS, results):
                dropped += self._sync_listed(store_kind, ns, items, list_rv, update=False)
        return dropped

    async def prime(self) -> None:
        """One LIST per kind before any reconcile, so the first reconciles see the whole namespace (a route
        reconciled before its adapters were seen would write a wrong table and flap)."""
        await self.relist()
        self.primed.set()
        self.schedule_all()
        log.info("primed: %d FineTuneJobs, %d Adapters, %d ModelRoutes", len(self.ftjs.objects),
                 len(self.adapters.objects), len(self.routes.objects))

    async def resync_forever(self) -> None:
        """Level-based safety net: re-reconcile everything; children are re-read, so deleted ones return."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.applier = Applier(self.kube)  # forget cached hashes: verify children against the server
            self.applier_epoch += 1
            try:
                if dropped := await self.relist():
                    log.info("resync: %d objects were deleted without a watch event reaching us", dropped)
            except Exception as exc:  # the next resync tries again; reconciles go on from the stores
                log.warning("resync LIST failed: %s", exc)
            self.schedule_all()

    async def start(self) -> None:
        REGISTRY.register(_StateCollector(self)) if not _collector_registered() else None
        _CURRENT[0] = self
        await self.start_http()
        await self.prime()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.resync_forever()))
        for store_kind in self.WATCHED_HERE:
            for ns in list(self.settings.namespaces) or [None]:
                self._tasks.append(loop.create_task(self.watch_children(store_kind, ns)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for q in (self.ftj_queue, self.route_queue, self.adapter_queue):
            await q.stop()
        if self._runner:
            await self._runner.cleanup()
        await self.kube.close()

    async def idle(self) -> None:
        for q in (self.ftj_queue, self.route_queue, self.adapter_queue):
            await q.idle.wait()

    async def start_http(self) -> None:
        async def metrics(_):
            return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_):
            ok = self.primed.is_set()
            return web.json_response({"ok": ok, "uptimeSeconds": round(time.time() - self.started_at, 1)},
                                     status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.settings.metrics_host, self.settings.metrics_port).start()


def _older(obj: dict, list_rv: str) -> bool:
    """Whether the stored object predates a LIST (resourceVersions are etcd revisions in practice; when
    they are not numbers, assume older)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0) <= int(list_rv)
    except ValueError:
        return True


def _owned_by(obj: dict, uid: str) -> bool:
    return any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _report_names(pod: dict | None) -> set[str]:
    """Adapter object names in a pod's report (served names are `<adapter>--<version>`)."""
    raw = (((pod or {}).get("metadata") or {}).get("annotations") or {}).get(REPORT_ANNOTATION)
    if not raw:
        return set()
    try:
        served = json.loads(raw).get("adapters") or {}
    except (ValueError, AttributeError):
        return set()
    return {s.rpartition("--")[0] for s in served if "--" in s}


_CURRENT: list[Operator | None] = [None]


def _collector_registered() -> bool:
    return any(isinstance(c, _StateCollector) for c in list(REGISTRY._collector_to_names))


class _StateCollector:
    """Gauges computed from the stores at scrape time: jobs by phase, adapters by state."""

    def __init__(self, op: Operator):
        self.op = op

    def collect(self):
        op = _CURRENT[0] or self.op
        jobs = GaugeMetricFamily("loraplane_operator_finetunejobs", "FineTuneJobs by phase", labels=["phase"])
        adapters = GaugeMetricFamily("loraplane_operator_adapters", "Adapters by phase", labels=["phase"])
        routes = GaugeMetricFamily("loraplane_operator_modelroutes", "ModelRoutes by phase", labels=["phase"])
        for family, store, model in ((jobs, op.ftjs, FineTuneJobStatus), (adapters, op.adapters, AdapterStatus),
                                     (routes, op.routes, ModelRouteStatus)):
            # Every phase the API defines, 0 included, so a dashboard's series exist from the start.
            counts = {p: 0 for p in typing.get_args(typing.get_args(model.model_fields["phase"].annotation)[0])}
            for obj in list(store.objects.values()):
                phase = (obj.get("status") or {}).get("phase") or "Unknown"
                counts[phase] = counts.get(phase, 0) + 1
            for phase, n in sorted(counts.items()):
                family.add_metric([phase], n)
        yield jobs
        yield adapters
        yield routes


__all__ = ["Operator"]
