"""Issue 17 review: the watch event of an Adapter's own status write (its "echo") is skipped when a reconcile of the
object it makes was found to change nothing (AdapterController.settles). These tests drive the races around that
skip with the real controllers and stores: a second reconcile that ran before the echo arrived, a route deleted
while an Adapter's reconcile read what that route remembered; and what the API server makes of a status merge
patch (RFC 7386: objects merge key by key), which the echo is computed from. MOCK: FakeKube records writes; the
watch is played by putting the object the API server would store (controllers.status.merge_patch) and calling
on_change, in the order a real watch may deliver."""

from __future__ import annotations

import asyncio
import copy

from loraplane.api.keys import REPORT_ANNOTATION, ROUTE_LABEL
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterReport, AdapterState, ReplicaReport
from loraplane.controllers import adapter as ad
from loraplane.controllers.status import merge_patch
from test_controllers import ROUTE_BODY, FakeKube, context

KEY = ("ns", "a")
ADAPTER_BODY = {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                "metadata": {"name": "a", "namespace": "ns", "uid": "au", "generation": 1, "resourceVersion": "5"},
                "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "s3://b/a"}, "version": "1",
                         "rank": 8}}


def engine_pod(name: str, served: str, route: str = "r") -> dict:
    """A ready engine replica of `route` whose loader reports `served` Ready."""
    report = ReplicaReport(replica=name, route=route, generation=1, engine_ready=True, updated_at="t", adapters={
        served: AdapterReport(state=AdapterState.Ready, reason=Reason.Loaded, since="2026-01-01T00:00:00Z",
                              sha256="1" * 64)})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "labels": {ROUTE_LABEL: route},
                         "annotations": {REPORT_ANNOTATION: report.to_annotation()}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


class Cluster:
    """An Adapter controller over real stores, with the API server's side played by hand: `write` is what the
    last status PATCH made of the object, `deliver` its watch event."""

    def __init__(self):
        self.ctl = ad.AdapterController(context(FakeKube()))
        self.scheduled: list = []
        self.ctl.schedule = lambda key, delay=None: self.scheduled.append(key)
        self.rv = 5

    def reconcile(self) -> dict:
        """One reconcile; returns its status patch ({} when it wrote nothing)."""
        before = len(self.ctl.kube.status_patches)
        asyncio.run(self.ctl.reconcile(KEY))
        patches = self.ctl.kube.status_patches[before:]
        return patches[-1][2] if patches else {}

    def server_object(self, base: dict, patch: dict) -> dict:
        """What the API server stores for the merge patch {"status": patch} on `base`."""
        self.rv += 1
        out = copy.deepcopy(base)
        out["status"] = merge_patch(base.get("status") or {}, patch)
        out["metadata"]["resourceVersion"] = str(self.rv)
        return out

    def deliver(self, obj: dict) -> None:
        """The watch event of `obj`: the store holds it, then the controller is told (Informer.on_event)."""
        old = self.ctl.stores.Adapter.put(obj)
        self.ctl.on_change("Adapter", obj, old)

    def settle(self) -> dict:
        """Reconcile until a reconcile writes nothing, each write's echo delivered; the stored object."""
        for _ in range(5):
            patch = self.reconcile()
            if not patch:
                return self.ctl.stores.Adapter.get(KEY)
            self.deliver(self.server_object(self.ctl.stores.Adapter.get(KEY), patch))
        raise AssertionError("did not settle")


def test_an_echo_is_reconciled_when_a_later_reconcile_ran_before_it_arrived():
    """Reconcile 1 writes status S1 from facts F1 and arms the skip of its echo; a pod goes away (F2) and reconcile
    2 runs before the echo is in the store (the watch lags the PATCH's answer): it reads the old status, which F2
    gives again, so it writes nothing. The echo of S1 then arrives: it equals what reconcile 1 armed, but S1 was
    computed from facts that no longer hold (loadedOn lists a replica that is gone). It must be
    reconciled; skipping it left the status lying for good."""
    c = Cluster()
    c.ctl.stores.ModelRoute.put(ROUTE_BODY)
    c.ctl.stores.Adapter.put(copy.deepcopy(ADAPTER_BODY))
    c.ctl.stores.EnginePod.put(engine_pod("p0", "a--1"))
    s0 = c.settle()
    assert s0["status"]["phase"] == "Ready" and [lo["replica"] for lo in s0["status"]["loadedOn"]] == ["p0"]
    pod = engine_pod("p1", "a--1")
    c.ctl.stores.EnginePod.put(pod)
    p1 = c.reconcile()                     # reconcile 1: loaded on p0 and p1
    assert [lo["replica"] for lo in p1["loadedOn"]] == ["p0", "p1"]
    c.ctl.stores.EnginePod.remove(pod)     # p1 goes (its event schedules the Adapter: reconcile 2)
    assert c.reconcile() == {}             # reconcile 2 reads S0 from the store: nothing to write
    c.scheduled.clear()
    c.deliver(c.server_object(s0, p1))     # the echo of reconcile 1's write arrives
    assert c.scheduled == [KEY], "the echo of a write whose facts changed since was not reconciled"
    final = c.settle()
    assert [lo["replica"] for lo in final["status"]["loadedOn"]] == ["p0"]


