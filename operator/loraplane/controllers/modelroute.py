"""The ModelRoute controller: the serving table and children, status from the engine Deployment and the
ReplicaReports the loaders write into their pods' `loraplane.io/adapters` annotation."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pydantic import ValidationError

from loraplane.api.adapter import Adapter
from loraplane.api.conditions import ConditionState, ConditionStatus, ConditionType, Progress, progress_of
from loraplane.api.keys import HASH_ANNOTATION, ROUTE_LABEL, ROUTER_LABEL
from loraplane.api.modelroute import BackendStatus, ModelRoute, ModelRoutePhase, ModelRouteStatus, ServedModel
from loraplane.api.orchestration import ContentDestinationStatus, ContentModelStatus
from loraplane.api.reasons import Reason
from loraplane.api.validation import format_validation_error
from loraplane.api.wire.serving import CONFIGMAP_KEY, AdapterState, ReplicaReport, ServingTable, configmap_name
from loraplane.builders import engine_pod
from loraplane.builders import modelroute as route_builders
from loraplane.builders.policy import policy_message
from loraplane.api.orchestration import Publication, engine_task, publication
from loraplane.builders.orchestration import EMBEDDING_PATH, publication_changes, referenced_names
from loraplane.builders.resolution import (Resolution, Verdict, resolve, route_selection, route_selects,
                                          selection_index, with_others)
from loraplane.controllers.base import API, Context, Controller
from loraplane.controllers.pods import (config_problem, crash_problem, image_pull_problem, pod_name, pod_ready,
                                        pods_refused, replica_report, unschedulable)
from loraplane.controllers.status import (dump_status, invalid_spec, owned_status, ready_reason,
                                          status_patch)
from loraplane.api.paths import ENGINE_KEY_SECRET_KEY
from loraplane.kube.apply import owned_by
from loraplane.kube.events import Event, EventType
from loraplane.kube.informer import Key

# The Adapter status fields its serving-table entries are resolved from (builders.resolution.adapter_versions):
# the serving version and its artifact, and the candidate (its phase and share of the traffic).
TABLE_STATUS_FIELDS = ("artifact", "servedName", "version", "candidate")
# What builders.resolution reads of an Adapter's status (the table fields and the rollout that holds a version back):
# a change elsewhere in it does not change any route's resolution.
RESOLUTION_STATUS_FIELDS = (*TABLE_STATUS_FIELDS, "rollout")
OWNED_STATUS = ("phase", "observedGeneration", "conditions", "replicas", "readyReplicas", "endpoint", "models",
                "contentModels")
# How long adapter changes are gathered before the routes of their namespace re-resolve their tables.
ROUTE_BATCH_SECONDS = 0.5
# While Adapter changes keep coming (a burst of creates), a route's table waits for ROUTE_BATCH_SECONDS without
# one, but not longer than this after the first: each table version is a ConfigMap write, a route status patch
# and a re-render of the children, and every reconcile in between (a pod, a Deployment, the route's own status)
# would otherwise publish the table of the moment.
ROUTE_BATCH_MAX_SECONDS = 10.0
# How long a change of a route's Deployments or pods waits for more before the route reconciles: a rollout moves
# them through several states within a fraction of a second (Deployment, ReplicaSet, pods created, scheduled),
# and each reconcile in between would patch the route's status with a state already gone.
CHILD_BATCH_SECONDS = 0.5
# Ready reasons that explain unready replicas (each posts a Warning event when it appears).
REPLICA_PROBLEMS = (Reason.Unschedulable, Reason.ImagePull, Reason.ModelFetchFailed, Reason.EngineFailing,
                    Reason.ContainerConfig, Reason.RolloutStalled, Reason.RouterFailing, Reason.PodsRefused)
# The engine key Secret's create is tried again at most this often per route (seconds) while a pod of the route
# cannot be created because that Secret is missing (CreateContainerConfigError: someone deleted it). Its name
# carries the route's uid (engine_pod.engine_key_secret_name), so a create answered 409 found the route's own
# Secret, never a deleted predecessor's of the same name: nothing else makes the operator try again.
ENGINE_KEY_RETRY_SECONDS = 30.0
FALSE = ConditionStatus.FALSE
# Which of two Ready=False states (the engine's, the router's) says more: the one that needs someone to act.
SEVERITY = {Progress.Idle: 0, Progress.Done: 0, Progress.Reconciling: 1, Progress.Stalled: 2}

BaseModelId = tuple[str, str | None]  # (identity, revision)
# apps/v1 DeploymentCondition: the rollout made no progress within spec.progressDeadlineSeconds.
DEPLOYMENT_PROGRESSING = "Progressing"
PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"


def ready_reports(pods: list[dict]) -> list[ReplicaReport]:
    """Reports of the replicas that can take traffic (Ready pods whose engine answers)."""
    out = []
    for pod in pods:
        report = replica_report(pod)
        if report and pod_ready(pod) and report.engine_ready:
            out.append(report)
    return out


def replica_reports_all(pods: list[dict]) -> list[ReplicaReport]:
    """The ReplicaReport of every pod that has one, ready or not."""
    return [r for r in (replica_report(p) for p in pods) if r]


def replica_problem(route: ModelRoute, pods: list[dict]) -> ConditionState | None:
    """Why engine replicas are not ready, from the newest pod that shows a reason (pure)."""
    gpu = route.spec.engine.gpu_resource
    containers = (engine_pod.ENGINE_CONTAINER, engine_pod.LOADER_CONTAINER)
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True):
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        if message := unschedulable(pod):
            return ConditionState(FALSE, Reason.Unschedulable, (
                f"pod {pod_name(pod)} cannot be scheduled: {message}; check spec.engine.gpus (free {gpu} in the "
                "cluster), gpuType, nodeSelector and tolerations"))
        if problem := crash_problem(pod, engine_pod.MODEL_FETCH_CONTAINER, init=True):
            return ConditionState(FALSE, Reason.ModelFetchFailed, problem)
        if problem := (image_pull_problem(pod, (engine_pod.MODEL_FETCH_CONTAINER,), init=True)
                       or image_pull_problem(pod, containers)):
            return ConditionState(FALSE, Reason.ImagePull, (
                f"{problem}; check spec.engine.image (or the chart's engineImage / image) and imagePullSecrets"))
        if problem := (config_problem(pod, (engine_pod.MODEL_FETCH_CONTAINER,), init=True)
                       or config_problem(pod, containers)):
            return ConditionState(FALSE, Reason.ContainerConfig, (
                f"{problem}; create the named Secret or ConfigMap (the engine key Secret "
                f"{engine_pod.engine_key_secret_name(route)} is re-created by the operator)"))
        for name in containers:
            if problem := crash_problem(pod, name):
                return ConditionState(FALSE, Reason.EngineFailing, problem)
    return None


def references_secret(deployment: dict | None, name: str) -> bool:
    """Whether `deployment`'s pod template takes an env value from Secret `name` (any container, init ones too),
    e.g. the engine key's secretKeyRef (engine_pod.engine_key_env). False for None."""
    template = ((deployment or {}).get("spec") or {}).get("template") or {}
    spec = template.get("spec") or {}
    return any(((env.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") == name
               for c in (*(spec.get("initContainers") or ()), *(spec.get("containers") or ()))
               for env in (c.get("env") or ()))


class Rollout(NamedTuple):
    """Why the engine Deployment does not yet run the route's current spec on every replica."""

    message: str
    stalled: bool = False  # the Deployment gave up: ProgressDeadlineExceeded


def rollout_pending(deployment: dict | None, desired_hash: str | None) -> Rollout | None:
    """Whether the engine Deployment's rollout of the current spec is unfinished (pure), else None.

    `desired_hash` is the HASH_ANNOTATION of the Deployment the route's current spec renders (None: unknown).
    The rules are `kubectl rollout status`'s (k8s.io/kubectl/pkg/polymorphichelpers/rollout_status.go), less its
    availability check (readiness is counted by the caller, and a scale-up is no rollout), plus the hash: the
    store may still hold the Deployment of the previous spec right after the new one was applied."""
    if deployment is None:
        return None
    meta = deployment.get("metadata") or {}
    ds = deployment.get("status") or {}
    if desired_hash is not None and (meta.get("annotations") or {}).get(HASH_ANNOTATION) != desired_hash:
        return Rollout("the engine Deployment does not have the current spec yet")
    if (meta.get("generation") or 0) > (ds.get("observedGeneration") or 0):
        return Rollout("the Deployment controller has not seen the current spec yet")
    stalled = any(c.get("type") == DEPLOYMENT_PROGRESSING and c.get("reason") == PROGRESS_DEADLINE_EXCEEDED
                  for c in ds.get("conditions") or [])
    want = (deployment.get("spec") or {}).get("replicas")
    updated = ds.get("updatedReplicas") or 0
    if want is not None and updated < want:
        return Rollout(f"{updated} of {want} replica(s) run the current spec", stalled)
    if (old := (ds.get("replicas") or 0) - updated) > 0:
        return Rollout(f"{old} replica(s) of the previous spec are still being replaced", stalled)
    return None


class RouterFacts(NamedTuple):
    """What was observed of a route's router: its Deployment (None: not in the store), its pods and the
    HASH_ANNOTATION its current spec renders (None: unknown)."""

    deployment: dict | None
    pods: list[dict] = []
    desired_hash: str | None = None


def router_state(route: ModelRoute, router: RouterFacts) -> ConditionState | None:
    """Why the router does not serve `status.endpoint` with the current spec (pure), else None.

    The router is the route's only way in: with no available router pod the endpoint has nothing behind it,
    whatever the engine replicas do. The rollout rules are the engine's (`rollout_pending`); a router pod's own
    problem (image pull, crash) names it as `replica_problem` does for the engine."""
    if (route.spec.router.replicas or 0) == 0:
        return ConditionState(FALSE, Reason.RouterScaledToZero, "spec.router.replicas is 0: no router pod serves "
                              f"the endpoint {route_builders.endpoint(route)}")
    name = route_builders.router_name(route)
    if router.deployment is None:
        return ConditionState(FALSE, Reason.RouterNotReady, f"the router Deployment {name} does not exist yet")
    ds = router.deployment.get("status") or {}
    available = ds.get("availableReplicas") or 0
    rollout = rollout_pending(router.deployment, router.desired_hash)
    if not available or rollout is not None:
        what = (f"router Deployment {name}: " + (rollout.message if rollout else "no router pod is available")
                + (f"; {available} available router pod(s) of the previous spec keep serving" if available else ""))
        live = [p for p in router.pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
        for pod in sorted(live, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp", ""), reverse=True):
            if pod_ready(pod):
                continue
            if problem := (image_pull_problem(pod, (route_builders.ROUTER_CONTAINER,))
                           or config_problem(pod, (route_builders.ROUTER_CONTAINER,))
                           or crash_problem(pod, route_builders.ROUTER_CONTAINER)):
                return ConditionState(FALSE, Reason.RouterFailing, f"{what}: {problem}")
            if message := unschedulable(pod):
                return ConditionState(FALSE, Reason.RouterNotReady, f"{what}: pod {pod_name(pod)} cannot be "
                                      f"scheduled: {message}")
        if refused := pods_refused(router.deployment):
            return ConditionState(FALSE, Reason.PodsRefused, f"{what}: the API server refuses the router pods: "
                                  f"{refused}")
        if rollout is not None and rollout.stalled:
            return ConditionState(FALSE, Reason.RouterFailing, f"{what}: the Deployment exceeded its progress "
                                  "deadline")
        return ConditionState(FALSE, Reason.RouterNotReady, what)
    return None


def scaled_to_zero(route: ModelRoute, deployment: dict | None) -> bool:
    """Whether an autoscaled route's engine Deployment asks for 0 replicas and has none left (KEDA scaled it to
    zero, or someone did by hand): a settled state, not a start that is under way."""
    if route.spec.autoscaling is None or deployment is None:
        return False
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    return spec.get("replicas") == 0 and not status.get("replicas")


def content_status(route: ModelRoute, resolution: Resolution, models: list[ServedModel],
                   others: Sequence[Publication] = ()) -> list[ContentModelStatus]:
    """status.contentModels (pure): each spec.contentRouting model with every public model it sends requests to
    and whether each can serve. A model of this route is ready when its status.models entry is (its reason: the
    first unready backend's); another route's when that route's status.models says so (else ModelsNotReady);
    one nobody serves is not ready with ContentTargetNotFound, one whose route's spec.engine.task cannot answer
    the role it is named in with ContentTargetWrongTask (per role: an embed route's model can be a right
    embeddingModel and a wrong default). A content model is ready when its default is."""
    if not route.spec.content_routing:
        return []   # (every other route's status.models would be indexed below for nothing)
    served = {m.name: m for m in models}
    published = {p.route: dict(p.models) for p in others}
    content = resolution.content

    def entry(name: str, path: str = "default") -> ContentDestinationStatus:
        t = content.target(path, name) if name in content.targets else None
        if t is None or t.missing is not None:
            return ContentDestinationStatus(model=name, route=t.route if t else None, ready=False,
                                            reason=t.reason if t else Reason.ContentTargetNotFound)
        if t.local:
            m = served.get(name)
            ready = bool(m and m.ready)
            reason = None if ready else next((b.reason for b in (m.backends if m else []) if b.reason),
                                             Reason.ModelsNotReady)
            return ContentDestinationStatus(model=name, route=t.route, ready=ready, reason=reason)
        ready = published.get(t.route or "", {}).get(name, False)
        return ContentDestinationStatus(model=name, route=t.route, ready=ready,
                                        reason=None if ready else Reason.ModelsNotReady)

    out = []
    for c in route.spec.content_routing:
        names = list(dict.fromkeys([*(d.model for d in c.destinations), c.default]))
        default = entry(c.default)
        out.append(ContentModelStatus(
            name=c.name, ready=default.ready, default=c.default, methods=list(c.methods),
            destinations=[entry(n) for n in names],
            classifier=entry(c.classifier.model) if c.classifier is not None else None,
            embedding_model=(entry(c.semantic.embedding_model, EMBEDDING_PATH) if c.semantic is not None
                             else None)))
    return out


def route_status(route: ModelRoute, resolution: Resolution, deployment: dict | None, pods: list[dict],
                 generation: int | None, previous: ModelRouteStatus,
                 desired_hash: str | None = None, *, router: RouterFacts,
                 others: Sequence[Publication] = ()) -> ModelRouteStatus:
    """Aggregate (pure): replicas, per-model backend readiness, phase and the Ready condition.

    Ready is True only when the current spec is rolled out (`rollout_pending`, with `desired_hash` the engine
    Deployment's wanted HASH_ANNOTATION): while replicas of a previous spec serve and the new ones do not come
    up, Ready is False at the new observedGeneration with the new pods' reason (ImagePull, EngineFailing, ...).
    It also needs the router (`router`, `router_state`): an endpoint with no available router pod of the current
    spec serves nothing, so Ready is False with its reason; of the engine's and the router's reasons the more
    severe one (Stalled over Reconciling over Idle) is Ready's, the other is added to the message.

    Content routing (`others`: what the namespace's other routes publish): status.contentModels
    (`content_status`); a content model whose default cannot serve counts as a model with no ready backend
    (ModelsNotReady); a name of this route an older route owns is PublicNameConflict, and a content model's
    reference nobody serves is ContentTargetNotFound (both spec mistakes, shown whatever else the state is)."""
    table = resolution.table
    ds = (deployment or {}).get("status") or {}
    reports = ready_reports(pods)
    # A shallow copy: every field below is assigned, never mutated in place, and set_condition returns a new list,
    # so `previous` stays as it was. (A deep copy of the status was ~9% of the operator's CPU under load.)
    new = previous.model_copy()
    new.observed_generation = generation
    new.replicas = ds.get("replicas") or 0
    new.ready_replicas = ds.get("readyReplicas") or 0
    new.endpoint = route_builders.endpoint(route)

    def count(served_name: str, base: bool) -> int:
        if base:
            return sum(1 for r in reports if r.engine_ready)
        return sum(1 for r in reports if (a := r.adapters.get(served_name)) and a.state == AdapterState.Ready)

    def loader_reason(served_name: str) -> str | None:
        for r in replica_reports_all(pods):
            a = r.adapters.get(served_name)
            if a and a.state != AdapterState.Ready:
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
                                          reason=None if n else (loader_reason(b.served_name) or Reason.NotLoaded)))
        for (public, adapter), verdict in sorted(resolution.missing.items()):
            if public == model.name:
                weight = next((x.weight for r in route.spec.routes if r.name == public for x in r.backends or []
                               if x.adapter == adapter), 0)
                backends.append(BackendStatus(adapter=adapter, weight=weight, ready=False, ready_replicas=0,
                                              reason=verdict.reason))
        models.append(ServedModel(name=model.name, ready=any(b.ready for b in backends), backends=backends))
    new.models = models
    new.content_models = content_status(route, resolution, models, others)
    unready = [m.name for m in models if not m.ready] + [
        c.name for c in new.content_models if not c.ready and c.name not in resolution.content.missing]
    excluded = sorted({f"{a} ({v.reason})" for (_, a), v in resolution.missing.items()}
                      | {f"{a} ({v.reason})" for a, v in resolution.selected.items()
                         if v.reason == Reason.ServingTableFull}   # selector-matched ones are in no backend
                      | {f"{a}'s new version ({v.reason})" for a, v in resolution.held.items()})
    rollout = rollout_pending(deployment, desired_hash)
    if new.ready_replicas == 0 and scaled_to_zero(route, deployment):
        new.phase = ModelRoutePhase.ScaledToZero
        cold = route.spec.router.cold_start
        ready = ConditionState(FALSE, Reason.ScaledToZero, "the engine is scaled to 0 replicas; the router holds "
                               f"up to {cold.max_requests} requests for up to {cold.max_wait_seconds} s while the "
                               "route wakes")
    elif new.ready_replicas == 0:
        new.phase = ModelRoutePhase.Progressing if deployment is not None else ModelRoutePhase.Pending
        ready = ConditionState(FALSE, Reason.NoReadyReplicas, f"0 of {new.replicas} engine replicas are ready")
        if problem := replica_problem(route, pods):
            ready = ConditionState(FALSE, problem.reason, f"{ready.message}: {problem.message}")
        elif refused := pods_refused(deployment):
            ready = ConditionState(FALSE, Reason.PodsRefused, f"{ready.message}: the API server refuses the "
                                   f"engine pods: {refused}")
    elif rollout is not None:
        # Serving goes on from the ready replicas; the current generation is not what they run yet.
        message = (f"generation {generation} is not rolled out: {rollout.message}; {new.ready_replicas} ready "
                   "replica(s) keep serving")
        # Only pods that are not ready can be the failing new ones (an old ready pod's past restart is not).
        if problem := replica_problem(route, [p for p in pods if not pod_ready(p)]):
            new.phase = ModelRoutePhase.Degraded
            ready = ConditionState(FALSE, problem.reason, f"{message}: {problem.message}")
        elif refused := pods_refused(deployment):
            new.phase = ModelRoutePhase.Degraded
            ready = ConditionState(FALSE, Reason.PodsRefused, f"{message}: the API server refuses the new engine "
                                   f"pods: {refused}")
        elif rollout.stalled:
            new.phase = ModelRoutePhase.Degraded
            ready = ConditionState(FALSE, Reason.RolloutStalled, f"{message}: the Deployment exceeded its "
                                   "progress deadline")
        else:
            new.phase = ModelRoutePhase.Progressing
            ready = ConditionState(FALSE, Reason.Progressing, message)
    elif unready:
        new.phase = ModelRoutePhase.Degraded
        ready = ConditionState(FALSE, Reason.ModelsNotReady, f"no ready backend for: {', '.join(unready)}")
    else:
        new.phase = ModelRoutePhase.Ready
        ready = ConditionState(ConditionStatus.TRUE, Reason.Ready,
                               f"{new.ready_replicas} replica(s) serve {len(models)} model(s)")
    if (router_problem := router_state(route, router)) is not None:
        if ready.status == ConditionStatus.TRUE:
            new.phase = ModelRoutePhase.Progressing if router_problem.reason == Reason.RouterNotReady else (
                ModelRoutePhase.Degraded)
            ready = router_problem
        elif SEVERITY[progress_of(router_problem.reason)] > SEVERITY[progress_of(ready.reason)]:
            ready = router_problem._replace(message=f"{router_problem.message}; engine: {ready.message}")
        else:
            ready = ready._replace(message=f"{ready.message}; {router_problem.message}")
    if excluded:
        ready = ready._replace(message=ready.message + f"; left out: {', '.join(excluded)}")
    content = resolution.content
    mistakes = []   # spec mistakes the user must fix: shown whatever else the route's state is, first one's reason
    if resolution.conflicts or content.conflicts:
        mistakes.append((Reason.PublicNameConflict, "; ".join(
            [c.message for c in resolution.conflicts] + ([content.conflict_message()] if content.conflicts else []))))
    if content.missing:
        mistakes.append((content.missing_reason, "spec.contentRouting names what no route of the namespace can "
                         f"serve as asked: {content.missing_message()}"))
    if mistakes:
        if new.phase == ModelRoutePhase.Ready:
            new.phase = ModelRoutePhase.Degraded
        ready = ConditionState(FALSE, mistakes[0][0], ". ".join(m for _, m in mistakes) + f". {ready.message}")
    new.set_condition(ConditionType.Ready, ready, generation)
    return new


def _published_part(body: dict) -> tuple:
    """The parts of a stored ModelRoute its Publication is read from (builders.orchestration.publication)."""
    status = body.get("status")
    status = status if isinstance(status, dict) else {}
    return ((body.get("metadata") or {}).get("creationTimestamp"), status.get("models"), status.get("contentModels"),
            engine_task(body))


def accepted_base(table_json: str | None) -> BaseModelId | None:
    """The base model (identity, revision) a serving table (its ConfigMap's JSON) was written for."""
    if not table_json:
        return None
    try:
        table = ServingTable.model_validate_json(table_json)
    except (ValidationError, ValueError):
        return None
    return table.base_model, table.base_model_revision


@dataclass
class ModelRouteFacts:
    """What a ModelRoute reconcile observed, from the stores and the controller's memory."""

    body: dict
    route: ModelRoute | None                     # None when the spec is invalid (`invalid` says why)
    invalid: str | None = None
    adapters: list[Adapter] = field(default_factory=list)      # the valid Adapters of its namespace
    rejected: dict[str, Verdict] = field(default_factory=dict)  # Adapters no route may serve
    accepted_base: BaseModelId | None = None     # the base model its serving table was written for
    deployment: dict | None = None               # the engine Deployment
    pods: list[dict] = field(default_factory=list)  # the engine pods
    resolution: Resolution | None = None         # resolve() of route, adapters and rejected (None: plan resolves)
    last_resolution: Resolution | None = None    # the table it serves now (kept while a change is refused)
    last_applied: tuple | None = None            # what its children were last rendered from
    last_selected: dict[str, Verdict] = field(default_factory=dict)  # adapters it selected last time
    last_held: dict[str, Verdict] = field(default_factory=dict)  # candidates its table left out last time
    applier_epoch: int = 0
    engine_hash: str | None = None               # HASH_ANNOTATION of the engine Deployment last applied
    router_deployment: dict | None = None        # the router Deployment
    router_pods: list[dict] = field(default_factory=list)  # the router pods
    router_hash: str | None = None               # HASH_ANNOTATION of the router Deployment last applied
    engine_key_due: bool = False                 # the engine key Secret's create is to be tried (again)
    # The engine Deployment (this route's, by uid) takes its key from the engine key Secret of this route's uid:
    # the Secret was made (or found) before it was applied (execute), so a restarted operator need not create it.
    engine_key_known: bool = False
    others: list[Publication] = field(default_factory=list)  # what the namespace's other routes publish


@dataclass
class ModelRoutePlan:
    """What a ModelRoute reconcile writes, in this order."""

    body: dict
    children: list[list[dict]] = field(default_factory=list)  # apply stages; empty: unchanged
    fresh: bool = False
    unwanted: list[tuple[str, str, str, str]] = field(default_factory=list)  # optional children to prune
    applied_as: tuple | None = None              # remembered once the children are applied
    accepted_base: BaseModelId | None = None     # remembered as accepted (None: the change was refused)
    resolution: Resolution | None = None
    status: dict = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    selected: dict[str, Verdict] = field(default_factory=dict)
    held: dict[str, Verdict] = field(default_factory=dict)   # Resolution.held (candidates left out)
    reselected: list[str] = field(default_factory=list)  # adapters whose table_full verdict or held changed
    engine_hash: str | None = None               # the engine Deployment's HASH_ANNOTATION, remembered once applied
    router_hash: str | None = None               # the router Deployment's, likewise
    # The route's engine key Secret without its key (execute generates one when it creates the Secret).
    engine_key: dict | None = None
    engine_key_due: bool = False                 # create it even if remembered (ModelRouteFacts.engine_key_due)


def table_full(verdict: Verdict | None) -> Verdict | None:
    """`verdict` (a route's resolution of one Adapter) when it left the Adapter out of the table for its size
    (Reason.ServingTableFull), else None: the part of a route's verdict an Adapter's status shows
    (ModelRouteController.table_verdicts), and so the part whose change reconciles the Adapter."""
    return verdict if verdict is not None and verdict.reason == Reason.ServingTableFull else None


class ModelRouteController(Controller):
    """Reconciles ModelRoutes. Remembers per route the base model it accepted, the resolution it serves, what
    its children were rendered from, and which adapters it selected (to tell the Adapter controller)."""

    kind = "ModelRoute"

    def __init__(self, ctx: Context, rejections: Callable[[str], dict[str, Verdict]],
                 reselected: Callable[[Key], None]):
        """`rejections(namespace)`: the Adapters no route may serve (AdapterController.rejections);
        `reselected(adapter key)`: called when what the Adapter's status reads of a route's resolution changed (its
        table_full verdict, its held candidate)."""
        super().__init__(ctx)
        self._rejections = rejections
        self._reselected = reselected
        self._accepted: dict[tuple[str, str, str], BaseModelId] = {}
        self._resolutions: dict[Key, Resolution] = {}
        self._resolved: dict[Key, tuple[tuple, dict[str, Verdict], Resolution]] = {}  # observe's resolve() memo
        # observe's with_others() memo: (the resolve() memo's Resolution, the other routes' names, the result).
        self._with_others: dict[Key, tuple[Resolution, tuple, Resolution]] = {}
        # Per route, a counter that moves when an Adapter it selects (before or after the change) changes in what
        # its resolution reads: the memo above is kept until it moves (routes_selecting).
        self._adapters_epoch: dict[Key, int] = {}
        # Per route, [first, last] time (self._clock) of the Adapter changes its last resolution does not have yet.
        self._adapters_changed: dict[Key, list[float]] = {}
        self._selected: dict[Key, dict[str, Verdict]] = {}
        self._held: dict[Key, dict[str, Verdict]] = {}   # Resolution.held of the table each route serves
        self._applied: dict[Key, tuple] = {}
        self._engine_hash: dict[Key, str] = {}
        self._router_hash: dict[Key, str] = {}
        # Routes' (namespace, name, uid) whose key Secret exists: created (201) or found (409) by this process.
        self._keyed: set[tuple[str, str, str]] = set()
        # (namespace, name, uid) -> time.monotonic() of its last create for a pod waiting on the missing Secret.
        self._key_tries: dict[tuple[str, str, str], float] = {}
        self._clock = time.monotonic   # for ENGINE_KEY_RETRY_SECONDS (tests replace it)
        # namespace -> (the ModelRoute store's version of it, the Publication of each route): `publications`.
        self._publications: dict[str, tuple[int, list[Publication]]] = {}
        self._publication: dict[Key, tuple[str, Publication]] = {}   # route -> (its resourceVersion, Publication)

    def on_change(self, source: str, obj: dict, old: dict | None) -> None:
        """Schedule the route itself, and the other routes of its namespace that its change concerns
        (`schedule_dependents`); re-resolve the routes that select an Adapter (batched: ROUTE_BATCH_SECONDS
        without a change, at most ROUTE_BATCH_MAX_SECONDS after the first) when an
        Adapter's spec, labels or artifact changed; schedule the route named by a changed replica or Deployment."""
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or ""
        if source == "ModelRoute":
            self.schedule((ns, meta.get("name") or ""))
            self.schedule_dependents(ns, meta.get("name") or "", obj, old)
        elif source == "Adapter":
            before = old or {}
            status, was = obj.get("status") or {}, before.get("status") or {}
            if (old is None or before.get("spec") != obj.get("spec")
                    or (before.get("metadata") or {}).get("labels") != meta.get("labels")
                    or any(was.get(f) != status.get(f) for f in RESOLUTION_STATUS_FIELDS)):
                table = old is None or any(was.get(f) != status.get(f) for f in TABLE_STATUS_FIELDS) or (
                    before.get("spec") != obj.get("spec")
                    or (before.get("metadata") or {}).get("labels") != meta.get("labels"))
                now = self._clock()
                for key in self.routes_selecting(ns, obj, old):
                    self._adapters_epoch[key] = self._adapters_epoch.get(key, 0) + 1
                    self._adapters_changed.setdefault(key, [now, now])[1] = now
                    if table:
                        # Batched: a burst of adapter changes re-resolves each route once, not once per adapter.
                        self.schedule(key, ROUTE_BATCH_SECONDS)
        elif source in ("EnginePod", "Deployment"):
            if route := (meta.get("labels") or {}).get(ROUTE_LABEL):
                self.schedule((ns, route), CHILD_BATCH_SECONDS)
        elif source in ("RouterPod", "RouterDeployment"):
            if route := (meta.get("labels") or {}).get(ROUTER_LABEL):
                self.schedule((ns, route), CHILD_BATCH_SECONDS)

    def routes_selecting(self, namespace: str, adapter: dict, old: dict | None) -> list[Key]:
        """The routes of `namespace` whose resolution reads the Adapter `adapter` (a stored object; `old` its
        previous state): those that select it now or selected it before (builders.resolution.route_selects), and
        those that do not parse (which Adapters they select is unknown)."""
        valid = self.store.valid_in(namespace, ModelRoute)
        index = selection_index(valid)
        found: set[Key] = set()
        for o in (adapter, old):
            if o is not None:
                meta = o.get("metadata") or {}
                found.update((namespace, r.metadata.name or "") for r in index.selecting(meta.get("name"),
                                                                                        meta.get("labels") or {}))
        keys = self.store.keys_in(namespace)
        if len(keys) != len(valid):   # routes that do not parse: which Adapters they select is unknown
            found.update(k for k in keys if not isinstance(self.store.parsed(k, ModelRoute), ModelRoute))
        return [k for k in keys if k in found]

    def adapter_batch_wait(self, key: Key) -> float:
        """Seconds until the Adapter changes that route `key`'s resolution does not have yet are due: a batch is
        due ROUTE_BATCH_SECONDS after its last change, at most ROUTE_BATCH_MAX_SECONDS after its first
        (0 when it is due or there is none)."""
        changed = self._adapters_changed.get(key)
        if changed is None:
            return 0.0
        first, last = changed
        return max(0.0, min(last + ROUTE_BATCH_SECONDS, first + ROUTE_BATCH_MAX_SECONDS) - self._clock())

    def selected_adapters(self, namespace: str, route: ModelRoute) -> list[Adapter]:
        """The valid Adapters of `namespace` that `route` selects, by name: the only ones its resolution reads
        (builders.resolution.resolve gives the same result for them as for the whole namespace). Found through
        the Adapter store's label index (one matchLabels pair per selector) instead of walking every Adapter."""
        store = self.stores.Adapter
        names, selectors = route_selection(route)
        candidates = set(names)
        for selector in selectors:
            if not selector.match_labels:   # matchExpressions only, or empty (every Adapter): walk them all
                candidates.update(name for _, name in store.keys_in(namespace))
                break
            candidates |= store.with_label(namespace, *next(iter(selector.match_labels.items())))
        out = []
        for name in sorted(candidates):
            adapter = store.parsed((namespace, name), Adapter)
            if isinstance(adapter, Adapter) and route_selects(route, adapter.metadata.name, adapter.metadata.labels):
                out.append(adapter)
        return out

    def schedule_dependents(self, ns: str, name: str, obj: dict, old: dict | None) -> list[Key]:
        """Schedule the other routes of `ns` that a change of route `name` (`old` -> `obj`; `old` None when it
        appeared or disappeared) concerns, and return their keys: those whose spec.contentRouting names a public
        model whose presence or readiness changed (their table's external models and status.contentModels), and
        those publishing a name that appeared or disappeared here (which route is older and owns it: the
        PublicNameConflict of the later one). Most route events (its replicas' counts, its conditions) change
        neither: one comparison of the status parts a Publication is read from, nothing scheduled. The other
        routes are walked only when a name or a readiness changed; a route without contentRouting costs one dict
        lookup then, and is scheduled only for a name it publishes too that appeared or disappeared."""
        if old is not None and _published_part(old) == _published_part(obj):
            return []   # the common case (replica counts, conditions): one comparison, in C
        changed, presence = publication_changes(publication(old) if old is not None else None, publication(obj))
        if not changed:
            return []
        keys = []
        publications = {p.route: p for p in self.publications(ns)} if presence else {}
        for key in self.store.keys_in(ns):
            if key[1] == name or (body := self.store.get(key)) is None:
                continue
            if (changed & referenced_names(body)
                    or (presence and (p := publications.get(key[1])) and presence.intersection(p.names()))):
                keys.append(key)
                self.schedule(key)
        return keys

    async def reconcile(self, key: Key) -> None:
        """observe -> plan -> execute for one ModelRoute; a deleted one is forgotten."""
        facts = await self.observe(key)
        if facts is None:
            self.forget(key)
            return
        await self.execute(key, self.plan(facts))

    def held_candidates(self, namespace: str, adapter: str) -> dict[str, Verdict]:
        """Route name -> why the routes of `namespace` leave `adapter`'s new version (its candidate) out of their
        serving table while its serving version serves (Resolution.held: NoRoomForCandidate, or a metadata
        refusal of the new version such as RankTooLarge)."""
        return {name: v for (ns, name), held in self._held.items() if ns == namespace
                and (v := held.get(adapter)) is not None}

    def table_verdicts(self, namespace: str, adapter: str) -> dict[str, Verdict]:
        """Route name -> the verdict of the routes of `namespace` that left `adapter` out of their serving table
        for its size (Reason.ServingTableFull): only the route's resolution knows it, the Adapter shows it."""
        return {name: v for (ns, name), selected in self._selected.items() if ns == namespace
                and (v := table_full(selected.get(adapter))) is not None}

    def forget(self, key: Key) -> None:
        """Drop what was remembered about a deleted route and its children, and tell the Adapters whose status read
        its resolution (a ServingTableFull verdict, a held candidate: `reselected`): the Adapter reconcile the
        deletion itself schedules may have run first and read them (AdapterController.on_change)."""
        told = {a for a, v in self._selected.get(key, {}).items() if table_full(v) is not None}
        told.update(self._held.get(key, {}))
        for memory in (self._resolutions, self._resolved, self._with_others, self._selected, self._applied,
                       self._publication,
                       self._engine_hash, self._router_hash, self._held, self._adapters_epoch,
                       self._adapters_changed):
            memory.pop(key, None)
        if not self.store.keys_in(key[0]):
            self._publications.pop(key[0], None)
        for ident in [i for i in self._accepted if i[:2] == key]:
            del self._accepted[ident]
        for memory in (self._key_tries,):
            for ident in [i for i in memory if i[:2] == key]:
                del memory[ident]
        self._keyed = {i for i in self._keyed if i[:2] != key}
        self.ctx.applier.forget(key[0], f"{key[1]}-")
        for adapter in sorted(told):
            self._reselected((key[0], adapter))

    # ---- observe -----------------------------------------------------------------------------------------

    async def observe(self, key: Key) -> ModelRouteFacts | None:
        """The facts to plan from: the parsed route (or its validation error), its namespace's Adapters and
        rejections, the accepted base model, its Deployment and replica pods, and what was applied last. None
        when deleted."""
        body = self.store.get(key)
        if body is None:
            return None
        route = self.store.parsed(key, ModelRoute)
        if isinstance(route, ValidationError):
            return ModelRouteFacts(body, None, invalid=format_validation_error(route, "spec field "))
        ns, name = key
        rejected = self._rejections(ns)
        uid = route.metadata.uid
        # The resolution is a function of the route's spec (its generation), the Adapters it selects (what
        # RESOLUTION_STATUS_FIELDS, spec and labels say: `_adapters_epoch`, moved by on_change) and the
        # rejections: most reconciles (a pod, a Deployment, the route's own status, another route's Adapter)
        # change none of them, so the last one is reused instead of matching every selector against every
        # Adapter again (the largest cost of a reconcile with 1,000 Adapters).
        memo = (uid, route.metadata.generation, self._adapters_epoch.get(key, 0))
        hit = self._resolved.get(key)
        adapters: list[Adapter] = []
        if hit is not None and hit[0] == memo and hit[1] == rejected:
            base = hit[2]
        elif (hit is not None and hit[0][:2] == memo[:2] and hit[1] == rejected
              and (wait := self.adapter_batch_wait(key)) > 0):
            # Only Adapters changed, and their batch is not due: the route keeps the table it has until it is.
            base = hit[2]
            self.schedule_later(key, wait)
        else:
            adapters = self.selected_adapters(ns, route)
            base = resolve(route, adapters, rejected)
            self._resolved[key] = (memo, rejected, base)
            self._adapters_changed.pop(key, None)
        # The other routes of the namespace: what they publish (names for ownership and content routing, their
        # readiness for status.contentModels). Only the content part of the resolution depends on them, and on
        # their names only: it is redone on top of the memo above when those change (`with_others`), without
        # matching the selectors again; its table is the memo's own object while its content part is unchanged.
        others = [p for p in self.publications(ns) if p.route != name]
        naming = tuple(p.naming for p in others)
        hit2 = self._with_others.get(key)
        if hit2 is not None and hit2[0] is base and hit2[1] == naming:
            resolution = hit2[2]
        else:
            resolution = with_others(base, route, others)
            if resolution is None:
                resolution = resolve(route, adapters or self.selected_adapters(ns, route), rejected, others=others)
            self._with_others[key] = (base, naming, resolution)

        def own(obj: dict | None) -> dict | None:
            # Found by computed name: only this route's (controller ownerReference = its uid) counts; another
            # owner's object of that name is not read as this route's (applying it shows NameConflict).
            return obj if owned_by(obj, uid) else None

        deployment = own(self.stores.Deployment.get((ns, route_builders.engine_name(route))))
        return ModelRouteFacts(
            body, route, adapters=adapters, rejected=rejected, resolution=resolution,
            accepted_base=await self.accepted_base_of(route) if body.get("status") else None,
            deployment=deployment,
            pods=self.stores.EnginePod.group(ns, name), last_resolution=self._resolutions.get(key),
            last_applied=self._applied.get(key), last_selected=self._selected.get(key, {}),
            last_held=self._held.get(key, {}),
            applier_epoch=self.ctx.applier.epoch, engine_hash=self._engine_hash.get(key),
            router_deployment=own(self.stores.RouterDeployment.get((ns, route_builders.router_name(route)))),
            router_pods=self.stores.RouterPod.group(ns, name), router_hash=self._router_hash.get(key),
            engine_key_due=self.engine_key_due(route, self.stores.EnginePod.group(ns, name),
                                               self.stores.RouterPod.group(ns, name)),
            engine_key_known=references_secret(deployment, engine_pod.engine_key_secret_name(route)),
            others=others)

    def publications(self, namespace: str) -> list[Publication]:
        """What every ModelRoute of `namespace` publishes (builders.orchestration.publication of each stored
        object), in store order. Built once per change of the namespace's routes (the store's version) and
        shared by the reconciles until the next one."""
        store = self.store
        version = store.version(namespace)
        hit = self._publications.get(namespace)
        if hit is not None and hit[0] == version:
            return hit[1]
        # One route's status patch moves the version: only that route's Publication is read again (each is
        # kept per resourceVersion, which moves on every change of the stored object).
        out = []
        for k in store.keys_in(namespace):
            body = store.get(k)
            if body is None:
                continue
            rv = (body.get("metadata") or {}).get("resourceVersion")
            kept = self._publication.get(k)
            if rv and kept is not None and kept[0] == rv:
                out.append(kept[1])
                continue
            pub = publication(body)
            if rv:
                self._publication[k] = (rv, pub)
            out.append(pub)
        self._publications[namespace] = (version, out)
        return out

    def engine_key_due(self, route: ModelRoute, pods: list[dict], router_pods: list[dict]) -> bool:
        """Whether the route's engine key Secret is to be created again in this reconcile although it was made
        (or found) before: a pod of the route waits on it missing (someone deleted it), at most every
        ENGINE_KEY_RETRY_SECONDS. Its first create happens when the children are rendered (`plan`)."""
        mark = (route.metadata.namespace or "", route.metadata.name or "", route.metadata.uid or "")
        # kubelet's message names what is missing (`secret "r-engine-key-<uid>" not found`): only the key counts.
        missing = f'"{engine_pod.engine_key_secret_name(route)}"'
        stuck = any(missing in (config_problem(p, (engine_pod.ENGINE_CONTAINER, engine_pod.LOADER_CONTAINER)) or "")
                    for p in pods) \
            or any(missing in (config_problem(p, (route_builders.ROUTER_CONTAINER,)) or "") for p in router_pods)
        if not stuck:
            return False
        last = self._key_tries.get(mark)
        return last is None or self._clock() - last >= ENGINE_KEY_RETRY_SECONDS

    async def accepted_base_of(self, route: ModelRoute) -> BaseModelId | None:
        """The base model the route's serving table was written for: from memory, else its ConfigMap."""
        ident = (route.metadata.namespace or "", route.metadata.name or "", route.metadata.uid or "")
        if ident in self._accepted:
            return self._accepted[ident]
        cm = await self.kube.get("v1", "ConfigMap", ident[0], configmap_name(ident[1]))
        if cm is None or not owned_by(cm, ident[2]):
            return None
        base = accepted_base((cm.get("data") or {}).get(CONFIGMAP_KEY))
        if base is not None:
            self._accepted[ident] = base
        return base

    # ---- plan (pure) -------------------------------------------------------------------------------------

    def plan(self, facts: ModelRouteFacts) -> ModelRoutePlan:
        """The serving table, children, status patch, Events and which Adapters to tell (no I/O)."""
        body = facts.body
        generation = body["metadata"].get("generation")
        current = body.get("status") or {}
        out = ModelRoutePlan(body, engine_hash=facts.engine_hash, router_hash=facts.router_hash)
        if facts.route is None:
            patch, event = invalid_spec(current, generation, facts.invalid or "")
            out.status, out.events = patch, [event] if event else []
            out.selected, out.held = facts.last_selected, facts.last_held  # an invalid route changes nothing it selected
            return out
        route = facts.route
        if violations := self.ctx.build.violations(route):
            # The operator's policy refuses the spec (an image, a vLLM flag, a Secret in env): nothing is created
            # or changed; the replicas already running keep serving the last accepted spec.
            patch, event = invalid_spec(current, generation, policy_message(violations), Reason.PolicyViolation)
            out.status, out.events = patch, [event] if event else []
            out.selected, out.held = facts.last_selected, facts.last_held
            return out
        resolution = facts.resolution or resolve(route, facts.adapters, facts.rejected, others=facts.others)
        wanted = (route.spec.base_model.identity, route.spec.base_model.revision)
        rejected = facts.accepted_base is not None and facts.accepted_base != wanted
        if not rejected:
            # Children depend only on the route's spec and its table: when neither changed since the last
            # successful apply (an adapter event that did not change this route's table), skip rendering them.
            applied_as = (route.metadata.uid, generation, resolution.table.to_json(), facts.applier_epoch)
            if facts.last_applied != applied_as:
                kids = route_builders.children(route, resolution.table, self.ctx.build)
                # The serving table and the RBAC first: the replicas and routers read them as they start.
                first = [k for k in kids if k["kind"] in ("ConfigMap", "ServiceAccount", "Role", "RoleBinding")]
                out.children = [first, [k for k in kids if k not in first]]
                out.fresh = not current
                out.unwanted = route_builders.unwanted_children(route, self.ctx.build)
                out.applied_as = applied_as
                if not facts.engine_key_known:
                    out.engine_key = route_builders.engine_key_secret(route, "")
                engine = route_builders.engine_name(route)
                out.engine_hash = next((k["metadata"]["annotations"].get(HASH_ANNOTATION) for k in kids
                                        if k["kind"] == "Deployment" and k["metadata"]["name"] == engine), None)
                router = route_builders.router_name(route)
                out.router_hash = next((k["metadata"]["annotations"].get(HASH_ANNOTATION) for k in kids
                                        if k["kind"] == "Deployment" and k["metadata"]["name"] == router), None)
            if facts.engine_key_due:
                out.engine_key, out.engine_key_due = route_builders.engine_key_secret(route, ""), True
            out.accepted_base, out.resolution = wanted, resolution
        else:
            resolution = facts.last_resolution or resolution
        previous = owned_status(ModelRouteStatus, current, OWNED_STATUS)
        new = route_status(route, resolution, facts.deployment, facts.pods, generation, previous, out.engine_hash,
                           router=RouterFacts(facts.router_deployment, facts.router_pods, out.router_hash),
                           others=facts.others)
        if rejected:
            accepted = facts.accepted_base
            new.set_condition(ConditionType.Ready, ConditionState(FALSE, Reason.SpecImmutable, (
                f"spec.baseModel cannot change from {accepted[0]}@{accepted[1] or '-'} to "
                f"{wanted[0]}@{wanted[1] or '-'} (immutable); revert it or create a new ModelRoute")), generation)
        out.status = status_patch(current, dump_status(new), OWNED_STATUS)
        old_phase = current.get("phase")
        ready = new.condition(ConditionType.Ready)
        warn = REPLICA_PROBLEMS + (Reason.SpecImmutable, Reason.PublicNameConflict, Reason.ContentTargetNotFound,
                                   Reason.ContentTargetWrongTask)
        if ready and ready.reason in warn and ready_reason(current) != ready.reason:
            out.events.append(Event(EventType.Warning, ready.reason, ready.message))
        elif old_phase != new.phase and new.phase in (ModelRoutePhase.Ready, ModelRoutePhase.Degraded) or (old_phase is None and new.phase):
            out.events.append(Event(EventType.Normal if new.phase != ModelRoutePhase.Degraded else EventType.Warning, new.phase,
                                    ready.message if ready else ""))
        # The Adapters whose status reads something of this route's resolution that changed follow: its
        # ServingTableFull verdict (table_verdicts) or its held candidate (held_candidates). Which routes select
        # an Adapter, and whether it is compatible with them, it computes itself from the ModelRoute store (a
        # route's creation, spec change or deletion schedules every Adapter of the namespace: AdapterController
        # .on_change); telling it of every selection that appeared ran one more reconcile per Adapter that
        # changed nothing (issue 17: a third of the Adapter reconciles of a burst of creates).
        out.selected = dict(resolution.selected)
        out.held = dict(resolution.held)
        out.reselected = [a for a in sorted(set(out.selected) | set(facts.last_selected)
                                            | set(out.held) | set(facts.last_held))
                          if table_full(facts.last_selected.get(a)) != table_full(out.selected.get(a))
                          or facts.last_held.get(a) != out.held.get(a)]
        return out

    # ---- execute -----------------------------------------------------------------------------------------

    async def ensure_engine_key(self, secret: dict, due: bool = False) -> bool:
        """Create the route's engine key Secret with a random key (256 bits, URL-safe) unless it exists: a create
        that finds it (409) leaves it alone, so the key is generated once and never overwritten, and the
        operator needs only `create` on Secrets, never `get`. The key is never logged. Its name carries the
        route's uid (engine_pod.engine_key_secret_name), so a 409 found this route's own Secret.

        Either answer is remembered per route (uid) and operator process: without `due` (a re-render of the
        children) a route whose Secret exists is not tried again. With `due` (engine_key_due: a pod waits on the
        Secret missing) it is, and the time is remembered for ENGINE_KEY_RETRY_SECONDS. Returns whether to look
        at the route again later (after a `due` create: the pod may still wait)."""
        meta = secret["metadata"]
        owner = (meta.get("ownerReferences") or [{}])[0]
        mark = (meta["namespace"], owner.get("name") or "", owner.get("uid") or "")   # the route's (ns, name, uid)
        if not due and mark in self._keyed:
            return False
        if due:
            self._key_tries[mark] = self._clock()
        body = {**secret, "stringData": {ENGINE_KEY_SECRET_KEY: secrets.token_urlsafe(32)}}
        await self.kube.create_if_absent(body)   # created (201) or this route's own, found (409)
        self._keyed.add(mark)
        return due

    async def execute(self, key: Key, plan: ModelRoutePlan) -> None:
        """Apply the children and prune the unwanted ones, remember what was accepted, patch the status, post
        the Events, and tell the Adapter controller whose selection changed."""
        ns, name = key
        applier = self.ctx.applier
        if plan.engine_key is not None and await self.ensure_engine_key(plan.engine_key, plan.engine_key_due):
            # Created for a pod that waited on it: look again later (engine_key_due decides whether to try again).
            self.schedule(key, ENGINE_KEY_RETRY_SECONDS)
        if plan.children:
            if await self.apply_children(plan.body, plan.children, plan.fresh) is None:
                return  # shown as InvalidSpec; nothing below may claim the children are in place
            await applier.prune(plan.unwanted, plan.body["metadata"].get("uid") or "")
            self._applied[key] = plan.applied_as
            if plan.engine_hash is not None:
                self._engine_hash[key] = plan.engine_hash
            if plan.router_hash is not None:
                self._router_hash[key] = plan.router_hash
        if plan.accepted_base is not None:
            self._accepted[(ns, name, plan.body["metadata"].get("uid") or "")] = plan.accepted_base
            self._resolutions[key] = plan.resolution
        if plan.status:
            await self.kube.patch_status(API, self.kind, ns, name, plan.status)
        for event in plan.events:
            await self.ctx.events.post(plan.body, event)
        for adapter in plan.reselected:
            self._reselected((ns, adapter))
        self._selected[key] = plan.selected
        self._held[key] = plan.held

