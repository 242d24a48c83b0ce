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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from pydantic import ValidationError

from loraplane.api.adapter import (
    Adapter,
    AdapterPhase,
    AdapterStatus,
    ArtifactInfo,
    CandidateVersion,
    LoadedOn,
    Provenance,
    served_name,
)
from loraplane.api.evaluation import EvaluationResult
from loraplane.api.keys import PRODUCED_BY_ANNOTATION
from loraplane.api.conditions import ConditionState, ConditionStatus, ConditionType, Progress
from loraplane.api.modelroute import ModelRoute
from loraplane.api.redaction import scrubbed
from loraplane.api.reasons import Reason, reason_or_unknown
from loraplane.api.rollout import RolloutPolicy, RolloutState
from loraplane.api.validation import format_validation_error
from loraplane.api.wire.serving import AdapterState
from loraplane.builders.resolution import Verdict, check_compatibility, route_selects, selection_index
from loraplane.builders.rollout import ANALYSED, RolloutDecision, Window
from loraplane.builders.rollout import candidate_weight as rollout_weight
from loraplane.controllers.base import API, Context, Controller
from loraplane.controllers.pods import pod_ready, replica_report, reported_adapters
from loraplane.controllers.rollout import RolloutWindows, policy_of, rollout_decision
from loraplane.controllers.rollout_metrics import Reading, RouterMetricsReader
from loraplane.controllers.status import (
    dump_status,
    invalid_spec,
    owned_status,
    same_but_noise,
    status_patch,
    with_status_patch,
)
from loraplane.kube.events import Event, EventType
from loraplane.kube.informer import Key, with_parsed_status

OWNED_STATUS = ("phase", "observedGeneration", "conditions", "version", "servedName", "routes", "loadedOn",
                "acceptedBaseModel", "artifact", "candidate", "rollout", "history")
FAILED_STATES = (AdapterState.Failed, AdapterState.Incompatible)
# The reasons a replica's loader reports a Pending adapter with when nothing failed (not yet started, the engine
# down or restarted, the artifact replaced); any other reason on a Pending entry is a failed attempt that the
# loader will retry (loader.reconciler: OUTCOMES, Loader._failed).
WAITING_REASONS = frozenset({Reason.Desired, Reason.EngineUnavailable, Reason.EngineRestarted,
                             Reason.AdapterReplaced})

# Rollout states in which spec's version gets no traffic until someone acts (Ready=False with the rollout's reason).
HELD_BACK = frozenset({RolloutState.GateFailed, RolloutState.RolledBack, RolloutState.Aborted})
TRUE, FALSE, UNKNOWN = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN


def selects(route: ModelRoute, adapter: Adapter) -> bool:
    """Whether one of `route`'s public models names `adapter` as a backend or matches it by label selector."""
    return route_selects(route, adapter.metadata.name, adapter.metadata.labels)


def serving_elsewhere(adapter: Adapter, previous: AdapterStatus, rejection: Verdict | None) -> bool:
    """Whether a version other than spec's serves (make-before-break): status names a version whose artifact was
    recorded when it was first served (status.artifact.uri), and spec asks for another served name. Then spec's
    version is the candidate (status.candidate) and status.version / servedName / artifact stay the serving
    version's until it is promoted. A rejected Adapter (invalid spec, changed immutable field) has no candidate."""
    art = previous.artifact
    return (rejection is None and bool(previous.served_name) and art is not None and bool(art.uri)
            and previous.served_name != adapter.served_name())


