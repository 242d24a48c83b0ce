"""What the three controllers share: the in-memory view of the cluster, the coalescing work queue, the
applier that writes only what changed, status diffing, metrics and the operator's settings.

Level-based design: every watch event only *schedules* a reconcile of the objects it affects; a reconcile
reads the current state from the stores (filled by kopf's watches, primed by one LIST at startup), computes
children and status from scratch, and writes only the differences. Bursts of events for one object
collapse into one reconcile; a periodic resync re-runs everything and, when nothing changed, writes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError

from loraplane.api.common import API_VERSION, StatusBase, set_condition
from loraplane.builders.common import HASH_ANNOTATION
from loraplane.builders.settings import BuildSettings
from loraplane.kube.client import ApiError, KubeClient

log = logging.getLogger("loraplane.operator")

RECONCILES = Counter("loraplane_operator_reconciles_total", "Reconciles by kind and result", ["kind", "result"])
RECONCILE_SECONDS = Histogram("loraplane_operator_reconcile_duration_seconds", "Reconcile duration", ["kind"],
                              buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
EVENTS_POSTED = Counter("loraplane_operator_events_total", "Kubernetes Events posted", ["kind", "reason"])

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class OperatorSettings:
    build: BuildSettings = field(default_factory=BuildSettings)
    namespaces: tuple[str, ...] = ()      # empty: all namespaces
    resync_seconds: float = 600.0
    coalesce_seconds: float = 0.05
    metrics_port: int = 8080
    metrics_host: str = "0.0.0.0"

    @classmethod
    def from_env(cls) -> "OperatorSettings":
        """`kopf run -m loraplane.controllers` has no flags of ours: settings come from LORAPLANE_* env."""
        e = os.environ.get
        d = BuildSettings()
        return cls(
            build=BuildSettings(image=e("LORAPLANE_IMAGE", d.image), trainer_image=e("LORAPLANE_TRAINER_IMAGE"),
                                engine_image=e("LORAPLANE_ENGINE_IMAGE", d.engine_image),
                                artifact_store=e("LORAPLANE_ARTIFACT_STORE", d.artifact_store),
                                hpa_api_version=e("LORAPLANE_HPA_API_VERSION", d.hpa_api_version),
                                pdb_api_version=e("LORAPLANE_PDB_API_VERSION", d.pdb_api_version),
                                pod_failure_policy=e("LORAPLANE_POD_FAILURE_POLICY", "true").lower() != "false"),
            namespaces=tuple(n for n in e("LORAPLANE_NAMESPACES", "").split(",") if n),
            resync_seconds=float(e("LORAPLANE_RESYNC_SECONDS", "600")),
            coalesce_seconds=float(e("LORAPLANE_COALESCE_SECONDS", "0.05")),
            metrics_port=int(e("LORAPLANE_METRICS_PORT", "8080")),
            metrics_host=e("LORAPLANE_METRICS_HOST", "0.0.0.0"),
        )


def key_of(obj: dict) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


class Store:
    """Objects of one kind by (namespace, name), with an optional secondary index (e.g. owner label)."""

    def __init__(self, group_by: Callable[[dict], str | None] | None = None):
        self.objects: dict[Key, dict] = {}
        self._group_by = group_by
        self._groups: dict[Key, set[str]] = defaultdict(set)
        self._parsed: dict[Key, tuple[str, Any]] = {}
        self._spec_parsed: dict[Key, tuple[str, Any]] = {}

    def put(self, obj: dict) -> dict | None:
        key = key_of(obj)
        old = self.objects.get(key)
        if old is not None:
            self._ungroup(key, old)
        self.objects[key] = obj
        if self._group_by and (g := self._group_by(obj)):
            self._groups[(key[0], g)].add(key[1])
        return old

    def remove(self, obj: dict) -> dict | None:
        key = key_of(obj)
        old = self.objects.pop(key, None)
        self._parsed.pop(key, None)
        self._spec_parsed.pop(key, None)
        if old is not None:
            self._ungroup(key, old)
        return old

    def _ungroup(self, key: Key, obj: dict) -> None:
        if self._group_by and (g := self._group_by(obj)):
            names = self._groups.get((key[0], g))
            if names:
                names.discard(key[1])
                if not names:
                    del self._groups[(key[0], g)]

    def get(self, key: Key) -> dict | None:
        return self.objects.get(key)

    def group(self, namespace: str, group: str) -> list[dict]:
        return [self.objects[(namespace, n)] for n in sorted(self._groups.get((namespace, group), ()))
                if (namespace, n) in self.objects]

    def in_namespace(self, namespace: str) -> list[dict]:
        return [o for (ns, _), o in self.objects.items() if ns == namespace]

    def parsed(self, key: Key, model: type[BaseModel]) -> Any:
        """The object validated as `model`, or the ValidationError of its spec.

        Validating a spec runs its CEL rules (cel-python, ~1 ms each), so the spec part is cached per
        (uid, generation, labels) and only the status, which our own patches change, is re-read."""
        obj = self.objects.get(key)
        if obj is None:
            return None
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion") or ""
        hit = self._parsed.get(key)
        if hit and hit[0] == rv:
            return hit[1]
        spec_key = json.dumps([meta.get("uid"), meta.get("generation"), meta.get("labels") or {}], sort_keys=True)
        spec_hit = self._spec_parsed.get(key)
        if spec_hit and spec_hit[0] == spec_key:
            base = spec_hit[1]
        else:
            try:
                base = model.model_validate(without_status_extras({**obj, "status": None}, model))
            except ValidationError as exc:
                base = exc
            self._spec_parsed[key] = (spec_key, base)
        value = base
        if not isinstance(base, ValidationError) and isinstance(obj.get("status"), dict):
            status_model = _status_model(model)
            try:
                status = status_model.model_validate(without_status_extras(obj, model)["status"])
                value = base.model_copy(update={"status": status})
            except ValidationError:
                value = base
        self._parsed[key] = (rv, value)
        return value


def _status_model(model: type[BaseModel]) -> type[BaseModel]:
    return model.model_fields["status"].annotation.__args__[0]  # Optional[XStatus]


def without_status_extras(obj: dict, model: type[BaseModel]) -> dict:
    """The object minus what the API model does not describe (kopf's bookkeeping, server metadata noise)."""
    out = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "metadata", "spec", "status")}
    status = out.get("status")
    if status is None:
        out.pop("status", None)
    if isinstance(status, dict):
        status_model = _status_model(model)
        allowed = {f.alias or n for n, f in status_model.model_fields.items()}
        out["status"] = {k: v for k, v in status.items() if k in allowed}
    return out


