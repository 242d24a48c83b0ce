"""The Adapter controller: which ModelRoutes select an Adapter, whether it is compatible with each (from
metadata), and what the replicas' loaders report (loadedOn, and the loader's reason when it refused or failed).

A version, once served, is immutable and content-addressed: the first time a replica reports it loaded, the
controller records its URI and digest in `status.artifact` (spec.source.sha256, else the digest the replica
verified); every replica must then verify that digest (builders.resolution.expected_digest), a spec.source change
under the same spec.version is refused (SpecImmutable), and a replica reporting other content for it is flagged
(ArtifactChanged). Adapters without spec.version are not pinned: their served name follows their source.

It also decides which Adapters no route may serve (an invalid spec, a changed immutable field): the
ModelRoute controller asks `rejections(namespace)` when it resolves a serving table, and is told to re-resolve
the namespace when that set changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pydantic import ValidationError

from loraplane.api.adapter import Adapter, AdapterPhase, AdapterStatus, ArtifactInfo, LoadedOn, Provenance
from loraplane.api.evaluation import EvaluationResult
from loraplane.api.conditions import ConditionState, ConditionStatus, ConditionType, Progress
from loraplane.api.modelroute import ModelRoute
from loraplane.api.reasons import Reason
from loraplane.api.rollout import RolloutState
from loraplane.api.validation import format_validation_error
from loraplane.api.wire.serving import AdapterState
from loraplane.builders.resolution import Verdict, check_compatibility, selector_matches
from loraplane.builders.rollout import RolloutDecision, Window
from loraplane.controllers.base import API, Context, Controller
from loraplane.controllers.pods import pod_ready, replica_report, reported_adapters
from loraplane.controllers.rollout import RolloutWindows, rollout_decision
from loraplane.controllers.rollout_metrics import Reading, RouterMetricsReader
from loraplane.controllers.status import dump_status, invalid_spec, owned_status, status_patch
from loraplane.kube.events import Event, EventType
from loraplane.kube.informer import Key

OWNED_STATUS = ("phase", "observedGeneration", "conditions", "version", "servedName", "routes", "loadedOn",
                "acceptedBaseModel", "artifact", "rollout", "history")
FAILED_STATES = (AdapterState.Failed, AdapterState.Incompatible)
# Rollout states in which spec's version gets no traffic until someone acts (Ready=False with the rollout's reason).
HELD_BACK = frozenset({RolloutState.GateFailed, RolloutState.RolledBack, RolloutState.Aborted})
TRUE, FALSE, UNKNOWN = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN


def selects(route: ModelRoute, adapter: Adapter) -> bool:
    """Whether one of `route`'s public models names `adapter` as a backend or matches it by label selector."""
    name = adapter.metadata.name
    for r in route.spec.routes:
        if r.backends is not None and any(b.adapter == name for b in r.backends):
            return True
        if r.selector is not None and selector_matches(r.selector, adapter.metadata.labels):
            return True
    return False