def candidate_weight(phase: AdapterPhase, ready_replicas: int, replicas: int) -> int:
    """The candidate's share (0..100 %) of its Adapter's traffic on every route that serves it: the one rule of
    how traffic moves to a new version. Make-before-break: 0 until the candidate is Ready (loaded and
    smoke-tested) on every ready replica of the routes that will serve it (at least one), then 100, which
    promotes it (status.version becomes it; the previous version drains and is unloaded). A failed or refused
    candidate (Failed, Incompatible, or one a route has no room for) gets 0. A progressive rollout replaces the
    step from 0 to 100 here; the serving table splits every backend naming the Adapter by this share
    (builders.resolution.split_backend) and the router never sends to a replica that does not report it Ready."""
    if phase != AdapterPhase.Ready or replicas <= 0 or ready_replicas < replicas:
        return 0
    return 100


def candidate_status(adapter: Adapter, compatible: list[ModelRoute], pods_by_route: dict[str, list[dict]],
                     held: dict[str, Verdict]) -> CandidateVersion:
    """Where spec's version (the candidate) stands on the replicas of the `compatible` routes that select the
    Adapter (pure). `held`: route name -> why that route leaves the candidate out of its table (a metadata
    refusal such as RankTooLarge, or NoRoomForCandidate). The replicas that will serve it are the ready engine
    pods (pod Ready, engine ready) of those routes; it is Ready when each reports it Ready."""
    served = adapter.served_name()
    base = {"version": adapter.spec.version or "", "served_name": served, "uri": adapter.spec.source.uri or ""}
    for route, verdict in sorted(held.items()):
        if verdict.reason in (Reason.NoRoomForCandidate, Reason.ArtifactPending):
            return CandidateVersion(**base, phase=AdapterPhase.Pending, reason=verdict.reason, message=verdict.message)
        return CandidateVersion(**base, phase=AdapterPhase.Incompatible, reason=verdict.reason,
                                message=f"route {route}: {verdict.message}")
    replicas = ready = 0
    problem: tuple[AdapterState, str, str] | None = None
    for r in compatible:
        for pod in pods_by_route.get(r.metadata.name or "", []):
            report = replica_report(pod)
            if report is None:
                continue
            entry = report.adapters.get(served)
            if entry is not None and entry.state in FAILED_STATES and problem is None:
                problem = (entry.state, entry.reason, f"replica {pod['metadata']['name']}: {entry.message}")
            if not (pod_ready(pod) and report.engine_ready):
                continue
            replicas += 1
            if entry is not None and entry.state == AdapterState.Ready:
                ready += 1
    if problem is not None:
        state, reason, message = problem
        phase = AdapterPhase.Incompatible if state == AdapterState.Incompatible else AdapterPhase.Failed
        return CandidateVersion(**base, phase=phase, reason=reason, message=message, ready_replicas=ready,
                                replicas=replicas)
    if replicas and ready == replicas:
        phase, reason, message = AdapterPhase.Ready, Reason.Loaded, f"loaded and smoke-tested on {ready} replica(s)"
    else:
        phase, reason = AdapterPhase.Loading, Reason.Loading
        message = (f"loading on the replicas of {', '.join(r.metadata.name or '' for r in compatible)}: "
                   f"{ready} of {replicas} ready replica(s) have it; traffic stays on the serving version until "
                   "all do")
    cand = CandidateVersion(**base, phase=phase, reason=reason, message=message, ready_replicas=ready,
                            replicas=replicas)
    return cand.model_copy(update={"weight": candidate_weight(phase, ready, replicas)})


