"""The ModelRoute controller's side of content routing (issue 15), without a cluster: status.contentModels, the
PublicNameConflict across routes and ContentTargetNotFound conditions, the observe memo, and which other routes a
route's change schedules. MOCK: FakeKube records writes; the stores are filled by hand."""

from __future__ import annotations

import asyncio
import json

from loraplane.api.conditions import ConditionType
from loraplane.api.reasons import Reason
from loraplane.builders.orchestration import Publication
from loraplane.builders.settings import BuildSettings
from loraplane.controllers.base import Context, Stores
from loraplane.controllers.modelroute import ModelRouteController, ModelRouteFacts
from loraplane.api import ModelRoute
from loraplane.kube.apply import Applier
from loraplane.kube.events import EventRecorder
from loraplane.api.wire.serving import REPORT_ANNOTATION, ReplicaReport

T1, T2, T3 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"


class FakeKube:
    async def patch_status(self, *args):
        pass

    async def post_event(self, *args):
        pass


def controller() -> ModelRouteController:
    kube = FakeKube()
    ctx = Context(kube=kube, applier=Applier(kube), events=EventRecorder(kube), build=BuildSettings(),
                  stores=Stores())
    return ModelRouteController(ctx, rejections=lambda ns: {}, reselected=lambda key: None)


def body(name: str, created: str, routes=None, content=None, status=None, rv="1") -> dict:
    out = {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
           "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "generation": 1,
                        "creationTimestamp": created, "resourceVersion": rv},
           "spec": {"baseModel": {"name": "org/base"},
                    "routes": routes if routes is not None else [{"name": "general", "backends": [{"base": True}]}],
                    "contentRouting": content or []}}
    if status is not None:
        out["status"] = status
    return out


AUTO = {"name": "auto", "default": "general", "methods": ["rules", "classifier"],
        "classifier": {"model": "clf"},
        "destinations": [{"model": "general", "label": "general"},
                         {"model": "support", "label": "support", "rules": {"keywords": ["refund"]}},
                         {"model": "nowhere", "rules": {"keywords": ["x"]}}]}
