"""Issue 16, child pod settings: the chart's childPods (pull secrets, security context, priority and runtime class,
labels, annotations, node selection) reach every pod the operator creates through the operator's environment,
a kind's own field overrides them where the policy allows, and the restricted profile holds either way."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest

from loraplane.api import FineTuneJob, ModelRoute
from loraplane.api.pods import ChildPodSettings, PodSettings
from loraplane.builders import render
from loraplane.controllers.settings import OperatorSettings, child_pods_from_env
from support.chart_rendering import by_kind, objects
from support.pod_security import violations

CHART_VALUES = {
    "imagePullSecrets": [{"name": "regcred"}],
    "childPods": {
        "securityContext": {"fsGroup": 2000, "supplementalGroups": [3000]},
        "containerSecurityContext": {"runAsGroup": 2000},
        "priorityClassName": "ml-batch",
        "runtimeClassName": "nvidia",
        "labels": {"kueue.x-k8s.io/queue-name": "team-a", "team": "a"},
        "annotations": {"example.com/cost-center": "42"},
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
    },
}


def settings_from_chart(values: dict) -> OperatorSettings:
    """What the operator the chart installs with `values` reads from its environment."""
    deployment = by_kind(objects(values), "Deployment")[0]
    env = {e["name"]: e.get("value", "") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            if k.startswith("LORAPLANE_"):
                mp.setenv(k, v)
        return OperatorSettings.from_env()


def route(engine_pod: dict | None = None, router_pod: dict | None = None) -> ModelRoute:
    spec: dict = {"baseModel": {"uri": "s3://bucket/llama"},   # s3: the model-fetch init container too
                  "engine": {"tensorParallelSize": 2, "gpus": 2},
                  "routes": [{"name": "a", "backends": [{"base": True}]}]}
    if engine_pod is not None:
        spec["engine"]["pod"] = engine_pod
    if router_pod is not None:
        spec["router"] = {"pod": router_pod}
    return ModelRoute.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                                      "metadata": {"name": "r", "namespace": "ml", "uid": "u1"}, "spec": spec})


def job(pod: dict | None = None) -> FineTuneJob:
    spec: dict = {"baseModel": {"name": "org/m"}, "dataset": {"uri": "s3://b/train.jsonl"},
                  "output": {"adapterName": "a"}}
    if pod is not None:
        spec["pod"] = pod
    return FineTuneJob.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
                                       "metadata": {"name": "t", "namespace": "ml", "uid": "u2"}, "spec": spec})


def pods(manifests: list[dict]) -> dict[str, dict]:
    return {m["metadata"]["name"]: m["spec"]["template"] for m in manifests if m["kind"] in ("Job", "Deployment")}


def containers(template: dict) -> list[dict]:
    return [*template["spec"]["containers"], *template["spec"].get("initContainers", [])]


def test_chart_child_pod_settings_are_on_every_pod_the_operator_creates():
    build = settings_from_chart(CHART_VALUES).build
    manifests = render([route(), job()], build)
    found = pods(manifests)
    assert set(found) == {"r-engine", "r-router", "t-train"}
    for name, t in found.items():
        spec, meta = t["spec"], t["metadata"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}], name
        assert spec["securityContext"]["fsGroup"] == 2000 and spec["securityContext"]["supplementalGroups"] == [3000]
        assert spec["priorityClassName"] == "ml-batch" and spec["runtimeClassName"] == "nvidia", name
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and meta["labels"]["team"] == "a", name
        assert meta["annotations"]["example.com/cost-center"] == "42", name
        assert spec["nodeSelector"]["pool"] == "gpu", name
        assert {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], name
        assert spec["affinity"] == CHART_VALUES["childPods"]["affinity"], name
        for c in containers(t):
            assert c["securityContext"]["runAsGroup"] == 2000, (name, c["name"])
        # and the restricted profile still holds on every pod
        assert violations(spec, meta) == [], name
    assert {c["name"] for t in found.values() for c in containers(t)} >= {
        "trainer", "vllm", "adapter-loader", "model-fetch", "router"}
    for m in manifests:
        if m["kind"] in ("Job", "Deployment"):
            kubernetes_validate.validate(m, "1.30", strict=True)


def test_without_child_pods_the_operators_own_pull_secrets_are_inherited_and_nothing_else_changes():
    assert settings_from_chart({}).build.child_pods == ChildPodSettings()
    assert settings_from_chart({"imagePullSecrets": [{"name": "regcred"}]}).build.child_pods == ChildPodSettings(
        image_pull_secrets=[{"name": "regcred"}])
    # childPods.imagePullSecrets: [] means none, even when the operator has its own
    assert settings_from_chart({"imagePullSecrets": [{"name": "regcred"}],
                                "childPods": {"imagePullSecrets": []}}).build.child_pods == ChildPodSettings()


def test_a_kinds_pod_settings_override_the_charts_where_the_policy_allows():
    build = settings_from_chart({**CHART_VALUES, "operator": {"policy": {
        "allowedPriorityClasses": ["team-*"]}}}).build
    override = {"imagePullSecrets": [{"name": "own"}], "securityContext": {"fsGroup": 4000},
                "priorityClassName": "team-high", "labels": {"kueue.x-k8s.io/queue-name": "team-b"},
                "nodeSelector": {"pool": "a100"}}
    objs = [route(engine_pod=override, router_pod={"labels": {"team": "router"}}), job(override)]
    assert [v for o in objs for v in build.violations(o)] == []
    found = pods(render(objs, build))
    for name in ("r-engine", "t-train"):
        spec, meta = found[name]["spec"], found[name]["metadata"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "own"}]
        assert spec["securityContext"]["fsGroup"] == 4000
        assert spec["securityContext"]["supplementalGroups"] == [3000]       # the chart's, not replaced
        assert spec["priorityClassName"] == "team-high"
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-b"
        assert spec["nodeSelector"]["pool"] == "a100"
        assert violations(spec, meta) == []
    router = found["r-router"]
    assert router["metadata"]["labels"]["team"] == "router"
    assert router["spec"]["priorityClassName"] == "ml-batch"             # the chart's default where none is set


def test_operator_owned_labels_win_over_the_charts():
    build = settings_from_chart({"childPods": {"labels": {"app.kubernetes.io/component": "x",
                                                          "loraplane.io/route": "other"}}}).build
    labels = pods(render([route()], build))["r-engine"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "engine" and labels["loraplane.io/route"] == "r"


REFUSED = [   # (pod settings on a kind, the field the violation names)
    ({"securityContext": {"runAsNonRoot": False}}, "securityContext.runAsNonRoot"),
    ({"securityContext": {"runAsUser": 0}}, "securityContext.runAsUser"),
    ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, "securityContext.seccompProfile.type"),
    ({"securityContext": {"seLinuxOptions": {"type": "spc_t"}}}, "securityContext.seLinuxOptions.type"),
    ({"containerSecurityContext": {"privileged": True}}, "containerSecurityContext.privileged"),
    ({"containerSecurityContext": {"allowPrivilegeEscalation": True}},
     "containerSecurityContext.allowPrivilegeEscalation"),
    ({"containerSecurityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}},
     "containerSecurityContext.capabilities.add[0]"),
    ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "containerSecurityContext.readOnlyRootFilesystem"),
    ({"containerSecurityContext": {"procMount": "Unmasked"}}, "containerSecurityContext.procMount"),
    ({"containerSecurityContext": {"appArmorProfile": {"type": "Unconfined"}}},
     "containerSecurityContext.appArmorProfile.type"),
    ({"priorityClassName": "system-node-critical"}, "priorityClassName"),
    ({"runtimeClassName": "runc-unsandboxed"}, "runtimeClassName"),
    ({"labels": {"loraplane.io/route": "other"}}, "labels[loraplane.io/route]"),
    ({"labels": {"app.kubernetes.io/managed-by": "me"}}, "labels[app.kubernetes.io/managed-by]"),
    ({"labels": {"pod-template-hash": "x"}}, "labels[pod-template-hash]"),
    ({"labels": {"loraplane.io/tier": "gold"}}, "labels[loraplane.io/tier]"),
    ({"annotations": {"prometheus.io/port": "1"}}, "annotations[prometheus.io/port]"),
    ({"annotations": {"node.kubernetes.io/x": "1"}}, "annotations[node.kubernetes.io/x]"),
]


@pytest.mark.parametrize("pod,field", REFUSED, ids=[f for _, f in REFUSED])
def test_a_kinds_pod_settings_may_not_loosen_security_or_take_owned_metadata(pod, field):
    build = settings_from_chart({}).build
    for obj, where in ((job(pod), "spec.pod"), (route(engine_pod=pod), "spec.engine.pod"),
                       (route(router_pod=pod), "spec.router.pod")):
        found = build.violations(obj)
        assert [v.field for v in found] == [f"{where}.{field}"], found


def test_reserved_keys_the_policy_allows_and_harmless_values_pass():
    build = settings_from_chart({"operator": {"policy": {"allowedPodMetadataKeys": ["loraplane.io/tier"]}}}).build
    ok = {"labels": {"loraplane.io/tier": "gold", "kueue.x-k8s.io/queue-name": "q", "app.kubernetes.io/part-of": "x"},
          "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "Localhost",
                                                                                           "localhostProfile": "p"}},
          "containerSecurityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["NET_RAW"]},
                                       "allowPrivilegeEscalation": False}}
    assert build.violations(job(ok)) == []
    spec = pods(render([job(ok)], build))["t-train"]["spec"]
    caps = spec["containers"][0]["securityContext"]["capabilities"]
    assert caps == {"add": ["NET_BIND_SERVICE"], "drop": ["ALL", "NET_RAW"]}    # ALL is never dropped from drop
    # the pod's Localhost profile applies: no container keeps the operator's RuntimeDefault over it
    assert spec["securityContext"]["seccompProfile"] == {"type": "Localhost", "localhostProfile": "p"}
    assert all("seccompProfile" not in c["securityContext"] for c in spec["containers"])
    assert violations(spec) == []


def test_the_operator_refuses_chart_child_pods_that_loosen_the_restricted_profile():
    with pytest.raises(ValueError, match=r"childPods\.securityContext\.runAsNonRoot"):
        child_pods_from_env('{"securityContext": {"runAsNonRoot": false}}')
    with pytest.raises(ValueError, match=r"childPods\.containerSecurityContext\.privileged"):
        child_pods_from_env('{"containerSecurityContext": {"privileged": true}}')
    with pytest.raises(ValueError, match="not valid JSON"):
        child_pods_from_env("{")
    with pytest.raises(ValueError, match=r"childPods\.priorityClass"):
        child_pods_from_env('{"priorityClass": "x"}')
    assert child_pods_from_env("") == ChildPodSettings()


def test_pod_settings_are_copied_not_shared():
    build = settings_from_chart(CHART_VALUES).build
    before = copy.deepcopy(build.child_pods.model_dump())
    render([route(engine_pod={"tolerations": [{"key": "x", "operator": "Exists"}]}), job()], build)
    assert build.child_pods.model_dump() == before


def test_the_artifact_claim_settings_reach_the_operator():
    """Issue 16 item 3: operator.artifacts (StorageClass, access mode, size, createClaim) -> LORAPLANE_ARTIFACT_CLAIM_*
    -> BuildSettings.artifact_claim, from which the operator creates a missing artifact store claim."""
    from loraplane.builders.settings import ArtifactClaim

    assert settings_from_chart({}).build.artifact_claim == ArtifactClaim()
    values = {"operator": {"artifacts": {"createClaim": False, "storageClassName": "nfs",
                                         "accessMode": "ReadWriteMany", "size": "1Ti"}}}
    assert settings_from_chart(values).build.artifact_claim == ArtifactClaim(
        create=False, storage_class="nfs", access_mode="ReadWriteMany", size="1Ti")


def test_the_chart_schema_knows_exactly_the_pod_settings_fields():
    """values.schema.json's childPods lists the fields api.pods.PodSettings has (a typo fails `helm install`, and a
    field added to the model cannot be forgotten in the chart)."""
    import json

    from support.chart_rendering import CHART

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["childPods"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {f.alias for f in ChildPodSettings.model_fields.values()}
    component = json.loads((CHART / "values.schema.json").read_text())["definitions"]["componentPods"]
    assert set(component["properties"]) == {f.alias for f in PodSettings.model_fields.values()}
    import yaml

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["childPods"]
    assert set(defaults) == set(schema["properties"])


# The chart's childPods security values the operator refuses at start (chart_pod_settings_problems): the values
# schema refuses each too, so `helm install` fails instead of installing an operator that cannot start.
CHART_REFUSED = [pod for pod, field in REFUSED if "ecurityContext" in field] + [
    {"securityContext": {"appArmorProfile": {"type": "Unconfined"}}},
    {"securityContext": {"seLinuxOptions": {"user": "system_u"}}},
    {"containerSecurityContext": {"runAsUser": 0}},
    {"containerSecurityContext": {"runAsNonRoot": False}},
    {"containerSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
    {"containerSecurityContext": {"capabilities": {"add": ["NET_BIND_SERVICE", "cap_sys_admin"]}}},
]
CHART_ALLOWED = [
    {"securityContext": {"fsGroup": 2000, "runAsUser": 1000, "runAsNonRoot": True,
                         "seccompProfile": {"type": "Localhost", "localhostProfile": "p"},
                         "seLinuxOptions": {"level": "s0:c1", "type": "container_t"}}},
    {"containerSecurityContext": {"runAsGroup": 2000, "readOnlyRootFilesystem": True, "privileged": False,
                                  "allowPrivilegeEscalation": False, "procMount": "Default",
                                  "capabilities": {"add": ["NET_BIND_SERVICE", "cap_net_bind_service"],
                                                   "drop": ["NET_RAW"]}}},
]


def _schema_refuses(values: dict) -> bool:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the `test` extra")
    from support.chart_rendering import CHART

    with helm.Chart.load(CHART) as chart:
        try:
            chart.validate_schema(chart.merge_values(values))
        except helm.HelmValuesError:
            return True
    return False


@pytest.mark.parametrize("component", [None, "trainer", "engine", "router"])
def test_the_values_schema_refuses_the_child_pod_security_the_operator_refuses(component):
    """A new user's report: childPods.securityContext.runAsNonRoot: false (privileged: true, ...) passed the
    values schema, `helm install` succeeded and the operator then refused to start. The schema and the operator
    agree on every value, at the top of childPods and under each component."""
    for pod in CHART_REFUSED + CHART_ALLOWED:
        values = {"childPods": {component: pod} if component else pod}
        try:
            child_pods_from_env(json.dumps(values["childPods"]))
            operator_refuses = False
        except ValueError:
            operator_refuses = True
        assert operator_refuses == (pod in CHART_REFUSED), pod
        assert _schema_refuses(values) == operator_refuses, (component, pod)


def test_kueue_queue_label_reaches_the_trainer_job_object_and_only_the_trainer():
    """operations.md's Kueue example: Kueue reads kueue.x-k8s.io/queue-name from the Job's own metadata, so the
    trainer Job object carries the pod settings' labels (the pod template's only were never seen by Kueue).
    Under childPods.trainer the label stays off the engine and router pods (Kueue's pod integration would gate
    them), and a GPU runtimeClassName / toleration under childPods.engine stays off the router."""
    values = {"childPods": {"labels": {"team": "a"},
                            "trainer": {"labels": {"kueue.x-k8s.io/queue-name": "team-a"}},
                            "engine": {"runtimeClassName": "nvidia",
                                       "tolerations": [{"key": "gpu", "operator": "Exists"}]},
                            "router": {"labels": {"tier": "edge"}}}}
    assert not _schema_refuses(values)
    build = settings_from_chart(values).build
    manifests = render([route(), job()], build)
    (job_obj,) = [m for m in manifests if m["kind"] == "Job"]
    assert job_obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job_obj["metadata"]["labels"]["team"] == "a"
    assert job_obj["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"   # the operator's win
    found = pods(manifests)
    assert found["t-train"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    for name in ("r-engine", "r-router"):
        assert "kueue.x-k8s.io/queue-name" not in found[name]["metadata"]["labels"], name
        assert found[name]["metadata"]["labels"]["team"] == "a", name
    assert found["r-engine"]["spec"]["runtimeClassName"] == "nvidia"
    assert {"key": "gpu", "operator": "Exists"} in found["r-engine"]["spec"]["tolerations"]
    assert "runtimeClassName" not in found["r-router"]["spec"] and "runtimeClassName" not in found["t-train"]["spec"]
    assert {"key": "gpu", "operator": "Exists"} not in found["r-router"]["spec"].get("tolerations", [])
    assert found["r-router"]["metadata"]["labels"]["tier"] == "edge"
    assert "tier" not in found["r-engine"]["metadata"]["labels"]
    # a FineTuneJob's own spec.pod label reaches the Job object too
    own = pods_job = render([job({"labels": {"kueue.x-k8s.io/queue-name": "team-b"}})], build)
    assert [m for m in own if m["kind"] == "Job"][0]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-b"
    del pods_job
    for m in manifests:
        if m["kind"] in ("Job", "Deployment"):
            kubernetes_validate.validate(m, "1.30", strict=True)
    # `loraplane render --values` reads the same childPods
    from loraplane.cli.validate import child_pods_from_values
    assert child_pods_from_values(values) == build.child_pods