def test_a_deleted_route_tells_the_adapters_it_held_or_left_out():
    """An Adapter's status reads what a route's resolution remembers of it (held_candidates: its new version left
    out; table_verdicts: left out for size), and a route tells the Adapter when that changes (reselected) — but a
    deleted route's memory was dropped (forget) without a word. The Adapter reconcile the deletion schedules runs
    first (the Manager tells the Adapter controller before the ModelRoute controller) and still reads the deleted
    route's held verdict; its write's echo settles on that, so it is skipped, and the candidate stayed Pending
    (NoRoomForCandidate, naming a route that is gone) with no traffic until some other event."""
    from loraplane.builders.resolution import Verdict
    from loraplane.controllers.modelroute import ModelRouteController

    told = []
    routes = ModelRouteController(context(FakeKube()), rejections=lambda ns: {}, reselected=told.append)
    held = Verdict(False, Reason.NoRoomForCandidate, "route r2 has no room for a--2 yet")
    full = Verdict(False, Reason.ServingTableFull, "Adapter b is left out of route r2's serving table")
    fine = Verdict(True, Reason.Compatible, "compatible with ModelRoute r2")
    routes._held[("ns", "r2")] = {"a": held}
    routes._selected[("ns", "r2")] = {"a": fine, "b": full, "c": fine}
    assert routes.held_candidates("ns", "a") == {"r2": held} and routes.table_verdicts("ns", "b") == {"r2": full}
    asyncio.run(routes.reconcile(("ns", "r2")))    # the route is gone from the store: forgotten
    assert routes.held_candidates("ns", "a") == {} and routes.table_verdicts("ns", "b") == {}
    # The Adapters whose status read those verdicts are reconciled again; the others (compatible: c) need not be.
    assert sorted(told) == [("ns", "a"), ("ns", "b")]



def test_a_status_patch_drops_the_nested_keys_the_new_status_no_longer_has():
    """A JSON merge patch merges objects key by key on the API server (RFC 7386): sending the new value of an owned
    object (status.rollout) without a key it had left that key as it was. After a rollout promoted, status.rollout
    kept the step, stepStartedAt and lastAnalysisAt of its steps (the next rollout's Loading showed them too), and
    since the stored value never became the desired one, every reconcile of the Adapter wrote the same patch again."""
    from loraplane.controllers.status import status_patch, with_status_patch

    body = {"metadata": {"name": "a"}, "status": {
        "phase": "Ready", "provenance": {"fineTuneJobUid": "j"},
        "rollout": {"state": "Progressing", "candidate": "2", "stable": "1", "step": 2, "weight": 50,
                    "stepStartedAt": "2026-01-01T00:00:00Z", "lastAnalysisAt": "2026-01-01T00:01:00Z",
                    "lastAnalysis": {"verdict": "Passed", "windowSeconds": 60, "candidate": {"requests": 9}}}}}
    desired = {"phase": "Ready",
               "rollout": {"state": "Promoted", "candidate": "2", "stable": "2", "weight": 100,
                           "lastAnalysis": {"verdict": "Passed", "windowSeconds": 60, "candidate": {"requests": 9}}}}
    patch = status_patch(body["status"], desired, ("phase", "rollout"))
    stored = with_status_patch(body, patch)["status"]   # what the API server's merge makes of it
    assert stored["rollout"] == desired["rollout"]
    assert stored["provenance"] == {"fineTuneJobUid": "j"}   # another writer's key: untouched
    assert status_patch(stored, desired, ("phase", "rollout")) == {}   # a fixed point: nothing to write again
    # A nested object that lost a key, inside the new value, likewise.
    desired["rollout"]["lastAnalysis"] = {"verdict": "Passed", "windowSeconds": 60, "candidate": {}}
    stored = with_status_patch({"status": stored}, status_patch(stored, desired, ("rollout",)))["status"]
    assert stored["rollout"]["lastAnalysis"]["candidate"] == {}


