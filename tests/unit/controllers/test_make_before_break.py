"""Issue 14 item 1, make-before-break: a new Adapter version is loaded and smoke-tested on every replica that will
serve it before any request goes there, a failed one never gets traffic, and the serving version is not dropped
before. Rules of the resolution (builders.resolution) and of the Adapter controller's aggregation of the replicas'
reports (controllers.adapter), driven the way the operator drives them: status -> table -> reports -> status."""

from __future__ import annotations

from loraplane.api import Adapter, ModelRoute
from loraplane.api.adapter import AdapterPhase
from loraplane.api.keys import REPORT_ANNOTATION
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterReport, AdapterState, ReplicaReport
from loraplane.builders.resolution import AdapterVersions, VersionRole, resolve, split_backend
from loraplane.controllers.adapter import AdapterController, AdapterFacts, candidate_weight
from loraplane.controllers.modelroute import route_status, RouterFacts
from loraplane.api.modelroute import ModelRouteStatus

DIGEST_1 = "1" * 64


def _route(max_cpu_loras: int | None = None, backends=None) -> ModelRoute:
    # maxLoras no larger than maxCpuLoras: vLLM (and the API) refuse a smaller CPU cache than one batch.
    engine = {"maxCpuLoras": max_cpu_loras, "maxLoras": min(max_cpu_loras, 4)} if max_cpu_loras else {}
    return ModelRoute.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r", "namespace": "ns"},
        "spec": {"baseModel": {"name": "org/base"}, "engine": engine,
                 "routes": [{"name": "m", "backends": backends or [{"adapter": "a"}]}]}})


ROUTE = _route()


def _body(name="a", uri="s3://b/a1", version="1", status=None, rank=None):
    spec = {"baseModel": {"name": "org/base"}, "source": {"uri": uri}, "version": version}
    if rank:
        spec["rank"] = rank
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
            "metadata": {"name": name, "namespace": "ns", "generation": 1}, "spec": spec, "status": status or {}}


