"""Issue 16, artifact storage without hand steps: a FineTuneJob without output.uri on a fresh namespace gets the
artifact store's claim created by the operator (from the chart's operator.artifacts), never a user's claim
changed, and a status that says why the run waits when a claim is missing or does not bind. MOCK: a scripted
API client (FakeKube) answers GETs from a dict and records creates; the trainer pod's fsGroup (so the non-root
trainer can write the claim) is checked on the rendered Job."""

from __future__ import annotations

import asyncio

import pytest

from loraplane.api import FineTuneJob, ModelRoute
from loraplane.api.reasons import Reason
from loraplane.builders import finetunejob as ftj_builders
from loraplane.builders import render
from loraplane.builders.settings import ArtifactClaim, BuildSettings
from loraplane.controllers.base import Context, Stores
from loraplane.controllers.finetunejob import FineTuneJobController
from loraplane.kube.apply import Applier
from loraplane.kube.client import ApiError
from loraplane.kube.events import EventRecorder


class FakeKube:
    """MOCK API client: GETs from `objects` ((kind, name) -> body); records creates, applies, status patches."""

    def __init__(self, objects: dict | None = None, create_error: ApiError | None = None):
        self.objects = objects or {}
        self.created, self.applied, self.status_patches, self.events = [], [], [], []
        self.create_error = create_error

    async def create_if_absent(self, manifest):
        if self.create_error:
            raise self.create_error
        self.created.append(manifest)
        return (manifest["kind"], manifest["metadata"]["name"]) not in self.objects

    async def get(self, api_version, kind, namespace, name):
        return self.objects.get((kind, name))

    async def apply(self, manifest, result=True):
        self.applied.append(manifest)
        return {**manifest, "metadata": {**manifest["metadata"], "uid": "new-uid"}}

    async def patch_status(self, api_version, kind, namespace, name, patch):
        self.status_patches.append((kind, name, patch))

    async def post_event(self, obj, type_, reason, message, now):
        self.events.append((type_, reason, message))


def body(output: dict | None = None) -> dict:
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "fresh", "uid": "u", "generation": 1},
            "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "s3://b/d.jsonl"},
                     "output": {"adapterName": "a", **(output or {})}}}


def reconcile(kube: FakeKube, obj: dict, build: BuildSettings | None = None) -> dict:
    """One observe -> plan -> execute pass; returns the Ready condition it wrote."""
    ctx = Context(kube=kube, applier=Applier(kube), events=EventRecorder(kube), build=build or BuildSettings(),
                  stores=Stores())
    ctl = FineTuneJobController(ctx)
    ctl.store.put(obj)
    asyncio.run(ctl.execute(ctl.plan(asyncio.run(ctl.observe(("fresh", "j"))))))
    return next(c for _, _, p in kube.status_patches for c in p.get("conditions", []) if c["type"] == "Ready")


def test_a_fresh_namespace_gets_the_artifact_store_claim_from_the_chart_settings():
    build = BuildSettings(artifact_claim=ArtifactClaim(storage_class="shared-nfs", access_mode="ReadWriteMany",
                                                       size="200Gi"))
    kube = FakeKube()
    ready = reconcile(kube, body(), build)
    claims = [m for m in kube.created if m["kind"] == "PersistentVolumeClaim"]
    assert claims == [{
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "loraplane-artifacts", "namespace": "fresh",
                     "labels": {"app.kubernetes.io/name": "loraplane", "app.kubernetes.io/component": "artifacts",
                                "app.kubernetes.io/managed-by": "loraplane"}},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "200Gi"}},
                 "storageClassName": "shared-nfs"}}]
    assert "ownerReferences" not in claims[0]["metadata"]     # shared by every job; never garbage-collected
    assert any(m["kind"] == "Job" for m in kube.applied)      # the run is not held back
    assert ready["reason"] == Reason.ArtifactClaimPending and "loraplane-artifacts" in ready["message"]
    # the trainer (non-root) can write the claim: the pod's fsGroup owns its volumes
    job = next(m for m in kube.applied if m["kind"] == "Job")["spec"]["template"]["spec"]
    assert job["securityContext"]["fsGroup"] == 65532 and job["securityContext"]["runAsNonRoot"] is True
    mount = next(v for v in job["volumes"] if "persistentVolumeClaim" in v)["persistentVolumeClaim"]
    assert mount == {"claimName": "loraplane-artifacts", "readOnly": False}