def test_a_deleted_routes_held_candidate_does_not_stay_on_the_adapter():
    """The story of test_a_deleted_route_tells_the_adapters_it_held_or_left_out with both controllers: routes r and
    r2 serve Adapter a; r2 has no room for its version 2 (held), which r's replica has loaded. r2 is deleted: the
    Adapter's reconcile runs first and still reads r2's held verdict (it writes routes: [r]; its echo settles on
    that), then the route controller forgets r2. The Adapter must be reconciled again and promote version 2."""
    from loraplane.builders.resolution import Verdict
    from loraplane.controllers.modelroute import ModelRouteController

    c = Cluster()
    routes = ModelRouteController(c.ctl.ctx, rejections=c.ctl.rejections, reselected=c.ctl.schedule)
    c.ctl.connect(lambda ns: None, routes.table_verdicts, routes.held_candidates)
    r2 = copy.deepcopy(ROUTE_BODY)
    r2["metadata"].update(name="r2", uid="r2u")
    c.ctl.stores.ModelRoute.put(ROUTE_BODY)
    c.ctl.stores.ModelRoute.put(r2)
    c.ctl.stores.Adapter.put(copy.deepcopy(ADAPTER_BODY))
    c.ctl.stores.EnginePod.put(engine_pod("p0", "a--1"))
    v1 = copy.deepcopy(c.settle())
    v1["spec"].update(version="2", source={"uri": "s3://b/a2"})
    v1["metadata"]["generation"] = 2
    c.deliver(v1)
    routes._held[("ns", "r2")] = {"a": Verdict(False, Reason.NoRoomForCandidate, "route r2 has no room for a--2")}
    pod = engine_pod("p0", "a--1")
    pod["metadata"]["annotations"][REPORT_ANNOTATION] = ReplicaReport(
        replica="p0", route="r", generation=1, engine_ready=True, updated_at="t", adapters={
            n: AdapterReport(state=AdapterState.Ready, reason=Reason.Loaded, since="2026-01-01T00:00:00Z",
                             sha256="1" * 64) for n in ("a--1", "a--2")}).to_annotation()
    c.ctl.stores.EnginePod.put(pod)
    held = c.settle()
    assert held["status"]["candidate"]["reason"] == Reason.NoRoomForCandidate
    c.ctl.stores.ModelRoute.remove(r2)   # deleted: the Adapter reconcile it schedules runs first
    c.scheduled.clear()
    patch = c.reconcile()
    assert patch["routes"] == ["r"]
    asyncio.run(routes.reconcile(("ns", "r2")))    # then the route controller forgets r2
    c.deliver(c.server_object(held, patch))        # and the echo of the Adapter's write arrives
    assert ("ns", "a") in c.scheduled
    final = c.settle()["status"]
    assert final.get("candidate") is None and final["version"] == "2"


def test_a_new_runs_provenance_does_not_keep_the_previous_runs_evaluation():
    """The FineTuneJob writes the produced Adapter's status.provenance as a merge patch; the API server merges the
    object key by key, so a run without an evaluation left the previous run's status.provenance.evaluation in place
    (beside the new run's uid) and the Adapter's gates judged the new version by the old version's scores."""
    from loraplane.controllers.finetunejob import FineTuneJobController, ProducedAdapter

    ctl = FineTuneJobController(context(FakeKube()))
    old = {"fineTuneJob": "j1", "fineTuneJobUid": "u1", "metrics": {"loss": 0.5, "accuracy": 0.9},
           "evaluation": {"primaryMetric": "rouge_l", "candidate": {"metrics": {"rouge_l": 0.9}, "examples": 40}}}
    live = {**ADAPTER_BODY, "status": {"phase": "Ready", "provenance": old}}
    new = {"fineTuneJob": "j2", "fineTuneJobUid": "u2", "metrics": {"loss": 0.4}}
    asyncio.run(ctl._write_adapter(ProducedAdapter(ADAPTER_BODY, job="j2", apply=False, created=False, live=live,
                                                   provenance=new)))
    [(_, _, patch)] = ctl.kube.status_patches
    assert merge_patch(live["status"], patch)["provenance"] == new


def test_an_integral_float_the_api_server_stores_as_an_integer_is_not_written_again():
    """The API server stores a JSON number without a fraction as an integer (1.0 comes back as 1), while the
    operator's status models dump floats as 1.0: status_patch compared the two as JSON text and wrote the key again
    on every reconcile of the object for ever (the server finds nothing to change: no event, a PATCH for nothing).
    A rollout's lastAnalysis keeps errorRate 0.0 after a clean analysis, so every such Adapter's idle resync wrote;
    likewise the FineTuneJob's provenance metrics (a loss of 2.0)."""
    from loraplane.controllers.finetunejob import FineTuneJobController, ProducedAdapter
    from loraplane.controllers.status import status_patch

    stored = {"rollout": {"state": "Stable", "lastAnalysis": {"windowSeconds": 30, "candidate": {"errorRate": 0}}}}
    desired = {"rollout": {"state": "Stable", "lastAnalysis": {"windowSeconds": 30.0,
                                                               "candidate": {"errorRate": 0.0}}}}
    assert status_patch(stored, desired, ("rollout",)) == {}
    desired["rollout"]["lastAnalysis"]["candidate"]["errorRate"] = 0.5   # a real change is still written
    assert status_patch(stored, desired, ("rollout",)) == {"rollout": desired["rollout"]}
    ctl = FineTuneJobController(context(FakeKube()))
    live = {**ADAPTER_BODY, "status": {"provenance": {"fineTuneJobUid": "u2", "metrics": {"loss": 2}}}}
    asyncio.run(ctl._write_adapter(ProducedAdapter(ADAPTER_BODY, job="j2", apply=False, created=False, live=live,
                                                   provenance={"fineTuneJobUid": "u2", "metrics": {"loss": 2.0}})))
    assert ctl.kube.status_patches == []
