"""charts/loraplane offline: strict lint, rendering through the Helm v4 SDK, strict schema validation of every
rendered manifest (kubernetes-validate), values.schema.json, security contexts, labels, RBAC shape, and the
CRD templates generated from the API models."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import yaml

from support.chart_rendering import CHART, RELEASE, RELEASE_NAMESPACE, by_kind, notes, objects, render, rule_grants
from support.paths import ROOT

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the `test` extra")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

# Value sets a user would install with: defaults, namespaced watch, everything optional switched on,
# CRDs managed elsewhere, pinned images.
VALUE_SETS = {
    "defaults": {},
    "namespaced": {"watch": {"namespaces": ["team-a", "team-b"]}},
    "everything-on": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
                      "monitoring": {"podMonitors": {"enabled": True}, "prometheusRule": {"enabled": True},
                                     "prometheusAdapter": {"enabled": True}},
                      "grafanaDashboard": {"enabled": True}, "commonLabels": {"cost-center": "ml"},
                      "podAnnotations": {"a": "b"}, "imagePullSecrets": [{"name": "regcred"}],
                      "nodeSelector": {"kubernetes.io/os": "linux"},
                      "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]},
    "crds-off-no-metrics": {"crds": {"enabled": False}, "metrics": {"enabled": False}, "rbac": {"keda": False}},
    "pinned-images": {"image": {"repository": "registry.example.com/lp/loraplane",
                                "digest": "sha256:" + "a" * 64},
                      "trainerImage": {"repository": "registry.example.com/lp/trainer", "tag": "0.1.0-cu128"},
                      "engineImage": {"repository": "registry.example.com/mirror/vllm-openai",
                                      "digest": "sha256:" + "b" * 64}},
    "old-cluster-apis": {"operator": {"hpaApiVersion": "autoscaling/v2beta2", "pdbApiVersion": "policy/v1beta1",
                                      "podFailurePolicy": "false"}},
    # issue 16: settings of every child pod, the artifact store's claim, the new policy globs
    "child-pods": {"imagePullSecrets": [{"name": "regcred"}],
                   "childPods": {"securityContext": {"fsGroup": 2000}, "priorityClassName": "ml-batch",
                                 "labels": {"kueue.x-k8s.io/queue-name": "team-a"},
                                 "tolerations": [{"key": "gpu", "operator": "Exists"}]},
                   "operator": {"artifacts": {"storageClassName": "nfs", "accessMode": "ReadWriteMany",
                                              "size": "1Ti"},
                                "policy": {"allowedPriorityClasses": ["team-*"],
                                           "allowedModelCacheHostPaths": ["/var/cache/loraplane/*"]}}},
    # issue 15: the gateway (one endpoint across a namespace's ModelRoutes), in a team namespace, with keys
    "gateway": {"gateway": {"enabled": True, "namespace": "team-a", "routeSelector": {"tier": "prod"},
                            "apiKeySecret": "gateway-keys", "replicas": 2},
                "imagePullSecrets": [{"name": "regcred"}]},
}
RECOMMENDED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                      "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of", "helm.sh/chart")


def operator_container(objs: list[dict]) -> dict:
    (deploy,) = by_kind(objs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


# --- lint and strict schema validation -----------------------------------------------------------------------

@pytest.mark.parametrize("kube_version", ["v1.20.0", "v1.30.0"])
@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_lint_strict_has_no_warnings(values, kube_version):
    report = helm.lint(CHART, VALUE_SETS[values], strict=True, namespace=RELEASE_NAMESPACE,
                       kube_version=kube_version)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("k8s", ["1.30", kubernetes_validate.utils.latest_version()])
@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_rendered_manifests_validate_strictly(values, k8s):
    objs = objects(VALUE_SETS[values])
    assert objs
    checked = skipped = 0
    for obj in objs:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            skipped += 1   # Prometheus Operator kinds: checked against their CRDs in test_monitoring.py
            continue
        # strict: unknown fields are errors, as the API server's strict field validation would report them
        kubernetes_validate.validate(obj, k8s, strict=True)
        checked += 1
    assert checked == len(objs) - skipped and checked >= len(objs) - 4


def test_service_monitor_selects_the_metrics_service():
    objs = objects(VALUE_SETS["everything-on"])
    (sm,) = by_kind(objs, "ServiceMonitor")
    svc = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-metrics"))
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [RELEASE_NAMESPACE]
    assert not by_kind(objects(), "ServiceMonitor"), "the ServiceMonitor is opt-in"


# --- values.schema.json -----------------------------------------------------------------------------------------

BAD_VALUES = [
    ("unknown top-level key", {"replicaCount": 2}, "replicaCount"),
    ("typo in a nested key", {"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),
    ("pull policy", {"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ("malformed digest", {"image": {"digest": "sha256:xyz"}}, "digest"),
    ("tag with a colon", {"trainerImage": {"tag": "v1:latest"}}, "tag"),
    ("vLLM image without tag or digest", {"engineImage": {"tag": ""}}, "engineImage"),
    ("namespace not a DNS label", {"watch": {"namespaces": ["Team_A"]}}, "namespaces"),
    ("namespace listed twice", {"watch": {"namespaces": ["a", "a"]}}, "namespaces"),
    ("port as a string", {"metrics": {"port": "http"}}, "port"),
    ("port out of range", {"metrics": {"service": {"port": 70000}}}, "port"),
    ("root user", {"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    ("privilege escalation", {"securityContext": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"),
    ("crds.enabled not a boolean", {"crds": {"enabled": "yes"}}, "enabled"),
    ("artifact store without scheme", {"operator": {"artifactStore": "/data"}}, "artifactStore"),
    ("unknown HPA version", {"operator": {"hpaApiVersion": "autoscaling/v1"}}, "hpaApiVersion"),
    ("pod failure policy as yes", {"operator": {"podFailurePolicy": "yes"}}, "podFailurePolicy"),
    ("scrape interval", {"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
    ("policy flag not a flag", {"operator": {"policy": {"allowedEngineArgs": ["--seed 1"]}}}, "allowedEngineArgs"),
    ("policy key misspelled", {"operator": {"policy": {"allowImages": ["x/*"]}}}, "allowImages"),
    ("gateway key misspelled", {"gateway": {"enable": True}}, "enable"),
    ("gateway namespace not a DNS label", {"gateway": {"namespace": "Team_A"}}, "namespace"),
    ("gateway selector value not a string", {"gateway": {"routeSelector": {"tier": 1}}}, "tier"),
    ("gateway with no replica", {"gateway": {"replicas": 0}}, "replicas"),
]


@pytest.mark.parametrize("case,values,field", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_values_schema_rejects_bad_values_naming_the_field(case, values, field):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(chart.merge_values(values))
    assert field in str(err.value), str(err.value)
    # and an install with them fails the same way (helm validates before rendering)
    with pytest.raises(helm.HelmError):
        render(values)


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_values_schema_accepts_the_documented_value_sets(values):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(VALUE_SETS[values]))


def test_every_default_value_is_described_by_the_schema():
    """values.yaml and values.schema.json agree: no default the schema would reject, no key it omits."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"]), set(defaults) - set(schema["properties"])


