"""Issue 17: work the operator's reconcile path no longer repeats (each test fails on the code before)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_parsing_specs_does_not_import_cel_python():
    """Every CEL rule has a Python mirror (CelRule.check), so the operator never evaluates with cel-python; it
    still imported it (and its lark parser, ~50 ms of CPU) on the first parse of its first reconcile."""
    code = """
import sys
import loraplane.controllers.manager
from loraplane.api.modelroute import ModelRoute
from loraplane.api.adapter import Adapter
ModelRoute.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
    "metadata": {"name": "r", "namespace": "ns"},
    "spec": {"baseModel": {"name": "org/base"}, "routes": [{"name": "m", "backends": [{"adapter": "a"}]}]}})
Adapter.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
    "metadata": {"name": "a", "namespace": "ns"},
    "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "s3://b/a"}, "version": "1", "rank": 8}})
print("celpy" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "operator"), "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_setting_an_unchanged_condition_keeps_the_condition_object():
    """A re-reconcile sets the same conditions again: the unchanged one is kept as it is, not validated anew."""
    from loraplane.api.common import set_condition
    from loraplane.api.conditions import ConditionState, ConditionStatus, ConditionType
    from loraplane.api.reasons import Reason

    state = ConditionState(ConditionStatus.TRUE, Reason.Loaded, "served")
    first = set_condition([], ConditionType.Ready, state, 2, now="2026-01-01T00:00:00Z")
    again = set_condition(first, ConditionType.Ready, state, 2, now="2026-02-02T00:00:00Z")
    assert again[0] is first[0]
    moved = set_condition(first, ConditionType.Ready, state, 3, now="2026-02-02T00:00:00Z")
    assert moved[0].observed_generation == 3 and moved[0].last_transition_time == "2026-01-01T00:00:00Z"
    flipped = set_condition(first, ConditionType.Ready, ConditionState(ConditionStatus.FALSE, Reason.Loading, "w"),
                            3, now="2026-02-02T00:00:00Z")
    assert flipped[0].last_transition_time == "2026-02-02T00:00:00Z"


def test_a_route_status_change_reads_only_that_routes_publication_again(monkeypatch):
    """Every route's reconcile reads what the namespace's routes publish; a status patch of one route moved the
    namespace's version and every route's Publication was read again (its status lists, name by name)."""
    from loraplane.controllers import modelroute as mr
    from test_controllers import FakeKube, context

    calls = []
    real = mr.publication
    monkeypatch.setattr(mr, "publication", lambda body: calls.append(body["metadata"]["name"]) or real(body))
    ctl = mr.ModelRouteController(context(FakeKube()), rejections=lambda ns: {}, reselected=lambda key: None)

    def route(i: int, rv: str, models=()) -> dict:
        return {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                "metadata": {"name": f"r{i}", "namespace": "ns", "uid": f"u{i}", "resourceVersion": rv},
                "spec": {}, "status": {"models": [{"name": m, "ready": True} for m in models]}}

    for i in range(5):
        ctl.stores.ModelRoute.put(route(i, "1"))
    assert len(ctl.publications("ns")) == 5 and len(calls) == 5
    ctl.stores.ModelRoute.put(route(2, "2", ["m2"]))
    pubs = ctl.publications("ns")
    assert calls[5:] == ["r2"]
    assert [p.models for p in pubs if p.route == "r2"] == [(("m2", True),)]


def test_an_adapter_reconcile_parses_its_owned_status_once(monkeypatch):
    """The rollout window and the plan both read the Adapter's owned status: it was validated twice per reconcile
    (every reconcile, most of which change nothing)."""
    from loraplane.controllers import adapter as ad
    from test_controllers import ROUTE_BODY, FakeKube, context

    calls = []
    real = ad.owned_status
    monkeypatch.setattr(ad, "owned_status", lambda *a: calls.append((a[0], dict(a[1]))) or real(*a))
    ctl = ad.AdapterController(context(FakeKube()))
    ctl.stores.ModelRoute.put(ROUTE_BODY)
    ctl.stores.Adapter.put({"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                            "metadata": {"name": "a", "namespace": "ns", "uid": "au", "generation": 1,
                                         "resourceVersion": "5"},
                            "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "s3://b/a"},
                                     "version": "1", "rank": 8},
                            "status": {"phase": "Loading", "observedGeneration": 1}})
    import asyncio

    asyncio.run(ctl.reconcile(("ns", "a")))
    stored = ctl.stores.Adapter.get(("ns", "a"))["status"]
    assert [c for c in calls if c[1] == stored] == [(ad.AdapterStatus, stored)]
    assert ctl.kube.status_patches   # it did reconcile (status written)