READY_POD = [{"metadata": {"name": "p", "annotations": {REPORT_ANNOTATION: ReplicaReport(
    replica="p", route="front", generation=1, engine_ready=True, updated_at=T1).to_annotation()}},
    "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]
READY_ROUTER = {"metadata": {"annotations": {}}, "spec": {"replicas": 2},
                "status": {"availableReplicas": 2, "replicas": 2, "updatedReplicas": 2}}


class Planned:
    """The first plan's children (the table) and, once they are applied, the status a reconcile writes."""

    def __init__(self, b: dict, others: list[Publication]):
        ctl = controller()
        facts = ModelRouteFacts(b, ModelRoute.model_validate(b), pods=READY_POD, router_deployment=READY_ROUTER,
                                deployment={"status": {"readyReplicas": 1, "replicas": 1, "updatedReplicas": 1}},
                                others=others)
        first = ctl.plan(facts)
        self.children = first.children
        facts.last_applied = first.applied_as   # applied: no rollout pending (the stand-ins carry no hash)
        self.status = ctl.plan(facts).status


def plan(b: dict, others: list[Publication]) -> Planned:
    return Planned(b, others)


def ready_of(p) -> dict:
    return next(c for c in p.status["conditions"] if c["type"] == ConditionType.Ready)


def test_status_lists_each_content_model_with_its_targets_route_and_readiness():
    others = [Publication("support-route", T1, models=(("support", False),)),
              Publication("classifiers", T1, models=(("clf", True),))]
    p = plan(body("front", T2, content=[AUTO]), others)
    [auto] = p.status["contentModels"]
    assert auto["name"] == "auto" and auto["default"] == "general" and auto["methods"] == ["rules", "classifier"]
    assert auto["ready"] is True   # its default, this route's base, serves
    assert [(d["model"], d.get("route"), d["ready"], d.get("reason")) for d in auto["destinations"]] == [
        ("general", "front", True, None),
        ("support", "support-route", False, Reason.ModelsNotReady),
        ("nowhere", None, False, Reason.ContentTargetNotFound)]
    assert auto["classifier"] == {"model": "clf", "route": "classifiers", "ready": True}
    ready = ready_of(p)
    assert ready["status"] == "False" and ready["reason"] == Reason.ContentTargetNotFound
    assert "destinations[2].model 'nowhere'" in ready["message"]
    assert p.status["phase"] == "Degraded"
    table = json.loads(next(iter(next(m for m in p.children[0] if m["kind"] == "ConfigMap")["data"].values())))
    assert [d["model"] for d in table["content_models"][0]["destinations"]] == ["general", "support"]
    assert sorted(e["name"] for e in table["external_models"]) == ["clf", "support"]


def test_every_target_found_and_ready_leaves_the_route_ready():
    content = [{**AUTO, "destinations": AUTO["destinations"][:2]}]
    others = [Publication("support-route", T1, models=(("support", True),)),
              Publication("classifiers", T1, models=(("clf", True),))]
    p = plan(body("front", T2, content=content), others)
    assert ready_of(p)["reason"] == Reason.Ready and p.status["phase"] == "Ready"
    assert all(d["ready"] for d in p.status["contentModels"][0]["destinations"])


def test_a_default_that_is_not_ready_makes_the_content_model_not_ready():
    content = [{"name": "auto", "default": "support", "destinations": [{"model": "general"}]}]
    p = plan(body("front", T2, content=content), [Publication("support-route", T1, models=(("support", False),))])
    assert p.status["contentModels"][0]["ready"] is False
    assert ready_of(p)["reason"] == Reason.ModelsNotReady and "auto" in ready_of(p)["message"]


def test_public_name_conflict_lands_on_the_later_route_only_naming_the_name_and_the_older_route():
    later = plan(body("later", T2), [Publication("older", T1, models=(("general", True),))])
    ready = ready_of(later)
    assert ready["reason"] == Reason.PublicNameConflict
    assert "'general'" in ready["message"] and "ModelRoute older" in ready["message"]
    older = plan(body("older", T1), [Publication("later", T2, models=(("general", True),))])
    assert ready_of(older)["reason"] == Reason.Ready


def test_observe_redoes_only_the_content_part_on_another_routes_names_and_nothing_on_its_readiness(monkeypatch):
    from loraplane.controllers import modelroute as mr

    calls = []
    real = mr.resolve
    monkeypatch.setattr(mr, "resolve", lambda *a, **k: calls.append(1) or real(*a, **k))
    ctl = controller()
    ctl.stores.ModelRoute.put(body("front", T2, content=[AUTO]))
    ctl.stores.ModelRoute.put(body("support-route", T1, status={"models": [{"name": "support", "ready": False}]}))

    def observe():
        return asyncio.run(ctl.observe(("ns", "front")))

    first = observe()
    assert len(calls) == 1 and first.others == [Publication("support-route", T1, models=(("support", False),))]
    assert [e.name for e in first.resolution.table.external_models] == ["support"]
    ctl.stores.ModelRoute.put(body("support-route", T1, rv="2",
                                   status={"models": [{"name": "support", "ready": True}]}))
    again = observe()
    assert len(calls) == 1 and again.others[0].models == (("support", True),)   # readiness: status only
    ctl.stores.ModelRoute.put(body("support-route", T1, rv="3", status={"models": [{"name": "help", "ready": True}]}))
    third = observe()
    # A name went away: the content part is redone on the memo (no selector matched again), into a new table.
    assert third.resolution.table.external_models == [] and len(calls) == 1
    assert third.resolution.table is not first.resolution.table
    assert third.resolution.content.targets["support"].missing
    ctl.stores.ModelRoute.put(body("support-route", T1, rv="4", status={"models": [{"name": "help", "ready": False}]}))
    assert observe().resolution is third.resolution                               # readiness only: reused


def test_a_routes_change_schedules_only_the_routes_it_concerns():
    ctl = controller()
    scheduled = []
    ctl.schedule = lambda key, delay=None: scheduled.append(key)
    support_old = body("support-route", T1, status={"models": [{"name": "support", "ready": False}],
                                                    "readyReplicas": 0})
    ctl.stores.ModelRoute.put(body("front", T2, content=[AUTO]))               # references support
    ctl.stores.ModelRoute.put(body("plain", T3, status={"models": [{"name": "general", "ready": True}]}))
    ctl.stores.ModelRoute.put(body("plain-status", T3, status={"models": [{"name": "other", "ready": True}]}))

    def change(new: dict, old: dict | None) -> list:
        scheduled.clear()
        ctl.stores.ModelRoute.put(new)
        ctl.on_change("ModelRoute", new, old)
        return sorted(k[1] for k in scheduled)

    # The route appears: itself, the route referencing its name (support); no one else publishes support.
    assert change(support_old, None) == ["front", "support-route"]
    # A status change that changes no public name or readiness: only itself.
    replicas = {**support_old, "status": {**support_old["status"], "readyReplicas": 1}}
    assert change(replicas, support_old) == ["support-route"]
    # Its model becomes ready: the referencing route follows; the routes without contentRouting do not.
    ready = {**replicas, "status": {**replicas["status"], "models": [{"name": "support", "ready": True}]}}
    assert change(ready, replicas) == ["front", "support-route"]
    # It starts publishing `general`, which `front` and `plain` publish too: both re-evaluate ownership.
    shared = {**ready, "status": {**ready["status"], "models": [*ready["status"]["models"],
                                                                {"name": "general", "ready": True}]}}
    assert change(shared, ready) == ["front", "plain", "support-route"]
    # Deleted: the routes sharing or referencing its names.
    scheduled.clear()
    ctl.stores.ModelRoute.remove(shared)
    ctl.on_change("ModelRoute", shared, None)
    assert sorted(k[1] for k in scheduled) == ["front", "plain", "support-route"]


def test_a_classifier_on_an_embed_route_is_wrong_task_in_status_and_left_out_of_the_table():
    """The operator checks other routes' spec.engine.task (not only `loraplane validate`): a classifier served by
    an embed route could never answer a completion, so the status says ContentTargetWrongTask, the Ready condition
    names it, and the table takes the classifier method out instead of sending requests there."""
    content = [{**AUTO, "destinations": AUTO["destinations"][:2]}]
    others = [Publication("support-route", T1, models=(("support", True),)),
              Publication("classifiers", T1, models=(("clf", True),), task="embed")]
    p = plan(body("front", T2, content=content), others)
    [auto] = p.status["contentModels"]
    assert auto["classifier"] == {"model": "clf", "route": "classifiers", "ready": False,
                                  "reason": Reason.ContentTargetWrongTask}
    ready = ready_of(p)
    assert ready["status"] == "False" and ready["reason"] == Reason.ContentTargetWrongTask
    assert "classifier.model 'clf' (served by ModelRoute classifiers, an embedding model" in ready["message"]
    # The route serving `clf` exists: the message does not say nothing in the namespace serves it.
    assert "nothing in the namespace" not in ready["message"], ready["message"]
    assert "spec.contentRouting names what no route of the namespace can serve as asked" in ready["message"]
    table = json.loads(next(iter(next(m for m in p.children[0] if m["kind"] == "ConfigMap")["data"].values())))
    assert table["content_models"][0]["methods"] == ["rules"]
    assert [e["name"] for e in table["external_models"]] == ["support"]


def test_a_route_whose_engine_task_changes_reschedules_the_routes_that_name_its_models():
    """spec.engine.task decides which role another route's model can play (ContentTargetWrongTask): a change of it
    re-reconciles the routes that name its models, though no status name or readiness changed."""
    ctl = controller()
    scheduled = []
    ctl.schedule = lambda key, delay=None: scheduled.append(key)
    ctl.stores.ModelRoute.put(body("front", T2, content=[AUTO]))          # its classifier is `clf`
    before = body("classifiers", T1, status={"models": [{"name": "clf", "ready": True}]})
    after = {**before, "spec": {**before["spec"], "engine": {"task": "embed"}},
             "metadata": {**before["metadata"], "resourceVersion": "2"}}
    ctl.stores.ModelRoute.put(after)
    ctl.on_change("ModelRoute", after, before)
    assert sorted(k[1] for k in scheduled) == ["classifiers", "front"]
