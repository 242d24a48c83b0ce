"""GitOps tools can see progress and failure (issue 13, item 7): kstatus' Reconciling / Stalled on every kind, the
Argo CD health script over statuses the operator's own status code writes, and the Flux example.

`kstatus` below is a port of sigs.k8s.io/cli-utils/pkg/kstatus/status Compute for a kind with no built-in rules
(checkGenericProperties, then Current: there is no Ready-condition fallback), what Flux's health checks
and `kubectl wait`-style tooling compute; it lives here, not in the product, to check the product against it.
The Argo CD script (docs/gitops/argocd-health.lua) runs in a real Lua interpreter (lupa).
"""

from __future__ import annotations

import re
from pathlib import Path

import lupa
import pytest
import yaml

from loraplane.api.adapter import AdapterStatus
from loraplane.api.conditions import IDLE_REASONS, STALLED_REASONS, ConditionType, Progress, progress_of
from loraplane.api.modelroute import AutoscalingSpec, ModelRouteStatus
from loraplane.api.reasons import Reason
from loraplane.builders import resolve
from loraplane.controllers.adapter import adapter_status
from loraplane.controllers.finetunejob import FineTuneJobController, FineTuneJobFacts, run_state
from loraplane.controllers.modelroute import route_status
from loraplane.controllers.status import dump_status, invalid_spec
from support.paths import ROOT
from test_controllers import FTJ, FTJ_BODY, context
from test_status_logic import ROUTER_UP, ROUTE, adapter, engine_pod, job, pod, report, rolling, serving_old_pod

LUA = ROOT / "docs" / "gitops" / "argocd-health.lua"
LATER = "2026-01-01T00:05:00Z"


def kstatus(obj: dict) -> str:
    """kstatus' status of a custom resource, ported faithfully from sigs.k8s.io/cli-utils pkg/kstatus/status:
    Compute (status.go) runs checkGenericProperties (generic.go: deletionTimestamp, then checkGeneration, then
    the first condition in list order that is Reconciling=True or Stalled=True), then the rules of built-in kinds
    (none apply to a custom resource), and otherwise returns Current. There is no Ready-condition fallback: a
    Ready=False object with neither condition is Current, so the product must set Reconciling or Stalled
    whenever it is not settled."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return "InProgress"
    for c in status.get("conditions") or []:
        if c.get("type") == "Reconciling" and c.get("status") == "True":
            return "InProgress"
        if c.get("type") == "Stalled" and c.get("status") == "True":
            return "Failed"
    return "Current"


def argocd_health(obj: dict) -> tuple[str, str]:
    """(status, message) of the Argo CD health script for `obj`, run in Lua as Argo CD runs it (`obj` global)."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(LUA.read_text())
    return hs["status"], hs["message"]


def wrap(kind: str, status: dict, generation: int = 3) -> dict:
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": kind,
            "metadata": {"name": "x", "namespace": "ns", "generation": generation}, "status": status}


def ftj_status(run) -> dict:
    body = {**FTJ_BODY, "metadata": {**FTJ_BODY["metadata"], "generation": 3}}
    return FineTuneJobController(context()).plan(FineTuneJobFacts(body, FTJ, run=run, now=LATER)).status


def route_of(deployment, pods, autoscaled: bool = False) -> dict:
    route = ROUTE
    if autoscaled:   # KEDA with minReplicas 0 (what scales a route to zero)
        route = ROUTE.model_copy(deep=True)
        route.spec.autoscaling = AutoscalingSpec(backend="keda", min_replicas=0, max_replicas=2)
    res = resolve(route, [adapter("a")])
    return dump_status(route_status(route, res, deployment, pods, 3, ModelRouteStatus(), "h-new",
                                     router=ROUTER_UP))


def adapter_of(pods_by_route, name="a", **kw) -> dict:
    return dump_status(adapter_status(adapter(name, **kw), [ROUTE], pods_by_route, AdapterStatus(), 3, None))


oom = {"exitCode": 137, "reason": "OOMKilled"}
pull = {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}},
        "image": "vllm/vllm-openai:v9.9.9"}
starting = {"vllm": {}, "adapter-loader": {}}
done = rolling(replicas=1, updated=1)

