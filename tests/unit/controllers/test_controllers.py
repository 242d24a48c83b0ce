"""The controllers' plan step without a cluster, and the runtime machinery (kube/workqueue, kube/apply) with a
scripted API client. MOCK: FakeKube records writes and answers GETs from a dict; no API server is involved.
The same code runs against the real API server in test_operator_apiserver.py."""

from __future__ import annotations

import ast
import asyncio
import json

import pytest

from loraplane.api import Adapter, FineTuneJob, ModelRoute
from loraplane.api.conditions import ConditionType
from loraplane.api.keys import HASH_ANNOTATION
from loraplane.api.reasons import Reason
from loraplane.builders import finetunejob as ftj_builders
from loraplane.builders.resolution import Verdict
from loraplane.builders.settings import BuildSettings
from loraplane.controllers.adapter import AdapterController, AdapterFacts
from loraplane.controllers.base import Context, Stores
from loraplane.controllers.finetunejob import FineTuneJobController, FineTuneJobFacts, artifact_of, run_state
from loraplane.controllers.modelroute import ModelRouteController, ModelRouteFacts
from loraplane.kube.apply import Applier
from loraplane.kube.events import EventRecorder
from loraplane.kube.workqueue import WorkQueue
from loraplane.api.wire.trainer import TerminationMessage
from support.paths import ROOT

PKG = ROOT / "operator" / "loraplane"


class FakeKube:
    """Answers GETs from `objects`; records applies, patches and Events."""

    def __init__(self, objects: dict | None = None):
        self.objects = objects or {}
        self.gets, self.applied, self.status_patches, self.events = [], [], [], []
        self.created: list[dict] = []

    async def create_if_absent(self, manifest):
        self.created.append(manifest)
        return True

    async def get(self, api_version, kind, namespace, name):
        self.gets.append((kind, name))
        return self.objects.get((kind, name))

    async def apply(self, manifest, result=True):
        self.applied.append(manifest)
        return {**manifest, "metadata": {**manifest["metadata"], "uid": "new-uid"}}

    async def patch_status(self, api_version, kind, namespace, name, patch):
        self.status_patches.append((kind, name, patch))

    async def post_event(self, obj, type_, reason, message, now):
        self.events.append((type_, reason, message))


def context(kube=None) -> Context:
    kube = kube or FakeKube()
    return Context(kube=kube, applier=Applier(kube), events=EventRecorder(kube), build=BuildSettings(),
                   stores=Stores())


FTJ_BODY = {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "/d.jsonl"},
                     "output": {"adapterName": "a"}}}
FTJ = FineTuneJob.model_validate(FTJ_BODY)


def test_a_new_finetunejob_plans_its_children_and_a_pending_status():
    ctl = FineTuneJobController(context())
    plan = ctl.plan(FineTuneJobFacts(FTJ_BODY, FTJ, run=run_state(FTJ, None, [])))
    assert [m["kind"] for stage in plan.children for m in stage] == [
        m["kind"] for m in ftj_builders.children(FTJ, BuildSettings())]
    assert plan.fresh and plan.status["phase"] == "Pending"
    ready = plan.status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "Pending")
    assert plan.adapter is None and plan.events[0].reason == "Pending"


def test_a_changed_immutable_field_is_refused_and_no_children_are_planned():
    body = {**FTJ_BODY, "status": {"phase": "Running"}}
    accepted = {**ftj_builders.trainer_config(FTJ, BuildSettings())["spec"], "baseModel": {"name": "org/other"}}
    plan = FineTuneJobController(context()).plan(
        FineTuneJobFacts(body, FTJ, accepted_spec=accepted, run=run_state(FTJ, None, [])))
    assert plan.children == []
    ready = plan.status["conditions"][0]
    assert ready["reason"] == Reason.SpecImmutable and "spec.baseModel" in ready["message"]
    assert [e.reason for e in plan.events] == ["Pending"]  # the phase change is the Event of this pass


def test_success_plans_the_adapter_from_the_termination_message_only():
    result = TerminationMessage.model_validate({"reason": "Succeeded", "artifact": {"uri": "s3://b/a",
                                                                                    "sha256": "c" * 64}})
    assert artifact_of(result, "pvc://x/y") == ("s3://b/a", "c" * 64)
    # Other spellings of the digest are not part of the message: only artifact.uri/sha256 count.
    legacy = TerminationMessage.parse(json.dumps({"reason": "Succeeded", "artifactUri": "s3://b/a",
                                                  "artifactSha256": "c" * 64}))
    assert artifact_of(legacy, "pvc://x/y") == ("pvc://x/y", None)
    job = {"spec": {}, "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    pod = {"metadata": {"name": "p", "creationTimestamp": "t"},
           "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 0, "message": json.dumps(result.to_json())}}}]}}
    body = {**FTJ_BODY, "status": {"phase": "Running"}}
    plan = FineTuneJobController(context()).plan(
        FineTuneJobFacts(body, FTJ, run=run_state(FTJ, job, [pod]), now="2026-01-01T00:00:00Z"))
    assert plan.adapter.apply and plan.adapter.created
    assert plan.adapter.manifest["spec"]["source"] == {"uri": "s3://b/a", "sha256": "c" * 64}
    assert plan.status["adapterRef"] == {"name": "a", "version": "1"}
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "Succeeded")]


ROUTE_BODY = {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
              "metadata": {"name": "r", "namespace": "ns", "uid": "ru", "generation": 3},
              "spec": {"baseModel": {"name": "org/base"}, "routes": [{"name": "m", "backends": [{"adapter": "a"}]}]}}
ROUTE = ModelRoute.model_validate(ROUTE_BODY)
ADAPTER = Adapter.model_validate({"kind": "Adapter", "metadata": {"name": "a", "namespace": "ns"},
                                  "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "s3://b/a"},
                                           "version": "1", "rank": 8}})