def adapter_status(adapter: Adapter, routes: list[ModelRoute], pods_by_route: dict[str, list[dict]],
                   previous: AdapterStatus, generation: int | None, rejection: Verdict | None,
                   table_verdicts: dict[str, Verdict] | None = None) -> AdapterStatus:
    """Aggregate (pure): routes, compatibility, loadedOn, phase and the Compatible/Ready conditions.
    `table_verdicts`: route name -> why that route left this adapter out of its table although compatible
    (ServingTableFull; ModelRouteController.table_verdicts), shown as that route's verdict."""
    table_verdicts = table_verdicts or {}
    # Shallow: fields are assigned, never mutated in place (see route_status), so `previous` is untouched.
    new = previous.model_copy()
    new.observed_generation = generation
    if rejection is None and previous.version != adapter.spec.version:
        new.artifact = None   # another version: its digest is recorded when it is first served
    new.version = adapter.spec.version
    served = adapter.served_name()
    new.served_name = served
    if new.accepted_base_model is None:
        new.accepted_base_model = adapter.spec.base_model
    selecting = sorted((r for r in routes if selects(r, adapter)), key=lambda r: r.metadata.name or "")
    new.routes = [r.metadata.name or "" for r in selecting]
    verdicts = {r.metadata.name: table_verdicts.get(r.metadata.name or "") or check_compatibility(adapter, r)
                for r in selecting}
    compatible = [r for r in selecting if verdicts[r.metadata.name].compatible]
    loaded: list[LoadedOn] = []
    digests: dict[str, str] = {}   # replica -> the digest it verified for this version (Ready replicas)
    loader_problems: list[tuple[AdapterState, ConditionState]] = []
    previous_since = {(lo.route, lo.replica): lo.since for lo in previous.loaded_on}
    for r in compatible:
        for pod in pods_by_route.get(r.metadata.name or "", []):
            report = replica_report(pod)
            entry = report.adapters.get(served) if report else None
            if entry is None:
                continue
            pod_name = pod["metadata"]["name"]
            if entry.state == AdapterState.Ready and entry.sha256:
                digests[pod_name] = entry.sha256
            if entry.state == AdapterState.Ready and pod_ready(pod):
                loaded.append(LoadedOn(route=r.metadata.name or "", replica=pod_name, served_name=served,
                                       since=previous_since.get((r.metadata.name or "", pod_name), entry.since)))
            elif entry.state in FAILED_STATES:
                # Failed / Incompatible are terminal on the replica whatever the (untrusted) reason says.
                loader_problems.append((entry.state, ConditionState(FALSE, entry.reason,
                                                                    f"replica {pod_name}: {entry.message}",
                                                                    Progress.Stalled)))
    new.loaded_on = sorted(loaded, key=lambda lo: (lo.route, lo.replica))

    def condition(type_: ConditionType, state: ConditionState) -> None:
        new.set_condition(type_, state, generation)

    if rejection is not None:
        new.phase = AdapterPhase.Failed
        condition(ConditionType.Ready, ConditionState(FALSE, rejection.reason, rejection.message))
        return new
    changed = record_artifact(adapter, new, digests)
    if not selecting:
        new.phase = AdapterPhase.Pending
        condition(ConditionType.Compatible, ConditionState(UNKNOWN, Reason.NoRoute,
                                                           "no ModelRoute selects this adapter"))
        condition(ConditionType.Ready, ConditionState(FALSE, Reason.NoRoute, (
            "no ModelRoute in this namespace selects this adapter; reference it in a route's backends or match a "
            "selector")))
        return new
    if not compatible:
        first = verdicts[selecting[0].metadata.name]
        new.phase = AdapterPhase.Incompatible
        message = "; ".join(v.message for v in verdicts.values())
        condition(ConditionType.Compatible, ConditionState(FALSE, first.reason, message))
        condition(ConditionType.Ready, ConditionState(FALSE, first.reason, message))
        return new
    incompatible = [v.message for v in verdicts.values() if not v.compatible]
    condition(ConditionType.Compatible, ConditionState(TRUE, Reason.Compatible, (
        f"compatible with {', '.join(r.metadata.name or '' for r in compatible)}"
        + (f"; not with: {'; '.join(incompatible)}" if incompatible else ""))))
    if changed:
        new.phase = AdapterPhase.Failed
        condition(ConditionType.Ready, changed)
    elif loaded:
        new.phase = AdapterPhase.Ready
        condition(ConditionType.Ready, ConditionState(TRUE, Reason.Loaded,
                                                      f"served as {served} by {len(loaded)} replica(s)"))
    elif loader_problems:
        state, problem = loader_problems[0]
        new.phase = AdapterPhase.Incompatible if state == AdapterState.Incompatible else AdapterPhase.Failed
        condition(ConditionType.Ready, problem)
    else:
        new.phase = AdapterPhase.Loading
        condition(ConditionType.Ready, ConditionState(FALSE, Reason.Loading, (
            f"waiting for the replicas of {', '.join(r.metadata.name or '' for r in compatible)} to load {served}")))
    return new


def evaluation_of(status: dict) -> EvaluationResult | None:
    """The evaluation in a stored status' provenance (written on behalf of the FineTuneJob, not owned here);
    None when absent or unreadable (outside input: a gate then fails on no data)."""
    try:
        provenance = Provenance.model_validate((status or {}).get("provenance") or {})
    except ValidationError:
        return None
    return provenance.evaluation


def record_artifact(adapter: Adapter, new: AdapterStatus, digests: dict[str, str]) -> ConditionState | None:
    """Record a versioned Adapter's artifact once a replica serves it (status.artifact: URI and digest), and
    return why the replicas' content differs from the recorded one (Reason.ArtifactChanged), else None.

    The digest recorded is spec.source.sha256 when set (replicas verified it), else the one the first Ready
    replica reports (sorted by replica name, so the choice is stable). Adapters without spec.version are not
    recorded (their served name follows their source, which may change in place)."""
    if not adapter.spec.version:
        return None
    art = new.artifact
    if (art is None or not art.sha256) and digests:
        sha = adapter.spec.source.sha256 or digests[sorted(digests)[0]]
        new.artifact = art = (art or ArtifactInfo()).model_copy(update={"uri": adapter.spec.source.uri,
                                                                        "sha256": sha})
    if art is None or not art.sha256:
        return None
    others = {replica: d for replica, d in sorted(digests.items()) if d != art.sha256}
    if not others:
        return None
    replica, digest = next(iter(others.items()))
    return ConditionState(FALSE, Reason.ArtifactChanged, (
        f"replica {replica} serves content with sha256 {digest} as version {adapter.spec.version}, but the version "
        f"was published with sha256 {art.sha256}: {art.uri} was overwritten. A published version is immutable; "
        "publish the new weights as a new spec.version, or restore the original artifact"))


