"""The real operator against the real kube-apiserver (v1.20.2) with the real Job, Deployment, ReplicaSet,
garbage-collector and namespace controllers. No kubelet exists here, so the tests play it: they patch Pod
status (Running, Succeeded with the trainer's result message, OOMKilled, Ready with a loader report)."""

from __future__ import annotations

import copy
import json
import time

import pytest
import yaml

from loraplane.api.wire.serving import REPORT_ANNOTATION, AdapterReport, ReplicaReport, ServingTable
from support.paths import ROOT
from support.loader_reports import check_sendable

pytestmark = pytest.mark.apiserver

EXAMPLES = ROOT / "docs" / "examples"
G, V = "loraplane.io", "v1alpha1"
PLURALS = {"FineTuneJob": "finetunejobs", "Adapter": "adapters", "ModelRoute": "modelroutes"}
NOW = "2026-01-01T00:00:00Z"


def wait_for(fn, timeout: float = 30, what: str = "condition", interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - an object that does not exist yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class Cluster:
    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.ns = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.api = api_client

    def create(self, doc: dict) -> dict:
        doc = copy.deepcopy(doc)
        doc["metadata"]["namespace"] = self.ns
        return self.custom.create_namespaced_custom_object(G, V, self.ns, PLURALS[doc["kind"]], doc)

    def get(self, kind: str, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(G, V, self.ns, PLURALS[kind], name)

    def patch(self, kind: str, name: str, patch: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(G, V, self.ns, PLURALS[kind], name, patch)

    def delete(self, kind: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(G, V, self.ns, PLURALS[kind], name,
                                                    propagation_policy="Background")

    def list(self, kind: str) -> list[dict]:
        return self.custom.list_namespaced_custom_object(G, V, self.ns, PLURALS[kind])["items"]

    def status(self, kind: str, name: str) -> dict:
        return self.get(kind, name).get("status") or {}

    def ready(self, kind: str, name: str) -> dict:
        return next((c for c in self.status(kind, name).get("conditions", []) if c["type"] == "Ready"), {})

    def pods(self, selector: str) -> list:
        return self.core.list_namespaced_pod(self.ns, label_selector=selector).items

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [(e.type, e.reason, e.message) for e in items if e.source and e.source.component ==
                "loraplane-operator"]

    def patch_pod_status(self, name: str, status: dict) -> None:
        self.core.patch_namespaced_pod_status(name, self.ns, {"status": status})


def trainer_state(**state) -> dict:
    return {"containerStatuses": [{"name": "trainer", "image": "loraplane:test", "imageID": "", "ready": False,
                                   "restartCount": 0, "state": state}]}


def example(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


@pytest.fixture
def kube(kube_api, namespace, operator) -> Cluster:
    return Cluster(kube_api, namespace)


def small_job(name: str, adapter: str, **spec) -> dict:
    body = {"apiVersion": f"{G}/{V}", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"baseModel": {"name": "org/tiny", "revision": "main"},
                     "dataset": {"uri": "s3://does-not-exist/train.jsonl"},
                     "method": {"r": 8, "targetModules": ["q_proj", "v_proj"]},
                     "resources": {"gpus": 0, "cpu": 1, "memory": "1Gi"},
                     "output": {"adapterName": adapter, "uri": "s3://does-not-exist/out",
                                "adapterLabels": {"team": "t"}}, **spec}}
    return body


def job_pod(kube: Cluster, ftj: str):
    return wait_for(lambda: kube.pods(f"loraplane.io/finetunejob={ftj}"), what=f"a trainer pod of {ftj}")[0]


def test_examples_get_their_children_and_honest_status(kube):
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in example(path.name):
            if doc["kind"] == "ConfigMap":
                kube.core.create_namespaced_config_map(kube.ns, doc)
            else:
                kube.create(doc)
    # The quickstart (CPU sizes, inline dataset) gets its children too.
    quick = wait_for(lambda: kube.batch.read_namespaced_job("quickstart-train", kube.ns), what="quickstart Job")
    volumes = {v.name: v for v in quick.spec.template.spec.volumes}
    assert volumes["dataset"].config_map.name == "quickstart-data"
    wait_for(lambda: kube.core.read_namespaced_service("quickstart-router", kube.ns), what="quickstart router")
    # FineTuneJob: config, narrowly scoped RBAC and the Job; it waits (no kubelet, no S3) and says so.
    job = wait_for(lambda: kube.batch.read_namespaced_job("support-bot-v1-train", kube.ns), what="the Job")
    owner = job.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("FineTuneJob", "support-bot-v1", True)
    cm = kube.core.read_namespaced_config_map("support-bot-v1-config", kube.ns)
    assert json.loads(cm.data["finetunejob.json"])["spec"]["output"]["adapterName"] == "support-bot"
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(kube.api)
    role = rbac.read_namespaced_role("support-bot-v1-trainer", kube.ns)
    assert role.rules[0].resources == ["finetunejobs/status"] and role.rules[0].resource_names == ["support-bot-v1"]
    wait_for(lambda: kube.status("FineTuneJob", "support-bot-v1").get("phase") == "Pending", what="Pending")
    ready = kube.ready("FineTuneJob", "support-bot-v1")
    assert ready["status"] == "False" and ready["observedGeneration"] == 1

    # ModelRoute: engine Deployment + headless Service + PDB + HPA, router Deployment + Service, serving table.
    # The router Service is applied last: once it exists, every child does.
    wait_for(lambda: kube.core.read_namespaced_service("qwen-small-router", kube.ns), what="router Service")
    deploy = kube.apps.read_namespaced_deployment("qwen-small-engine", kube.ns)
    assert deploy.spec.template.metadata.labels["loraplane.io/route"] == "qwen-small"
    assert kube.core.read_namespaced_service("qwen-small-engine", kube.ns).spec.cluster_ip == "None"
    assert kube.core.read_namespaced_service("qwen-small-router", kube.ns).spec.ports[0].port == 8080
    wait_for(lambda: kube.apps.read_namespaced_deployment("qwen-small-router", kube.ns), what="router")
    # The 1.20 server's versions (the client library no longer has typed APIs for them).
    hpa = kube.custom.get_namespaced_custom_object("autoscaling", "v2beta2", kube.ns, "horizontalpodautoscalers",
                                                   "qwen-small-engine")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    pdb = kube.custom.get_namespaced_custom_object("policy", "v1beta1", kube.ns, "poddisruptionbudgets",
                                                   "qwen-small-engine")
    assert pdb["spec"]["maxUnavailable"] == 1
    table = ServingTable.model_validate_json(
        kube.core.read_namespaced_config_map("qwen-small-serving", kube.ns).data["serving.json"])
    assert {a.served_name for a in table.adapters} == {"sql-helper--3", "support-bot-canary--2"}
    # The first status may say Pending (written before the engine Deployment reached the operator's store).
    status = wait_for(lambda: (s := kube.status("ModelRoute", "qwen-small")).get("phase") == "Progressing" and s,
                      what="route Progressing")
    assert status["endpoint"] == f"http://qwen-small-router.{kube.ns}.svc:8080/v1"
    assert status["phase"] == "Progressing" and status["readyReplicas"] == 0
    support = next(m for m in status["models"] if m["name"] == "support")
    assert {b["adapter"]: b.get("reason") for b in support["backends"]} == {
        "support-bot-canary": "NotLoaded", "support-bot": "AdapterNotFound"}
    # Adapters: selected by the route (one by reference, one by selector), compatible, waiting to load.
    for name in ("sql-helper", "support-bot-canary"):
        st = wait_for(lambda: (s := kube.status("Adapter", name)).get("phase") and s, what=f"{name} status")
        assert st["phase"] == "Loading" and st["routes"] == ["qwen-small"]
        assert next(c for c in st["conditions"] if c["type"] == "Compatible")["status"] == "True"
    # Its output claim `adapters` (pvc://adapters/...) does not exist here: the status says so (issue 16).
    wait_for(lambda: any(t == "Normal" and r == "Pending" and "PersistentVolumeClaim adapters" in m
                         for t, r, m in kube.events("support-bot-v1")), what="the Pending event")
    ready = kube.ready("FineTuneJob", "support-bot-v1")
    assert ready["reason"] == "ArtifactClaimMissing" and "spec.output.uri" in ready["message"]
    # The quickstart job writes to the artifact store: the operator created its claim in this fresh namespace
    # (from operator.artifacts' defaults), and says it waits for the claim to bind (no provisioner here).
    claim = wait_for(lambda: kube.core.read_namespaced_persistent_volume_claim("loraplane-artifacts", kube.ns),
                     what="the artifact store's claim")
    assert claim.spec.access_modes == ["ReadWriteOnce"] and not claim.metadata.owner_references
    wait_for(lambda: kube.ready("FineTuneJob", "quickstart")["reason"] == "ArtifactClaimPending",
             what="ArtifactClaimPending")


def test_success_creates_the_adapter_with_provenance_and_a_rerun_bumps_it(kube, operator):
    kube.create(small_job("tune", "tuned"))
    pod = job_pod(kube, "tune")
    kube.patch_pod_status(pod.metadata.name, {"phase": "Running", **trainer_state(running={"startedAt": NOW})})
    wait_for(lambda: kube.status("FineTuneJob", "tune").get("phase") == "Running", what="Running")
    result = {"reason": "Succeeded", "artifact": {"uri": "s3://does-not-exist/out", "sha256": "a" * 64},
              "datasetSha256": "b" * 64, "metrics": {"train_loss": 0.75, "eval_loss": 0.8},
              "libraryVersions": {"peft": "0.21.0"}, "completedAt": NOW}
    kube.patch_pod_status(pod.metadata.name, {"phase": "Succeeded", **trainer_state(terminated={
        "exitCode": 0, "reason": "Completed", "message": json.dumps(result)})})
    st = wait_for(lambda: (s := kube.status("FineTuneJob", "tune")).get("phase") == "Succeeded" and s,
                  what="Succeeded")
    assert st["adapterRef"] == {"name": "tuned", "version": "1"}
    assert st["artifact"] == {"uri": "s3://does-not-exist/out", "sha256": "a" * 64}
    assert kube.ready("FineTuneJob", "tune")["status"] == "True"
    adapter = kube.get("Adapter", "tuned")
    assert adapter["spec"]["source"] == {"uri": "s3://does-not-exist/out", "sha256": "a" * 64}
    assert adapter["spec"]["version"] == "1" and adapter["spec"]["rank"] == 8
    assert adapter["metadata"]["labels"]["team"] == "t"
    # Not owned by the job (issue 13 item 4c): deleting the FineTuneJob must never delete the served Adapter.
    assert "ownerReferences" not in adapter["metadata"]
    prov = wait_for(lambda: kube.status("Adapter", "tuned").get("provenance"), what="provenance")
    assert prov["fineTuneJob"] == "tune" and prov["fineTuneJobUid"] == kube.get("FineTuneJob", "tune")["metadata"]["uid"]
    assert prov["datasetSha256"] == "b" * 64 and prov["metrics"] == {"train_loss": 0.75, "eval_loss": 0.8}
    assert prov["baseModel"] == "org/tiny" and prov["baseModelRevision"] == "main"
    assert prov["hyperparameters"]["method"]["r"] == 8 and prov["libraryVersions"] == {"peft": "0.21.0"}
    wait_for(lambda: {"Pending", "Running", "Succeeded"} <= {r for _, r, _ in kube.events("tune")},
             what="the tune events")
    wait_for(lambda: ("Normal", "Created", "version 1 from FineTuneJob tune") in kube.events("tuned"),
             what="the Created event")

    # A second job naming the same Adapter does not start without the opt-in (issue 13 item 4d).
    kube.create(small_job("tune-uninvited", "tuned"))
    wait_for(lambda: kube.ready("FineTuneJob", "tune-uninvited").get("reason") == "AdapterExists",
             what="AdapterExists")
    assert "allowExistingAdapter" in kube.ready("FineTuneJob", "tune-uninvited")["message"]
    assert kube.pods("loraplane.io/finetunejob=tune-uninvited") == []
    # With it, a successful run bumps the version.
    again = small_job("tune-again", "tuned")
    again["spec"]["output"]["allowExistingAdapter"] = True
    kube.create(again)
    pod2 = job_pod(kube, "tune-again")
    kube.patch_pod_status(pod2.metadata.name, {"phase": "Succeeded", **trainer_state(terminated={
        "exitCode": 0, "reason": "Completed", "message": json.dumps(result | {"artifact": {
            "uri": "s3://does-not-exist/out2", "sha256": "c" * 64}})})})
    wait_for(lambda: kube.status("FineTuneJob", "tune-again").get("adapterRef", {}).get("version") == "2",
             what="version 2")
    adapter = kube.get("Adapter", "tuned")
    assert adapter["spec"]["source"]["uri"] == "s3://does-not-exist/out2"
    assert "ownerReferences" not in adapter["metadata"]
    wait_for(lambda: kube.status("Adapter", "tuned")["provenance"]["fineTuneJob"] == "tune-again",
             what="the second run's provenance")
    # Deleting the jobs garbage-collects their children (the trainer Jobs), never the Adapter.
    for name in ("tune", "tune-again"):
        kube.delete("FineTuneJob", name)
    wait_for(lambda: not kube.pods("loraplane.io/finetunejob=tune-again"), timeout=60, what="the jobs' pods GC'd")
    time.sleep(2)
    assert kube.get("Adapter", "tuned")["spec"]["version"] == "2"


def test_oom_is_categorised_with_a_warning_event(kube):
    kube.create(small_job("oom", "oom-out", backoffLimit=0))
    pod = job_pod(kube, "oom")
    kube.patch_pod_status(pod.metadata.name, {"phase": "Failed", **trainer_state(terminated={
        "exitCode": 137, "reason": "OOMKilled"})})
    st = wait_for(lambda: (s := kube.status("FineTuneJob", "oom")).get("phase") == "Failed" and s, what="Failed")
    assert st["failure"]["reason"] == "OOMKilled" and "batchSize" in st["failure"]["message"]
    ready = kube.ready("FineTuneJob", "oom")
    assert (ready["status"], ready["reason"]) == ("False", "OOMKilled")
    wait_for(lambda: any(t == "Warning" and r == "OOMKilled" for t, r, _ in kube.events("oom")), what="the oom event")
    with pytest.raises(Exception):
        kube.get("Adapter", "oom-out")


def test_trainer_reason_from_the_termination_message(kube):
    kube.create(small_job("nodata", "nodata-out", backoffLimit=0))
    pod = job_pod(kube, "nodata")
    msg = {"reason": "DatasetNotFound", "message": "s3://does-not-exist/train.jsonl: NoSuchBucket"}
    kube.patch_pod_status(pod.metadata.name, {"phase": "Failed", **trainer_state(terminated={
        "exitCode": 66, "reason": "Error", "message": json.dumps(msg)})})
    st = wait_for(lambda: (s := kube.status("FineTuneJob", "nodata")).get("phase") == "Failed" and s,
                  what="Failed")
    assert st["failure"]["reason"] == "DatasetNotFound" and "NoSuchBucket" in st["failure"]["message"]


def test_deadline_exceeded(kube):
    kube.create(small_job("slow", "slow-out", activeDeadlineSeconds=3600))
    job_pod(kube, "slow")
    # The API's minimum is 60 s; the Job's own deadline is shortened so the real Job controller fails it now.
    kube.batch.patch_namespaced_job("slow-train", kube.ns, {"spec": {"activeDeadlineSeconds": 1}})
    st = wait_for(lambda: (s := kube.status("FineTuneJob", "slow")).get("phase") == "Failed" and s,
                  timeout=45, what="DeadlineExceeded")
    assert st["failure"]["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds" in st["failure"]["message"]
    wait_for(lambda: any(r == "DeadlineExceeded" for _, r, _ in kube.events("slow")), what="the slow event")


def test_invalid_spec_and_immutable_change_become_conditions(kube, operator):
    # v1.20 ignores the CRD's CEL rules, so this reaches the operator: it must say which field, not crash.
    bad = small_job("bad", "bad-out")
    bad["spec"]["dataset"]["configMapRef"] = {"name": "data"}
    kube.create(bad)
    ready = wait_for(lambda: (r := kube.ready("FineTuneJob", "bad")) and r, what="InvalidSpec")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "dataset" in ready["message"] and "exactly one of dataset.uri or dataset.configMapRef" in ready["message"]
    assert not kube.pods("loraplane.io/finetunejob=bad")

    kube.create(small_job("fixed", "fixed-out"))
    job_pod(kube, "fixed")
    wait_for(lambda: kube.status("FineTuneJob", "fixed").get("phase") == "Pending", what="Pending")
    before = kube.batch.read_namespaced_job("fixed-train", kube.ns).metadata
    kube.patch("FineTuneJob", "fixed", {"spec": {"method": {"r": 32}}})
    ready = wait_for(lambda: (r := kube.ready("FineTuneJob", "fixed"))["reason"] == "SpecImmutable" and r,
                     what="SpecImmutable")
    assert "spec.method" in ready["message"] and ready["observedGeneration"] == 2
    after = kube.batch.read_namespaced_job("fixed-train", kube.ns).metadata
    assert after.annotations == before.annotations  # the Job (and its config) kept the accepted spec
    config = kube.core.read_namespaced_config_map("fixed-config", kube.ns).data["finetunejob.json"]
    assert json.loads(config)["spec"]["method"]["r"] == 8
    wait_for(lambda: any(r == "SpecImmutable" for _, r, _ in kube.events("fixed")), what="the fixed event")
    kube.patch("FineTuneJob", "fixed", {"spec": {"method": {"r": 8}}})
    wait_for(lambda: kube.ready("FineTuneJob", "fixed")["reason"] == "Pending", what="accepted again")
    # A mutable field reaches the Job.
    kube.patch("FineTuneJob", "fixed", {"spec": {"backoffLimit": 5}})
    wait_for(lambda: kube.batch.read_namespaced_job("fixed-train", kube.ns).spec.backoff_limit == 5,
             what="backoffLimit applied")


def route_doc(name: str, **engine) -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "ModelRoute", "metadata": {"name": name},
            "spec": {"baseModel": {"name": "org/tiny"}, "replicas": 1,
                     "engine": {"gpus": 0, "maxLoraRank": 16, **engine},
                     "routes": [{"name": "chat", "backends": [{"adapter": "good", "weight": 80},
                                                              {"base": True, "weight": 20}]},
                                {"selector": {"matchLabels": {"team": "t"}}, "prefix": "t/"}]}}


def adapter_doc(name: str, rank: int = 8, base: str = "org/tiny", labels=None) -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "Adapter", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"baseModel": {"name": base}, "source": {"uri": f"s3://does-not-exist/{name}"},
                     "version": "1", "rank": rank}}


def report(pod: str, route: str, adapters: dict[str, tuple[str, str]]) -> str:
    """A hand-written replica report: only pairs the real loader sends (support.loader_reports)."""
    for s, r in adapters.values():
        check_sendable(s, r)
    return ReplicaReport(replica=pod, route=route, generation=1, engine_ready=True, updated_at=NOW, adapters={
        k: AdapterReport(state=s, reason=r, message=f"{r} on {pod}", since=NOW)
        for k, (s, r) in adapters.items()}).to_annotation()


def test_route_serves_compatible_adapters_and_aggregates_loader_reports(kube):
    kube.create(adapter_doc("good"))
    kube.create(adapter_doc("big", rank=64, labels={"team": "t"}))
    kube.create(adapter_doc("elsewhere", base="org/other", labels={"team": "t"}))
    kube.create(adapter_doc("noeffect", labels={"team": "t"}))
    kube.create(route_doc("r1"))
    big = wait_for(lambda: (s := kube.status("Adapter", "big")).get("phase") == "Incompatible" and s,
                   what="big Incompatible")
    assert next(c for c in big["conditions"] if c["type"] == "Ready")["reason"] == "RankTooLarge"
    other = wait_for(lambda: (s := kube.status("Adapter", "elsewhere")).get("phase") == "Incompatible" and s,
                     what="elsewhere Incompatible")
    assert next(c for c in other["conditions"] if c["type"] == "Ready")["reason"] == "BaseModelMismatch"
    table = ServingTable.model_validate_json(
        kube.core.read_namespaced_config_map("r1-serving", kube.ns).data["serving.json"])
    assert sorted(a.served_name for a in table.adapters) == ["good--1", "noeffect--1"]
    assert sorted(m.name for m in table.models) == ["chat", "t/noeffect"]

    # Play the kubelet and the loader: the replica is Ready and reports what it loaded.
    pod = wait_for(lambda: kube.pods("loraplane.io/route=r1"), what="engine pod")[0]
    kube.core.patch_namespaced_pod(pod.metadata.name, kube.ns, {"metadata": {"annotations": {
        REPORT_ANNOTATION: report(pod.metadata.name, "r1", {"good--1": ("Ready", "Loaded"),
                                                            "noeffect--1": ("Failed", "NoEffect")})}}})
    kube.patch_pod_status(pod.metadata.name, {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]})
    good = wait_for(lambda: (s := kube.status("Adapter", "good")).get("phase") == "Ready" and s, what="good Ready")
    assert good["loadedOn"][0]["replica"] == pod.metadata.name and good["servedName"] == "good--1"
    noeffect = wait_for(lambda: (s := kube.status("Adapter", "noeffect")).get("phase") == "Failed" and s,
                        what="NoEffect reported")
    assert next(c for c in noeffect["conditions"] if c["type"] == "Ready")["reason"] == "NoEffect"
    route = wait_for(lambda: (s := kube.status("ModelRoute", "r1")).get("readyReplicas") == 1 and s,
                     what="route ready replica (the ReplicaSet controller counted the Ready pod)")
    chat = next(m for m in route["models"] if m["name"] == "chat")
    assert chat["ready"] and [b["readyReplicas"] for b in chat["backends"]] == [1, 1]
    assert route["phase"] == "Degraded"  # t/noeffect has no ready backend
    assert kube.ready("ModelRoute", "r1")["reason"] == "ModelsNotReady"

    # Switching to an autoscaler creates the HPA; switching back removes it (pruned, not left to fight).
    def hpa_exists():
        return any(h["metadata"]["name"] == "r1-engine" for h in kube.custom.list_namespaced_custom_object(
            "autoscaling", "v2beta2", kube.ns, "horizontalpodautoscalers")["items"])

    kube.patch("ModelRoute", "r1", {"spec": {"replicas": None, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}})
    wait_for(hpa_exists, what="HPA created")
    kube.patch("ModelRoute", "r1", {"spec": {"replicas": 2, "autoscaling": None}})
    wait_for(lambda: not hpa_exists(), what="HPA pruned")
    wait_for(lambda: kube.apps.read_namespaced_deployment("r1-engine", kube.ns).spec.replicas == 2,
             what="fixed replicas applied")

    # An immutable baseModel change is refused; the serving table keeps the accepted base.
    kube.patch("ModelRoute", "r1", {"spec": {"baseModel": {"name": "org/other"}}})
    ready = wait_for(lambda: (r := kube.ready("ModelRoute", "r1"))["reason"] == "SpecImmutable" and r,
                     what="SpecImmutable")
    assert "org/tiny" in ready["message"] and "org/other" in ready["message"]
    table = ServingTable.model_validate_json(
        kube.core.read_namespaced_config_map("r1-serving", kube.ns).data["serving.json"])
    assert table.base_model == "org/tiny"

    # Deleting the route garbage-collects its children.
    kube.delete("ModelRoute", "r1")
    wait_for(lambda: not kube.apps.list_namespaced_deployment(kube.ns).items
             and not kube.core.list_namespaced_config_map(kube.ns, label_selector="app.kubernetes.io/instance=r1"
                                                          ).items, timeout=45, what="garbage collection")
    wait_for(lambda: kube.status("Adapter", "good").get("phase") == "Pending", what="adapter without route")


def test_idle_resync_writes_nothing_and_restart_duplicates_nothing(kube, operator):
    kube.create(adapter_doc("good"))
    kube.create(route_doc("r2"))
    kube.create(small_job("restart", "restart-out"))
    kube.create(small_job("upgrade", "upgrade-out"))
    # Kill the operator while it is still reconciling these, start it again.
    time.sleep(0.3)
    operator.restart()
    pod = job_pod(kube, "restart")
    job_pod(kube, "upgrade")  # both Jobs have their pod: the status writes those pods cause come before the quiet
    wait_for(lambda: kube.status("ModelRoute", "r2").get("phase") and kube.status("Adapter", "good").get("phase")
             and kube.status("FineTuneJob", "restart").get("phase")
             and kube.status("FineTuneJob", "upgrade").get("phase"), what="settled")
    # Quiet: no write for 3 s in a row (bounded wait; on a busy machine the controller-manager creates children,
    # and the operator writes the status they cause, a while after the objects settle).
    writes, quiet, deadline = -1.0, 0, time.monotonic() + 60
    while time.monotonic() < deadline and quiet < 2:
        before, writes = writes, operator.metric_sum("loraplane_operator_api_writes_total")
        quiet = quiet + 1 if writes == before else 0
        if quiet < 2:
            time.sleep(1.5)
    reconciles = operator.metric_sum("loraplane_operator_reconciles_total")
    time.sleep(2 * operator.resync_seconds + 1)
    assert operator.metric_sum("loraplane_operator_reconciles_total") > reconciles + 2  # resyncs ran ...
    assert operator.metric_sum("loraplane_operator_api_writes_total") == writes, [  # ... and wrote nothing
        line for line in operator.metrics_text().splitlines() if line.startswith("loraplane_operator_api_writes")]

    # Success, then a kill right after the Adapter appears: the restarted operator finishes the job's status
    # without a second Adapter version.
    kube.patch_pod_status(pod.metadata.name, {"phase": "Succeeded", **trainer_state(terminated={
        "exitCode": 0, "reason": "Completed", "message": json.dumps(
            {"artifact": {"uri": "s3://does-not-exist/out", "sha256": "d" * 64}})})})
    wait_for(lambda: kube.get("Adapter", "restart-out"), interval=0.05, what="the Adapter")
    # The operator that comes back is a new version: it renders Jobs differently (another default image).
    upgrade_before = kube.batch.read_namespaced_job("upgrade-train", kube.ns)
    operator.image = "loraplane:next"
    operator.restart()
    wait_for(lambda: kube.status("FineTuneJob", "restart").get("adapterRef"), what="adapterRef")
    assert kube.get("Adapter", "restart-out")["spec"]["version"] == "1"
    assert kube.status("FineTuneJob", "restart")["adapterRef"]["version"] == "1"
    assert sorted(j.metadata.name for j in kube.batch.list_namespaced_job(kube.ns).items) == [
        "restart-train", "upgrade-train"]
    assert len(kube.pods("loraplane.io/finetunejob=restart")) == 1
    assert len([d for d in kube.apps.list_namespaced_deployment(kube.ns).items]) == 2  # engine + router
    # A Job's pod template is immutable: the running Job keeps its pods, only its mutable fields follow the
    # new rendering, and no reconcile fails over it.
    wait_for(lambda: kube.batch.read_namespaced_job("upgrade-train", kube.ns).metadata.annotations
             != upgrade_before.metadata.annotations, what="the running Job's hash follows the new rendering")
    upgrade_after = kube.batch.read_namespaced_job("upgrade-train", kube.ns)
    assert upgrade_after.spec.template.spec.containers[0].image == "loraplane:test"
    assert upgrade_after.metadata.uid == upgrade_before.metadata.uid
    assert operator.metric_sum("loraplane_operator_reconciles_total", kind="FineTuneJob", result="error") == 0
    assert kube.status("FineTuneJob", "upgrade")["phase"] == "Pending"
    # Deleting the job garbage-collects its children (the Job), never the Adapter it produced (issue 13 item 4c:
    # a served Adapter must outlive the run that made it).
    kube.delete("FineTuneJob", "restart")
    wait_for(lambda: [j.metadata.name for j in kube.batch.list_namespaced_job(kube.ns).items] == ["upgrade-train"],
             timeout=45, what="the Job garbage-collected")
    time.sleep(2)
    assert any(a["metadata"]["name"] == "restart-out" for a in kube.list("Adapter"))


def client_for_service_account(kube: Cluster, kube_cluster, tmp_path, account: str):
    """An API client authenticated as a ServiceAccount (its token Secret, made by the token controller)."""
    import base64

    from kubernetes import config

    def token():
        sa = kube.core.read_namespaced_service_account(account, kube.ns)
        if not sa.secrets:
            return None
        secret = kube.core.read_namespaced_secret(sa.secrets[0].name, kube.ns)
        return base64.b64decode(secret.data["token"]).decode() if secret.data and "token" in secret.data else None

    path = kube_cluster.kubeconfig_for_token(wait_for(token, what=f"token of {account}"), tmp_path / account)
    return config.new_client_from_config(config_file=str(path))


def test_pod_rbac_is_scoped_to_their_own_objects(kube, kube_cluster, tmp_path):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    kube.create(small_job("mine", "mine-out"))
    kube.create(small_job("theirs", "theirs-out"))
    kube.create(route_doc("r3"))
    kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": "other"}, "data": {"k": "v"}})
    wait_for(lambda: kube.core.read_namespaced_service("r3-router", kube.ns), what="route children")
    wait_for(lambda: kube.status("FineTuneJob", "theirs").get("phase"), what="job status")

    # The trainer of "mine" reports progress on its own job, and only there.
    trainer = client.CustomObjectsApi(client_for_service_account(kube, kube_cluster, tmp_path, "mine-trainer"))
    progress = {"status": {"progress": {"step": 3, "totalSteps": 10, "loss": 1.25}}}
    trainer.patch_namespaced_custom_object_status(G, V, kube.ns, "finetunejobs", "mine", progress)
    with pytest.raises(ApiException) as denied:
        trainer.patch_namespaced_custom_object_status(G, V, kube.ns, "finetunejobs", "theirs", progress)
    assert denied.value.status == 403
    assert kube.status("FineTuneJob", "mine")["progress"]["step"] == 3
    # The operator's own status writes leave the trainer's progress alone.
    kube.patch("FineTuneJob", "mine", {"spec": {"backoffLimit": 4}})
    wait_for(lambda: kube.status("FineTuneJob", "mine").get("observedGeneration") == 2, what="reconciled")
    assert kube.status("FineTuneJob", "mine")["progress"]["loss"] == 1.25

    # The loader reads its route's serving table and nothing else.
    loader = client.CoreV1Api(client_for_service_account(kube, kube_cluster, tmp_path, "r3-engine"))
    assert "serving.json" in loader.read_namespaced_config_map("r3-serving", kube.ns).data
    with pytest.raises(ApiException) as denied:
        loader.read_namespaced_config_map("other", kube.ns)
    assert denied.value.status == 403


def test_image_pull_problem_is_reported_while_pending(kube):
    kube.create(small_job("pull", "pull-out", image="registry.invalid/nope:1"))
    pod = job_pod(kube, "pull")
    kube.patch_pod_status(pod.metadata.name, {"phase": "Pending", **trainer_state(waiting={
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "registry.invalid/nope:1"'})})
    ready = wait_for(lambda: (r := kube.ready("FineTuneJob", "pull"))["reason"] == "ImagePull" and r,
                     what="ImagePull")
    assert "registry.invalid/nope:1" in ready["message"] and "spec.image" in ready["message"]
    assert kube.status("FineTuneJob", "pull")["phase"] == "Pending"
    wait_for(lambda: any(t == "Warning" and r == "ImagePull" for t, r, _ in kube.events("pull")), what="the pull event")


def test_route_status_quotes_why_replicas_fail(kube):
    """An s3:// base model: the engine pod gets the fetch init container; its failure, then a crashing vLLM,
    reach the route's Ready condition and a Warning event (the tests play the kubelet)."""
    doc = route_doc("r-s3")
    doc["spec"]["baseModel"] = {"uri": "s3://models/tiny/"}
    kube.create(doc)
    pod = wait_for(lambda: kube.pods("loraplane.io/route=r-s3"), what="engine pod")[0]
    assert [c.name for c in pod.spec.init_containers] == ["model-fetch"]
    assert pod.spec.init_containers[0].command[:3] == ["loraplane", "fetch-model", "s3://models/tiny/"]
    kube.patch_pod_status(pod.metadata.name, {"phase": "Pending", "initContainerStatuses": [{
        "name": "model-fetch", "ready": False, "restartCount": 2, "image": "loraplane:test", "imageID": "",
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "spec.baseModel.uri "
                                     "s3://models/tiny/: no objects under that prefix"}}}]})
    ready = wait_for(lambda: (r := kube.ready("ModelRoute", "r-s3"))["reason"] == "ModelFetchFailed" and r,
                     what="ModelFetchFailed")
    assert "no objects under that prefix" in ready["message"] and ready["status"] == "False"
    wait_for(lambda: any(t == "Warning" and r == "ModelFetchFailed" for t, r, _ in kube.events("r-s3")),
             what="the r-s3 event")

    running = {"running": {"startedAt": NOW}}
    kube.patch_pod_status(pod.metadata.name, {"phase": "Running", "initContainerStatuses": [{
        "name": "model-fetch", "ready": True, "restartCount": 2, "image": "loraplane:test", "imageID": "",
        "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}], "containerStatuses": [
        {"name": "vllm", "ready": False, "restartCount": 1, "image": "vllm", "imageID": "",
         "state": {"waiting": {"reason": "CrashLoopBackOff"}},
         "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                      "message": "torch.OutOfMemoryError: CUDA out of memory"}}},
        {"name": "adapter-loader", "ready": True, "restartCount": 0, "image": "loraplane:test", "imageID": "",
         "state": running}]})
    ready = wait_for(lambda: (r := kube.ready("ModelRoute", "r-s3"))["reason"] == "EngineFailing" and r,
                     what="EngineFailing")
    assert "container vllm exited with code 1 (1 restarts): torch.OutOfMemoryError" in ready["message"]


def test_adapter_base_model_change_is_refused_and_it_leaves_the_table(kube, operator):
    kube.create(adapter_doc("good"))
    kube.create(route_doc("r4"))

    def served():
        cm = kube.core.read_namespaced_config_map("r4-serving", kube.ns)
        return [a.served_name for a in ServingTable.model_validate_json(cm.data["serving.json"]).adapters]

    wait_for(lambda: served() == ["good--1"], what="good in the table")
    wait_for(lambda: kube.status("Adapter", "good").get("acceptedBaseModel"), what="accepted base recorded")
    kube.patch("Adapter", "good", {"spec": {"baseModel": {"name": "org/other"}}})
    ready = wait_for(lambda: (r := kube.ready("Adapter", "good"))["reason"] == "SpecImmutable" and r,
                     what="SpecImmutable")
    assert "org/tiny" in ready["message"] and "org/other" in ready["message"]
    wait_for(lambda: served() == [], what="refused adapter out of the table")

    def backend_reason():
        chat = next(m for m in kube.status("ModelRoute", "r4")["models"] if m["name"] == "chat")
        return {b.get("adapter"): b.get("reason") for b in chat["backends"]}["good"]

    wait_for(lambda: backend_reason() == "SpecImmutable", what="the route says why the backend is out")
    kube.patch("Adapter", "good", {"spec": {"baseModel": {"name": "org/tiny"}}})
    wait_for(lambda: served() == ["good--1"], what="back in the table once reverted")
    kube.delete("Adapter", "good")
    wait_for(lambda: served() == [], what="a deleted adapter leaves the table")
    wait_for(lambda: backend_reason() == "AdapterNotFound", what="the route says it is gone")
    text = operator.metrics_text()
    for name in ("loraplane_operator_reconcile_duration_seconds_bucket", "loraplane_operator_adapters{",
                 "loraplane_operator_finetunejobs{", 'loraplane_operator_reconciles_total{kind="Adapter"'):
        assert name in text


def test_child_watches_are_label_selected_on_the_server(kube_cluster, kube_api, namespace):
    """The operator's own watches of Pods/Jobs/Deployments carry the label selector to the API server: an
    unrelated pod is never sent (kopf would stream it and filter it here). Also: a watch resumes from its
    resourceVersion, so nothing between LIST and WATCH is lost."""
    import asyncio

    from kubernetes import client

    from loraplane.builders.common import COMPONENT_LABEL
    from loraplane.kube.client import KubeClient
    from loraplane.api.wire.serving import ROUTE_LABEL

    core = client.CoreV1Api(kube_api)
    selector = f"{ROUTE_LABEL},{COMPONENT_LABEL}=engine"

    def pod(name, labels):
        return {"metadata": {"name": name, "labels": labels},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}

    async def scenario():
        kube = KubeClient.from_environment(kubeconfig=str(kube_cluster.kubeconfig))
        try:
            _, rv = await kube.list_with_version("v1", "Pod", namespace, selector)
            # Created after the LIST, before the WATCH: the watch from rv must still deliver the labelled one.
            for i in range(5):
                core.create_namespaced_pod(namespace, pod(f"unrelated-{i}", {"app": "other"}))
            core.create_namespaced_pod(namespace, pod("engine-0", {ROUTE_LABEL: "r", COMPONENT_LABEL: "engine"}))
            core.create_namespaced_pod(namespace, pod("unrelated-late", {ROUTE_LABEL: "r"}))  # not an engine pod
            seen = []

            async def collect():
                async for event_type, obj in kube.watch("v1", "Pod", namespace, selector, rv, timeout_seconds=5):
                    if event_type != "BOOKMARK":
                        seen.append((event_type, obj["metadata"]["name"], obj["kind"]))

            await asyncio.wait_for(collect(), 30)  # the server ends the watch after timeoutSeconds
            return seen
        finally:
            await kube.close()

    seen = asyncio.run(scenario())
    assert seen and {name for _, name, _ in seen} == {"engine-0"}, seen
    assert seen[0] == ("ADDED", "engine-0", "Pod")


# ---- issue 13: names at the seams ------------------------------------------------------------------------------

def test_a_long_job_name_and_a_dotted_claim_give_children_the_api_server_accepts(kube):
    # A 69-character FineTuneJob used to render 69-character label values: the API server refused its children
    # and the operator retried forever with no status. Now the Job and its pods exist, labelled within 63.
    from loraplane.api import FineTuneJob
    from loraplane.builders.finetunejob import job_name, owner_label

    name = "f" * 69
    body = small_job(name, "a" * 63, dataset={"uri": "pvc://my.claim/train.jsonl"})
    kube.create(body)
    ftj = FineTuneJob.model_validate(body)
    label = owner_label(name)
    assert len(label) <= 63 and label != name
    pod = wait_for(lambda: kube.pods(f"loraplane.io/finetunejob={label}"), what="a trainer pod")[0]
    assert kube.batch.read_namespaced_job(job_name(ftj), kube.ns).metadata.name == job_name(ftj)
    assert [v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim] == [
        "my.claim"]
    wait_for(lambda: kube.status("FineTuneJob", name).get("phase") == "Pending", what="Pending")


def test_served_name_and_public_name_collisions_are_refused_or_reported(kube):
    # Item 1: v1.20 ignores CEL, so the reserved separator in a version reaches the operator: InvalidSpec.
    kube.create(adapter_doc("sql") | {"spec": {**adapter_doc("sql")["spec"], "version": "v2--1"}})
    ready = wait_for(lambda: (r := kube.ready("Adapter", "sql")) and r, what="InvalidSpec")
    assert ready["reason"] == "InvalidSpec" and "spec.version" in ready["message"]
    # Item 2: an explicit route `analytics-sql`, and a selector with prefix `analytics-s` over Adapter `ql`.
    kube.create(adapter_doc("ql", labels={"team": "analytics"}))
    route = route_doc("names")
    route["spec"]["routes"] = [{"selector": {"matchLabels": {"team": "analytics"}}, "prefix": "analytics-s"},
                               {"name": "analytics-sql", "backends": [{"base": True}]}]
    kube.create(route)
    ready = wait_for(lambda: (r := kube.ready("ModelRoute", "names"))["reason"] == "PublicNameConflict" and r,
                     what="PublicNameConflict")
    assert "routes[1] (analytics-sql)" in ready["message"] and "Adapter ql" in ready["message"]
    table = ServingTable.model_validate_json(
        kube.core.read_namespaced_config_map("names-serving", kube.ns).data["serving.json"])
    assert [m.name for m in table.models] == ["analytics-sql"]
    # Item 3: a malformed selector no longer reaches anyone: the CRD's schema refuses it at admission.
    from kubernetes.client.exceptions import ApiException

    bad = route_doc("badsel")
    bad["spec"]["routes"] = [{"selector": {"matchLabels": ["team"]}, "prefix": "x-"}]
    with pytest.raises(ApiException) as err:
        kube.create(bad)
    assert err.value.status == 422 and "matchLabels" in err.value.body
    wait_for(lambda: kube.status("Adapter", "ql").get("routes") == ["names"], what="the adapter's routes")


def test_a_spec_the_policy_refuses_creates_nothing_and_says_which_setting(kube):
    """Issue 12, item 6, against the real API server: with the default policy, a FineTuneJob with a foreign image
    and a ModelRoute with --trust-remote-code get Ready=False PolicyViolation (which the CRD's condition schema
    accepts) and a Warning Event; no Job, ConfigMap or Deployment is created. Fixing the route creates them."""
    kube.create(small_job("foreign", "foreign-out", image="evil.example/miner:1"))
    ready = wait_for(lambda: (r := kube.ready("FineTuneJob", "foreign")) and r, what="PolicyViolation")
    assert (ready["status"], ready["reason"]) == ("False", "PolicyViolation")
    assert "spec.image" in ready["message"] and "operator.policy.allowedImages" in ready["message"]
    route = example("modelroute.yaml")[0]
    route["metadata"]["name"] = "trusting"
    route["spec"]["engine"]["extraArgs"] = ["--trust-remote-code"]
    kube.create(route)
    ready = wait_for(lambda: (r := kube.ready("ModelRoute", "trusting")) and r, what="PolicyViolation")
    assert ready["reason"] == "PolicyViolation" and "spec.engine.extraArgs[0]" in ready["message"]
    wait_for(lambda: any(r == "PolicyViolation" for _, r, _ in kube.events("trusting")), what="the Event")
    assert not kube.batch.list_namespaced_job(kube.ns).items
    assert not kube.apps.list_namespaced_deployment(kube.ns).items
    kube.patch("ModelRoute", "trusting", {"spec": {"engine": {"extraArgs": ["--enable-prefix-caching"]}}})
    wait_for(lambda: kube.apps.list_namespaced_deployment(kube.ns).items, what="the route's Deployments")
