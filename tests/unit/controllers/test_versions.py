"""Issue 13 item 4 in the FineTuneJob controller: a run writes to paths of its own (a recreated job neither resumes
nor overwrites another run's files), a produced Adapter is not owned by the job, and a job publishes a version
of an Adapter it did not create only when spec.output.allowExistingAdapter says so."""

from __future__ import annotations

import json

import yaml

from loraplane.api import FineTuneJob
from loraplane.api.keys import FINETUNEJOB_LABEL, PRODUCED_BY_ANNOTATION
from loraplane.api.reasons import Reason
from loraplane.api.wire.trainer import TerminationMessage
from loraplane.builders import finetunejob as ftj_builders
from loraplane.builders.settings import BuildSettings
from loraplane.controllers.finetunejob import FineTuneJobController, FineTuneJobFacts, run_state
from test_controllers import context

UID_1 = "11111111-aaaa-4aaa-8aaa-000000000001"
UID_2 = "22222222-bbbb-4bbb-8bbb-000000000002"


def _ftj(uid: str, **output) -> tuple[dict, FineTuneJob]:
    body = {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": uid, "generation": 1},
            "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "/d.jsonl"},
                     "output": {"adapterName": "a", **output}}}
    return body, FineTuneJob.model_validate(body)


def _config_output(plan) -> str:
    cm = next(m for stage in plan.children for m in stage if m["kind"] == "ConfigMap")
    return yaml.safe_load(cm["data"][ftj_builders.CONFIG_KEY])["spec"]["output"]["uri"]


def _adapter(producer: str | None, job: str = "j") -> dict:
    meta = {"name": "a", "namespace": "ns", "labels": {FINETUNEJOB_LABEL: job} if producer else {}}
    if producer:
        meta["annotations"] = {PRODUCED_BY_ANNOTATION: producer}
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter", "metadata": meta,
            "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "s3://b/j/run-11111111"}, "version": "1"}}


def test_a_recreated_job_writes_to_its_own_paths_and_the_same_run_keeps_its_own():
    """Before: both runs wrote (and checkpointed) at spec.output.uri itself, so the second resumed the first's
    checkpoints and overwrote the artifact Adapter version 1 points at."""
    ctl = FineTuneJobController(context())
    for output in ({"uri": "s3://bucket/adapters/a"}, {}):
        body1, ftj1 = _ftj(UID_1, **output)
        body2, ftj2 = _ftj(UID_2, **output)
        first = _config_output(ctl.plan(FineTuneJobFacts(body1, ftj1, run=run_state(ftj1, None, []))))
        second = _config_output(ctl.plan(FineTuneJobFacts(body2, ftj2, run=run_state(ftj2, None, []))))
        assert first.endswith("/run-11111111") and second.endswith("/run-22222222")
        assert first.rsplit("/", 1)[0] == second.rsplit("/", 1)[0] == ftj_builders.output_root(ftj1, BuildSettings())
        # the same run (a preempted pod's successor, an operator restart) renders the same location
        again = _config_output(ctl.plan(FineTuneJobFacts(body1, ftj1, run=run_state(ftj1, None, []))))
        assert again == first


def test_a_run_keeps_the_location_it_was_accepted_with():
    """A run started by an operator without run folders keeps its path (its checkpoints are there): no
    SpecImmutable, the config is not rewritten to a new location."""
    body, ftj = _ftj(UID_1, uri="pvc://adapters/a")
    accepted = ftj_builders.trainer_config(ftj, BuildSettings(), output="pvc://adapters/a")["spec"]
    # as an older operator wrote it: without the fields added since
    del accepted["output"]["allowExistingAdapter"]
    plan = FineTuneJobController(context()).plan(FineTuneJobFacts(
        {**body, "status": {"phase": "Running"}}, ftj, accepted_spec=accepted, run=run_state(ftj, None, []),
        job_exists=True))
    assert _config_output(plan) == "pvc://adapters/a"
    assert plan.status["conditions"][0]["reason"] != Reason.SpecImmutable
    assert plan.children