def version_rejection(adapter: Adapter, previous: AdapterStatus) -> Verdict | None:
    """Why `adapter` may not be served because spec.source changed under a version that was already served
    (status.artifact records its URI and digest), else None."""
    art, version = previous.artifact, adapter.spec.version
    if not version or previous.version != version or art is None or not art.sha256:
        return None
    source = adapter.spec.source
    if art.uri == source.uri and source.sha256 in (None, art.sha256):
        return None
    return Verdict(False, Reason.SpecImmutable, (
        f"spec.source changed under version {version}, which was published as {art.uri} (sha256 {art.sha256}); "
        f"a published version is immutable: set a new spec.version to publish other content, or revert "
        "spec.source. Not served until then."))


def immutable_rejection(adapter: Adapter, previous: AdapterStatus) -> Verdict | None:
    """Why `adapter` may not be served because its base model changed from the accepted one, or its source under
    a published version (version_rejection), else None."""
    accepted = previous.accepted_base_model
    if accepted is None or accepted == adapter.spec.base_model:
        return version_rejection(adapter, previous)
    return Verdict(False, Reason.SpecImmutable,
                   f"spec.baseModel cannot change from {accepted.name}@{accepted.revision or '-'} to "
                   f"{adapter.spec.base_model.name}@{adapter.spec.base_model.revision or '-'} "
                   "(immutable); revert it or create a new Adapter. Not served until then.")


@dataclass
class AdapterFacts:
    """What an Adapter reconcile observed."""

    body: dict
    adapter: Adapter | None                   # None when the spec is invalid (`invalid` says why)
    invalid: str | None = None
    routes: list[ModelRoute] = field(default_factory=list)  # the valid ModelRoutes of its namespace
    pods_by_route: dict[str, list[dict]] = field(default_factory=dict)  # their engine pods
    table_verdicts: dict[str, Verdict] = field(default_factory=dict)  # routes whose table left it out (size)
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    window: Window | None = None   # the rollout's analysis window, when one is due (controllers.rollout)
    reading: dict[str, Reading] | None = None   # the routers' reading it ends with


@dataclass
class AdapterPlan:
    """What an Adapter reconcile writes: its rejection (in memory), its status patch, Events."""

    body: dict
    rejection: Verdict | None
    status: dict
    events: list[Event]
    rollout: RolloutDecision | None = None
    reading: dict[str, Reading] | None = None