def adapter_status(adapter: Adapter, routes: list[ModelRoute], pods_by_route: dict[str, list[dict]],
                   previous: AdapterStatus, generation: int | None, rejection: Verdict | None,
                   table_verdicts: dict[str, Verdict] | None = None,
                   held: dict[str, Verdict] | None = None,
                   weigh: Callable[[CandidateVersion], int] | None = None) -> AdapterStatus:
    """Aggregate (pure): routes, compatibility, loadedOn, phase and the Compatible/Ready conditions.
    `table_verdicts`: route name -> why that route left this adapter out of its table although compatible
    (ServingTableFull; ModelRouteController.table_verdicts), shown as that route's verdict. `held`: route name
    -> why that route leaves spec's new version out of its table while the serving one serves
    (ModelRouteController.held_candidates). `weigh`: the candidate's share given its status (the rollout's,
    controllers.rollout), in place of `candidate_weight`'s make-before-break 0 or 100.

    Make-before-break (`serving_elsewhere`): while another version serves, status.version / servedName /
    artifact / loadedOn describe that version and status.candidate spec's; the candidate is promoted (status
    describes it, the candidate goes) when `candidate_weight` gives it 100, or at once when no route serves the
    Adapter (nothing to keep serving)."""
    table_verdicts = table_verdicts or {}
    # Shallow: fields are assigned, never mutated in place (see route_status), so `previous` is untouched.
    new = previous.model_copy()
    new.observed_generation = generation
    if new.accepted_base_model is None:
        new.accepted_base_model = adapter.spec.base_model
    selecting = sorted((r for r in routes if selects(r, adapter)), key=lambda r: r.metadata.name or "")
    new.routes = [r.metadata.name or "" for r in selecting]
    candidate: CandidateVersion | None = None
    if serving_elsewhere(adapter, previous, rejection):
        # The serving version was accepted by every route that serves it; spec's metadata refusals are the
        # candidate's (builders.resolution keeps the serving version in the table).
        verdicts = {r.metadata.name: table_verdicts.get(r.metadata.name or "")
                    or Verdict(True, Reason.Compatible, f"compatible with ModelRoute {r.metadata.name}")
                    for r in selecting}
        compatible = [r for r in selecting if verdicts[r.metadata.name].compatible]
        refused = {r.metadata.name or "": v for r in compatible
                   if not (v := check_compatibility(adapter, r)).compatible}
        if not adapter.spec.source.uri:
            refused = {r.metadata.name or "": Verdict(False, Reason.ArtifactPending, (
                "spec.source has no uri yet (its FineTuneJob has not finished)")) for r in compatible}
        candidate = candidate_status(adapter, compatible, pods_by_route, {**refused, **(held or {})})
        if weigh is not None:
            candidate = candidate.model_copy(update={"weight": max(0, min(100, weigh(candidate)))})
        if not compatible or candidate.weight >= 100:
            # Promote: spec's version is the one that serves from now on (its digest is recorded below).
            promoted = previous.model_copy(update={"version": adapter.spec.version,
                                                   "served_name": adapter.served_name(), "artifact": None,
                                                   "candidate": None})
            return adapter_status(adapter, routes, pods_by_route, promoted, generation, rejection, table_verdicts)
        served = previous.served_name or ""
    else:
        if rejection is None and previous.served_name != adapter.served_name():
            new.artifact = None   # another version: its artifact is recorded when it is first served
        new.version = adapter.spec.version
        new.served_name = adapter.served_name()
        served = new.served_name
        verdicts = {r.metadata.name: table_verdicts.get(r.metadata.name or "") or check_compatibility(adapter, r)
                    for r in selecting}
        compatible = [r for r in selecting if verdicts[r.metadata.name].compatible]
    new.candidate = candidate
    loaded: list[LoadedOn] = []
    digests: dict[str, str] = {}   # replica -> the digest it verified for this version (Ready replicas)
    ranks: dict[str, int] = {}     # replica -> the rank its gate read from the artifact (Ready replicas)
    loader_problems: list[tuple[AdapterState, ConditionState]] = []
    retrying: list[ConditionState] = []   # replicas that failed an attempt and will try again (loader OUTCOMES)
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
            if entry.state == AdapterState.Ready and entry.rank:
                ranks[pod_name] = entry.rank
            if entry.state == AdapterState.Ready and pod_ready(pod):
                loaded.append(LoadedOn(route=r.metadata.name or "", replica=pod_name, served_name=served,
                                       since=previous_since.get((r.metadata.name or "", pod_name), entry.since)))
            elif entry.state in FAILED_STATES:
                # Failed / Incompatible are terminal on the replica whatever the (untrusted) reason says.
                loader_problems.append((entry.state, ConditionState(FALSE, entry.reason,
                                                                    f"replica {pod_name}: {entry.message}",
                                                                    Progress.Stalled)))
            elif entry.state == AdapterState.Pending and entry.reason not in WAITING_REASONS:
                # The loader reports a failed attempt it will retry as Pending with the failure's reason (its
                # OUTCOMES table): say so, instead of a bare "waiting for the replicas", but as progress, not stalled.
                retrying.append(ConditionState(FALSE, entry.reason, f"replica {pod_name} retries: {entry.message}",
                                               Progress.Reconciling))
    new.loaded_on = sorted(loaded, key=lambda lo: (lo.route, lo.replica))

    def condition(type_: ConditionType, state: ConditionState) -> None:
        new.set_condition(type_, state, generation)

    if rejection is not None:
        new.phase = AdapterPhase.Failed
        condition(ConditionType.Ready, ConditionState(FALSE, rejection.reason, rejection.message))
        return new
    changed = record_artifact(adapter, new, digests, ranks) if candidate is None else None
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
        message = f"served as {served} by {len(loaded)} replica(s)"
        reason = Reason.Loaded
        if candidate is not None:
            message += (f"; version {candidate.version or candidate.served_name} is {candidate.phase} "
                        f"({candidate.reason}: {candidate.message})")
            if candidate.phase in (AdapterPhase.Failed, AdapterPhase.Incompatible):
                reason = Reason.CandidateFailed
                message += f"; it gets no traffic and {previous.version or served} keeps serving"
        condition(ConditionType.Ready, ConditionState(TRUE, reason, message))
    elif loader_problems:
        state, problem = loader_problems[0]
        new.phase = AdapterPhase.Incompatible if state == AdapterState.Incompatible else AdapterPhase.Failed
        condition(ConditionType.Ready, problem)
    elif retrying:
        new.phase = AdapterPhase.Loading
        condition(ConditionType.Ready, retrying[0])
    else:
        new.phase = AdapterPhase.Loading
        condition(ConditionType.Ready, ConditionState(FALSE, Reason.Loading, (
            f"waiting for the replicas of {', '.join(r.metadata.name or '' for r in compatible)} to load {served}")))
    return new