def route_controller(rejected=None) -> ModelRouteController:
    return ModelRouteController(context(), rejections=lambda ns: rejected or {}, reselected=lambda key: None)


def test_route_plan_renders_children_once():
    ctl = route_controller()
    plan = ctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER]))
    # A compatible selection is nothing the Adapter reads of the route (test_reconcile_costs: table_full).
    assert plan.children and plan.fresh and plan.selected["a"].compatible and plan.reselected == []
    table = next(m for m in plan.children[0] if m["kind"] == "ConfigMap")
    assert [a["adapter"] for a in json.loads(next(iter(table["data"].values())))["adapters"]] == ["a"]
    again = ctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER], last_applied=plan.applied_as,
                                     last_selected=plan.selected))
    assert again.children == [] and again.reselected == []  # same spec, same table: nothing to render


def test_route_plan_is_not_ready_until_the_deployment_has_the_current_spec():
    """The reconcile that applies a new engine spec still sees the previous Deployment in its store (rolled out,
    ready): its status must not say Ready at the new generation (issue 13, item 6). The hash of the Deployment
    it applies is remembered for later reconciles that render nothing."""
    ctl = route_controller()
    previous = {"metadata": {"generation": 1, "annotations": {HASH_ANNOTATION: "previous"}}, "spec": {"replicas": 1},
                "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1}}
    plan = ctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER], deployment=previous))
    engine = next(m for stage in plan.children for m in stage if m["kind"] == "Deployment"
                  and m["metadata"]["name"].endswith("-engine"))
    assert plan.engine_hash == engine["metadata"]["annotations"][HASH_ANNOTATION]
    ready = next(c for c in plan.status["conditions"] if c["type"] == ConditionType.Ready)
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("False", Reason.Progressing, 3)
    later = ctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER], deployment=previous,
                                     last_applied=plan.applied_as, engine_hash=plan.engine_hash))
    assert later.children == [] and later.engine_hash == plan.engine_hash
    ready = next(c for c in later.status["conditions"] if c["type"] == ConditionType.Ready)
    assert ready["reason"] == Reason.Progressing


def test_route_plan_leaves_out_a_rejected_adapter_and_refuses_a_new_base_model():
    rejected = {"a": Verdict(False, Reason.SpecImmutable, "changed")}
    plan = route_controller().plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER], rejected=rejected))
    assert plan.status["models"][0]["backends"][0]["reason"] == Reason.SpecImmutable
    body = {**ROUTE_BODY, "status": {"phase": "Ready"}}
    plan = route_controller().plan(ModelRouteFacts(body, ROUTE, adapters=[ADAPTER],
                                                   accepted_base=("org/old", None)))
    assert plan.children == [] and plan.accepted_base is None
    ready = next(c for c in plan.status["conditions"] if c["type"] == ConditionType.Ready)
    assert ready["reason"] == Reason.SpecImmutable and "org/old@-" in ready["message"]


def test_adapter_plan_rejects_a_changed_base_model_and_execute_tells_the_routes():
    changed = []
    ctl = AdapterController(context())
    ctl.connect(rejections_changed=changed.append)
    body = {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
            "metadata": {"name": "a", "namespace": "ns", "generation": 2},
            "status": {"acceptedBaseModel": {"name": "org/old"}}}
    plan = ctl.plan(AdapterFacts(body, ADAPTER, routes=[ROUTE]))
    assert plan.rejection.reason == Reason.SpecImmutable and plan.status["phase"] == "Failed"
    asyncio.run(ctl.execute(("ns", "a"), plan))
    assert changed == ["ns"] and ctl.rejections("ns") == {"a": plan.rejection}
    asyncio.run(ctl.execute(("ns", "a"), plan))
    assert changed == ["ns"]  # unchanged: the routes are not told again


def test_workqueue_coalesces_a_burst_and_reruns_a_key_changed_while_running():
    async def main():
        runs, gate = [], asyncio.Event()

        async def reconcile(key):
            runs.append(key)
            if len(runs) == 1:
                await gate.wait()

        q = WorkQueue("Test", reconcile, delay=0.01)
        for _ in range(5):
            q.schedule(("ns", "a"))  # a burst: one run
        await asyncio.sleep(0.05)
        q.schedule(("ns", "a"))      # while it runs: once more afterwards
        q.schedule(("ns", "a"))
        gate.set()
        await asyncio.sleep(0.05)
        await q.idle.wait()
        return runs

    assert asyncio.run(main()) == [("ns", "a")] * 2


def test_applier_writes_only_children_whose_hash_changed():
    def child(h):
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "c", "namespace": "ns", "annotations": {HASH_ANNOTATION: h}}}

    kube = FakeKube({("ConfigMap", "c"): child("h1")})
    applier = Applier(kube)
    assert asyncio.run(applier.ensure([[child("h1")]])) == 0 and kube.gets == [("ConfigMap", "c")]
    assert asyncio.run(applier.ensure([[child("h1")]])) == 0 and len(kube.gets) == 1  # remembered: no GET
    assert asyncio.run(applier.ensure([[child("h2")]])) == 1 and len(kube.applied) == 1
    applier.reset()
    assert applier.epoch == 1 and asyncio.run(applier.ensure([[child("h2")]])) == 1  # re-read: h1 live


def test_controllers_do_not_import_the_manager():
    for path in (PKG / "controllers").glob("*.py"):
        if path.name in ("manager.py", "handlers.py"):  # the wiring and the kopf handlers do
            continue
        imported = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        assert "loraplane.controllers.manager" not in imported, path.name



# ---- issue 13: names at the seams ------------------------------------------------------------------------------