def test_kopf_keeps_no_handler_progress_and_clears_nothing():
    """kopf cleared handler progress marks off both (empty) essences of every event with its default storage,
    deep-copying them four times per event; the operator has only on.event handlers, which have no progress."""
    import kopf

    from loraplane.controllers.handlers import configure_kopf

    settings = kopf.OperatorSettings()
    configure_kopf(settings)
    storage = settings.persistence.progress_storage
    essence = {}
    assert storage.clear(essence=essence) is essence
    assert storage.fetch(key="h", body={}) is None


def test_condition_messages_are_scrubbed_once_per_distinct_text():
    """Every reconcile sets its conditions again with mostly the same messages: each text is scrubbed once (the
    result cached), and still scrubbed."""
    from loraplane.api import common
    from loraplane.api.conditions import ConditionState, ConditionStatus, ConditionType
    from loraplane.api.reasons import Reason

    message = "fetch of https://user:pw@example.com/a failed"
    state = ConditionState(ConditionStatus.FALSE, Reason.Loading, message)
    hits = common._scrubbed_message.cache_info().hits
    first = common.set_condition([], ConditionType.Ready, state, 1)
    again = common.set_condition([], ConditionType.Ready, state, 1)
    assert common._scrubbed_message.cache_info().hits > hits
    assert "pw@" not in first[0].message and first[0].message == again[0].message


def test_a_route_reconciles_an_adapter_only_when_what_its_status_reads_of_the_route_changed():
    """An Adapter's status reads two things of a route's resolution: a ServingTableFull verdict (table_verdicts)
    and a held candidate (held_candidates); which routes select it and whether it is compatible it computes itself
    from the ModelRoute store. A route told the Adapter controller of every selection that appeared, so each
    Adapter of a burst of creates was reconciled once more for nothing (a third of the Adapter reconciles)."""
    from loraplane.api.reasons import Reason
    from loraplane.builders.resolution import Verdict
    from loraplane.controllers.modelroute import ModelRouteFacts, table_full
    from test_controllers import ADAPTER, ROUTE, ROUTE_BODY, route_controller

    ctl = route_controller()
    first = ctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER]))
    assert first.selected["a"].compatible and first.reselected == []
    full = Verdict(False, Reason.ServingTableFull, "Adapter a is left out of route r's serving table")
    assert table_full(full) is full and table_full(first.selected["a"]) is None and table_full(None) is None
    # Left out for size before, served now: the Adapter's Ready condition changes, so it is told.
    assert ctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER],
                                    last_selected={"a": full})).reselected == ["a"]
    # Left out before, no longer selected at all: likewise.
    assert ctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[], last_selected={"a": full})).reselected == ["a"]
    # The verdict an Adapter shows is exactly what table_verdicts hands it.
    ctl._selected[("ns", "r")] = {"a": full, "b": first.selected["a"]}
    assert ctl.table_verdicts("ns", "a") == {"r": full} and ctl.table_verdicts("ns", "b") == {}