# --- the operator Deployment ------------------------------------------------------------------------------------

def test_operator_deployment_is_one_replica_recreate_and_hardened():
    objs = objects()
    (deploy,) = by_kind(objs, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = operator_container(objs)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["command"] == ["loraplane", "operator"]
    assert pod["serviceAccountName"] == f"{RELEASE}-loraplane"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080}
    assert c["livenessProbe"]["httpGet"]["path"] == c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_operator_settings_env_matches_what_the_operator_reads():
    """Every LORAPLANE_* variable the chart sets is one the operator reads (controllers/settings.py)."""
    source = (ROOT / "operator" / "loraplane" / "controllers" / "settings.py").read_text()
    read = set(re.findall(r'e\("(LORAPLANE_[A-Z_]+)"', source))
    env = env_of(operator_container(objects()))
    chart_vars = {k for k in env if k.startswith("LORAPLANE_")}
    assert chart_vars <= read, f"the operator does not read {chart_vars - read}"


def test_network_policies_are_on_by_default_and_can_be_switched_off(monkeypatch):
    from loraplane.controllers.settings import OperatorSettings

    on = env_of(operator_container(objects()))["LORAPLANE_NETWORK_POLICIES"]
    off = env_of(operator_container(objects({"networkPolicies": False})))["LORAPLANE_NETWORK_POLICIES"]
    read = []
    for value in (on, off):
        monkeypatch.setenv("LORAPLANE_NETWORK_POLICIES", value)
        read.append(OperatorSettings.from_env().build.network_policies)
    assert read == [True, False]