class WorkQueue:
    """Coalescing, retrying queue of reconciles: one pending run per key; a key scheduled while it runs
    runs once more afterwards (so the newest state is always seen); failures retry with backoff."""

    def __init__(self, kind: str, fn: Callable[[Key], Awaitable[None]], delay: float, concurrency: int = 32):
        self.kind = kind
        self._fn = fn
        self._delay = delay
        self._pending: set[Key] = set()
        self._running: set[Key] = set()
        self._again: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._gate = asyncio.Semaphore(concurrency)
        self.idle = asyncio.Event()
        self.idle.set()

    def schedule(self, key: Key, delay: float | None = None) -> None:
        if key in self._running:
            self._again.add(key)
            return
        if key in self._pending:
            return
        self._pending.add(key)
        self.idle.clear()
        task = asyncio.get_running_loop().create_task(self._run(key, self._delay if delay is None else delay))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self.idle.set()

    async def _run(self, key: Key, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self._gate:
            self._pending.discard(key)
            self._running.add(key)
            started = time.perf_counter()
            retry = None
            try:
                await self._fn(key)
                RECONCILES.labels(self.kind, "success").inc()
                self._failures.pop(key, None)
            except Exception as exc:  # a reconcile error must never stop the operator
                n = self._failures[key] = self._failures.get(key, 0) + 1
                retry = min(300.0, 0.5 * 2 ** min(n, 10)) * (0.8 + 0.4 * random.random())
                RECONCILES.labels(self.kind, "error").inc()
                level = logging.WARNING if isinstance(exc, ApiError) else logging.ERROR
                log.log(level, "%s %s/%s: reconcile failed (retry in %.1fs): %s", self.kind, *key, retry, exc,
                        exc_info=not isinstance(exc, ApiError))
            finally:
                RECONCILE_SECONDS.labels(self.kind).observe(time.perf_counter() - started)
                self._running.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.schedule(key)
        elif retry is not None:
            self.schedule(key, retry)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Applier:
    """Server-side apply of children, skipped when the live object already carries the same spec hash.

    The hash of what was last applied is remembered per object; an object never seen is read once (a GET,
    not a write) to learn its hash, so a restarted operator writes nothing for unchanged children.
    """

    def __init__(self, kube: KubeClient):
        self.kube = kube
        self._known: dict[tuple[str, str, str, str], str] = {}

    @staticmethod
    def _id(m: dict) -> tuple[str, str, str, str]:
        return m["apiVersion"], m["kind"], m["metadata"].get("namespace", ""), m["metadata"]["name"]

    async def ensure(self, stages: list[list[dict]], fresh: bool = False) -> int:
        """Apply what differs; returns the number of objects written. Objects of one stage are applied
        concurrently, stages in order (RBAC and config before the workloads that use them). `fresh`: the
        owner was never reconciled, so its children cannot exist yet and are applied without a read."""
        written = 0
        for stage in stages:
            results = await asyncio.gather(*(self._ensure_one(m, fresh) for m in stage))
            written += sum(results)
        return written

    async def _ensure_one(self, m: dict, fresh: bool) -> int:
        ident = self._id(m)
        want = m["metadata"].get("annotations", {}).get(HASH_ANNOTATION)
        have = self._known.get(ident)
        if have is None and not fresh:
            live = await self.kube.get(ident[0], ident[1], ident[2], ident[3])
            have = ((live or {}).get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
        if have == want and want is not None:
            self._known[ident] = want
            return 0
        try:
            await self.kube.apply(m)
        except ApiError as exc:
            if exc.status != 422 or m["kind"] != "Job":
                raise
            # A Job's pod template is immutable: when the rendering of a running Job changed (a new operator
            # version or default image), only the fields a Job may change are updated; the run goes on.
            spec = {k: m["spec"].get(k) for k in ("backoffLimit", "activeDeadlineSeconds", "parallelism")}
            await self.kube.merge_patch(ident[0], ident[1], ident[2], ident[3],
                                        {"metadata": {"annotations": {HASH_ANNOTATION: want}}, "spec": spec})
            log.info("Job %s/%s: pod template unchanged (immutable); updated %s only", ident[2], ident[3],
                     ", ".join(k for k, v in spec.items() if v is not None))
        self._known[ident] = want
        return 1

    async def prune(self, unwanted: list[tuple[str, str, str, str]], owner_uid: str) -> int:
        """Delete children the spec no longer asks for (e.g. the HPA after a switch to KEDA), only when
        this owner owns them. Returns the number deleted."""
        deleted = 0
        for api_version, kind, namespace, name in unwanted:
            ident = (api_version, kind, namespace, name)
            if self._known.get(ident) == "absent":
                continue
            live = await self.kube.get(api_version, kind, namespace, name)
            refs = ((live or {}).get("metadata") or {}).get("ownerReferences") or []
            if live is not None and any(r.get("uid") == owner_uid for r in refs):
                await self.kube.delete(api_version, kind, namespace, name)
                deleted += 1
            self._known[ident] = "absent"
        return deleted

    def forget(self, namespace: str, name_prefix: str = "") -> None:
        for ident in [i for i in self._known if i[2] == namespace and i[3].startswith(name_prefix)]:
            del self._known[ident]


def owned_status(status_cls: type[StatusBase], current: dict, owned: tuple[str, ...]) -> StatusBase:
    """The part of the stored status this controller owns, parsed; empty when it is unreadable (a status
    written by an older version, or by hand), since the reconcile recomputes it anyway."""
    try:
        return status_cls.model_validate({k: v for k, v in current.items() if k in owned})
    except ValidationError:
        return status_cls()


async def write_invalid(op, body: dict, current: dict, generation: int | None, message: str) -> None:
    """Ready=False, reason InvalidSpec, naming the field; a Warning Event when the message is new."""
    conditions = StatusBase.model_validate(
        {"conditions": current.get("conditions") or []}).conditions if current.get("conditions") else []
    conditions = set_condition(conditions, "Ready", "False", "InvalidSpec", message,
                               observed_generation=generation)
    desired = {"observedGeneration": generation,
               "conditions": [c.model_dump(by_alias=True, exclude_none=True) for c in conditions]}
    patch = status_patch(current, desired, ("observedGeneration", "conditions"))
    if patch:
        ns, name = body["metadata"].get("namespace"), body["metadata"]["name"]
        await op.kube.patch_status(body.get("apiVersion", API_VERSION), body["kind"], ns, name, patch)
        old = [c for c in current.get("conditions") or [] if c.get("type") == "Ready"]
        if not old or old[0].get("reason") != "InvalidSpec" or old[0].get("message") != message:
            await op.events.post(body, "Warning", "InvalidSpec", message)


def status_patch(current: dict | None, desired: dict, owned: tuple[str, ...]) -> dict:
    """The merge patch that turns `current` into `desired` on the `owned` keys (others are left alone:
    the trainer's progress, kopf's bookkeeping, another controller's fields)."""
    current = current or {}
    patch: dict[str, Any] = {}
    for k in owned:
        want = desired.get(k)
        if _canonical(current.get(k)) != _canonical(want):
            patch[k] = want
    return patch


def _canonical(value: Any) -> str:
    if value in (None, [], {}):
        return "null"
    return json.dumps(value, sort_keys=True)


def dump_status(model: BaseModel) -> dict:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def condition_reason(status: dict | None, type_: str = "Ready") -> tuple[str | None, str | None]:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c.get("status"), c.get("reason")
    return None, None


class Events:
    """Posts an Event when a user-visible state changes (not per reconcile)."""

    def __init__(self, kube: KubeClient):
        self.kube = kube

    async def post(self, obj: dict, type_: str, reason: str, message: str) -> None:
        from loraplane.api.common import now_rfc3339

        EVENTS_POSTED.labels(obj.get("kind", ""), reason).inc()
        await self.kube.post_event(obj, type_, reason, message, now_rfc3339())


__all__ = ["Applier", "Events", "Key", "OperatorSettings", "Store", "WorkQueue", "key_of", "status_patch"]