def test_a_route_with_a_malformed_selector_is_invalid_and_adapters_still_reconcile():
    # The selector used to be free-form: `matchLabels: [team]` raised inside the Adapter controller's selector
    # matching, so every Adapter of the namespace failed its reconcile and retried forever with no status.
    ctl = AdapterController(context())
    bad = {**ROUTE_BODY, "metadata": {**ROUTE_BODY["metadata"], "name": "bad"},
           "spec": {**ROUTE_BODY["spec"], "routes": [{"selector": {"matchLabels": ["team"]}}]}}
    ctl.stores.ModelRoute.put(bad)
    ctl.stores.ModelRoute.put(ROUTE_BODY)
    body = {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
            "metadata": {"name": "a", "namespace": "ns", "generation": 1},
            "spec": ADAPTER.spec.wire()}
    ctl.store.put(body)
    facts = ctl.observe(("ns", "a"))
    assert [r.metadata.name for r in facts.routes] == ["r"]  # the invalid route selects nothing
    plan = ctl.plan(facts)
    assert plan.status["routes"] == ["r"] and plan.status["phase"] == "Loading"
    # The route itself shows InvalidSpec naming the field.
    rctl = route_controller()
    rctl.stores.ModelRoute.put(bad)
    rfacts = asyncio.run(rctl.observe(("ns", "bad")))
    ready = rctl.plan(rfacts).status["conditions"][0]
    assert ready["reason"] == Reason.InvalidSpec and "spec.routes[0].selector.matchLabels" in ready["message"]


def test_a_public_name_conflict_shows_on_the_route_naming_both_sources():
    body = {**ROUTE_BODY, "spec": {"baseModel": {"name": "org/base"}, "routes": [
        {"name": "analytics-sql", "backends": [{"base": True}]},
        {"selector": {"matchLabels": {"team": "analytics"}}, "prefix": "analytics-"}]}}
    sql = Adapter.model_validate({**ADAPTER.model_dump(by_alias=True, exclude_none=True),
                                  "metadata": {"name": "sql", "namespace": "ns", "labels": {"team": "analytics"}}})
    pods = [{"metadata": {"name": "p", "annotations": {"loraplane.io/adapters": json.dumps({
        "replica": "p", "route": "r", "generation": 3, "engineReady": True, "updatedAt": "t",
        "adapters": {}})}}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]
    plan = route_controller().plan(ModelRouteFacts(body, ModelRoute.model_validate(body), adapters=[sql],
                                                   deployment={"status": {"readyReplicas": 1, "replicas": 1}},
                                                   pods=pods))
    table = json.loads(next(iter(next(m for m in plan.children[0] if m["kind"] == "ConfigMap")["data"].values())))
    assert [m["name"] for m in table["models"]] == ["analytics-sql"]  # once, the explicit route's
    ready = next(c for c in plan.status["conditions"] if c["type"] == ConditionType.Ready)
    assert ready["status"] == "False" and ready["reason"] == Reason.PublicNameConflict
    assert "routes[0] (analytics-sql)" in ready["message"] and "Adapter sql" in ready["message"]
    assert plan.status["phase"] != "Ready"
    assert any(e.reason == Reason.PublicNameConflict for e in plan.events)


def test_children_of_a_long_named_finetunejob_lead_back_to_it():
    # A 69-character name gives a shortened label value; the controller still finds the job from it.
    long = "j" * 69
    body = {**FTJ_BODY, "metadata": {**FTJ_BODY["metadata"], "name": long}}
    ctl = FineTuneJobController(context())
    ctl.store.put(body)
    job = ftj_builders.job(FineTuneJob.model_validate(body), BuildSettings())
    value = job["metadata"]["labels"]["loraplane.io/finetunejob"]
    assert len(value) <= 63 and value != long
    assert ctl.owner_of_label("ns", value) == long and ctl.owner_of_label("ns", "j") == "j"


def test_a_child_the_api_server_refuses_shows_as_invalid_spec_instead_of_a_retry_loop():
    # The safety net under the builders' naming rules: a 422 on a child used to raise into the work queue, which
    # retried it forever while the owner's status said nothing.
    from loraplane.kube.client import ApiError

    class Refusing(FakeKube):
        async def apply(self, manifest, result=True):
            raise ApiError(422, {"message": f'{manifest["kind"]} "x" is invalid: metadata.labels: Invalid value'},
                           f'apply {manifest["kind"]}/{manifest["metadata"]["name"]}')

    kube = Refusing()
    ctl = FineTuneJobController(context(kube))
    plan = ctl.plan(FineTuneJobFacts(FTJ_BODY, FTJ, run=run_state(FTJ, None, [])))
    asyncio.run(ctl.execute(plan))  # does not raise
    (kind, name, patch), = kube.status_patches
    ready = patch["conditions"][0]
    assert ready["reason"] == Reason.InvalidSpec and "metadata.labels" in ready["message"]
    assert [e[1] for e in kube.events] == [Reason.InvalidSpec]
    rctl = ModelRouteController(context(kube), rejections=lambda ns: {}, reselected=lambda key: None)
    rplan = rctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER]))
    asyncio.run(rctl.execute(("ns", "r"), rplan))
    assert kube.status_patches[-1][:2] == ("ModelRoute", "r")
    assert kube.status_patches[-1][2]["conditions"][0]["reason"] == Reason.InvalidSpec