def test_a_job_does_not_start_into_an_adapter_it_did_not_create():
    ctl = FineTuneJobController(context())
    for existing, made_by in ((_adapter(None), "by hand"), (_adapter("other-uid", "old-job"), "FineTuneJob old-job")):
        body, ftj = _ftj(UID_2)
        plan = ctl.plan(FineTuneJobFacts(body, ftj, run=run_state(ftj, None, []), existing_adapter=existing))
        assert plan.children == []
        ready = plan.status["conditions"][0]
        assert (ready["status"], ready["reason"]) == ("False", Reason.AdapterExists)
        assert made_by in ready["message"] and "allowExistingAdapter" in ready["message"]
    # opted in: it runs
    body, ftj = _ftj(UID_2, allowExistingAdapter=True)
    plan = ctl.plan(FineTuneJobFacts(body, ftj, run=run_state(ftj, None, []), existing_adapter=_adapter(None)))
    assert plan.children and plan.status["conditions"][0]["reason"] == Reason.Pending
    # its own Adapter (an operator restart after it was written): no refusal
    body, ftj = _ftj(UID_2)
    plan = ctl.plan(FineTuneJobFacts(body, ftj, run=run_state(ftj, None, []), existing_adapter=_adapter(UID_2)))
    assert plan.children


def _succeeded(ftj):
    result = TerminationMessage.model_validate({"reason": "Succeeded", "artifact": {
        "uri": "s3://b/j/run-22222222", "sha256": "c" * 64}})
    job = {"spec": {}, "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    pod = {"metadata": {"name": "p", "creationTimestamp": "t"},
           "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 0, "message": json.dumps(result.to_json())}}}]}}
    return run_state(ftj, job, [pod])


def test_an_adapter_that_appeared_during_the_run_is_not_bumped_and_the_artifact_is_kept():
    body, ftj = _ftj(UID_2)
    plan = FineTuneJobController(context()).plan(FineTuneJobFacts(
        {**body, "status": {"phase": "Running"}}, ftj, run=_succeeded(ftj), existing_adapter=_adapter(None),
        job_exists=True, now="2026-01-01T00:00:00Z"))
    assert plan.adapter is None
    assert plan.status["phase"] == "Succeeded" and "adapterRef" not in plan.status
    assert plan.status["artifact"] == {"uri": "s3://b/j/run-22222222", "sha256": "c" * 64}
    ready = plan.status["conditions"][0]
    assert ready["reason"] == Reason.AdapterExists and "s3://b/j/run-22222222" in ready["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", Reason.AdapterExists)]


def test_the_produced_adapter_has_no_owner_and_names_its_run():
    """Before: an ownerReference to the job, so deleting (or pruning) the FineTuneJob garbage-collected the served
    Adapter."""
    body, ftj = _ftj(UID_2, allowExistingAdapter=True)
    existing = {**_adapter("other-uid", "old-job")}
    existing["metadata"]["ownerReferences"] = [{"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
                                                "name": "old-job", "uid": "other-uid"}]
    plan = FineTuneJobController(context()).plan(FineTuneJobFacts(
        {**body, "status": {"phase": "Running"}}, ftj, run=_succeeded(ftj), existing_adapter=existing,
        job_exists=True, now="2026-01-01T00:00:00Z"))
    manifest = plan.adapter.manifest
    assert "ownerReferences" not in manifest["metadata"]
    assert manifest["spec"]["version"] == "2" and manifest["spec"]["source"]["uri"] == "s3://b/j/run-22222222"
    assert plan.adapter.provenance["fineTuneJob"] == "j" and plan.adapter.provenance["fineTuneJobUid"] == UID_2


def test_a_change_of_the_named_adapter_wakes_the_job_it_blocked():
    """A job refused with AdapterExists goes on once that Adapter is deleted: the Adapter's change schedules every
    job of the namespace naming it (the refused job's Adapter carries no label of it)."""
    ctl = FineTuneJobController(context())
    scheduled = []
    ctl.schedule = lambda key, delay=None: scheduled.append(key)
    body, _ = _ftj(UID_2)
    ctl.store.put(body)
    ctl.store.put({**body, "metadata": {**body["metadata"], "name": "other"},
                   "spec": {**body["spec"], "output": {"adapterName": "b"}}})
    ctl.on_change("Adapter", _adapter(None), None)
    assert scheduled == [("ns", "j")]


def test_the_refusal_shows_only_where_it_blocks():
    """A running job keeps its Running/Pending condition while a foreign Adapter appears (it is re-checked on
    success); a failed job keeps its failure."""
    body, ftj = _ftj(UID_2)
    running = FineTuneJobController(context()).plan(FineTuneJobFacts(
        {**body, "status": {"phase": "Running"}}, ftj, run=run_state(ftj, {"spec": {}, "status": {}}, []),
        existing_adapter=_adapter(None), job_exists=True))
    assert running.status["conditions"][0]["reason"] == Reason.Pending and running.children
    failed = FineTuneJobController(context()).plan(FineTuneJobFacts(
        {**body, "status": {"phase": "Failed", "failure": {"reason": "OOMKilled", "message": "m"}}}, ftj, run=None,
        existing_adapter=_adapter(None)))
    assert failed.status["conditions"][0]["reason"] == "OOMKilled"
