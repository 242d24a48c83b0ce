"""Issue 14 items 3-4 through the Adapter controller's plan (pure) and the route's resolution: the rollout policy
drives the candidate's share of the serving table, a version worse than the base never enters it, an analysis
that fails takes it out, and promote / abort / rollbackTo are spec fields."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from loraplane.api import Adapter
from loraplane.api.reasons import Reason
from loraplane.api.rollout import RolloutState
from loraplane.builders.rollout import Counts, Window
from loraplane.controllers.adapter import AdapterController, AdapterFacts

from test_make_before_break import READY, ROUTE, _backends, _body, _loaded, _pod

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
POLICY = {"gates": {"minScore": 0.5, "mustBeatBase": True},
          "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1m"}],
          "analysis": {"interval": "30s", "minRequests": 10, "maxErrorRate": 0.05}}
EVAL_GOOD = {"primaryMetric": "rouge_l", "candidate": {"metrics": {"rouge_l": 0.71}, "examples": 40},
             "base": {"metrics": {"rouge_l": 0.42}, "examples": 40}}
EVAL_WORSE_THAN_BASE = {"primaryMetric": "rouge_l", "candidate": {"metrics": {"rouge_l": 0.31}, "examples": 40},
                        "base": {"metrics": {"rouge_l": 0.42}, "examples": 40}}
BOTH = (_pod("p0", {"a--1": READY, "a--2": READY}),)


def step(body: dict, *pods: dict, now: datetime = T0, window: Window | None = None):
    plan = AdapterController.plan(AdapterFacts(body, Adapter.model_validate(body), routes=[ROUTE],
                                               pods_by_route={"r": list(pods)}, now=now, window=window))
    return plan, {**body, "status": {**body["status"], **plan.status}}


def bumped(policy: dict, evaluation: dict | None, **spec) -> dict:
    """Adapter a serving version 1 (with a policy), bumped to version 2 with `evaluation` in its provenance."""
    first = with_policy(_body(), policy)
    first["status"] = {"provenance": {"evaluation": EVAL_GOOD}}
    _, served = step(first, _pod("p0", {"a--1": READY}))
    assert served["status"]["rollout"]["state"] == RolloutState.Promoted   # first version: no steps
    body = with_policy(_body(uri="s3://b/a2", version="2", status=served["status"]), policy, **spec)
    if evaluation is not None:
        body["status"]["provenance"] = {"evaluation": evaluation}
    return body


def with_policy(body: dict, policy: dict, **extra) -> dict:
    return {**body, "spec": {**body["spec"], "rollout": {**policy, **extra}}}


def ready_condition(body: dict) -> dict:
    return next(c for c in body["status"]["conditions"] if c["type"] == "Ready")


def test_a_version_worse_than_the_base_is_never_loaded_and_status_names_the_gate_and_numbers():
    plan, b = step(bumped(POLICY, EVAL_WORSE_THAN_BASE), _pod("p0", {"a--1": READY}))
    rollout = b["status"]["rollout"]
    assert (rollout["state"], rollout["weight"], rollout["stable"]) == (RolloutState.GateFailed, 0, "1")
    gates = {g["gate"]: g for g in rollout["gates"]}
    assert (gates["mustBeatBase"]["passed"], gates["mustBeatBase"]["candidate"],
            gates["mustBeatBase"]["reference"]) == (False, 0.31, 0.42)
    assert (gates["minScore"]["passed"], gates["minScore"]["reference"]) == (False, 0.5)
    ready = ready_condition(b)
    assert (ready["status"], ready["reason"]) == ("False", Reason.RolloutGateFailed)
    assert "0.31" in ready["message"] and "0.42" in ready["message"] and "version 1 serves" in ready["message"]
    assert any(c["type"] == "Stalled" for c in b["status"]["conditions"])
    assert [(e.type, e.reason) for e in plan.events if e.reason == Reason.RolloutGateFailed] == [
        ("Warning", Reason.RolloutGateFailed)]
    # The serving table never loads it; all traffic stays on version 1.
    assert _loaded(b) == ["a--1"] and _backends(b) == [("a--1", 100)]
    assert b["status"]["history"][0]["version"] == "2" and b["status"]["history"][0]["evaluation"]["base"] == 0.42


def test_steps_drive_the_tables_split_and_a_failed_analysis_takes_the_candidate_out():
    b = bumped(POLICY, EVAL_GOOD)
    _, b = step(b, _pod("p0", {"a--1": READY}))
    assert b["status"]["rollout"]["state"] == RolloutState.Loading
    assert _loaded(b) == ["a--1", "a--2"] and _backends(b) == [("a--1", 100)]   # loaded, no traffic yet
    plan, b = step(b, *BOTH)
    assert (b["status"]["rollout"]["state"], b["status"]["rollout"]["weight"]) == (RolloutState.Progressing, 10)
    assert b["status"]["candidate"]["weight"] == 10 and plan.rollout.requeue_seconds == 30
    assert _backends(b) == [("a--1", 90), ("a--2", 10)]
    bad = Window(Counts(40, 20), Counts(300, 0), 30)
    plan, b = step(b, *BOTH, now=T0 + timedelta(seconds=30), window=bad)
    rollout = b["status"]["rollout"]
    assert (rollout["state"], rollout["weight"], rollout["lastAnalysis"]["failedCheck"]) == (
        RolloutState.RolledBack, 0, "maxErrorRate")
    assert rollout["lastAnalysis"]["candidate"]["errorRate"] == 0.5
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", Reason.RolloutRolledBack)]
    assert ready_condition(b)["reason"] == Reason.RolloutRolledBack
    assert (b["status"]["candidate"]["phase"], b["status"]["candidate"]["reason"]) == ("Pending",
                                                                                      Reason.RolloutRolledBack)
    assert b["status"]["version"] == "1"
    assert _loaded(b) == ["a--1"] and _backends(b) == [("a--1", 100)]


def test_promote_and_abort_are_spec_fields():
    b = bumped(POLICY, EVAL_GOOD)
    _, b = step(b, *BOTH)
    _, b = step(b, *BOTH)
    assert b["status"]["rollout"]["weight"] == 10
    aborted = with_policy(b, POLICY, abort="2")
    plan, aborted = step(aborted, *BOTH)
    assert aborted["status"]["rollout"]["state"] == RolloutState.Aborted and _backends(aborted) == [("a--1", 100)]
    assert [e.reason for e in plan.events] == [Reason.RolloutAborted]
    promoted = with_policy(b, POLICY, promote="2")
    plan, promoted = step(promoted, *BOTH)
    assert (promoted["status"]["version"], promoted["status"]["rollout"]["state"]) == ("2", RolloutState.Promoted)
    assert _backends(promoted) == [("a--2", 100)]
    assert [e.reason for e in plan.events] == [Reason.RolloutPromoted]


def test_rollback_to_a_named_earlier_version_is_one_spec_change():
    b = bumped(POLICY, EVAL_GOOD, promote="2")
    _, b = step(b, *BOTH)
    _, b = step(b, _pod("p0", {"a--2": READY}))
    assert b["status"]["version"] == "2"
    assert [h["version"] for h in b["status"]["history"]] == ["2", "1"]
    assert b["status"]["history"][1]["uri"] == "s3://b/a1"
    back = with_policy(b, POLICY, promote="2", rollbackTo="1")
    plan, back = step(back, _pod("p0", {"a--2": READY}))
    assert (back["status"]["version"], back["status"]["servedName"]) == ("1", "a--1")
    assert back["status"]["rollout"]["reason"] == Reason.RolloutManualRollback
    assert _loaded(back) == ["a--1"] and _backends(back) == [("a--1", 100)]
    # And it stays there while rollbackTo is set (the replicas load version 1).
    _, back = step(back, _pod("p0", {"a--1": READY}))
    assert back["status"]["version"] == "1" and _backends(back) == [("a--1", 100)]


def test_a_first_version_that_fails_its_gates_is_served_nowhere():
    first = with_policy(_body(), POLICY)
    first["status"] = {"provenance": {"evaluation": EVAL_WORSE_THAN_BASE}}
    _, b = step(first)
    assert b["status"]["rollout"]["state"] == RolloutState.GateFailed
    _, b = step(b)    # and stays so (status.version names it, but it never served)
    assert b["status"]["rollout"]["state"] == RolloutState.GateFailed
    assert _loaded(b) == [] and _backends(b) == []
    assert ready_condition(b)["reason"] == Reason.RolloutGateFailed


def test_the_gates_wait_for_the_evaluation_of_the_version_a_finetunejob_just_published():
    # The job applies the new spec, then patches provenance: in between, provenance is the previous run's.
    b = bumped(POLICY, EVAL_WORSE_THAN_BASE)
    b["metadata"] = {**b["metadata"], "annotations": {"loraplane.io/produced-by": "run-2"}}
    b["status"]["provenance"] = {"fineTuneJobUid": "run-1", "evaluation": EVAL_GOOD}   # v1's scores
    plan, waiting = step(b, *BOTH)
    assert waiting["status"]["rollout"]["candidate"] == "1"         # unchanged: v2 not judged yet
    assert waiting["status"]["candidate"]["weight"] == 0 and _backends(waiting) == [("a--1", 100)]
    assert not [e for e in plan.events if e.reason.startswith("Rollout")]
    waiting["status"]["provenance"] = {"fineTuneJobUid": "run-2", "evaluation": EVAL_WORSE_THAN_BASE}
    _, judged = step(waiting, *BOTH)
    assert judged["status"]["rollout"]["state"] == RolloutState.GateFailed


def test_a_routes_default_policy_applies_to_its_adapters_and_theirs_overrides_it_by_field():
    from loraplane.api import ModelRoute

    route = ModelRoute.model_validate({**ROUTE.wire(), "spec": {**ROUTE.spec.wire(), "adapterRollout": POLICY}})

    def plan(body):
        p = AdapterController.plan(AdapterFacts(body, Adapter.model_validate(body), routes=[route],
                                                pods_by_route={"r": list(BOTH)}, now=T0))
        return p, {**body, "status": {**body["status"], **p.status}}

    first = _body()
    first["status"] = {"provenance": {"evaluation": EVAL_GOOD}}
    _, served = plan(first)
    b = _body(uri="s3://b/a2", version="2", status=served["status"])
    b["status"]["provenance"] = {"evaluation": EVAL_WORSE_THAN_BASE}
    _, held = plan(b)
    assert held["status"]["rollout"]["state"] == RolloutState.GateFailed      # the route's gates, no own policy
    _, promoted = plan(with_policy(held, {"promote": "2"}))                   # own field, the route's others
    assert promoted["status"]["rollout"]["state"] in (RolloutState.Loading, RolloutState.Promoted)
    try:
        ModelRoute.model_validate({**ROUTE.wire(), "spec": {**ROUTE.spec.wire(),
                                                             "adapterRollout": {"promote": "2"}}})
    except ValueError as exc:
        assert "promote" in str(exc)
    else:
        raise AssertionError("a route default cannot name an Adapter's version")


def test_gates_do_not_wait_for_a_finetunejob_that_no_longer_exists():
    """The gates waited for the evaluation of the FineTuneJob named by the produced-by annotation as long as
    provenance was another run's, even when that job no longer existed (deleted between its two writes, or the
    annotation copied with the manifest, as a GitOps export does): a bumped version waited for ever with its
    candidate Ready at weight 0 and nothing saying why, and a first version served at 100 % without its gates
    judged. Now only an existing job is waited for; without it the gates judge at once, and not by another run's
    scores (a gate fails on no evaluation, saying so)."""
    def gone(body: dict, *pods: dict):
        plan = AdapterController.plan(AdapterFacts(body, Adapter.model_validate(body), routes=[ROUTE],
                                                   pods_by_route={"r": list(pods)}, now=T0, producer_exists=False))
        return plan, {**body, "status": {**body["status"], **plan.status}}

    ghost = {"loraplane.io/produced-by": "deleted-run"}
    first = with_policy(_body(), POLICY)
    first["metadata"] = {**first["metadata"], "annotations": ghost}
    _, b = gone(first, _pod("p0", {"a--1": READY}))
    assert b["status"]["rollout"]["state"] == RolloutState.GateFailed and _backends(b) == []
    assert "no evaluation" in ready_condition(b)["message"]

    bumped_body = bumped(POLICY, None)
    bumped_body["metadata"] = {**bumped_body["metadata"], "annotations": ghost}
    bumped_body["status"]["provenance"] = {"fineTuneJobUid": "run-1", "evaluation": EVAL_GOOD}   # v1's scores
    _, b = gone(bumped_body, *BOTH)
    assert b["status"]["rollout"]["state"] == RolloutState.GateFailed and _backends(b) == [("a--1", 100)]
    assert ready_condition(b)["reason"] == Reason.RolloutGateFailed
    assert "no evaluation" in ready_condition(b)["message"]   # not judged by version 1's good scores


def test_observe_says_whether_the_producing_finetunejob_exists_and_its_deletion_reconciles_the_adapter():
    from test_controllers import FTJ_BODY, context

    ctl = AdapterController(context())
    body = with_policy(_body(), POLICY)
    body["metadata"] = {**body["metadata"], "annotations": {"loraplane.io/produced-by": FTJ_BODY["metadata"]["uid"]}}
    ctl.stores.Adapter.put(body)
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    assert ctl.observe(key).producer_exists is False
    job = {**FTJ_BODY, "metadata": {**FTJ_BODY["metadata"], "namespace": key[0]},
           "spec": {**FTJ_BODY["spec"], "output": {"adapterName": key[1]}}}
    ctl.stores.FineTuneJob.put(job)
    assert ctl.observe(key).producer_exists is True
    scheduled = []
    ctl.schedule = lambda k, delay=None: scheduled.append(k)
    ctl.stores.FineTuneJob.remove(job)
    ctl.on_change("FineTuneJob", job, None)
    assert scheduled == [key] and ctl.observe(key).producer_exists is False
    # Through observe and plan, with the route and its replica in the stores: the first version is judged (no
    # evaluation: not served), where it was served ungated while waiting for the deleted job.
    ctl.stores.ModelRoute.put(ROUTE.wire())
    pod = _pod("p0", {"a--1": READY})
    pod["metadata"].update(namespace=key[0], labels={"loraplane.io/route": "r", "loraplane.io/component": "engine"})
    ctl.stores.EnginePod.put(pod)
    facts = ctl.observe(key)
    assert [r.metadata.name for r in facts.routes] == ["r"] and facts.pods_by_route["r"]
    status = {**body["status"], **AdapterController.plan(facts).status}
    assert status["rollout"]["state"] == RolloutState.GateFailed and _backends({**body, "status": status}) == []