def test_a_spec_the_policy_refuses_gets_policy_violation_and_no_children():
    """Issue 12, item 6: an image outside the policy (FineTuneJob) or --trust-remote-code (ModelRoute) ends in
    Ready=False PolicyViolation naming the field and the setting; nothing is created. Allowed, it runs."""
    from loraplane.builders.policy import SpecPolicy

    body = {**FTJ_BODY, "spec": {**FTJ_BODY["spec"], "image": "evil.example/miner:1"}}
    job = FineTuneJob.model_validate(body)
    plan = FineTuneJobController(context()).plan(FineTuneJobFacts(body, job, run=run_state(job, None, [])))
    (ready,) = [c for c in plan.status["conditions"] if c["type"] == ConditionType.Ready]
    assert (ready["status"], ready["reason"]) == ("False", Reason.PolicyViolation)
    assert "spec.image" in ready["message"] and "operator.policy.allowedImages" in ready["message"]
    assert not plan.children and [e.reason for e in plan.events] == [Reason.PolicyViolation]

    rbody = {**ROUTE_BODY, "spec": {**ROUTE_BODY["spec"], "engine": {"extraArgs": ["--trust-remote-code"]}}}
    r = ModelRoute.model_validate(rbody)
    plan = route_controller().plan(ModelRouteFacts(rbody, r, adapters=[ADAPTER]))
    (ready,) = [c for c in plan.status["conditions"] if c["type"] == ConditionType.Ready]
    assert (ready["status"], ready["reason"]) == ("False", Reason.PolicyViolation)
    assert "spec.engine.extraArgs[0]" in ready["message"] and "allowTrustRemoteCode" in ready["message"]
    assert not plan.children

    trusting = context()
    trusting.build = BuildSettings(policy=SpecPolicy(allow_trust_remote_code=True))
    ctl = ModelRouteController(trusting, rejections=lambda ns: {}, reselected=lambda key: None)
    plan = ctl.plan(ModelRouteFacts(rbody, r, adapters=[ADAPTER]))
    assert plan.children


def test_the_default_policy_refuses_a_loosened_security_context():
    """No chart operator.policy (BuildSettings' default SpecPolicy): a pod setting that loosens the restricted
    profile still ends in PolicyViolation, with a message that does not send the user to the platform team."""
    body = {**FTJ_BODY, "spec": {**FTJ_BODY["spec"], "pod": {"securityContext": {"runAsUser": 0}}}}
    job = FineTuneJob.model_validate(body)
    plan = FineTuneJobController(context()).plan(FineTuneJobFacts(body, job, run=run_state(job, None, [])))
    (ready,) = [c for c in plan.status["conditions"] if c["type"] == ConditionType.Ready]
    assert (ready["status"], ready["reason"]) == ("False", Reason.PolicyViolation)
    assert "spec.pod.securityContext.runAsUser" in ready["message"] and "platform team" not in ready["message"]
    assert not plan.children
    rbody = {**ROUTE_BODY, "spec": {**ROUTE_BODY["spec"],
                                    "router": {"pod": {"containerSecurityContext": {"privileged": True}}}}}
    plan = route_controller().plan(ModelRouteFacts(rbody, ModelRoute.model_validate(rbody), adapters=[ADAPTER]))
    (ready,) = [c for c in plan.status["conditions"] if c["type"] == ConditionType.Ready]
    assert ready["reason"] == Reason.PolicyViolation and "spec.router.pod.containerSecurityContext.privileged" in \
        ready["message"] and not plan.children


def test_a_finetunejob_never_adopts_or_overwrites_another_owners_child():
    """Issue 13 review p12: a FineTuneJob named `<head>-<hash8>` gets the child names of a long-named one. It must
    neither read the other's Job and pods as its run nor apply over its children: Ready=False NameConflict names
    the other owner, and nothing is written."""
    from loraplane.api import parse

    def ftj_body(name, uid):
        return {**FTJ_BODY, "metadata": {"name": name, "namespace": "ns", "uid": uid, "generation": 1}}

    long_body = ftj_body("team-a-" + "x" * 62, "uid-a")
    a = parse(long_body)
    short_name = ftj_builders.job_name(a).removesuffix("-train")
    b_body = {**ftj_body(short_name, "uid-b"), "status": {"observedGeneration": 1}}
    b = parse(b_body)
    assert ftj_builders.job_name(a) == ftj_builders.job_name(b)   # the names do coincide
    a_job = {"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": ftj_builders.job_name(a), "namespace": "ns", "uid": "job-a",
                          "labels": {"loraplane.io/finetunejob": ftj_builders.owner_label(a.metadata.name)},
                          "ownerReferences": [{"kind": "FineTuneJob", "name": a.metadata.name, "uid": "uid-a",
                                               "controller": True}]},
             "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    kube = FakeKube({("Job", a_job["metadata"]["name"]): a_job})
    ctl = FineTuneJobController(context(kube))
    ctl.stores.Job.put(a_job)
    ctl.store.put(b_body)
    facts = asyncio.run(ctl.observe(("ns", short_name)))
    assert not facts.job_exists and (facts.run is None or facts.run.phase != "Succeeded")
    asyncio.run(ctl.execute(ctl.plan(facts)))
    assert not any(m["kind"] == "Job" for m in kube.applied)
    ready = next(c for _, _, p in kube.status_patches for c in p.get("conditions", []) if c["type"] == "Ready")
    assert ready["reason"] == Reason.NameConflict and a.metadata.name in ready["message"]


def test_the_applier_refuses_a_name_another_owner_holds_even_on_a_fresh_apply():
    from loraplane.kube.apply import NameTaken
    from loraplane.kube.client import ApiError

    mine = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "x", "namespace": "ns", "annotations": {HASH_ANNOTATION: "h"},
        "ownerReferences": [{"kind": "ModelRoute", "name": "me", "uid": "u-me", "controller": True}]}}
    theirs = {**mine, "metadata": {**mine["metadata"], "annotations": {}, "ownerReferences": [
        {"kind": "ModelRoute", "name": "other", "uid": "u-other", "controller": True}]}}

    class Refusing(FakeKube):
        async def apply(self, manifest, result=True):   # what the API server says to a second controller ownerReference
            raise ApiError(422, {"message": "Only one reference can have Controller set to true"}, "apply")

    for kube, fresh in ((FakeKube({("ConfigMap", "x"): theirs}), False),
                        (Refusing({("ConfigMap", "x"): theirs}), True)):
        with pytest.raises(NameTaken, match="ModelRoute other"):
            asyncio.run(Applier(kube).ensure([[mine]], fresh=fresh))
        assert kube.applied == []


