"""Issue 14, a version that passes evaluation but fails live is rolled back automatically: the real operator and the
real kube-apiserver, the real router (in this process, reading the route's serving table from the ConfigMap the
operator writes) in front of a stub vLLM replica whose new adapter version answers 500.

No kubelet runs here: the test plays it and the loader (engine pod Ready with a replica report) and gives the
router pod the address the router listens on (127.0.0.1, the operator reads its /metrics on
LORAPLANE_ROUTER_METRICS_PORT)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest

from harness.cluster import free_port
from loraplane.api.wire.serving import REPORT_ANNOTATION, AdapterReport, ReplicaReport, ServingTable
from loraplane.router.replicas import ReplicaPool, parse_replica_arg
from loraplane.router.server import Router
from loraplane.router.service import RouterService
from support.operator_process import OperatorProcess
from support.router_stubs import StubReplica

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(240)]

G, V = "loraplane.io", "v1alpha1"
NOW = "2026-01-01T00:00:00Z"
INTERVAL = 5        # spec.rollout.analysis.interval, seconds
ROUTER_PORT = free_port()
# A promotion is "Promoted" until the next reconcile records the version as "Stable"; a poll may see either.
PROMOTED = ("Promoted", "Stable")

POLICY = {"gates": {"minScore": 0.5, "mustBeatBase": True},
          "steps": [{"weight": 50, "pause": "2m"}],
          "analysis": {"interval": f"{INTERVAL}s", "minRequests": 5, "maxErrorRate": 0.05}}
EVALUATION = {"primaryMetric": "rouge_l", "candidate": {"metrics": {"rouge_l": 0.71}, "examples": 40},
              "base": {"metrics": {"rouge_l": 0.42}, "examples": 40},
              "previous": {"metrics": {"rouge_l": 0.69}, "examples": 40}, "previousVersion": "1"}


@pytest.fixture(scope="module")
def operator(kube_cluster, crds_installed, tmp_path_factory):
    proc = OperatorProcess(kube_cluster.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log",
                           extra_env={"LORAPLANE_ALLOWED_IMAGES": "registry.invalid/*",
                                      "LORAPLANE_ROUTER_METRICS_PORT": str(ROUTER_PORT)}).start()
    yield proc
    proc.stop()


async def until(fn, timeout: float = 30, what: str = "condition", interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - not there yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}; {DEBUG()}")


def DEBUG() -> str:  # noqa: N802 - replaced by the test with what it knows
    return ""


def report(pod: str, adapters: list[str]) -> str:
    return ReplicaReport(replica=pod, route="r", generation=1, engine_ready=True, updated_at=NOW, adapters={
        a: AdapterReport(state="Ready", reason="Loaded", message="", since=NOW, sha256=a[-1] * 64)
        for a in adapters}).to_annotation()


async def test_a_version_that_fails_live_is_rolled_back_within_the_analysis_interval(kube_cluster, kube_api, namespace,
                                                                                   operator):
    from kubernetes import client

    custom, core = client.CustomObjectsApi(kube_api), client.CoreV1Api(kube_api)
    ns = namespace

    def adapter() -> dict:
        return custom.get_namespaced_custom_object(G, V, ns, "adapters", "a")

    def rollout() -> dict:
        return (adapter().get("status") or {}).get("rollout") or {}

    global DEBUG

    def DEBUG():  # noqa: N802
        return f"status: {adapter().get('status')}\noperator log:\n{operator.log_tail(3000)}"

    def table() -> ServingTable:
        return ServingTable.model_validate_json(core.read_namespaced_config_map("r-serving", ns).data["serving.json"])

    custom.create_namespaced_custom_object(G, V, ns, "adapters", {
        "apiVersion": f"{G}/{V}", "kind": "Adapter", "metadata": {"name": "a"},
        "spec": {"baseModel": {"name": "org/tiny"}, "source": {"uri": "s3://does-not-exist/a1"}, "version": "1",
                 "rank": 8, "rollout": POLICY}})
    custom.create_namespaced_custom_object(G, V, ns, "modelroutes", {
        "apiVersion": f"{G}/{V}", "kind": "ModelRoute", "metadata": {"name": "r"},
        "spec": {"baseModel": {"name": "org/tiny"}, "replicas": 1, "engine": {"gpus": 0, "maxLoraRank": 16},
                 "routes": [{"name": "chat", "backends": [{"adapter": "a"}]}]}})
    # Version 1 has no evaluation: the gates hold it back (a first version is served nowhere then).
    await until(lambda: rollout().get("state") == "GateFailed", what="v1 held back by its gates")
    custom.patch_namespaced_custom_object_status(G, V, ns, "adapters", "a", {"status": {"provenance": {
        "evaluation": {**EVALUATION, "previous": None, "previousVersion": None}}}})

    # Play the kubelet and the loader: the replica is Ready and has version 1 loaded.
    pod = (await until(lambda: core.list_namespaced_pod(ns, label_selector="loraplane.io/route=r").items,
                       what="engine pod"))[0].metadata.name
    core.patch_namespaced_pod(pod, ns, {"metadata": {"annotations": {REPORT_ANNOTATION: report(pod, ["a--1"])}}})
    core.patch_namespaced_pod_status(pod, ns, {"status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]}})
    await until(lambda: rollout().get("state") in PROMOTED and adapter()["status"]["version"] == "1",
                what="v1 promoted (first version)")

    # The router pod lives at the address the router of this test listens on.
    router_pod = (await until(lambda: core.list_namespaced_pod(ns, label_selector="loraplane.io/router").items,
                              what="router pod"))[0].metadata.name
    core.patch_namespaced_pod_status(router_pod, ns, {"status": {"phase": "Running", "podIP": "127.0.0.1",
                                                                 "conditions": [{"type": "Ready", "status": "True"}]}})
    stub = await StubReplica("p", adapters={"a--1", "a--2"}, failing={"a--2"}).start()
    pool = ReplicaPool(poll_interval=0.2)
    pool.set_replicas([parse_replica_arg(stub.spec)])
    service = RouterService(Router(pool, rng=random.Random(1)), configmap=(ns, "r-serving"),
                            kubeconfig=kube_cluster.kubeconfig, host="127.0.0.1", port=ROUTER_PORT)
    answered: dict[str, dict[int, int]] = {}
    stop = asyncio.Event()

    async def load(c: aiohttp.ClientSession):
        while not stop.is_set():
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p", "max_tokens": 3}) as resp:
                await resp.read()
                backend = resp.headers.get("X-Loraplane-Backend", "-")
                per = answered.setdefault(backend, {})
                per[resp.status] = per.get(resp.status, 0) + 1
            await asyncio.sleep(0.02)

    await service.start()
    try:
        async with aiohttp.ClientSession(base_url=service.url) as c:
            workers = [asyncio.create_task(load(c)) for _ in range(4)]
            # Version 2: evaluated better than the base and v1; the operator loads it beside v1 first.
            custom.patch_namespaced_custom_object_status(G, V, ns, "adapters", "a", {"status": {"provenance": {
                "evaluation": EVALUATION}}})
            custom.patch_namespaced_custom_object(G, V, ns, "adapters", "a", {"spec": {
                "version": "2", "source": {"uri": "s3://does-not-exist/a2"}}})
            await until(lambda: rollout().get("state") == "Loading" and rollout().get("candidate") == "2",
                        what="v2 passed its gates and loads")
            await until(lambda: sorted(d.served_name for d in table().adapters) == ["a--1", "a--2"],
                        what="v2 loaded beside v1")
            core.patch_namespaced_pod(pod, ns, {"metadata": {"annotations": {
                REPORT_ANNOTATION: report(pod, ["a--1", "a--2"])}}})
            progressing = await until(lambda: (r := rollout()).get("state") == "Progressing" and r,
                                      what="v2 at 50%")
            started = time.monotonic()
            assert progressing["weight"] == 50
            # `kubectl get adapters` (the Table the API server renders from the CRD's printer columns).
            request = kube_api.param_serialize(
                method="GET", resource_path=f"/apis/{G}/{V}/namespaces/{ns}/adapters/a", auth_settings=["BearerToken"],
                header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
            response = kube_api.call_api(*request)
            response.read()
            rows = json.loads(response.data)
            cells = dict(zip([c["name"] for c in rows["columnDefinitions"]], rows["rows"][0]["cells"]))
            assert (cells["Rollout"], cells["Step"], cells["Weight"]) == ("Progressing", 1, 50), cells
            await until(lambda: any(b.served_name == "a--2" and b.weight == 50
                                    for m in table().models for b in m.backends), what="table split 50/50")
            rolled = await until(lambda: (r := rollout()).get("state") == "RolledBack" and r,
                                 timeout=3 * INTERVAL + 10, interval=0.1, what="automatic rollback")
            elapsed = time.monotonic() - started
            ready_at_rollback = next(c for c in adapter()["status"]["conditions"] if c["type"] == "Ready")
            # The route's table goes back to version 1 alone, the router follows, and no request reaches v2.
            reverted = await until(lambda: (t := table()) and [(b.served_name, b.weight) for m in t.models
                                                                for b in m.backends] == [("a--1", 100)] and t,
                                   timeout=15, what="table back on v1")
            await until(lambda: service.router.table.source.generation == reverted.generation, timeout=10,
                        what="router reloaded")
            to_v2 = sum(answered["a--2"].values())
            await asyncio.sleep(1.0)
            assert sum(answered["a--2"].values()) == to_v2
            stop.set()
            await asyncio.gather(*workers)
            # GitOps: promote it anyway (a spec field naming the version), then roll back to 1 by one field.
            custom.patch_namespaced_custom_object(G, V, ns, "adapters", "a", {"spec": {"rollout": {"promote": "2"}}})
            promoted = await until(lambda: (r := rollout()).get("state") in PROMOTED
                                   and adapter()["status"]["version"] == "2" and r,
                                   what="v2 promoted by spec.rollout.promote")
            # The steps' fields are gone: a merge patch without them kept them on the server (RFC 7386 merges
            # objects key by key), so status.rollout went on showing the rolled-back step.
            assert not {"step", "stepStartedAt", "lastAnalysisAt"} & set(promoted), promoted
            await until(lambda: [(b.served_name, b.weight) for m in table().models for b in m.backends]
                        == [("a--2", 100)], what="table on v2")
            custom.patch_namespaced_custom_object(G, V, ns, "adapters", "a", {"spec": {"rollout": {
                "rollbackTo": "1"}}})
            back = await until(lambda: (a := adapter()["status"])["version"] == "1" and a, what="rollbackTo 1")
            assert back["rollout"]["reason"] == "RolloutManualRollback" and back["servedName"] == "a--1"
            await until(lambda: [(b.served_name, b.weight) for m in table().models for b in m.backends]
                        == [("a--1", 100)], what="table back on v1 by rollbackTo")
    finally:
        stop.set()
        await service.stop()
        await stub.stop()
    print(f"\nanswered per backend: {answered}; rolled back {elapsed:.1f}s after the step began "
          f"(interval {INTERVAL}s)")
    # Within the analysis interval (plus the operator's requeue and one read of the routers).
    assert elapsed <= INTERVAL + 6, elapsed
    analysis = rolled["lastAnalysis"]
    assert analysis["verdict"] == "Failed" and analysis["failedCheck"] == "maxErrorRate"
    assert analysis["candidate"]["requests"] >= 5 and analysis["candidate"]["errorRate"] > 0.05
    assert analysis["candidate"]["errors"] == analysis["candidate"]["requests"]
    assert rolled["weight"] == 0 and rolled["stable"] == "1"
    assert (ready_at_rollback["status"], ready_at_rollback["reason"]) == ("False", "RolloutRolledBack")
    assert "maxErrorRate" in ready_at_rollback["message"]
    status = adapter()["status"]
    history = {h["version"]: h for h in status["history"]}
    assert history["2"]["rolledBackAt"] and history["2"]["promotedAt"] and history["1"]["promotedAt"]
    assert history["2"]["evaluation"] == {"metric": "rouge_l", "candidate": 0.71, "base": 0.42, "previous": 0.69}
    events = [(e.type, e.reason, e.message) for e in core.list_namespaced_event(
        ns, field_selector="involvedObject.name=a").items]
    warning = [e for e in events if e[1] == "RolloutRolledBack"]
    assert warning and warning[0][0] == "Warning" and "error rate" in warning[0][2], events
    assert {"RolloutProgressing", "RolloutPromoted", "RolloutManualRollback"} <= {e[1] for e in events}, events
    assert answered.get("a--2") and set(answered["a--2"]) == {500}
    assert set(answered.get("a--1", {})) == {200}