def test_an_existing_claim_is_never_created_or_changed_and_a_bound_one_lets_the_run_go():
    bound = {"metadata": {"name": "loraplane-artifacts"}, "spec": {"accessModes": ["ReadWriteOnce"]},
             "status": {"phase": "Bound"}}
    kube = FakeKube({("PersistentVolumeClaim", "loraplane-artifacts"): bound})
    ready = reconcile(kube, body())
    assert kube.created == [] and not any(m["kind"] == "PersistentVolumeClaim" for m in kube.applied)
    assert ready["reason"] == Reason.Pending


def test_an_unbound_claim_is_named_with_its_storage_class_and_access_mode():
    pending = {"metadata": {"name": "loraplane-artifacts"},
               "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "standard"},
               "status": {"phase": "Pending"}}
    kube = FakeKube({("PersistentVolumeClaim", "loraplane-artifacts"): pending})
    ready = reconcile(kube, body())
    assert ready["reason"] == Reason.ArtifactClaimPending and kube.created == []
    assert "not bound" in ready["message"] and "standard" in ready["message"] and "ReadWriteMany" in ready["message"]
    assert "kubectl describe pvc loraplane-artifacts -n fresh" in ready["message"]


def test_a_users_missing_claim_is_reported_not_created():
    kube = FakeKube()
    ready = reconcile(kube, body({"uri": "pvc://team-claim/adapters"}))
    assert kube.created == []
    assert ready["reason"] == Reason.ArtifactClaimMissing and "team-claim" in ready["message"]
    assert "spec.output.uri" in ready["message"]


def test_without_create_claim_the_store_claim_is_reported_missing():
    kube = FakeKube()
    ready = reconcile(kube, body(), BuildSettings(artifact_claim=ArtifactClaim(create=False)))
    assert kube.created == [] and ready["reason"] == Reason.ArtifactClaimMissing
    assert "operator.artifacts.createClaim" in ready["message"]


def test_s3_output_needs_no_claim():
    kube = FakeKube()
    ready = reconcile(kube, body({"uri": "s3://bucket/adapters"}))
    assert kube.created == [] and ready["reason"] == Reason.Pending


def test_a_refused_create_is_a_warning_event_not_a_crash():
    kube = FakeKube(create_error=ApiError(403, {"message": "exceeded quota"}, "create PersistentVolumeClaim"))
    ready = reconcile(kube, body())
    assert ready["reason"] == Reason.ArtifactClaimPending
    assert any(t == "Warning" and r == Reason.ArtifactClaimMissing and "exceeded quota" in m
               for t, r, m in kube.events)


def test_the_loader_reads_adapters_from_the_claim_as_the_pods_fsgroup():
    route = ModelRoute.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r", "namespace": "fresh"},
        "spec": {"baseModel": {"name": "org/base"}}})
    spec = next(m for m in render([route]) if m["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["fsGroup"] == 65532


@pytest.mark.parametrize("store,claim", [("pvc://loraplane-artifacts", "loraplane-artifacts"),
                                         ("pvc://shared/sub/dir", "shared"), ("s3://b/p", None)])
def test_the_store_claim_is_the_pvc_of_a_pvc_store(store, claim):
    assert ftj_builders.store_claim(BuildSettings(artifact_store=store)) == claim
    ftj = FineTuneJob.model_validate(body())
    assert ftj_builders.output_claim(ftj_builders.output_uri(ftj, BuildSettings(artifact_store=store))) == claim
