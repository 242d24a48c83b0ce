"""spec.evaluation's plumbing through the operator, without a cluster: the served version reaches the trainer's
config, the evaluation set is mounted, and the trainer's scores land in FineTuneJob status.evaluation and the
Adapter's status.provenance.evaluation (the fields the rollout gates read)."""

from __future__ import annotations

import asyncio
import copy
import json

from loraplane.api import FineTuneJob
from loraplane.api.evaluation import EvaluationResult, EvaluationScores
from loraplane.api.keys import PRODUCED_BY_ANNOTATION
from loraplane.api.wire.trainer import PREVIOUS_VERSION_KEY, TerminationMessage
from loraplane.builders import finetunejob as ftj_builders
from loraplane.builders.settings import BuildSettings
from loraplane.controllers.finetunejob import FineTuneJobController, FineTuneJobFacts, run_state
from unit.controllers.test_controllers import FakeKube, context

BODY = {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"baseModel": {"name": "org/base"},
                 "dataset": {"uri": "pvc://data/train.jsonl", "configMapRef": None, "validationSplit": 0.1},
                 "output": {"adapterName": "a", "allowExistingAdapter": True},
                 "evaluation": {"dataset": {"configMapRef": {"name": "evalset", "key": "eval.jsonl"}},
                                "primaryMetric": "rouge_l"}}}
BODY["spec"]["dataset"].pop("configMapRef")
FTJ = FineTuneJob.model_validate(BODY)
SERVED = {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
          "metadata": {"name": "a", "namespace": "ns", "uid": "au", "annotations": {PRODUCED_BY_ANNOTATION: "old"}},
          "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "pvc://store/ns/j/run-old"}, "version": "4"},
          "status": {"version": "4", "artifact": {"uri": "pvc://store/ns/j/run-old", "sha256": "d" * 64}}}
RESULT = EvaluationResult(
    primary_metric="rouge_l", score=0.91, base_score=0.18, previous_version="4",
    candidate=EvaluationScores(metrics={"rouge_l": 0.91, "eval_loss": 0.3}, examples=16),
    base=EvaluationScores(metrics={"rouge_l": 0.18, "eval_loss": 6.2}, examples=16),
    previous=EvaluationScores(metrics={"rouge_l": 0.5, "eval_loss": 1.1}, examples=16))


def config_of(plan) -> dict:
    cm = next(m for stage in plan.children for m in stage if m["kind"] == "ConfigMap")
    return json.loads(cm["data"][ftj_builders.CONFIG_KEY])


def test_the_served_version_reaches_the_trainer_config():
    ctl = FineTuneJobController(context())
    plan = ctl.plan(FineTuneJobFacts(BODY, FTJ, run=run_state(FTJ, None, []), existing_adapter=SERVED))
    assert config_of(plan)[PREVIOUS_VERSION_KEY] == {"uri": "pvc://store/ns/j/run-old", "version": "4",
                                                     "sha256": "d" * 64}
    # Not the spec: the accepted spec (immutability) and the Job's pod template do not change with the Adapter.
    assert PREVIOUS_VERSION_KEY not in plan.spec
    jobs = [m for stage in plan.children for m in stage if m["kind"] == "Job"]
    other = copy.deepcopy(SERVED)
    other["status"]["artifact"]["uri"] = "s3://elsewhere/v5"
    again = ctl.plan(FineTuneJobFacts(BODY, FTJ, run=run_state(FTJ, None, []), existing_adapter=other))
    assert [m for stage in again.children for m in stage if m["kind"] == "Job"] == jobs


def test_no_previous_version_without_one_to_score():
    unknown = copy.deepcopy(SERVED)
    del unknown["status"]["artifact"]
    own = copy.deepcopy(SERVED)
    own["metadata"]["annotations"][PRODUCED_BY_ANNOTATION] = "u"
    off = FineTuneJob.model_validate({**BODY, "spec": {**BODY["spec"], "evaluation": {
        **BODY["spec"]["evaluation"], "comparePrevious": False}}})
    no_eval = FineTuneJob.model_validate({**BODY, "spec": {k: v for k, v in BODY["spec"].items()
                                                           if k != "evaluation"}})
    assert ftj_builders.previous_version(FTJ, None) is None
    assert ftj_builders.previous_version(FTJ, unknown) is None        # no artifact URI known yet
    assert ftj_builders.previous_version(FTJ, own) is None            # this job's own output
    assert ftj_builders.previous_version(off, SERVED) is None
    assert ftj_builders.previous_version(no_eval, SERVED) is None
    assert PREVIOUS_VERSION_KEY not in ftj_builders.trainer_config(FTJ, BuildSettings())


def test_the_evaluation_set_is_mounted_where_the_trainer_reads_it():
    pod = ftj_builders.job(FTJ, BuildSettings())["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/data/evalset"]["readOnly"]
    assert {"name": "evaluation-dataset", "configMap": {"name": "evalset"}} in pod["volumes"]
    by_uri = FineTuneJob.model_validate({**BODY, "spec": {**BODY["spec"], "evaluation": {
        "dataset": {"uri": "pvc://evaldata/e.jsonl"}}}})
    pod = ftj_builders.job(by_uri, BuildSettings())["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims["evaldata"] is True


def succeeded_pod(result: TerminationMessage) -> tuple[dict, dict]:
    job = {"spec": {}, "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    pod = {"metadata": {"name": "p", "creationTimestamp": "t"},
           "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 0, "message": json.dumps(result.to_json())}}}]}}
    return job, pod


def test_the_scores_go_to_the_job_status_and_the_adapter_provenance():
    result = TerminationMessage(reason="Succeeded", artifact={"uri": "pvc://store/ns/j/run-u", "sha256": "c" * 64},
                                evaluation=RESULT)
    job, pod = succeeded_pod(result)
    kube = FakeKube()
    ctl = FineTuneJobController(context(kube))
    body = {**BODY, "status": {"phase": "Running"}}
    plan = ctl.plan(FineTuneJobFacts(body, FTJ, run=run_state(FTJ, job, [pod]), existing_adapter=SERVED,
                                     job_exists=True, now="2026-01-01T00:00:00Z"))
    assert plan.status["evaluation"] == RESULT.wire()
    assert plan.status["evaluation"]["score"] == 0.91 and plan.status["evaluation"]["baseScore"] == 0.18
    assert plan.adapter.provenance["evaluation"] == RESULT.wire()
    assert "evaluation rouge_l: adapter 0.91, base 0.18, previous 4 0.5" in plan.events[0].message
    asyncio.run(ctl.execute(plan))
    ((kind, name, patch),) = [p for p in kube.status_patches if p[0] == "Adapter"]
    assert (kind, name) == ("Adapter", "a") and patch["provenance"]["evaluation"] == RESULT.wire()
    ((_, _, ftj_patch),) = [p for p in kube.status_patches if p[0] == "FineTuneJob"]
    assert ftj_patch["evaluation"]["candidate"]["metrics"]["rouge_l"] == 0.91


def test_a_run_without_evaluation_writes_none():
    job, pod = succeeded_pod(TerminationMessage(reason="Succeeded", artifact={"uri": "pvc://store/x"}))
    plan = FineTuneJobController(context()).plan(FineTuneJobFacts(
        {**BODY, "status": {"phase": "Running"}}, FTJ, run=run_state(FTJ, job, [pod]), now="t"))
    assert "evaluation" not in plan.status and "evaluation" not in plan.adapter.provenance