def waits_on_nothing(decision: RolloutDecision | None) -> bool:
    """Whether a rollout decision leaves nothing to do later by itself: no requeue, no new analysis window, not
    in a state whose analysis reads the routers' metrics (builders.rollout.ANALYSED)."""
    return decision is None or (decision.requeue_seconds is None and not decision.new_window
                                and decision.status.state not in ANALYSED)


def held_back(adapter: Adapter, new: AdapterStatus, decision: RolloutDecision, generation: int | None) -> AdapterStatus:
    """`new` as the rollout `decision` leaves it (pure). While spec's version is held back (gate failed, rolled
    back, aborted) Ready is False with the rollout's reason: kstatus reads the stalled reasons as Failed, the
    deliberate ones (abort, rollbackTo) as Current, while the stable version keeps serving. A rollbackTo makes
    the named version the one that serves: status.version / servedName / artifact from status.history, from
    which the serving table loads it."""
    rollout = decision.status
    if rollout.state not in HELD_BACK:
        return new
    if rollout.reason == Reason.RolloutManualRollback and rollout.stable and rollout.stable != new.version:
        entry = next((h for h in decision.history if h.version == rollout.stable), None)
        if entry is not None and entry.uri:
            new = new.model_copy(update={
                "version": entry.version, "served_name": served_name(adapter.metadata.name or "", entry.version),
                "artifact": ArtifactInfo(uri=entry.uri, sha256=entry.sha256), "candidate": None, "loaded_on": []})
    if new.candidate is not None and new.candidate.served_name == adapter.served_name():
        # Left out of the serving table by the rollout: it is not loading, whatever the replicas still report.
        new = new.model_copy(update={"candidate": new.candidate.model_copy(update={
            "phase": AdapterPhase.Pending, "reason": reason_or_unknown(rollout.reason),
            "message": rollout.message or "", "weight": 0})})
    new.set_condition(ConditionType.Ready, ConditionState(FALSE, reason_or_unknown(rollout.reason), (
        f"{rollout.message}; version {rollout.stable or '-'} serves")), generation)
    return new


