"""Issue 15, the operator's side of content routing against the real kube-apiserver (v1.20.2): two ModelRoutes in one
namespace. The later route's content model `auto` sends requests to its own model, to a model of the older route
and to a name nobody publishes: its serving table holds the content model and the older route's model as an
external model (that route's router Service), its status.contentModels lists each destination with its route and
readiness (following the older route's status as it changes), the unknown name gives ContentTargetNotFound, and a
public name both routes publish is a PublicNameConflict on the later route only.

No kubelet runs here: the test plays it and the loader (the older route's engine pod Ready with a replica report)."""

from __future__ import annotations

import time

import pytest

from loraplane.api.paths import ROUTER_PORT
from loraplane.api.wire.serving import REPORT_ANNOTATION, ReplicaReport, ServingTable
from test_operator_apiserver import G, NOW, V, Cluster, wait_for

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(240)]


@pytest.fixture
def kube(kube_api, namespace, operator) -> Cluster:
    return Cluster(kube_api, namespace)


def route(name: str, routes: list[dict], content: list[dict] | None = None) -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "ModelRoute", "metadata": {"name": name},
            "spec": {"baseModel": {"name": "org/tiny"}, "replicas": 1, "engine": {"gpus": 0},
                     "routes": routes, "contentRouting": content or []}}


def base(name: str) -> dict:
    return {"name": name, "backends": [{"base": True}]}


AUTO = {"name": "auto", "default": "sql", "methods": ["rules"],
        "destinations": [{"model": "sql", "rules": {"pattern": "(?i)\\bselect\\b"}},
                         {"model": "support", "rules": {"keywords": ["refund"]}},
                         {"model": "ghost", "rules": {"keywords": ["boo"]}}]}


def ready_condition(kube: Cluster, name: str) -> dict:
    return kube.ready("ModelRoute", name)


def destinations(kube: Cluster, name: str) -> dict[str, tuple]:
    models = kube.status("ModelRoute", name).get("contentModels") or []
    return {d["model"]: (d.get("route"), d["ready"], d.get("reason"))
            for m in models for d in m.get("destinations", [])}


def test_two_routes_content_model_status_conflict_on_the_later_route_and_an_unknown_destination(kube):
    kube.create(route("older", [base("general"), base("support")]))
    wait_for(lambda: {m["name"] for m in kube.status("ModelRoute", "older").get("models", [])} == {"general",
                                                                                                  "support"},
             what="the older route's status.models")
    time.sleep(1.1)   # creationTimestamp has one-second resolution: `front` must be the later route
    kube.create(route("front", [base("general"), base("sql")], [AUTO]))

    # The name both publish: PublicNameConflict on the later route, naming the name and the older route.
    ready = wait_for(lambda: (r := ready_condition(kube, "front")).get("reason") == "PublicNameConflict" and r,
                     what="PublicNameConflict on front")
    assert "'general'" in ready["message"] and "ModelRoute older" in ready["message"]
    assert "'ghost'" in ready["message"]            # the unknown destination is named too
    assert ready_condition(kube, "older").get("reason") != "PublicNameConflict"

    # status.contentModels: each destination with its owning route and readiness (no replica is ready yet).
    dests = wait_for(lambda: (d := destinations(kube, "front")) and d, what="front's status.contentModels")
    assert dests == {"sql": ("front", False, "NotLoaded"), "support": ("older", False, "ModelsNotReady"),
                     "ghost": (None, False, "ContentTargetNotFound")}

    # The serving table: the content model without the unknown destination, the older route's model external.
    table = ServingTable.model_validate_json(
        kube.core.read_namespaced_config_map("front-serving", kube.ns).data["serving.json"])
    [auto] = table.content_models
    assert [d.model for d in auto.destinations] == ["sql", "support"] and auto.default == "sql"
    assert [(e.name, e.route, e.url) for e in table.external_models] == [
        ("support", "older", f"http://older-router.{kube.ns}.svc:{ROUTER_PORT}")]
    assert table.route_created == kube.get("ModelRoute", "front")["metadata"]["creationTimestamp"]

    # Without the shared name, the unknown destination is Ready's reason.
    kube.patch("ModelRoute", "front", {"spec": {"routes": [base("sql")]}})
    ready = wait_for(lambda: (r := ready_condition(kube, "front")).get("reason") == "ContentTargetNotFound" and r,
                     what="ContentTargetNotFound on front")
    assert "destinations[2].model 'ghost'" in ready["message"] and "PublicNameConflict" not in ready["message"]

    # The older route's replica becomes ready (play the kubelet and the loader): its status.models say so, and the
    # later route's destination follows without any change to the later route (the cross-route watch).
    pod = wait_for(lambda: kube.pods("loraplane.io/route=older"), what="older's engine pod")[0]
    kube.core.patch_namespaced_pod(pod.metadata.name, kube.ns, {"metadata": {"annotations": {
        REPORT_ANNOTATION: ReplicaReport(replica=pod.metadata.name, route="older", generation=1, engine_ready=True,
                                         updated_at=NOW).to_annotation()}}})
    kube.patch_pod_status(pod.metadata.name, {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]})
    wait_for(lambda: destinations(kube, "front").get("support") == ("older", True, None),
             what="front's destination support ready, from the older route's status")

    # The older route goes away: its name is nobody's, the external model leaves the table.
    kube.delete("ModelRoute", "older")
    wait_for(lambda: destinations(kube, "front").get("support") == (None, False, "ContentTargetNotFound"),
             what="support not found once the older route is deleted")
    table = ServingTable.model_validate_json(
        kube.core.read_namespaced_config_map("front-serving", kube.ns).data["serving.json"])
    assert table.external_models == [] and [d.model for d in table.content_models[0].destinations] == ["sql"]
