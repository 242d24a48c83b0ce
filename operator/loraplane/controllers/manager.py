"""The manager: wires the informers, the three controllers and the /metrics + /healthz server, and runs the
startup LIST and the periodic resync. It holds no controller's state; each controller owns its own."""

from __future__ import annotations

import asyncio
import logging
import time
import typing

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily

from loraplane.api.adapter import AdapterStatus
from loraplane.api.finetunejob import FineTuneJobStatus
from loraplane.api.modelroute import ModelRouteStatus
from loraplane.controllers.adapter import AdapterController
from loraplane.controllers.base import CHILD_SOURCES, SOURCES, Context, Controller, Stores
from loraplane.controllers.finetunejob import FineTuneJobController
from loraplane.controllers.modelroute import ModelRouteController
from loraplane.controllers.reports import ReportRelay
from loraplane.controllers.settings import OperatorSettings
from loraplane.kube.apply import Applier
from loraplane.kube.client import KubeClient
from loraplane.kube.events import EventRecorder
from loraplane.kube.informer import Informer

log = logging.getLogger("loraplane.operator")


class Manager:
    """The running operator: informers fill the stores, every change goes to each controller's `on_change`,
    which schedules the reconciles it affects on that controller's own queue."""

    def __init__(self, settings: OperatorSettings, kube: KubeClient):
        self.settings = settings
        self.kube = kube
        self.stores = Stores()
        ctx = Context(kube=kube, applier=Applier(kube), events=EventRecorder(kube), build=settings.build,
                      stores=self.stores, coalesce_seconds=settings.coalesce_seconds)
        self.applier = ctx.applier
        self.finetunejobs = FineTuneJobController(ctx)
        self.adapters = AdapterController(ctx)
        self.routes = ModelRouteController(ctx, rejections=self.adapters.rejections,
                                           reselected=self.adapters.schedule)
        self.adapters.connect(rejections_changed=self.routes.schedule_namespace,
                              table_verdicts=self.routes.table_verdicts,
                              held_candidates=self.routes.held_candidates)
        self.controllers: tuple[Controller, ...] = (self.finetunejobs, self.adapters, self.routes)
        self.informers = {s.name: Informer(kube, s, self.stores.of(s.name), self._changed, settings.namespaces)
                          for s in SOURCES}
        # The engine pods' reports: read from each loader's /status, written into its pod's annotation.
        self.relay = ReportRelay(kube, self.stores.EnginePod, settings.report_poll_seconds)
        self.adapters.windows.reader.port = settings.router_metrics_port
        self.primed = asyncio.Event()
        self.started_at = time.time()
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._collector: _StateCollector | None = None

    def _changed(self, source: str, obj: dict, old: dict | None) -> None:
        for controller in self.controllers:
            controller.on_change(source, obj, old)

    def on_event(self, source: str, event_type: str | None, obj: dict) -> None:
        """A watch event of `source` (a store name, e.g. "Adapter") from kopf's streams."""
        self.informers[source].on_event(event_type, obj)

    def schedule_all(self) -> None:
        """Ask every controller to reconcile every object it holds."""
        for controller in self.controllers:
            controller.schedule_all()

    async def relist(self) -> int:
        """LIST every source into its store: bring up to date objects whose ADDED or MODIFIED event was lost, drop
        objects the server no longer has (a deletion whose watch event was lost). Returns how many were dropped."""
        dropped = 0
        for ns in list(self.settings.namespaces) or [None]:
            dropped += sum(await asyncio.gather(*(i.relist(ns) for i in self.informers.values())))
        return dropped

    async def prime(self) -> None:
        """One LIST per source before any reconcile, so the first reconciles see the whole namespace (a route
        reconciled before its adapters were seen would write a wrong table and flap)."""
        await self.relist()
        for informer in self.informers.values():
            informer.active = True
        self.primed.set()
        self.schedule_all()
        log.info("primed: %d FineTuneJobs, %d Adapters, %d ModelRoutes", len(self.stores.FineTuneJob.objects),
                 len(self.stores.Adapter.objects), len(self.stores.ModelRoute.objects))

    async def resync_forever(self) -> None:
        """Level-based safety net: re-reconcile everything; children are re-read, so deleted ones return."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.applier.reset()  # forget cached hashes: verify children against the server
            try:
                if dropped := await self.relist():
                    log.info("resync: %d objects were deleted without a watch event reaching us", dropped)
            except Exception as exc:  # the next resync tries again; reconciles go on from the stores
                log.warning("resync LIST failed: %s", exc)
            self.schedule_all()

    async def start(self) -> None:
        """Register the phase gauges, serve /metrics and /healthz, prime the stores (one LIST per source), then
        start the periodic resync, the report relay and the watches of the children."""
        self._collector = _StateCollector(self.stores)
        REGISTRY.register(self._collector)
        await self.start_http()
        await self.prime()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.resync_forever()))
        self._tasks.append(loop.create_task(self.relay.run()))
        for name in CHILD_SOURCES:
            for ns in list(self.settings.namespaces) or [None]:
                self._tasks.append(loop.create_task(self.informers[name].run(ns)))

    async def stop(self) -> None:
        """Cancel the watches and the resync, stop every work queue, the HTTP server and the API client."""
        for t in self._tasks:
            t.cancel()
        for controller in self.controllers:
            await controller.queue.stop()
        if self._runner:
            await self._runner.cleanup()
        if self._collector is not None:
            REGISTRY.unregister(self._collector)
            self._collector = None
        await self.kube.close()

    async def idle(self) -> None:
        """Return once no reconcile is pending or running."""
        for controller in self.controllers:
            await controller.queue.idle.wait()

    async def start_http(self) -> None:
        """Serve /metrics (Prometheus) and /healthz (200 once primed, else 503) on the settings' metrics
        host and port."""
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


class _StateCollector:
    """Gauges computed from the stores at scrape time: objects of each kind by phase."""

    def __init__(self, stores: Stores):
        self.stores = stores

    def collect(self):
        jobs = GaugeMetricFamily("loraplane_operator_finetunejobs", "FineTuneJobs by phase", labels=["phase"])
        adapters = GaugeMetricFamily("loraplane_operator_adapters", "Adapters by phase", labels=["phase"])
        routes = GaugeMetricFamily("loraplane_operator_modelroutes", "ModelRoutes by phase", labels=["phase"])
        for family, store, model in ((jobs, self.stores.FineTuneJob, FineTuneJobStatus),
                                     (adapters, self.stores.Adapter, AdapterStatus),
                                     (routes, self.stores.ModelRoute, ModelRouteStatus)):
            # Every phase the API defines, 0 included, so a dashboard's series exist from the start.
            phases = typing.get_args(model.model_fields["phase"].annotation)[0]  # the kind's Phase StrEnum
            counts = {p.value: 0 for p in phases}
            for obj in list(store.objects.values()):
                phase = (obj.get("status") or {}).get("phase") or "Unknown"
                counts[phase] = counts.get(phase, 0) + 1
            for phase, n in sorted(counts.items()):
                family.add_metric([phase], n)
        yield jobs
        yield adapters
        yield routes


__all__ = ["Manager"]