def evaluation_pending(adapter: Adapter, policy: RolloutPolicy | None, status: dict,
                       producer_exists: bool = True) -> bool:
    """Whether the gates must wait for the evaluation of spec's version: the Adapter has gates, a FineTuneJob
    produced spec's version (its uid in PRODUCED_BY_ANNOTATION), that job still exists (`producer_exists`), and
    status.provenance is still another run's. The job writes spec first and provenance just after
    (controllers.finetunejob); judging in between would judge the previous version's scores. Meanwhile the
    rollout status stays as it was and the candidate gets no traffic. A job that no longer exists never writes
    the evaluation (deleted between its two writes, or an annotation copied with the manifest, as a GitOps export
    does): waiting for it wedged the version for ever (a first version served without its gates judged), so
    then the gates judge at once, without another run's scores (`judged_evaluation`)."""
    if not producer_exists or policy is None or policy.gates is None:
        return False
    return provenance_of_another_run(adapter, status)


def provenance_of_another_run(adapter: Adapter, status: dict) -> bool:
    """Whether PRODUCED_BY_ANNOTATION names a FineTuneJob run (its uid) and status.provenance records another run,
    or none: the evaluation stored there is not spec's version's."""
    produced_by = adapter.metadata.annotations.get(PRODUCED_BY_ANNOTATION)
    provenance = (status or {}).get("provenance") or {}
    return bool(produced_by) and provenance.get("fineTuneJobUid") != produced_by


def judged_evaluation(adapter: Adapter, status: dict) -> EvaluationResult | None:
    """The evaluation the gates judge spec's version by: status.provenance's, unless it is another run's
    (`provenance_of_another_run`: the previous version's scores; None, so a gate fails on no data and says so)."""
    return None if provenance_of_another_run(adapter, status) else evaluation_of(status)


def evaluation_of(status: dict) -> EvaluationResult | None:
    """The evaluation in a stored status' provenance (written on behalf of the FineTuneJob, not owned here);
    None when absent or unreadable (outside input: a gate then fails on no data)."""
    try:
        provenance = Provenance.model_validate((status or {}).get("provenance") or {})
    except ValidationError:
        return None
    return provenance.evaluation


