"""ModelRoute reconcile: the serving table and children, status from the engine Deployment and the
ReplicaReports the loaders write into their pods' `loraplane.io/adapters` annotation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from loraplane.api.adapter import Adapter
from loraplane.api.common import API_VERSION, set_condition
from loraplane.api.modelroute import BackendStatus, ModelRoute, ModelRouteStatus, ServedModel
from loraplane.builders import modelroute as builders
from loraplane.builders import engine_pod
from loraplane.builders.resolution import Resolution, resolve
from loraplane.api.validation import format_validation_error
from loraplane.controllers.pods import crash_problem, image_pull_problem, pod_name, unschedulable
from loraplane.controllers.runtime import Key, dump_status, owned_status, status_patch, write_invalid
from loraplane.api.wire.serving import REPORT_ANNOTATION, ReplicaReport, ServingTable

if TYPE_CHECKING:
    from loraplane.controllers.operator import Operator

API = API_VERSION
OWNED_STATUS = ("phase", "observedGeneration", "conditions", "replicas", "readyReplicas", "endpoint", "models")


def pod_ready(pod: dict) -> bool:
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def replica_report(pod: dict) -> ReplicaReport | None:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(REPORT_ANNOTATION)
    if not raw:
        return None
    try:
        return ReplicaReport.model_validate_json(raw)
    except (ValidationError, ValueError):
        return None


def ready_reports(pods: list[dict]) -> list[ReplicaReport]:
    """Reports of the replicas that can take traffic (Ready pods whose engine answers)."""
    out = []
    for pod in pods:
        report = replica_report(pod)
        if report and pod_ready(pod) and report.engine_ready:
            out.append(report)
    return out


# Ready reasons that explain unready replicas (each posts a Warning event when it appears).
REPLICA_PROBLEMS = ("Unschedulable", "ImagePull", "ModelFetchFailed", "EngineFailing")


def replica_problem(route: ModelRoute, pods: list[dict]) -> tuple[str, str] | None:
    """Why engine replicas are not ready, from the newest pod that shows a reason (pure)."""
    gpu = route.spec.engine.gpu_resource
    containers = (engine_pod.ENGINE_CONTAINER, engine_pod.LOADER_CONTAINER)
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True):
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        if message := unschedulable(pod):
            return "Unschedulable", (f"pod {pod_name(pod)} cannot be scheduled: {message}; check spec.engine.gpus "
                                     f"(free {gpu} in the cluster), gpuType, nodeSelector and tolerations")
        if problem := crash_problem(pod, engine_pod.MODEL_FETCH_CONTAINER, init=True):
            return "ModelFetchFailed", problem
        if problem := (image_pull_problem(pod, (engine_pod.MODEL_FETCH_CONTAINER,), init=True)
                       or image_pull_problem(pod, containers)):
            return "ImagePull", (f"{problem}; check spec.engine.image (or the chart's engineImage / image) and "
                                 "imagePullSecrets")
        for name in containers:
            if problem := crash_problem(pod, name):
                return "EngineFailing", problem
    return None


def route_status(route: ModelRoute, resolution: Resolution, deployment: dict | None, pods: list[dict],
                 generation: int | None, previous: ModelRouteStatus) -> ModelRouteStatus:
    """Aggregate (pure): replicas, per-model backend readiness, phase and the Ready condition."""
    table = resolution.table
    ds = (deployment or {}).get("status") or {}
    reports = ready_reports(pods)
    new = previous.model_copy(deep=True)
    new.observed_generation = generation
    new.replicas = ds.get("replicas") or 0
    new.ready_replicas = ds.get("readyReplicas") or 0
    new.endpoint = builders.endpoint(route)

    def count(served_name: str, base: bool) -> int:
        if base:
            return sum(1 for r in reports if r.engine_ready)
        return sum(1 for r in reports if (a := r.adapters.get(served_name)) and a.state == "Ready")

    def loader_reason(served_name: str) -> str | None:
        for r in replica_reports_all(pods):
            a = r.adapters.get(served_name)
            if a and a.state != "Ready":
                return a.reason
        return None

    models = []
    for model in table.models:
        backends = []
        for b in model.backends:
            n = count(b.served_name, b.adapter is None)
            backends.append(BackendStatus(adapter=b.adapter, base=True if b.adapter is None else None,
                                          weight=b.weight, served_name=b.served_name, ready=n > 0,
                                          ready_replicas=n,
                                          reason=None if n else (loader_reason(b.served_name) or "NotLoaded")))
        for (public, adapter), verdict in sorted(resolution.missing.items()):
            if public == model.name:
                weight = next((x.weight for r in route.spec.routes if r.name == public for x in r.backends or []
                               if x.adapter == adapter), 0)
                backends.append(BackendStatus(adapter=adapter, weight=weight, ready=False, ready_replicas=0,
                                              reason=verdict.reason))
        models.append(ServedModel(name=model.name, ready=any(b.ready for b in backends), backends=backends))
    new.models = models
    unready = [m.name for m in models if not m.ready]
    excluded = sorted({f"{a} ({v.reason})" for (_, a), v in resolution.missing.items()})
    if new.ready_replicas == 0:
        new.phase = "Progressing" if deployment is not None else "Pending"
        ready = ("False", "NoReadyReplicas", f"0 of {new.replicas} engine replicas are ready")
        if problem := replica_problem(route, pods):
            ready = ("False", problem[0], f"{ready[2]}: {problem[1]}")
    elif unready:
        new.phase = "Degraded"
        ready = ("False", "ModelsNotReady", f"no ready backend for: {', '.join(unready)}")
    else:
        new.phase = "Ready"
        ready = ("True", "Ready", f"{new.ready_replicas} replica(s) serve {len(models)} model(s)")
    if excluded:
        ready = (ready[0], ready[1], ready[2] + f"; left out: {', '.join(excluded)}")
    new.conditions = set_condition(new.conditions, "Ready", ready[0], ready[1], ready[2],
                                   observed_generation=generation)
    return new


def replica_reports_all(pods: list[dict]) -> list[ReplicaReport]:
    return [r for r in (replica_report(p) for p in pods) if r]


def accepted_base(table_json: str | None) -> tuple[str, str | None] | None:
    if not table_json:
        return None
    try:
        table = ServingTable.model_validate_json(table_json)
    except (ValidationError, ValueError):
        return None
    return table.base_model, table.base_model_revision


async def reconcile(op: "Operator", key: Key) -> None:
    body = op.routes.get(key)
    if body is None:
        op.resolutions.pop(key, None)
        op.route_selected.pop(key, None)
        op.route_applied.pop(key, None)
        op.forget(key)
        return
    route = op.routes.parsed(key, ModelRoute)
    generation = body["metadata"].get("generation")
    current = body.get("status") or {}
    if isinstance(route, ValidationError):
        await write_invalid(op, body, current, generation, format_validation_error(route, "spec field "))
        return
    ns, name = key
    previous = owned_status(ModelRouteStatus, current, OWNED_STATUS)
    adapters = [a for a in (op.adapters.parsed(k, Adapter) for k in list(op.adapters.objects) if k[0] == ns)
                if isinstance(a, Adapter)]
    resolution = resolve(route, adapters, op.rejected_adapters(ns))
    accepted = await op.accepted_route_base(route) if current else None
    wanted = (route.spec.base_model.identity, route.spec.base_model.revision)
    rejected = accepted is not None and accepted != wanted
    if not rejected:
        # Children depend only on the route's spec and its table: when neither changed since the last
        # successful apply (an adapter event that did not change this route's table), skip rendering them.
        applied_as = (route.metadata.uid, generation, resolution.table.to_json(), op.applier_epoch)
        if op.route_applied.get(key) != applied_as:
            kids = builders.children(route, resolution.table, op.settings.build)
            # The serving table and the RBAC first: the replicas and routers read them as they start.
            first = [k for k in kids if k["kind"] in ("ConfigMap", "ServiceAccount", "Role", "RoleBinding")]
            await op.applier.ensure([first, [k for k in kids if k not in first]], fresh=not current)
            await op.applier.prune(builders.unwanted_children(route, op.settings.build), route.metadata.uid or "")
            op.route_applied[key] = applied_as
        op.remember_route_base(route, wanted)
        op.resolutions[key] = resolution
    else:
        resolution = op.resolutions.get(key) or resolution
    deployment = op.deployments.get((ns, builders.engine_name(route)))
    pods = op.engine_pods.group(ns, name)
    new = route_status(route, resolution, deployment, pods, generation, previous)
    if rejected:
        new.conditions = set_condition(
            new.conditions, "Ready", "False", "SpecImmutable",
            f"spec.baseModel cannot change from {accepted[0]}@{accepted[1] or '-'} to "
            f"{wanted[0]}@{wanted[1] or '-'} (immutable); revert it or create a new ModelRoute",
            observed_generation=generation)
    desired = dump_status(new)
    patch = status_patch(current, desired, OWNED_STATUS)
    if patch:
        await op.kube.patch_status(API, "ModelRoute", ns, name, patch)
    old_phase = current.get("phase")
    ready = new.condition("Ready")
    old_reason = next((c.get("reason") for c in current.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready and ready.reason in REPLICA_PROBLEMS + ("SpecImmutable",) and old_reason != ready.reason:
        await op.events.post(body, "Warning", ready.reason, ready.message)
    elif old_phase != new.phase and new.phase in ("Ready", "Degraded") or (old_phase is None and new.phase):
        await op.events.post(body, "Normal" if new.phase != "Degraded" else "Warning", new.phase,
                             ready.message if ready else "")
    # Adapters' status lists the routes that select them: those whose selection or verdict changed follow.
    previous_selection = op.route_selected.get(key, {})
    for adapter_name in set(resolution.selected) | set(previous_selection):
        if previous_selection.get(adapter_name) != resolution.selected.get(adapter_name):
            op.adapter_queue.schedule((ns, adapter_name))
    op.route_selected[key] = dict(resolution.selected)