def test_images_and_settings_are_values():
    env = env_of(operator_container(objects()))
    assert env["LORAPLANE_IMAGE"] == "ghcr.io/loraplane/loraplane:0.1.0"  # tag defaults to appVersion
    assert env["LORAPLANE_TRAINER_IMAGE"] == "ghcr.io/loraplane/loraplane-trainer:0.1.0"
    # vLLM's own release, never the chart's appVersion; the same default the operator has without the chart
    from loraplane.builders.settings import DEFAULT_ENGINE_IMAGE
    assert env["LORAPLANE_ENGINE_IMAGE"] == DEFAULT_ENGINE_IMAGE
    assert env["LORAPLANE_NAMESPACES"] == ""
    objs = objects(VALUE_SETS["pinned-images"])
    c = operator_container(objs)
    assert c["image"] == "registry.example.com/lp/loraplane@sha256:" + "a" * 64  # digest wins over the tag
    assert env_of(c)["LORAPLANE_IMAGE"] == c["image"]
    assert env_of(c)["LORAPLANE_TRAINER_IMAGE"] == "registry.example.com/lp/trainer:0.1.0-cu128"
    assert env_of(c)["LORAPLANE_ENGINE_IMAGE"] == "registry.example.com/mirror/vllm-openai@sha256:" + "b" * 64
    c = operator_container(objects(VALUE_SETS["namespaced"]))
    assert env_of(c)["LORAPLANE_NAMESPACES"] == "team-a,team-b"
    assert c["args"] == ["--namespace=team-a", "--namespace=team-b"]  # what kopf watches
    assert "args" not in operator_container(objects())
    c = operator_container(objects({**VALUE_SETS["namespaced"], "operator": {"extraArgs": ["--verbose"]}}))
    assert c["args"] == ["--namespace=team-a", "--namespace=team-b", "--verbose"]
    env = env_of(operator_container(objects({"operator": {"artifactStore": "s3://bucket/adapters"}})))
    assert env["LORAPLANE_ARTIFACT_STORE"] == "s3://bucket/adapters"


def test_the_spec_policy_reaches_the_operator():
    """Issue 12, item 6: operator.policy values -> the operator's LORAPLANE_* env -> OperatorSettings' policy; the
    defaults are the operator's own (the safe extraArgs list, nothing else allowed)."""
    from loraplane.builders.policy import DEFAULT_ENGINE_ARGS, DEFAULT_ENGINE_ENV, SpecPolicy
    from loraplane.controllers.settings import OperatorSettings

    def policy_of(values: dict) -> SpecPolicy:
        env = env_of(operator_container(objects(values)))
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                if k.startswith("LORAPLANE_"):
                    mp.setenv(k, v)
            return OperatorSettings.from_env().build.policy

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]["policy"]
    assert tuple(defaults["allowedEngineArgs"]) == DEFAULT_ENGINE_ARGS
    assert tuple(defaults["allowedEngineEnv"]) == DEFAULT_ENGINE_ENV
    assert policy_of({}) == SpecPolicy()
    values = {"operator": {"policy": {
        "allowedImages": ["registry.example.com/ml/*", "quay.io/x/y:1"], "allowedEngineArgs": ["--seed"],
        "allowTrustRemoteCode": True, "allowedEnvSecrets": ["hf-*"], "allowedServiceAccounts": ["trainer-*"],
        "allowedEngineEnv": ["NCCL_*"], "allowedPrometheusAddresses": ["http://prometheus.monitoring:9090"]}}}
    assert policy_of(values) == SpecPolicy(
        allowed_images=("registry.example.com/ml/*", "quay.io/x/y:1"), allowed_engine_args=("--seed",),
        allow_trust_remote_code=True, allowed_env_secrets=("hf-*",), allowed_service_accounts=("trainer-*",),
        allowed_engine_env=("NCCL_*",), allowed_prometheus_addresses=("http://prometheus.monitoring:9090",))
    assert policy_of({"operator": {"policy": {"allowedEngineArgs": []}}}).allowed_engine_args == ()