def record_artifact(adapter: Adapter, new: AdapterStatus, digests: dict[str, str],
                    ranks: dict[str, int] | None = None) -> ConditionState | None:
    """Record a versioned Adapter's artifact once a replica serves it (status.artifact: URI, digest and the LoRA
    rank the replica's gate read from it), and return why the replicas' content differs from the recorded one
    (Reason.ArtifactChanged), else None.

    The digest recorded is spec.source.sha256 when set (replicas verified it), else the one the first Ready
    replica reports (sorted by replica name, so the choice is stable); the rank is the first Ready replica's
    (`ranks`: replica -> rank), recorded once. Adapters without spec.version are not pinned (their served name
    follows their source, which may change in place): only their URI is recorded, so the version keeps serving
    from it while a changed source is made ready (make-before-break)."""
    if not adapter.spec.version:
        # Not pinned, but where it is loaded from is kept: it serves while a changed source is made ready.
        if new.artifact is None and digests:
            new.artifact = ArtifactInfo(uri=scrubbed(adapter.spec.source.uri),
                                        rank=ranks[sorted(ranks)[0]] if ranks else None)
        return None
    art = new.artifact
    if (art is None or not art.sha256) and digests:
        sha = adapter.spec.source.sha256 or digests[sorted(digests)[0]]
        # The URI as a message would quote it (api.redaction.scrubbed): a presigned URL's signature is a credential,
        # and status is read by more than the spec's author (dashboards, GitOps tools).
        new.artifact = art = (art or ArtifactInfo()).model_copy(update={"uri": scrubbed(adapter.spec.source.uri),
                                                                        "sha256": sha})
    if art is not None and art.rank is None and ranks:
        new.artifact = art = art.model_copy(update={"rank": ranks[sorted(ranks)[0]]})
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
    # status.artifact.uri is the scrubbed URI (record_artifact; the raw one in statuses written before): a
    # re-signed presigned URL of the same object is the same source.
    if art.uri in (source.uri, scrubbed(source.uri)) and source.sha256 in (None, art.sha256):
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
    # The valid ModelRoutes of its namespace that select it (observe leaves the others out: every use below reads
    # only those, and matching each route again at each use was most of an Adapter reconcile's CPU).
    routes: list[ModelRoute] = field(default_factory=list)
    pods_by_route: dict[str, list[dict]] = field(default_factory=dict)  # their engine pods
    table_verdicts: dict[str, Verdict] = field(default_factory=dict)  # routes whose table left it out (size)
    held: dict[str, Verdict] = field(default_factory=dict)  # routes whose table leaves its new version out
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    window: Window | None = None   # the rollout's analysis window, when one is due (controllers.rollout)
    reading: dict[str, Reading] | None = None   # the routers' reading it ends with
    # The owned part of its stored status, parsed (owned_status); None: plan parses it. reconcile parses it once
    # for the rollout window and plan, instead of validating the same status twice per reconcile.
    previous: AdapterStatus | None = None
    # Whether the FineTuneJob PRODUCED_BY_ANNOTATION names (by uid) is in the store (True without the annotation):
    # only a job that exists can still write the evaluation the gates wait for (evaluation_pending).
    producer_exists: bool = True


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
        self._held: Callable[[str, str], dict[str, Verdict]] = lambda namespace, adapter: {}
        # Where each rollout's analysis window began (controllers.rollout); reads the routers' /metrics.
        self.windows = RolloutWindows(self.stores.RouterPod, RouterMetricsReader())
        # Per Adapter, the object its last status write makes (with_status_patch), when a reconcile of exactly that
        # object was found to change nothing (`settles`): the watch event of our own write is then not reconciled
        # (on_change). One event per entry: any event of the Adapter, and any later reconcile of it, takes it out.
        self._echoes: dict[Key, dict] = {}

    def connect(self, rejections_changed: Callable[[str], None],
                table_verdicts: Callable[[str, str], dict[str, Verdict]] | None = None,
                held_candidates: Callable[[str, str], dict[str, Verdict]] | None = None) -> None:
        """Call `rejections_changed(namespace)` when the set of rejected Adapters of a namespace changes (the
        ModelRoute controller re-resolves that namespace's tables); `table_verdicts(namespace, adapter)` gives
        the routes that left the adapter out of their serving table (ModelRouteController.table_verdicts),
        `held_candidates(namespace, adapter)` those that leave its new version out
        (ModelRouteController.held_candidates)."""
        self._rejections_changed = rejections_changed
        if table_verdicts is not None:
            self._table_verdicts = table_verdicts
        if held_candidates is not None:
            self._held = held_candidates

    def rejections(self, namespace: str) -> dict[str, Verdict]:
        """Adapter name -> why no route may serve it, for the Adapters of `namespace` the operator refuses."""
        return {k[1]: v for k, v in self._rejected.items() if k[0] == namespace}

    def on_change(self, source: str, obj: dict, old: dict | None) -> None:
        """Schedule the Adapter itself, every Adapter of the namespace when a route's spec changes (its selection
        may have), and the adapters an engine pod's report names (their loadedOn may have changed)."""
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or ""
        if source == "Adapter":
            key = (ns, meta.get("name") or "")
            echo = self._echoes.pop(key, None)
            if echo is not None and old is not None and same_but_noise(echo, obj):
                return   # our own status write, and nothing else: reconciling it was found to change nothing
            self.schedule(key)
        elif source == "ModelRoute":
            if old is None or old.get("spec") != obj.get("spec"):
                self.schedule_namespace(ns)  # which adapters it selects may have changed
        elif source == "EnginePod":
            for pod in (obj, old):  # a replica's report names the adapters whose loadedOn may change
                for adapter in reported_adapters(pod):
                    self.schedule((ns, adapter))
        elif source == "FineTuneJob" and old is None:
            # A job appeared or is gone: the Adapter it publishes may wait for its evaluation (evaluation_pending).
            name = ((obj.get("spec") or {}).get("output") or {}).get("adapterName")
            if isinstance(name, str) and name:
                self.schedule((ns, name))

    async def reconcile(self, key: Key) -> None:
        """observe -> plan -> execute for one Adapter; a deleted one leaves the rejected set."""
        # Any reconcile disarms the skip of the previous write's echo: one that runs before that echo is in the
        # store reads the status from before the write, with newer facts, and may find nothing to write (or write
        # less); the echo's status was computed from facts that no longer hold, so it must be reconciled.
        self._echoes.pop(key, None)
        facts = self.observe(key)
        if facts is None:
            self._rejected.pop(key, None)
            self.windows.forget(key)
            return
        if facts.adapter is not None:
            previous = facts.previous = owned_status(AdapterStatus, facts.body.get("status") or {}, OWNED_STATUS)
            selecting = [r for r in facts.routes if selects(r, facts.adapter)]
            facts.window, facts.reading = await self.windows.window(key, policy_of(facts.adapter, selecting),
                                                                    previous.rollout, selecting, facts.now)
        plan = self.plan(facts)
        # Set before the write: the watch may deliver its event before the PATCH's answer is read.
        if plan.status and (echo := self.settles(facts, plan)) is not None:
            self._echoes[key] = echo
        try:
            await self.execute(key, plan)
        except BaseException:
            self._echoes.pop(key, None)
            raise

    @classmethod
    def settles(cls, facts: AdapterFacts, plan: AdapterPlan) -> dict | None:
        """The object `plan`'s status write makes (with_status_patch) when a reconcile of it with the same facts
        would write, post and decide nothing new, else None (pure). Then that write's own watch event needs no
        reconcile: every other input (routes, pods, the routes' verdicts, an Adapter change by anyone else)
        schedules the Adapter itself when it changes. Rollouts that wait on time or read the routers' metrics
        (a requeue, an analysed state) are always reconciled again, as before."""
        if facts.adapter is None or not waits_on_nothing(plan.rollout):
            return None
        echo = with_status_patch(facts.body, plan.status)
        # The Adapter as the store parses the echo: its status is read too (the rank status.artifact records
        # decides RankTooLarge when spec.rank is unset: builders.resolution.declared_rank).
        adapter = with_parsed_status(facts.adapter.model_copy(update={"status": None}), echo, Adapter)
        again = cls.plan(replace(facts, body=echo, adapter=adapter, previous=None, window=None, reading=None))
        if again.status or again.events or again.rejection != plan.rejection or not waits_on_nothing(again.rollout):
            return None
        return echo

    def observe(self, key: Key) -> AdapterFacts | None:
        """Everything comes from the stores: no I/O."""
        body = self.store.get(key)
        if body is None:
            return None
        adapter = self.store.parsed(key, Adapter)
        if isinstance(adapter, ValidationError):
            return AdapterFacts(body, None, invalid=format_validation_error(adapter, "spec field "))
        ns = key[0]
        routes = selection_index(self.stores.ModelRoute.valid_in(ns, ModelRoute)).selecting(
            adapter.metadata.name, adapter.metadata.labels)
        pods = {r.metadata.name or "": self.stores.EnginePod.group(ns, r.metadata.name or "") for r in routes}
        return AdapterFacts(body, adapter, routes=routes, pods_by_route=pods,
                            table_verdicts=self._table_verdicts(ns, key[1]), held=self._held(ns, key[1]),
                            producer_exists=self._producer_exists(ns, adapter))

    def _producer_exists(self, ns: str, adapter: Adapter) -> bool:
        """Whether the FineTuneJob whose uid the Adapter's PRODUCED_BY_ANNOTATION names is in the store (True
        without the annotation)."""
        uid = adapter.metadata.annotations.get(PRODUCED_BY_ANNOTATION)
        if not uid:
            return True
        jobs = self.stores.FineTuneJob
        return any(((jobs.get(k) or {}).get("metadata") or {}).get("uid") == uid for k in jobs.keys_in(ns))

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
        previous = facts.previous if facts.previous is not None else owned_status(AdapterStatus, current,
                                                                                   OWNED_STATUS)
        rejection = immutable_rejection(facts.adapter, previous)
        evaluation = judged_evaluation(facts.adapter, current)
        policy = policy_of(facts.adapter, [r for r in facts.routes if selects(r, facts.adapter)])
        pending = evaluation_pending(facts.adapter, policy, current, facts.producer_exists)
        decision: RolloutDecision | None = None

        def weigh(candidate: CandidateVersion) -> int:
            # The rollout decides the candidate's share once make-before-break says it may have traffic (Ready,
            # smoke-tested on every replica that will serve it: candidate_weight's 100).
            nonlocal decision
            if pending:
                return 0
            ready = candidate.weight >= 100
            decision = rollout_decision(facts.adapter, policy, previous, evaluation, ready, facts.now, facts.window)
            return rollout_weight(decision.status) if ready else 0

        new = adapter_status(facts.adapter, facts.routes, facts.pods_by_route, previous, generation, rejection,
                             facts.table_verdicts, facts.held, weigh)
        if decision is None and rejection is None and not pending:   # no candidate: spec's version serves
            decision = rollout_decision(facts.adapter, policy, previous, evaluation,
                                        new.phase == AdapterPhase.Ready, facts.now, facts.window)
        events = []
        if decision is not None:
            new.rollout, new.history = decision.status, decision.history
            new = held_back(facts.adapter, new, decision, generation)
            if policy is not None:   # without a policy, make-before-break's Events say it all
                events += [Event(EventType.Warning if e.warning else EventType.Normal, e.reason, e.message)
                           for e in decision.events]
        before = previous.candidate
        if (before is not None and new.candidate is None and new.served_name == before.served_name
                and policy is None):   # with one, RolloutPromoted says it
            events.append(Event(EventType.Normal, Reason.VersionPromoted, (
                f"version {before.version or before.served_name} is loaded and smoke-tested on every replica that "
                f"serves the Adapter ({before.ready_replicas}): traffic moved to it; the previous version drains")))
        cand = new.candidate
        if (cand is not None and cand.phase in (AdapterPhase.Failed, AdapterPhase.Incompatible)
                and (before is None or (before.served_name, before.phase) != (cand.served_name, cand.phase))):
            events.append(Event(EventType.Warning, Reason.CandidateFailed, (
                f"version {cand.version or cand.served_name} gets no traffic ({cand.reason}: {cand.message}); "
                f"version {new.version or new.served_name} keeps serving")))
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
            routes = selection_index(self.stores.ModelRoute.valid_in(key[0], ModelRoute)).selecting(
                adapter.metadata.name, adapter.metadata.labels)
            await self.windows.after(key, policy_of(adapter, routes), decision, plan.reading, routes)
            if decision.requeue_seconds is not None:
                self.schedule(key, decision.requeue_seconds)

