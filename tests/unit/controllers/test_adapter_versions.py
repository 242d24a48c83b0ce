"""Issue 13 item 4 (content-addressed versions) in the Adapter controller: the first time a version is served its URI
and digest are recorded in status.artifact; the serving table then pins that digest, a spec.source change under
the same version is refused, and a replica serving other content under it is flagged."""

from __future__ import annotations

from loraplane.api import Adapter, ModelRoute
from loraplane.api.keys import REPORT_ANNOTATION
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterReport, AdapterState, ReplicaReport
from loraplane.builders.resolution import resolve
from loraplane.controllers.adapter import AdapterController, AdapterFacts

ROUTE = ModelRoute.model_validate({
    "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r", "namespace": "ns"},
    "spec": {"baseModel": {"name": "org/base"}, "routes": [{"name": "m", "backends": [{"adapter": "a"}]}]}})
DIGEST_1, DIGEST_2 = "1" * 64, "2" * 64


def _body(uri: str = "s3://b/a", version: str | None = "1", status: dict | None = None, sha: str | None = None):
    spec = {"baseModel": {"name": "org/base"}, "source": {"uri": uri, **({"sha256": sha} if sha else {})}}
    if version:
        spec["version"] = version
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
            "metadata": {"name": "a", "namespace": "ns", "generation": 1}, "spec": spec, "status": status or {}}


def _pod(name: str, served: str, sha: str | None) -> dict:
    report = ReplicaReport(replica=name, route="r", generation=1, engine_ready=True, updated_at="t", adapters={
        served: AdapterReport(state=AdapterState.Ready, reason=Reason.Loaded, since="2026-01-01T00:00:00Z",
                              sha256=sha)})
    return {"metadata": {"name": name, "annotations": {REPORT_ANNOTATION: report.to_annotation()}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def _plan(body: dict, *pods: dict):
    return AdapterController.plan(AdapterFacts(body, Adapter.model_validate(body), routes=[ROUTE],
                                               pods_by_route={"r": list(pods)}))


def _merged(body: dict, plan) -> dict:
    return {**body, "status": {**body["status"], **plan.status}}


def test_the_first_serving_records_the_digest_and_the_table_pins_it():
    body = _body()
    table = resolve(ROUTE, [Adapter.model_validate(body)]).table
    assert table.adapters[0].sha256 is None          # nothing known yet: the replica verifies what it fetches
    plan = _plan(body, _pod("p0", "a--1", DIGEST_1))
    assert plan.status["artifact"] == {"uri": "s3://b/a", "sha256": DIGEST_1}
    assert plan.status["phase"] == "Ready"
    served = _merged(body, plan)
    # now every replica must verify that digest: content overwritten at the URI is refused (ChecksumMismatch)
    assert resolve(ROUTE, [Adapter.model_validate(served)]).table.adapters[0].sha256 == DIGEST_1
    # a pinned spec.source.sha256 is what gets recorded
    pinned = _plan(_body(sha=DIGEST_2), _pod("p0", "a--1", DIGEST_2))
    assert pinned.status["artifact"]["sha256"] == DIGEST_2


def test_a_source_change_under_a_published_version_is_refused_and_a_new_version_is_not():
    body = _body()
    served = _merged(body, _plan(body, _pod("p0", "a--1", DIGEST_1)))
    for change in ({"uri": "s3://b/other"}, {"sha": DIGEST_2}):
        moved = _body(status=served["status"], **change)
        plan = _plan(moved, _pod("p0", "a--1", DIGEST_1))
        assert plan.rejection is not None and plan.rejection.reason == Reason.SpecImmutable
        assert "version 1" in plan.rejection.message and plan.status["phase"] == "Failed"
        assert "artifact" not in plan.status or plan.status["artifact"]["uri"] == "s3://b/a"
    bumped = _body(uri="s3://b/other", version="2", status=served["status"])
    plan = _plan(bumped)
    # v1 keeps serving (its artifact stays recorded) while v2 is made ready; v2's digest comes when it is served
    assert plan.rejection is None and plan.status.get("artifact") is None
    assert plan.status["candidate"]["servedName"] == "a--2"
    entries = {d.served_name: d.sha256 for d in resolve(ROUTE, [Adapter.model_validate(_merged(bumped, plan))]).table.adapters}
    assert entries == {"a--1": DIGEST_1, "a--2": None}


def test_a_replica_serving_other_content_under_the_version_is_flagged():
    body = _body()
    served = _merged(body, _plan(body, _pod("p0", "a--1", DIGEST_1)))
    plan = _plan(served, _pod("p0", "a--1", DIGEST_1), _pod("p1", "a--1", DIGEST_2))
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", Reason.ArtifactChanged)
    assert "replica p1" in ready["message"] and DIGEST_1 in ready["message"]


def test_an_unversioned_adapter_is_not_pinned():
    body = _body(version=None)
    served_name = Adapter.model_validate(body).served_name()
    plan = _plan(body, _pod("p0", served_name, DIGEST_1))
    # not pinned (no digest); its URI is kept so it keeps serving while a changed source is made ready
    assert plan.status.get("artifact") == {"uri": "s3://b/a"} and plan.status["phase"] == "Ready"