def test_a_route_reads_only_the_deployments_it_controls():
    def deployment(name, uid):
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
            "name": name, "namespace": "ns", "ownerReferences": [{"kind": "ModelRoute", "uid": uid,
                                                                   "controller": True}]},
            "status": {"availableReplicas": 1, "readyReplicas": 1}}

    ctl = route_controller()
    ctl.stores.ModelRoute.put(ROUTE_BODY)
    for uid, seen in (("someone-else", False), ("ru", True)):
        ctl.stores.Deployment.put(deployment("r-engine", uid))
        ctl.stores.RouterDeployment.put(deployment("r-router", uid))
        facts = asyncio.run(ctl.observe(("ns", "r")))
        assert (facts.deployment is not None, facts.router_deployment is not None) == (seen, seen)


def test_a_route_resolves_again_only_when_its_spec_its_adapters_or_the_rejections_change(monkeypatch):
    """observe() reuses the route's last resolution while nothing it depends on changed (a pod or Deployment event,
    the route's own status patch, an Adapter status field the resolution does not read, an Adapter it does not
    select), and resolves again when an Adapter it selects (before or after the change) changes in its spec,
    labels or the status fields the resolution reads, on a new generation or a new rejection: matching every
    selector against every Adapter on every reconcile was the largest cost at 1,000 Adapters (issue 17). Only the
    routes an Adapter change concerns are scheduled."""
    from loraplane.builders.resolution import Verdict
    from loraplane.controllers import modelroute as mr

    calls, scheduled = [], []
    real = mr.resolve
    monkeypatch.setattr(mr, "resolve", lambda *a, **k: calls.append(1) or real(*a, **k))
    rejected: dict = {}
    ctl = ModelRouteController(context(), rejections=lambda ns: dict(rejected), reselected=lambda key: None)
    monkeypatch.setattr(ctl, "schedule", lambda key, delay=None: scheduled.append(key))
    clock = [100.0]
    ctl._clock = lambda: clock[0]
    route_body = {**ROUTE_BODY, "metadata": {**ROUTE_BODY["metadata"], "resourceVersion": "1"},
                  "spec": {**ROUTE_BODY["spec"], "routes": [*ROUTE_BODY["spec"]["routes"],
                                                            {"selector": {"matchLabels": {"g": "x"}}}]}}
    rv = iter(range(2, 100))

    def adapter(name, labels=None, status=None):
        return {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "generation": 1,
                             "resourceVersion": str(next(rv)), "labels": labels or {}},
                "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": f"s3://b/{name}"}, "version": "1",
                         "rank": 8}, **({"status": status} if status else {})}

    def put(source, body):   # what the informer does: store it, then report the change
        old = ctl.stores.of(source).put(body)
        ctl.on_change(source, body, old)

    def resolves(change) -> int:
        scheduled.clear()
        before = len(calls)
        change()
        clock[0] += 10   # past any batch of Adapter changes (test_adapter_changes_reach_the_table_in_batches)
        asyncio.run(ctl.observe(("ns", "r")))
        return len(calls) - before

    put("ModelRoute", route_body)
    assert resolves(lambda: put("Adapter", adapter("a"))) == 1 and scheduled == [("ns", "r")]
    pod = {"metadata": {"name": "p", "namespace": "ns", "labels": {"loraplane.io/route": "r"}}}
    assert resolves(lambda: put("EnginePod", pod)) == 0
    assert resolves(lambda: put("ModelRoute", {**route_body, "metadata": {**route_body["metadata"],
                                                                          "resourceVersion": "99"},
                                               "status": {"phase": "Pending"}})) == 0
    assert resolves(lambda: put("Adapter", adapter("a", status={"phase": "Ready"}))) == 0 and not scheduled
    assert resolves(lambda: put("Adapter", adapter("other", {"g": "y"}))) == 0 and not scheduled
    assert resolves(lambda: put("Adapter", adapter("b", {"g": "x"}))) == 1 and scheduled == [("ns", "r")]
    assert resolves(lambda: put("Adapter", adapter("b", {"g": "y"}))) == 1 and scheduled == [("ns", "r")]  # left
    assert resolves(lambda: put("Adapter", adapter("a", status={"phase": "Ready", "servedName": "a--1"}))) == 1
    # status.rollout is read (a held-back version) but not scheduled on: the memo still follows it.
    assert resolves(lambda: put("Adapter", adapter("a", status={"phase": "Ready", "servedName": "a--1",
                                                                 "rollout": {"state": "Stable"}}))) == 1
    assert resolves(lambda: ctl.on_change("Adapter", adapter("a"), None)) == 1   # deleted (or re-created)
    rejected["a"] = Verdict(False, Reason.SpecImmutable, "no")
    assert resolves(lambda: None) == 1                                            # a new rejection
    assert resolves(lambda: put("ModelRoute", {**route_body, "metadata": {**route_body["metadata"], "generation": 4,
                                                                          "resourceVersion": "100"}})) == 1