def _adapter_echo_setup():
    """An Adapter controller with one route and one Adapter reconciled once (status written), the watch event
    its write makes, and the keys it schedules."""
    import asyncio
    import copy

    from loraplane.controllers import adapter as ad
    from loraplane.controllers.status import merge_patch
    from test_controllers import ROUTE_BODY, FakeKube, context

    ctl = ad.AdapterController(context(FakeKube()))
    ctl.stores.ModelRoute.put(ROUTE_BODY)
    body = {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
            "metadata": {"name": "a", "namespace": "ns", "uid": "au", "generation": 1, "resourceVersion": "5",
                         "labels": {"team": "t"}, "managedFields": [{"manager": "kubectl"}]},
            "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "s3://b/a"}, "version": "1", "rank": 8}}
    ctl.stores.Adapter.put(body)
    asyncio.run(ctl.reconcile(("ns", "a")))
    [(_, _, patch)] = ctl.kube.status_patches
    # What the API server stores and the watch delivers: the merge patch applied, a new resourceVersion and
    # managedFields entry.
    echo = copy.deepcopy(body)
    echo["status"] = merge_patch({}, patch)
    echo["metadata"].update(resourceVersion="6", managedFields=[{"manager": "kubectl"}, {"manager": "loraplane"}])
    scheduled = []
    ctl.schedule = lambda key, delay=None: scheduled.append(key)
    return ctl, body, echo, scheduled


def test_the_watch_event_of_an_adapters_own_status_write_is_not_reconciled():
    """Every Adapter status write came back as a watch event and ran a reconcile that changed nothing (a third of
    the Adapter reconciles of a burst of creates): when a reconcile of exactly the object the write makes was found
    to change nothing (AdapterController.settles), that event is not reconciled."""
    ctl, body, echo, scheduled = _adapter_echo_setup()
    ctl.stores.Adapter.put(echo)
    ctl.on_change("Adapter", echo, body)
    assert scheduled == []
    # One event per write: the same state again (a relist, a resync) is reconciled.
    ctl.on_change("Adapter", echo, body)
    assert scheduled == [("ns", "a")]


def test_any_other_change_than_the_adapters_own_status_write_is_reconciled():
    """A spec change, a label change, another writer's status key or a different value of an owned key, a deletion:
    each is reconciled, also when it arrives as the event of (or folded into) our own write."""
    import copy

    cases = {
        "spec": lambda o: o["spec"].update(rank=16) or o["metadata"].update(generation=2),
        "labels": lambda o: o["metadata"]["labels"].update(team="u"),
        "annotations": lambda o: o["metadata"].update(annotations={"x": "y"}),
        "other writer's status": lambda o: o["status"].update(provenance={"fineTuneJobUid": "j"}),
        "owned key changed": lambda o: o["status"].update(phase="Ready"),
        "deleting": lambda o: o["metadata"].update(deletionTimestamp="2026-01-01T00:00:00Z"),
    }
    for what, change in cases.items():
        ctl, body, echo, scheduled = _adapter_echo_setup()
        other = copy.deepcopy(echo)
        change(other)
        ctl.on_change("Adapter", other, body)
        assert scheduled == [("ns", "a")], what
    ctl, body, echo, scheduled = _adapter_echo_setup()
    ctl.on_change("Adapter", echo, None)   # appeared or disappeared (a DELETED event carries the last state)
    assert scheduled == [("ns", "a")]


def test_an_adapter_write_whose_reconcile_would_change_more_is_reconciled_again(monkeypatch):
    """The event of our own write is skipped only when a reconcile of the object it makes was computed to change
    nothing: a plan that would write again (or a rollout that waits on time or on the routers' metrics) keeps the
    reconcile of that event."""
    from loraplane.builders.rollout import ANALYSED, RolloutDecision
    from loraplane.controllers import adapter as ad

    real = ad.AdapterController.plan
    plans = []

    def plan(facts):
        out = real(facts)
        plans.append(out)
        if len(plans) == 2:   # the settles check: pretend the written status is not a fixed point
            out.status = {"phase": "Ready"}
        return out

    monkeypatch.setattr(ad.AdapterController, "plan", staticmethod(plan))
    ctl, body, echo, scheduled = _adapter_echo_setup()
    assert len(plans) == 2
    ctl.on_change("Adapter", echo, body)
    assert scheduled == [("ns", "a")]
    decision = plans[0].rollout
    assert isinstance(decision, RolloutDecision) and ad.waits_on_nothing(decision)
    assert not ad.waits_on_nothing(RolloutDecision(decision.status, [], requeue_seconds=30.0))
    assert not ad.waits_on_nothing(RolloutDecision(decision.status, [], new_window=True))
    analysed = decision.status.model_copy(update={"state": next(iter(ANALYSED))})
    assert not ad.waits_on_nothing(RolloutDecision(analysed, []))


def test_the_settles_check_reads_the_adapter_with_the_status_its_write_makes(monkeypatch):
    """The Adapter's parsed status is an input of its reconcile (builders.resolution.declared_rank reads the rank
    status.artifact records when spec.rank is unset): the check that the write's echo changes nothing plans with
    the Adapter as the store will parse the echo, not with the status it had before the write."""
    from loraplane.controllers import adapter as ad

    real = ad.AdapterController.plan
    seen = []
    monkeypatch.setattr(ad.AdapterController, "plan",
                        staticmethod(lambda facts: seen.append(facts) or real(facts)))
    ctl, body, echo, scheduled = _adapter_echo_setup()
    first, check = seen
    assert first.adapter.status is None   # as stored: no status yet
    assert check.body["status"] == echo["status"]
    assert check.adapter.status is not None and check.adapter.status.phase == echo["status"]["phase"]
    assert check.adapter.status.served_name == echo["status"]["servedName"]
    assert check.adapter.spec == first.adapter.spec