# (what, object as the operator writes it, kstatus, Argo CD)
CASES = [
    ("job pending", lambda: wrap("FineTuneJob", ftj_status(run_state(FTJ, None, []))), "InProgress", "Progressing"),
    ("job running", lambda: wrap("FineTuneJob", ftj_status(run_state(FTJ, job(active=1), [pod("p", "Running")]))),
     "InProgress", "Progressing"),
    ("job failed (OOM)", lambda: wrap("FineTuneJob", ftj_status(run_state(FTJ, job(
        ("Failed", "BackoffLimitExceeded", "backoff limit"), failed=2), [pod("p1", "Failed", oom),
                                                                          pod("p2", "Failed", oom)]))),
     "Failed", "Degraded"),
    ("job cannot pull its image", lambda: wrap("FineTuneJob", ftj_status(run_state(FTJ, job(active=1), [
        pod("p", waiting={"reason": "ImagePullBackOff", "message": "nope"})]))), "Failed", "Degraded"),
    ("invalid spec", lambda: wrap("ModelRoute", invalid_spec({}, 3, "spec field engine.gpus: must be >= 0")[0]),
     "Failed", "Degraded"),
    ("route serving", lambda: wrap("ModelRoute", route_of(done, [serving_old_pod()])), "Current", "Healthy"),
    ("route scaled to zero", lambda: wrap("ModelRoute", route_of(
        {"spec": {"replicas": 0}, "status": {"observedGeneration": 1}}, [], autoscaled=True)), "Current", "Suspended"),
    ("route starting", lambda: wrap("ModelRoute", route_of(
        {"status": {"replicas": 1}}, [engine_pod("r-1", containers=starting)])), "InProgress", "Progressing"),
    ("route rolling out", lambda: wrap("ModelRoute", route_of(rolling(), [
        serving_old_pod(), engine_pod("r-new", created=LATER, containers=starting)])), "InProgress", "Progressing"),
    ("route's new image missing", lambda: wrap("ModelRoute", route_of(rolling(), [
        serving_old_pod(), engine_pod("r-new", created=LATER, containers={"vllm": pull, "adapter-loader": {}})])),
     "Failed", "Degraded"),
    ("adapter loaded", lambda: wrap("Adapter", adapter_of({"r": [serving_old_pod()]})), "Current", "Healthy"),
    ("adapter loading", lambda: wrap("Adapter", adapter_of({"r": [pod("r-1", ready=True, report=report(
        "r-1", {"a--1": ("Loading", "Loading")}))]})), "InProgress", "Progressing"),
    ("adapter refused by the gate", lambda: wrap("Adapter", adapter_of({"r": [pod("r-1", ready=True, report=report(
        "r-1", {"a--1": ("Incompatible", "TargetModulesNotFound")}))]})), "Failed", "Degraded"),
    ("adapter with no effect", lambda: wrap("Adapter", adapter_of({"r": [pod("r-1", ready=True, report=report(
        "r-1", {"a--1": ("Failed", "NoEffect")}))]})), "Failed", "Degraded"),
    ("adapter load being retried", lambda: wrap("Adapter", adapter_of({"r": [pod("r-1", ready=True, report=report(
        "r-1", {"a--1": ("Pending", "FetchFailed")}))]})), "InProgress", "Progressing"),
    ("adapter artifact refused as unsafe", lambda: wrap("Adapter", adapter_of({"r": [pod("r-1", ready=True,
        report=report("r-1", {"a--1": ("Incompatible", "UnsafeArtifact")}))]})), "Failed", "Degraded"),
    ("adapter a replica gave up on", lambda: wrap("Adapter", adapter_of({"r": [pod("r-1", ready=True,
        report=report("r-1", {"a--1": ("Failed", "AlreadyLoaded")}))]})), "Failed", "Degraded"),
    ("adapter too large for the route", lambda: wrap("Adapter", adapter_of({}, "big", rank=64,
                                                                           labels={"team": "x"})),
     "Failed", "Degraded"),
    # Deliberate (docs/gitops.md): an Adapter no route selects is valid and settled (Idle: neither condition),
    # so kstatus reads it as Current and a Flux `wait` does not hang on it; Argo CD shows Suspended.
    ("adapter no route selects", lambda: wrap("Adapter", adapter_of({}, "lonely")), "Current", "Suspended"),
    ("spec not yet seen", lambda: wrap("ModelRoute", route_of(done, [serving_old_pod()]), generation=4),
     "InProgress", "Progressing"),
    ("never reconciled", lambda: {"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                                  "metadata": {"name": "x", "generation": 1}}, "Current", "Progressing"),
]


@pytest.mark.parametrize("obj, want_kstatus, want_argo", [pytest.param(make, k, a, id=what)
                                                          for what, make, k, a in CASES])
def test_kstatus_and_argocd_health_of_real_statuses(obj, want_kstatus, want_argo):
    obj = obj()
    assert kstatus(obj) == want_kstatus, obj.get("status")
    status, message = argocd_health(obj)
    assert status == want_argo, (status, message)
    if want_argo in ("Degraded", "Progressing", "Suspended") and obj.get("status"):
        assert message  # the reason and message reach the UI


def test_reconciling_and_stalled_follow_ready_with_abnormal_true_polarity():
    """Present and True only while reconciling / stalled, with Ready's reason; removed when Ready turns True."""
    from loraplane.api.common import StatusBase
    from loraplane.api.conditions import ConditionState, ConditionStatus

    st = StatusBase()
    st.set_condition(ConditionType.Ready, ConditionState(ConditionStatus.FALSE, Reason.Loading, "loading"), 1)
    assert {c.type: (c.status, c.reason) for c in st.conditions} == {
        "Ready": ("False", "Loading"), "Reconciling": ("True", "Loading")}
    st.set_condition(ConditionType.Ready, ConditionState(ConditionStatus.FALSE, Reason.LoadFailed, "vLLM: no"), 2)
    assert {c.type: (c.status, c.reason, c.observed_generation) for c in st.conditions} == {
        "Ready": ("False", "LoadFailed", 2), "Stalled": ("True", "LoadFailed", 2)}
    assert st.condition("Stalled").message == "vLLM: no"
    st.set_condition(ConditionType.Ready, ConditionState(ConditionStatus.TRUE, Reason.Loaded, "ok"), 3)
    assert [c.type for c in st.conditions] == ["Ready"]


def test_every_ready_reason_is_classified_on_purpose():
    """A reason shown in Ready is progressing unless listed stalled or idle: the lists name only Ready reasons,
    and the ones a user must act on (their `fix` is not 'Wait') are not left to read as progressing."""
    ready_reasons = {r for r in Reason if "Ready" in r.where}
    assert STALLED_REASONS <= ready_reasons and IDLE_REASONS <= ready_reasons
    assert not STALLED_REASONS & IDLE_REASONS
    for r in (Reason.InvalidSpec, Reason.SpecImmutable, Reason.ImagePull, Reason.EngineFailing,
              Reason.RolloutStalled, Reason.BackoffLimitExceeded, Reason.RankTooLarge, Reason.NoEffect):
        assert progress_of(r) == Progress.Stalled, r
    for r in (Reason.Pending, Reason.Running, Reason.Retrying, Reason.Loading, Reason.Progressing,
              Reason.NoReadyReplicas, Reason.Unschedulable, Reason.ArtifactPending):
        assert progress_of(r) == Progress.Reconciling, r


def test_docs_ship_the_tested_script_and_a_flux_example():
    doc = (ROOT / "docs" / "gitops.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.S)]
    argocd = next(b["data"] for b in blocks if isinstance(b, dict) and "data" in b)
    for kind in ("ModelRoute", "Adapter", "FineTuneJob"):
        assert argocd[f"resource.customizations.health.loraplane.io_{kind}"].strip() == LUA.read_text().strip()
    flux = next(b for b in blocks if isinstance(b, dict) and b.get("kind") == "Kustomization")
    assert flux["apiVersion"].startswith("kustomize.toolkit.fluxcd.io/") and flux["spec"]["wait"] is True
    assert Path(LUA).exists()


def test_a_failed_replica_report_stalls_the_adapter_whatever_its_reason():
    """A loader report in a terminal state (Failed / Incompatible) reads as Stalled even with a reason that alone
    is progressing (AlreadyLoaded after the attempts ran out) or that is no Reason at all (an untrusted report)."""
    from loraplane.api.common import StatusBase
    from loraplane.api.conditions import ConditionState, ConditionStatus

    for reason in (Reason.AlreadyLoaded, "SomethingNew"):
        st = StatusBase()
        st.set_condition(ConditionType.Ready, ConditionState(ConditionStatus.FALSE, reason, "gave up",
                                                             Progress.Stalled), 1)
        assert {c.type for c in st.conditions} == {"Ready", "Stalled"}, reason