def test_adapter_changes_reach_the_table_in_batches(monkeypatch):
    """A route re-resolves its table ROUTE_BATCH_SECONDS after the last change of an Adapter it selects, but at
    most ROUTE_BATCH_MAX_SECONDS after the first while changes keep coming; a reconcile in between (a pod, the
    route's own status) keeps the table it has and comes back when the batch is due (issue 17: each table
    version is a ConfigMap write, a status patch and a re-render of the children). A new generation or a new
    rejection re-resolves at once."""
    from loraplane.controllers import modelroute as mr

    calls, later = [], []
    real = mr.resolve
    monkeypatch.setattr(mr, "resolve", lambda *a, **k: calls.append(1) or real(*a, **k))
    rejected: dict = {}
    ctl = ModelRouteController(context(), rejections=lambda ns: dict(rejected), reselected=lambda key: None)
    monkeypatch.setattr(ctl, "schedule", lambda key, delay=None: None)
    monkeypatch.setattr(ctl, "schedule_later", lambda key, delay: later.append(round(delay, 3)))
    clock = [100.0]
    ctl._clock = lambda: clock[0]
    route_body = {**ROUTE_BODY, "metadata": {**ROUTE_BODY["metadata"], "resourceVersion": "1"}}
    ctl.stores.ModelRoute.put(route_body)
    rv = iter(range(2, 1000))

    def change():   # adapter "a" (selected by name) changes its source
        body = {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                "metadata": {"name": "a", "namespace": "ns", "uid": "ua", "generation": 1,
                             "resourceVersion": str(next(rv))},
                "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": f"s3://b/{next(rv)}"}, "rank": 8}}
        ctl.on_change("Adapter", body, ctl.stores.Adapter.put(body))

    def table_uri():
        facts = asyncio.run(ctl.observe(("ns", "r")))
        return [d.uri for d in facts.resolution.table.adapters]

    assert table_uri() == [] and len(calls) == 1            # the first resolution is never held back
    change()
    first = ctl.stores.Adapter.get(("ns", "a"))["spec"]["source"]["uri"]
    clock[0] += 0.1
    assert table_uri() == [] and later == [0.4]              # not due: the table it has, back in 0.4 s
    clock[0] += 0.4
    assert table_uri() == [first] and len(calls) == 2        # due: 0.5 s without a change
    steps = int(mr.ROUTE_BATCH_MAX_SECONDS / 0.4) + 1
    for i in range(steps):                                    # a change every 0.4 s: never 0.5 s of quiet ...
        change()
        clock[0] += 0.4
        table_uri()
        assert len(calls) == (2 if 0.4 * (i + 1) < mr.ROUTE_BATCH_MAX_SECONDS - 1e-9 else 3), i
    assert len(calls) == 3                                    # ... but resolved ROUTE_BATCH_MAX_SECONDS after the first
    change()
    rejected["x"] = mr.Verdict(False, Reason.SpecImmutable, "no")
    assert len(table_uri()) == 1 and len(calls) == 4          # a new rejection: at once


def test_the_route_engine_key_secret_is_created_once_with_a_random_key_and_never_overwritten():
    """Issue 12 item 1 (a): vLLM, the loader and the router share a per-route key from a Secret the operator
    creates: random, generated once (a create that finds it leaves it alone), before the pods that need it."""
    class Exists(FakeKube):
        async def create_if_absent(self, manifest):
            self.created.append(manifest)
            return len(self.created) == 1   # the first create made it; later ones found it

    kube = Exists()
    ctl = ModelRouteController(context(kube), rejections=lambda ns: {}, reselected=lambda key: None)
    plan = ctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER]))
    asyncio.run(ctl.execute(("ns", "r"), plan))
    (secret,) = kube.created
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", "r-engine-key-ru")   # the route's uid
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "ru"
    key = secret["stringData"]["api-key"]
    assert len(key) >= 40 and kube.applied, "the Secret is created before the children are applied"
    # The pods take it from the Secret: vLLM (VLLM_API_KEY = --api-key), the loader and the router.
    pods = [m["spec"]["template"]["spec"] for m in kube.applied if m["kind"] == "Deployment"]
    refs = {c["name"]: e["valueFrom"]["secretKeyRef"] for p in pods for c in p["containers"]
            for e in c.get("env", []) if e["name"] == "VLLM_API_KEY"}
    assert set(refs) == {"vllm", "adapter-loader", "router"}
    assert all(r == {"name": "r-engine-key-ru", "key": "api-key"} for r in refs.values())
    # A re-render (a resync, a new table) does not create it again; another route gets its own random key.
    again = ctl.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER], applier_epoch=1))
    asyncio.run(ctl.execute(("ns", "r"), again))
    assert len(kube.created) == 1
    other = ModelRouteController(context(kube), rejections=lambda ns: {}, reselected=lambda key: None)
    asyncio.run(other.execute(("ns", "r"), other.plan(ModelRouteFacts(ROUTE_BODY, ROUTE, adapters=[ADAPTER]))))
    assert kube.created[1]["stringData"]["api-key"] != key   # a new process tries with a new random key...
    # ...and the create finding the Secret leaves the stored one unchanged (KubeClient.create_if_absent: 409).


class SecretsKube(FakeKube):
    """create_if_absent against a set of existing Secret names: 201 once per name, 409 after."""

    def __init__(self, existing=()):
        super().__init__()
        self.names = set(existing)

    async def create_if_absent(self, manifest):
        self.created.append(manifest)
        name = manifest["metadata"]["name"]
        if name in self.names:
            return False
        self.names.add(name)
        return True


def young_route(uid: str) -> dict:
    """ROUTE_BODY as the API server would show it just after `kubectl apply` (created now, with `uid`)."""
    from datetime import datetime, timezone

    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {**ROUTE_BODY, "metadata": {**ROUTE_BODY["metadata"], "uid": uid, "creationTimestamp": created}}