def test_child_api_versions_follow_the_cluster_or_the_values():
    env = env_of(operator_container(objects()))  # Helm's built-in capabilities: a current cluster
    assert (env["LORAPLANE_HPA_API_VERSION"], env["LORAPLANE_PDB_API_VERSION"]) == ("autoscaling/v2", "policy/v1")
    assert env["LORAPLANE_POD_FAILURE_POLICY"] == "true"
    env = env_of(operator_container(objects(VALUE_SETS["old-cluster-apis"])))
    assert (env["LORAPLANE_HPA_API_VERSION"], env["LORAPLANE_PDB_API_VERSION"]) == (
        "autoscaling/v2beta2", "policy/v1beta1")
    assert env["LORAPLANE_POD_FAILURE_POLICY"] == "false"
    # and the operator reads them as meant
    from loraplane.controllers.settings import OperatorSettings
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            if k.startswith("LORAPLANE_"):
                mp.setenv(k, v)
        assert OperatorSettings.from_env().build.pod_failure_policy is False
        mp.setenv("LORAPLANE_POD_FAILURE_POLICY", "true")
        assert OperatorSettings.from_env().build.pod_failure_policy is True


def test_chart_app_version_is_the_package_version():
    import loraplane

    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["appVersion"] == loraplane.__version__ == meta["version"]