def _pod(name: str, entries: dict[str, tuple[AdapterState, Reason]], ready: bool = True) -> dict:
    report = ReplicaReport(replica=name, route="r", generation=1, engine_ready=True, updated_at="t", adapters={
        served: AdapterReport(state=state, reason=reason, since="2026-01-01T00:00:00Z", message=f"{reason} here",
                              sha256=DIGEST_1 if state == AdapterState.Ready else None)
        for served, (state, reason) in entries.items()})
    return {"metadata": {"name": name, "annotations": {REPORT_ANNOTATION: report.to_annotation()}},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


READY = (AdapterState.Ready, Reason.Loaded)
LOADING = (AdapterState.Loading, Reason.Loading)


def _step(body: dict, *pods: dict, route: ModelRoute = ROUTE, held=None):
    """One Adapter reconcile: the plan, and the body with its status patch applied."""
    plan = AdapterController.plan(AdapterFacts(body, Adapter.model_validate(body), routes=[route],
                                               pods_by_route={"r": list(pods)}, held=held or {}))
    return plan, {**body, "status": {**body["status"], **plan.status}}


def _serving_v1() -> dict:
    """Adapter a, version 1 served on two replicas (its artifact recorded), then bumped to version 2."""
    _, served = _step(_body(), _pod("p0", {"a--1": READY}), _pod("p1", {"a--1": READY}))
    assert served["status"]["artifact"]["uri"] == "s3://b/a1"
    return _body(uri="s3://b/a2", version="2", status=served["status"])


def _backends(body: dict, route: ModelRoute = ROUTE) -> list[tuple[str, int]]:
    table = resolve(route, [Adapter.model_validate(body)]).table
    return [(b.served_name, b.weight) for m in table.models for b in m.backends]


def _loaded(body: dict, route: ModelRoute = ROUTE) -> list[str]:
    return [d.served_name for d in resolve(route, [Adapter.model_validate(body)]).table.adapters]


def test_a_bump_loads_the_new_version_beside_the_serving_one_and_keeps_traffic_on_it():
    bumped = _serving_v1()
    # Before any replica reported: both versions in the table, every backend on version 1 (today: only a--2).
    plan, bumped = _step(bumped, _pod("p0", {"a--1": READY}), _pod("p1", {"a--1": READY}))
    assert bumped["status"]["version"] == "1" and bumped["status"]["servedName"] == "a--1"
    assert bumped["status"]["candidate"]["servedName"] == "a--2"
    assert bumped["status"]["candidate"]["phase"] == AdapterPhase.Loading
    assert _loaded(bumped) == ["a--1", "a--2"]
    assert _backends(bumped) == [("a--1", 100)]
    ready = next(c for c in bumped["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and "version 2 is Loading" in ready["message"]
    versions = resolve(ROUTE, [Adapter.model_validate(bumped)]).versions["a"]
    assert [(role, d.served_name) for role, d in versions.entries()] == [
        (VersionRole.Stable, "a--1"), (VersionRole.Candidate, "a--2")]
    assert versions.stable.sha256 == DIGEST_1    # the serving version stays pinned to what was verified


def test_the_new_version_is_promoted_only_when_every_ready_replica_has_it_ready():
    bumped = _serving_v1()
    # Ready on one of two replicas: no traffic yet.
    _, half = _step(bumped, _pod("p0", {"a--1": READY, "a--2": READY}), _pod("p1", {"a--1": READY, "a--2": LOADING}))
    assert half["status"]["candidate"]["readyReplicas"] == 1 and half["status"]["candidate"]["replicas"] == 2
    assert half["status"]["candidate"]["weight"] == 0 and _backends(half) == [("a--1", 100)]
    # A replica that is not ready (takes no traffic) does not hold the promotion back.
    plan, done = _step(half, _pod("p0", {"a--1": READY, "a--2": READY}), _pod("p1", {"a--1": READY, "a--2": LOADING},
                                                                                ready=False))
    assert done["status"]["version"] == "2" and done["status"]["servedName"] == "a--2"
    assert done["status"].get("candidate") is None and done["status"]["artifact"]["uri"] == "s3://b/a2"
    assert [e.reason for e in plan.events] == [Reason.VersionPromoted]
    # The table: version 1 leaves (the loader drains it), every backend on version 2.
    assert _loaded(done) == ["a--2"] and _backends(done) == [("a--2", 100)]


def test_a_new_version_that_fails_its_smoke_test_never_gets_traffic():
    bumped = _serving_v1()
    no_effect = (AdapterState.Failed, Reason.NoEffect)
    plan, failed = _step(bumped, _pod("p0", {"a--1": READY, "a--2": no_effect}), _pod("p1", {"a--1": READY,
                                                                                              "a--2": READY}))
    cand = failed["status"]["candidate"]
    assert (cand["phase"], cand["reason"], cand["weight"]) == (AdapterPhase.Failed, Reason.NoEffect, 0)
    assert failed["status"]["version"] == "1" and failed["status"]["phase"] == AdapterPhase.Ready
    ready = next(c for c in failed["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", Reason.CandidateFailed)
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", Reason.CandidateFailed)]
    # Kept in the table (so the replicas keep reporting why), never in a backend.
    assert _loaded(failed) == ["a--1", "a--2"] and _backends(failed) == [("a--1", 100)]
    # And again: no second Event for the same failure.
    plan, _ = _step(failed, _pod("p0", {"a--1": READY, "a--2": no_effect}), _pod("p1", {"a--1": READY}))
    assert plan.events == []


def test_a_new_version_the_route_refuses_by_metadata_leaves_the_serving_one_in_place():
    bumped = _serving_v1()
    bumped["spec"]["rank"] = 64   # above the route's maxLoraRank 16
    res = resolve(ROUTE, [Adapter.model_validate(bumped)])
    assert [d.served_name for d in res.table.adapters] == ["a--1"]          # today: nothing served at all
    assert res.held["a"].reason == Reason.RankTooLarge and res.selected["a"].compatible
    _, after = _step(bumped, _pod("p0", {"a--1": READY}), held={"r": res.held["a"]})
    cand = after["status"]["candidate"]
    assert (cand["phase"], cand["reason"]) == (AdapterPhase.Incompatible, Reason.RankTooLarge)
    assert after["status"]["phase"] == AdapterPhase.Ready and after["status"]["servedName"] == "a--1"


def test_with_no_room_for_both_versions_the_new_one_waits_with_a_reason():
    route = _route(max_cpu_loras=2, backends=[{"adapter": "a", "weight": 50}, {"adapter": "b", "weight": 50}])
    _, b = _step(_body(name="b", uri="s3://b/b1"))
    bumped = _serving_v1()
    res = resolve(route, [Adapter.model_validate(bumped), Adapter.model_validate(b)])
    assert sorted(d.served_name for d in res.table.adapters) == ["a--1", "b--1"]
    assert res.held["a"].reason == Reason.NoRoomForCandidate and "maxCpuLoras 2" in res.held["a"].message
    _, after = _step(bumped, _pod("p0", {"a--1": READY}), route=route, held={"r": res.held["a"]})
    assert after["status"]["candidate"]["phase"] == AdapterPhase.Pending
    assert after["status"]["candidate"]["reason"] == Reason.NoRoomForCandidate
    status = route_status(route, res, None, [], 1, ModelRouteStatus(), router=RouterFacts(None))
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert "a's new version (NoRoomForCandidate)" in ready.message
    # One more slot: the new version is loaded beside the serving one.
    roomy = _route(max_cpu_loras=3, backends=[{"adapter": "a", "weight": 50}, {"adapter": "b", "weight": 50}])
    assert sorted(d.served_name for d in resolve(roomy, [Adapter.model_validate(bumped),
                                                         Adapter.model_validate(b)]).table.adapters) == [
        "a--1", "a--2", "b--1"]


def test_an_adapter_no_route_serves_takes_the_new_version_at_once():
    bumped = _serving_v1()
    plan = AdapterController.plan(AdapterFacts(bumped, Adapter.model_validate(bumped), routes=[], pods_by_route={}))
    assert plan.status["servedName"] == "a--2" and plan.status.get("candidate") is None


def test_candidate_weight_and_the_backend_split():
    assert candidate_weight(AdapterPhase.Loading, 0, 2) == 0
    assert candidate_weight(AdapterPhase.Ready, 1, 2) == 0
    assert candidate_weight(AdapterPhase.Ready, 0, 0) == 0     # no replica to prove it on
    assert candidate_weight(AdapterPhase.Failed, 2, 2) == 0
    assert candidate_weight(AdapterPhase.Ready, 2, 2) == 100
    bumped = _serving_v1()
    versions = resolve(ROUTE, [Adapter.model_validate(bumped)]).versions["a"]
    assert split_backend(versions, 80)[0].served_name == "a--1"
    split = AdapterVersions(stable=versions.stable, candidate=versions.candidate, weight=25)
    assert [(b.served_name, b.weight) for b in split_backend(split, 80)] == [("a--1", 60), ("a--2", 20)]


def test_a_new_version_without_an_artifact_yet_leaves_the_serving_one_in_place():
    bumped = _serving_v1()
    bumped["spec"]["source"] = {"fineTuneJobRef": {"name": "j"}}   # its FineTuneJob has not finished
    res = resolve(ROUTE, [Adapter.model_validate(bumped)])
    assert [d.served_name for d in res.table.adapters] == ["a--1"] and _backends(bumped) == [("a--1", 100)]
    _, after = _step(bumped, _pod("p0", {"a--1": READY}), held={"r": res.held["a"]})
    cand = after["status"]["candidate"]
    assert (cand["phase"], cand["reason"], cand["uri"]) == (AdapterPhase.Pending, Reason.ArtifactPending, "")
    assert after["status"]["phase"] == AdapterPhase.Ready and after["status"]["servedName"] == "a--1"


def test_the_route_controller_tells_the_adapter_about_a_held_candidate_and_follows_its_status():
    """The wiring: a route whose table leaves an Adapter's new version out tells the Adapter controller
    (reselected, held_candidates); a change of the Adapter's serving version or candidate re-resolves the routes."""
    from test_controllers import ROUTE_BODY, context
    from loraplane.controllers.modelroute import ModelRouteController, ModelRouteFacts

    ctl = ModelRouteController(context(), rejections=lambda ns: {}, reselected=lambda key: None)
    route = ModelRoute.model_validate(ROUTE_BODY)
    bumped = _serving_v1()
    plan = ctl.plan(ModelRouteFacts(ROUTE_BODY, route, adapters=[Adapter.model_validate(bumped)]))
    assert set(plan.held) == set() and "a" not in plan.reselected   # room and a compatible candidate: nothing held
    bumped["spec"]["rank"] = 64
    held = ctl.plan(ModelRouteFacts(ROUTE_BODY, route, adapters=[Adapter.model_validate(bumped)],
                                    last_selected=plan.selected))
    assert held.held["a"].reason == Reason.RankTooLarge and held.reselected == ["a"]
    ctl._held[("ns", "r")] = held.held     # what execute remembers
    assert ctl.held_candidates("ns", "a") == {"r": held.held["a"]}
    scheduled = []
    ctl.stores.ModelRoute.put(ROUTE_BODY)   # the routes that select the Adapter are scheduled
    ctl.schedule = lambda key, delay=None: scheduled.append(key[0])
    promoted = {**bumped, "status": {**bumped["status"], "servedName": "a--2"}}
    ctl.on_change("Adapter", promoted, bumped)
    candidate = {**bumped, "status": {**bumped["status"], "candidate": {"servedName": "a--2", "phase": "Ready",
                                                                         "reason": "Loaded", "weight": 100}}}
    ctl.on_change("Adapter", candidate, bumped)
    ctl.on_change("Adapter", {**bumped, "status": {**bumped["status"], "loadedOn": []}}, bumped)
    assert scheduled == ["ns", "ns"]