def test_a_restarted_operator_does_not_create_a_young_routes_engine_key_again_and_again():
    """Issue 17: a restarted operator (fresh memory) whose engine key create finds the route's own Secret (409)
    created it again every ENGINE_KEY_RETRY_SECONDS while the route was younger than 10 minutes (a write per
    route per 30 s, the benchmark's idle writes): the operator may not read Secrets, and the Secret's name
    (`<route>-engine-key`) was also a deleted predecessor's. The name now carries the route's uid, so a 409 is
    the route's own Secret; and a restarted operator whose engine Deployment (the route's, by uid) already takes
    its key from that Secret does not create it at all."""
    from loraplane.controllers.modelroute import ENGINE_KEY_RETRY_SECONDS

    body = young_route("ru")
    now = {"mono": 1000.0}
    first = SecretsKube()
    ctl = ModelRouteController(context(first), rejections=lambda ns: {}, reselected=lambda key: None)
    ctl._clock = lambda: now["mono"]
    ctl.stores.ModelRoute.put(body)
    asyncio.run(ctl.reconcile(("ns", "r")))
    assert [m["metadata"]["name"] for m in first.created] == ["r-engine-key-ru"]
    deployment = next(m for m in first.applied if m["kind"] == "Deployment"
                      and m["metadata"]["name"] == "r-engine")

    # A restarted operator before its informers show the Deployment: one create, 409 (the route's own Secret,
    # since no other route's has its uid in the name), then never again: not on later reconciles, nor resyncs.
    kube = SecretsKube(first.names)
    restarted = ModelRouteController(context(kube), rejections=lambda ns: {}, reselected=lambda key: None)
    restarted._clock = lambda: now["mono"]
    scheduled = []
    restarted.schedule = lambda key, delay=None: scheduled.append((key, delay))
    restarted.stores.ModelRoute.put(body)
    for epoch in range(4):
        now["mono"] += ENGINE_KEY_RETRY_SECONDS
        restarted.ctx.applier.epoch = epoch   # a resync re-renders the children
        asyncio.run(restarted.reconcile(("ns", "r")))
    assert len(kube.created) == 1 and scheduled == []

    # A restarted operator whose store holds the route's engine Deployment, which takes its key from the
    # Secret: the Secret was made before the Deployment was applied; no create at all.
    kube = SecretsKube(first.names)
    again = ModelRouteController(context(kube), rejections=lambda ns: {}, reselected=lambda key: None)
    again.stores.ModelRoute.put(body)
    again.stores.Deployment.put(deployment)
    for _ in range(3):
        now["mono"] += ENGINE_KEY_RETRY_SECONDS
        asyncio.run(again.reconcile(("ns", "r")))
    assert kube.created == []


def test_a_recreated_route_gets_its_own_engine_key_secret_not_its_predecessors():
    """`kubectl delete modelroute r && kubectl apply -f r.yaml`: the old route's Secret (and Deployment) may still
    await garbage collection. The new route's Secret has another name (its uid), so its create makes it at
    once (201) and its pods never take the old key; the old Deployment (another owner uid) does not count as
    the new route's. A pod waiting on the route's Secret missing (someone deleted it) re-creates it, at most
    every ENGINE_KEY_RETRY_SECONDS; a pod missing another Secret does not."""
    from loraplane.controllers.modelroute import ENGINE_KEY_RETRY_SECONDS

    old = young_route("old-uid")
    first = SecretsKube()
    ctl = ModelRouteController(context(first), rejections=lambda ns: {}, reselected=lambda key: None)
    ctl.stores.ModelRoute.put(old)
    asyncio.run(ctl.reconcile(("ns", "r")))
    old_deployment = next(m for m in first.applied if m["kind"] == "Deployment"
                          and m["metadata"]["name"] == "r-engine")

    now = {"mono": 1000.0}
    kube = SecretsKube(first.names)          # the old route's Secret is still there
    ctl = ModelRouteController(context(kube), rejections=lambda ns: {}, reselected=lambda key: None)
    ctl._clock = lambda: now["mono"]
    scheduled = []
    ctl.schedule = lambda key, delay=None: scheduled.append((key, delay))
    ctl.stores.ModelRoute.put(young_route("new-uid"))
    ctl.stores.Deployment.put(old_deployment)  # awaiting garbage collection
    asyncio.run(ctl.reconcile(("ns", "r")))
    assert [m["metadata"]["name"] for m in kube.created] == ["r-engine-key-new-uid"]
    assert kube.names == {"r-engine-key-old-uid", "r-engine-key-new-uid"}
    pods = [m["spec"]["template"]["spec"] for m in kube.applied if m["kind"] == "Deployment"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for p in pods for c in p["containers"]
            for e in c.get("env", []) if e["name"] == "VLLM_API_KEY"} == {"r-engine-key-new-uid"}

    # Someone deletes the Secret: a pod of the route waits on it; the operator creates it again, rate-limited.
    kube.names.discard("r-engine-key-new-uid")
    ctl.stores.EnginePod.put({"metadata": {"name": "r-engine-1", "namespace": "ns", "labels": {"loraplane.io/route": "r"},
                                           "creationTimestamp": "2026-01-01T00:00:00Z"},
                              "status": {"containerStatuses": [{"name": "vllm", "state": {"waiting": {
                                  "reason": "CreateContainerConfigError",
                                  "message": 'secret "r-engine-key-new-uid" not found'}}}]}})
    asyncio.run(ctl.reconcile(("ns", "r")))
    assert len(kube.created) == 2 and "r-engine-key-new-uid" in kube.names
    assert scheduled == [(("ns", "r"), ENGINE_KEY_RETRY_SECONDS)]   # looked at again: the pod may still wait
    ready = next(c for c in kube.status_patches[-1][2]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == Reason.ContainerConfig and 'secret "r-engine-key-new-uid" not found' in ready["message"]
    now["mono"] += 5
    asyncio.run(ctl.reconcile(("ns", "r")))
    assert len(kube.created) == 2                     # bounded: not again within ENGINE_KEY_RETRY_SECONDS
    now["mono"] += ENGINE_KEY_RETRY_SECONDS
    asyncio.run(ctl.reconcile(("ns", "r")))
    assert len(kube.created) == 3                     # still waiting: tried again (409: it is there)
    # A pod missing another Secret (the user's) is shown, but does not make the operator create its key again.
    now["mono"] += ENGINE_KEY_RETRY_SECONDS
    pod = ctl.stores.EnginePod.get(("ns", "r-engine-1"))
    pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"] = 'secret "users-secret" not found'
    asyncio.run(ctl.reconcile(("ns", "r")))
    assert len(kube.created) == 3


async def test_a_job_whose_pod_is_refused_shows_it_once_per_recheck_not_in_a_loop():
    """Issue 12: a trainer Job whose pod the API server refuses (Pod Security admission) writes that only in a
    FailedCreate Event; the controller reads it into Ready (PodsRefused) and looks again later. The look-again
    must be a timer: scheduling the key from its own reconcile re-runs it at once (the queue's rule), a hot
    loop of reconciles and Event lists."""
    refusal = ('Error creating: pods "j-" is forbidden: PodSecurityPolicy: unable to admit pod: '
               '[spec.containers[0].securityContext.runAsNonRoot: Invalid value: false: must be true]')

    class Kube(FakeKube):
        lists: list = []

        async def list(self, api_version, kind, namespace=None, label_selector=None, *, field_selector=None):
            self.lists.append((kind, field_selector))
            return [{"reason": "FailedCreate", "message": refusal, "lastTimestamp": "2026-01-01T00:00:00Z"}]

    kube = Kube()
    ctl = FineTuneJobController(context(kube))
    ctl.store.put(FTJ_BODY)
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": ftj_builders.job_name(FTJ), "namespace": "ns", "uid": "job-uid",
                        "ownerReferences": [{"uid": "u", "controller": True, "kind": "FineTuneJob", "name": "j",
                                             "apiVersion": "loraplane.io/v1alpha1"}]},
           "spec": {}, "status": {"active": 0}}
    ctl.stores.Job.put(job)
    ctl.schedule(("ns", "j"))
    await asyncio.sleep(0.6)
    await ctl.queue.stop()
    assert 1 <= len(Kube.lists) <= 2, f"{len(Kube.lists)} Event lists in 0.6 s"
    assert Kube.lists[0] == ("Event", "involvedObject.uid=job-uid,reason=FailedCreate")
    ready = [c for _, _, p in kube.status_patches for c in (p.get("status") or p).get("conditions") or []
             if c["type"] == "Ready"]
    assert ready and ready[-1]["reason"] == "PodsRefused" and "runAsNonRoot" in ready[-1]["message"]