# --- labels -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_every_object_has_the_recommended_labels(values):
    for obj in objects(VALUE_SETS[values]):
        labels = obj["metadata"].get("labels") or {}
        missing = [k for k in RECOMMENDED_LABELS if k not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if values == "everything-on":
            assert labels["cost-center"] == "ml"


# --- RBAC ---------------------------------------------------------------------------------------------------------

def all_rules(objs: list[dict]) -> list[dict]:
    return [r for o in objs if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_rbac_has_no_wildcards(values):
    for rule in all_rules(objects(VALUE_SETS[values])):
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        allowed = {"get", "list", "watch", "create", "patch"}
        # The deletions the operator makes: the autoscaler a route no longer uses (HPA <-> KEDA <-> fixed), and
        # its NetworkPolicies once networkPolicies is switched off.
        if set(rule["resources"]) <= {"horizontalpodautoscalers", "scaledobjects", "networkpolicies"}:
            allowed.add("delete")
        assert set(rule["verbs"]) <= allowed, rule


def test_cluster_wide_watch_uses_a_cluster_role():
    objs = objects()
    assert not by_kind(objs, "Role") and not by_kind(objs, "RoleBinding")
    (role,) = by_kind(objs, "ClusterRole")
    (binding,) = by_kind(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-loraplane",
                                    "namespace": RELEASE_NAMESPACE}]
    grants = rule_grants(role["rules"])
    assert ("loraplane.io", "modelroutes", "watch") in grants
    assert ("", "namespaces", "list") not in grants  # kopf needs namespaces only for a namespace list


def test_namespaced_watch_uses_a_role_per_namespace():
    objs = objects(VALUE_SETS["namespaced"])
    roles, bindings = by_kind(objs, "Role"), by_kind(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"][0]["namespace"] == RELEASE_NAMESPACE
    (cluster_role,) = by_kind(objs, "ClusterRole")
    # cluster-wide, only what kopf reads about the cluster: CRDs and namespace names
    assert {(g, r) for g, r, _ in rule_grants(cluster_role["rules"])} == {
        ("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces")}
    assert {v for *_, v in rule_grants(cluster_role["rules"])} == {"list", "watch"}
    cluster_wide_role = by_kind(objects(), "ClusterRole")[0]
    namespaced = rule_grants(roles[0]["rules"])
    assert namespaced == rule_grants(cluster_wide_role["rules"]) - rule_grants(cluster_role["rules"])


def builder_children(backend: str = "hpa") -> list[dict]:
    """Everything the operator creates for the examples in docs/examples (and the Adapter a job produces)."""
    from loraplane.api import parse
    from loraplane.builders import render as render_children
    from loraplane.builders.finetunejob import produced_adapter

    from support.examples import valid_examples

    resources = []
    for _, doc in valid_examples():
        doc = copy.deepcopy(doc)
        if doc["kind"] == "ModelRoute" and doc["spec"].get("autoscaling"):
            doc["spec"]["autoscaling"]["backend"] = backend
        resources.append(parse(doc))
    children = render_children(resources)
    for r in resources:
        if r.kind == "FineTuneJob":
            children.append(produced_adapter(r, "pvc://adapters/x", None, None))
    return children


@pytest.mark.parametrize("backend", ["hpa", "keda"])
def test_operator_role_covers_every_child_and_every_grant(backend):
    """What the builders create, the operator may GET and server-side apply (PATCH); what the Roles they
    create grant, the operator holds itself (Kubernetes refuses to let it grant more than it has)."""
    from loraplane.kube.client import PLURALS

    grants = rule_grants(by_kind(objects(), "ClusterRole")[0]["rules"])
    children = builder_children(backend)
    kinds = {c["kind"] for c in children}
    assert {"Role", "RoleBinding", "Job", "Deployment", "ConfigMap", "Adapter"} <= kinds
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        for verb in ("get", "create", "patch"):  # a server-side apply that creates is authorized as create too
            assert (group, PLURALS[child["kind"]], verb) in grants, (child["kind"], verb)
        if child["kind"] == "Role":
            for rule in child["rules"]:
                for g, r, v in rule_grants([rule]):
                    assert (g, r, v) in grants, f"the operator grants {v} {g}/{r} without holding it"
    without_keda = rule_grants(by_kind(objects({"rbac": {"keda": False}}), "ClusterRole")[0]["rules"])
    assert ("keda.sh", "scaledobjects", "patch") not in without_keda


def test_operator_role_holds_nothing_it_neither_uses_nor_grants():
    """Least privilege (issue 12): every namespaced grant of the operator is a call it makes (watches and reads
    of its sources, server-side apply of its children, status patches, Events, pruning autoscalers) or a
    permission a Role it creates grants (RBAC's escalation check): `patch pods` (the report relay), `create
    secrets` (the engine key), deleting the children a spec or setting no longer asks for."""
    from loraplane.api import API_VERSION, ModelRoute, parse
    from loraplane.builders.modelroute import unwanted_children
    from loraplane.builders.settings import BuildSettings
    from loraplane.controllers.base import SOURCES
    from loraplane.kube.client import PLURALS

    def group(api_version: str) -> str:
        return api_version.rpartition("/")[0]

    used: set[tuple[str, str, str]] = set()
    for src in SOURCES:                                   # kopf's watches and the operator's informers
        used |= {(group(src.api_version), PLURALS[src.kind], v) for v in ("get", "list", "watch")}
    for kind in ("FineTuneJob", "Adapter", "ModelRoute"):  # status patches
        used.add((group(API_VERSION), PLURALS[kind] + "/status", "patch"))
    used.add(("", "events", "create"))
    used.add(("", "events", "list"))      # a trainer Job's FailedCreate Events (controllers/finetunejob)
    route = parse(yaml.safe_load((ROOT / "docs" / "examples" / "modelroute.yaml").read_text()))
    assert isinstance(route, ModelRoute)
    fixed = route.model_copy(update={"spec": route.spec.model_copy(update={"autoscaling": None, "replicas": 1})})
    for settings in (BuildSettings(), BuildSettings(network_policies=False)):
        for api_version, kind, _, _ in unwanted_children(fixed, settings):   # pruned autoscalers, NetworkPolicies
            used.add((group(api_version), PLURALS[kind], "delete"))
    used.add(("", "pods", "patch"))       # the report relay writes each engine pod's annotation (controllers/reports)
    used.add(("", "secrets", "create"))   # each route's engine key Secret, created once, never read
    # the artifact store's claim: read while a run waits for it, created when missing (issue 16), never changed
    used |= {("", "persistentvolumeclaims", "get"), ("", "persistentvolumeclaims", "create")}
    granted: set[tuple[str, str, str]] = set()
    for child in builder_children("hpa") + builder_children("keda"):
        used |= {(group(child["apiVersion"]), PLURALS[child["kind"]], v) for v in ("get", "create", "patch")}
        if child["kind"] == "Role":
            granted |= rule_grants(child["rules"])
    cluster_only = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
    grants = rule_grants(by_kind(objects(), "ClusterRole")[0]["rules"]) - cluster_only
    extra = grants - used - granted
    assert not extra, f"the operator holds {sorted(extra)} but neither uses nor grants them"


# --- CRDs ---------------------------------------------------------------------------------------------------------

def test_crd_templates_are_not_stale():
    """charts/loraplane/templates/crd-*.yaml are exactly what `loraplane crds` generates from the models."""
    from loraplane.codegen import chart as chartgen
    from loraplane.cli import main as cli_main

    expected = chartgen.crd_template_files(CHART)
    on_disk = set((CHART / "templates").glob("crd-*.yaml"))
    assert on_disk == set(expected), "the chart has CRD templates the models do not generate (or misses some)"
    for path, text in expected.items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `loraplane crds`"
    assert cli_main(["crds", "--check"]) == 0


def test_crds_check_detects_a_stale_chart(tmp_path):
    from loraplane.cli import main as cli_main

    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    args = ["--out", str(ROOT / "crds"), "--reference", str(ROOT / "docs" / "api-reference.md"),
            "--chart", str(chart)]
    assert cli_main(["crds", "--check", *args]) == 0
    victim = chart / "templates" / "crd-modelroutes.yaml"
    victim.write_text(victim.read_text().replace("maxLoraRank", "maxRank"))
    assert cli_main(["crds", "--check", *args]) == 1
    victim.unlink()
    assert cli_main(["crds", "--check", *args]) == 1


def test_rendered_crds_are_the_generated_crds_with_keep_policy():
    from loraplane.codegen import crds as crdgen

    crds = {c["metadata"]["name"]: c for c in by_kind(objects(), "CustomResourceDefinition")}
    generated = {c["metadata"]["name"]: c for c in crdgen.all_crds().values()}
    assert set(crds) == set(generated) == {"finetunejobs.loraplane.io", "adapters.loraplane.io",
                                           "modelroutes.loraplane.io"}
    for name, crd in crds.items():
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["spec"] == generated[name]["spec"]
        assert generated[name]["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    assert not by_kind(objects({"crds": {"enabled": False}}), "CustomResourceDefinition")


def test_template_syntax_in_model_text_is_escaped():
    from loraplane.codegen.chart import crd_template

    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "x.loraplane.io"}, "spec": {"description": "use {{ .Values }} literally"}}
    text = crd_template(crd)
    assert '{{ "{{" }}' in text and "{{ .Values }}" not in text


# --- dashboard and notes ------------------------------------------------------------------------------------------

def test_grafana_dashboard_parses_and_names_only_metrics_that_exist():
    objs = objects(VALUE_SETS["everything-on"])
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["loraplane.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    source = "\n".join(p.read_text() for p in (ROOT / "operator" / "loraplane").rglob("*.py"))
    names = {m for e in exprs for m in re.findall(r"\b(loraplane_[a-z_]+)", e)}
    for name in names:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert f'"{base}"' in source or f'"{base}_total"' in source, f"{name} is not a metric of loraplane"
    assert not by_kind(objects(), "ConfigMap"), "the dashboard is opt-in"


def test_notes_say_where_things_are():
    text = notes()
    assert f"deployment/{RELEASE}-loraplane" in text and "every namespace" in text
    text = notes(VALUE_SETS["namespaced"])
    assert "team-a, team-b" in text
    assert "install the CRDs yourself" in notes(VALUE_SETS["crds-off-no-metrics"])