class AdapterController(Controller):
    """Reconciles Adapters. Owns the set of rejected Adapters (by key) that no route may serve."""

    kind = "Adapter"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self._rejected: dict[Key, Verdict] = {}
        self._rejections_changed: Callable[[str], None] = lambda namespace: None
        self._table_verdicts: Callable[[str, str], dict[str, Verdict]] = lambda namespace, adapter: {}
        # Where each rollout's analysis window began (controllers.rollout); reads the routers' /metrics.
        self.windows = RolloutWindows(self.stores.RouterPod, RouterMetricsReader())

    def connect(self, rejections_changed: Callable[[str], None],
                table_verdicts: Callable[[str, str], dict[str, Verdict]] | None = None) -> None:
        """Call `rejections_changed(namespace)` when the set of rejected Adapters of a namespace changes (the
        ModelRoute controller re-resolves that namespace's tables); `table_verdicts(namespace, adapter)` gives
        the routes that left the adapter out of their serving table (ModelRouteController.table_verdicts)."""
        self._rejections_changed = rejections_changed
        if table_verdicts is not None:
            self._table_verdicts = table_verdicts

    def rejections(self, namespace: str) -> dict[str, Verdict]:
        """Adapter name -> why no route may serve it, for the Adapters of `namespace` the operator refuses."""
        return {k[1]: v for k, v in self._rejected.items() if k[0] == namespace}

    def on_change(self, source: str, obj: dict, old: dict | None) -> None:
        """Schedule the Adapter itself, every Adapter of the namespace when a route's spec changes (its selection
        may have), and the adapters an engine pod's report names (their loadedOn may have changed)."""
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or ""
        if source == "Adapter":
            self.schedule((ns, meta.get("name") or ""))
        elif source == "ModelRoute":
            if old is None or old.get("spec") != obj.get("spec"):
                self.schedule_namespace(ns)  # which adapters it selects may have changed
        elif source == "EnginePod":
            for pod in (obj, old):  # a replica's report names the adapters whose loadedOn may change
                for adapter in reported_adapters(pod):
                    self.schedule((ns, adapter))

    async def reconcile(self, key: Key) -> None:
        """observe -> plan -> execute for one Adapter; a deleted one leaves the rejected set."""
        facts = self.observe(key)
        if facts is None:
            self._rejected.pop(key, None)
            self.windows.forget(key)
            return
        if facts.adapter is not None:
            previous = owned_status(AdapterStatus, facts.body.get("status") or {}, OWNED_STATUS)
            facts.window, facts.reading = await self.windows.window(key, facts.adapter, previous.rollout,
                                                                    facts.routes, facts.now)
        await self.execute(key, self.plan(facts))

    def observe(self, key: Key) -> AdapterFacts | None:
        """Everything comes from the stores: no I/O."""
        body = self.store.get(key)
        if body is None:
            return None
        adapter = self.store.parsed(key, Adapter)
        if isinstance(adapter, ValidationError):
            return AdapterFacts(body, None, invalid=format_validation_error(adapter, "spec field "))
        ns = key[0]
        routes = list(self.stores.ModelRoute.valid_in(ns, ModelRoute))
        pods = {r.metadata.name or "": self.stores.EnginePod.group(ns, r.metadata.name or "") for r in routes}
        return AdapterFacts(body, adapter, routes=routes, pods_by_route=pods,
                            table_verdicts=self._table_verdicts(ns, key[1]))

    @staticmethod
    def plan(facts: AdapterFacts) -> AdapterPlan:
        """Rejection, status patch and Events (pure)."""
        body = facts.body
        generation = body["metadata"].get("generation")
        current = body.get("status") or {}
        if facts.adapter is None:
            message = facts.invalid or ""
            patch, event = invalid_spec(current, generation, message)
            return AdapterPlan(body, Verdict(False, Reason.InvalidSpec, message), patch, [event] if event else [])
        previous = owned_status(AdapterStatus, current, OWNED_STATUS)
        rejection = immutable_rejection(facts.adapter, previous)
        new = adapter_status(facts.adapter, facts.routes, facts.pods_by_route, previous, generation, rejection,
                             facts.table_verdicts)
        decision = None
        if rejection is None:
            decision = rollout_decision(facts.adapter, previous, evaluation_of(current),
                                        new.phase == AdapterPhase.Ready, facts.now, facts.window)
            new.rollout, new.history = decision.status, decision.history
            if decision.status.state in HELD_BACK:
                # spec's version does not serve and will not by itself: Ready says so (kstatus reads the
                # stalled reasons as Failed, the deliberate ones as Current), while the stable version serves.
                new.set_condition(ConditionType.Ready, ConditionState(FALSE, Reason(decision.status.reason), (
                    f"{decision.status.message}; version {decision.status.stable or '-'} serves")), generation)
        events = [Event(EventType.Warning if e.warning else EventType.Normal, e.reason, e.message)
                  for e in (decision.events if decision else [])]
        old_phase = current.get("phase")
        if old_phase != new.phase and (old_phase is not None or new.phase not in (AdapterPhase.Pending, AdapterPhase.Loading)):
            ready = new.condition(ConditionType.Ready)
            warn = new.phase in (AdapterPhase.Incompatible, AdapterPhase.Failed)
            events.append(Event(EventType.Warning if warn else EventType.Normal,
                                ready.reason if ready else new.phase, ready.message if ready else ""))
        return AdapterPlan(body, rejection, status_patch(current, dump_status(new), OWNED_STATUS), events, decision,
                           facts.reading)

    async def execute(self, key: Key, plan: AdapterPlan) -> None:
        """Record the rejection (telling the routes when it changed), patch the status, post the Events."""
        if self._rejected.get(key) != plan.rejection:
            if plan.rejection is None:
                self._rejected.pop(key, None)
            else:
                self._rejected[key] = plan.rejection
            self._rejections_changed(key[0])
        if plan.status:
            await self.kube.patch_status(API, self.kind, key[0], key[1], plan.status)
        for event in plan.events:
            await self.ctx.events.post(plan.body, event)
        decision = plan.rollout
        adapter = self.store.parsed(key, Adapter)
        if decision is not None and isinstance(adapter, Adapter):
            routes = [r for r in self.stores.ModelRoute.valid_in(key[0], ModelRoute) if selects(r, adapter)]
            await self.windows.after(key, adapter, decision, plan.reading, routes)
            if decision.requeue_seconds is not None:
                self.schedule(key, decision.requeue_seconds)