def test_applier_creates_a_role_before_the_binding_that_names_it():
    """Issue 11, found by the e2e install (the operator with the chart's RBAC, no `bind` verb): Role and
    RoleBinding of one stage were applied concurrently, and the API server's escalation check refused the binding
    with HTTP 404 (`roles... "x-trainer" not found`) whenever it arrived first; the reconcile failed and retried.
    This fake plays that check: a binding applied while its Role is still being created fails."""
    from loraplane.kube.client import ApiError

    class RbacKube(FakeKube):
        def __init__(self):
            super().__init__()
            self.roles: set[str] = set()

        async def apply(self, manifest, result=True):
            if manifest["kind"] == "Role":
                await asyncio.sleep(0.01)   # the create is on the wire
                self.roles.add(manifest["metadata"]["name"])
            if manifest["kind"] == "RoleBinding" and manifest["roleRef"]["name"] not in self.roles:
                raise ApiError(404, {"message": f'roles "{manifest["roleRef"]["name"]}" not found'}, "apply RoleBinding")
            return await super().apply(manifest, result)

    ftj = FineTuneJob.model_validate({**FTJ_BODY, "metadata": {**FTJ_BODY["metadata"], "uid": "u1"}})
    kids = ftj_builders.children(ftj, BuildSettings(), ftj_builders.output_uri(ftj, BuildSettings()))
    assert {"Role", "RoleBinding"} <= {k["kind"] for k in kids}
    kube = RbacKube()
    asyncio.run(Applier(kube).ensure([kids], fresh=True))   # one stage, as a controller may pass them
    assert [k["kind"] for k in kube.applied].index("RoleBinding") > [k["kind"] for k in kube.applied].index("Role")


@pytest.mark.parametrize("selector", [{"matchLabels": {"g": "x"}}, {"matchLabels": {"g": "x", "t": "1"}},
                                      {"matchExpressions": [{"key": "g", "operator": "In", "values": ["x"]}]}, {}])
def test_a_route_resolves_from_the_adapters_it_selects_as_from_the_whole_namespace(selector):
    """observe() resolves a route from the Adapters it selects, found through the Adapter store's label index
    (issue 17: not every Adapter of the namespace on every resolution); the table, verdicts and left-out
    backends are the ones the whole namespace gives."""
    from loraplane.builders.resolution import resolve

    ctl = route_controller()
    body = {**ROUTE_BODY, "metadata": {**ROUTE_BODY["metadata"], "resourceVersion": "1"},
            "spec": {**ROUTE_BODY["spec"], "routes": [{"name": "m", "backends": [{"adapter": "a"}]},
                                                      {"name": "gone", "backends": [{"adapter": "missing"}]},
                                                      {"selector": selector, "prefix": "s/"}]}}
    ctl.stores.ModelRoute.put(body)
    for i, labels in enumerate([{}, {"g": "x"}, {"g": "x", "t": "1"}, {"g": "y"}, {"t": "1"}, {"g": "x", "t": "2"}]):
        for name in (f"n{i}", "a") if i == 0 else (f"n{i}",):
            ctl.stores.Adapter.put({"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                                    "metadata": {"name": name, "namespace": "ns", "uid": f"u{name}", "generation": 1,
                                                 "resourceVersion": "1", "labels": labels},
                                    "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": f"s3://b/{name}"},
                                             "rank": 8 if i != 5 else 64}})
    ctl.stores.Adapter.put({"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",   # invalid: left out
                            "metadata": {"name": "bad", "namespace": "ns", "uid": "ub", "generation": 1,
                                         "resourceVersion": "1", "labels": {"g": "x"}},
                            "spec": {"baseModel": {"name": "org/base"}, "source": {}}})
    facts = asyncio.run(ctl.observe(("ns", "r")))
    whole = resolve(facts.route, ctl.stores.Adapter.valid_in("ns", Adapter), {})
    assert facts.resolution.table == whole.table and facts.resolution.selected == whole.selected
    assert facts.resolution.missing == whole.missing and len(whole.table.models) >= 2
