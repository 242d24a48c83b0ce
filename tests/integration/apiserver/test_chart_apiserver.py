"""The chart against the real kube-apiserver (v1.20.2): install what `helm install` would (CRDs, ServiceAccount,
RBAC, metrics Service), then act with the chart ServiceAccount's own token:

- RBAC sufficient: the real operator, started exactly as the chart's Deployment starts it (its command and
  env), reconciles every example of docs/examples; and the calls the operator makes (watch, server-side apply
  of every child kind including the Roles it grants, status patches, Events) succeed with that token;
- RBAC minimal: the token is refused what lies outside the role (deleting namespaces, reading Secrets,
  creating cluster role bindings, granting what it does not hold, writing outside the watched namespaces).

Not installed: the operator Deployment itself (there is no kubelet to run it; the test runs its command as a
local process instead). The 1.20 server lacks autoscaling/v2, policy/v1 and Job podFailurePolicy, so the chart
is rendered with `operator.hpaApiVersion: autoscaling/v2beta2`, `operator.pdbApiVersion: policy/v1beta1` and
`operator.podFailurePolicy: "false"`, the values a 1.20 cluster's capabilities select on a real `helm install`.
No KEDA CRDs are installed: the examples use HPA.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support.chart_rendering import by_kind, objects
from harness.cluster import free_port, stop_process
from support.examples import valid_examples
from support.kube import service_account_token
from support.paths import ROOT

pytestmark = pytest.mark.apiserver
pytest.importorskip("helm_python", reason="helm-python-sdk is in the `test` extra")

API = "loraplane.io/v1alpha1"
V120 = {"operator": {"hpaApiVersion": "autoscaling/v2beta2", "pdbApiVersion": "policy/v1beta1",
                     "podFailurePolicy": "false"}}
_counter = iter(range(1000))


# --- installing the rendered chart ------------------------------------------------------------------------------

def install(kube_api, objs: list[dict], workdir: Path) -> None:
    """The rendered objects, CRDs first, by server-side apply (as Helm 4 does); not the operator Deployment."""
    import yaml
    from kubernetes.dynamic import DynamicClient

    from support.kube import install_crds

    # The 1.20 server's apply schema lacks x-kubernetes-validations (CEL came later), so its server-side apply
    # refuses our CRDs: they go through the session's create-or-replace, as Helm 3's client-side apply does.
    crd_dir = workdir / "crds"
    crd_dir.mkdir()
    for crd in by_kind(objs, "CustomResourceDefinition"):
        (crd_dir / f"{crd['metadata']['name']}.yaml").write_text(yaml.safe_dump(crd))
    install_crds(kube_api, crd_dir)
    dyn = DynamicClient(kube_api)
    for obj in sorted(objs, key=lambda o: {"ServiceAccount": 0, "ClusterRole": 1, "Role": 1}.get(o["kind"], 2)):
        if obj["kind"] in ("CustomResourceDefinition", "Deployment"):
            continue  # Deployment: no kubelet; the operator runs as a local process with the same command and env
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        dyn.server_side_apply(resource, body=obj, namespace=obj["metadata"].get("namespace"),
                              field_manager="helm", force_conflicts=True)


def uninstall(kube_api, objs: list[dict]) -> None:
    """What `helm uninstall` removes: everything but the CRDs (resource-policy: keep)."""
    from kubernetes.client.rest import ApiException
    from kubernetes.dynamic import DynamicClient

    dyn = DynamicClient(kube_api)
    for obj in objs:
        if obj["kind"] in ("Deployment", "CustomResourceDefinition"):
            continue
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        try:
            resource.delete(name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace"))
        except ApiException as exc:
            if exc.status != 404:
                raise


def make_namespace(kube_api, prefix: str) -> str:
    from kubernetes import client

    name = f"{prefix}-{int(time.time()) % 100000}-{next(_counter)}"
    client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": name}})
    return name


def delete_namespace(kube_api, name: str) -> None:
    from kubernetes import client

    client.CoreV1Api(kube_api).delete_namespace(name)


class Installed:
    def __init__(self, kube_api, kube_cluster, tmp: Path, release: str, values: dict):
        self.kube_api = kube_api
        self.release_ns = make_namespace(kube_api, "lp-system")
        self.values = values
        self.objs = objects(values, name=release, namespace=self.release_ns)
        install(kube_api, self.objs, tmp)
        (sa,) = by_kind(self.objs, "ServiceAccount")
        self.token = service_account_token(kube_api, self.release_ns, sa["metadata"]["name"])
        self.kubeconfig = kube_cluster.kubeconfig_for_token(self.token, tmp / f"{release}.kubeconfig")

    def close(self) -> None:
        uninstall(self.kube_api, self.objs)
        delete_namespace(self.kube_api, self.release_ns)


@pytest.fixture(scope="module")
def watched(kube_api, crds_installed):
    """Three namespaces: the namespaced install watches `a` and `c`, not `b`. `c` stays empty until the real
    operator's test creates the examples there."""
    names = make_namespace(kube_api, "lp-a"), make_namespace(kube_api, "lp-b"), make_namespace(kube_api, "lp-c")
    yield names
    for name in names:
        delete_namespace(kube_api, name)


@pytest.fixture(scope="module")
def cluster_wide(kube_api, kube_cluster, crds_installed, tmp_path_factory):
    inst = Installed(kube_api, kube_cluster, tmp_path_factory.mktemp("chart"), "lpc", V120)
    yield inst
    inst.close()


@pytest.fixture(scope="module")
def namespaced(kube_api, kube_cluster, crds_installed, watched, tmp_path_factory):
    values = {**V120, "watch": {"namespaces": [watched[0], watched[2]]}}
    inst = Installed(kube_api, kube_cluster, tmp_path_factory.mktemp("chart"), "lpn", values)
    yield inst
    inst.close()


# --- acting as the operator ----------------------------------------------------------------------------------

def create_examples(kube_api, namespace: str) -> list[dict]:
    """Every valid example of docs/examples, created (as a user would) in `namespace`; returns the live objects."""
    from kubernetes import client

    from loraplane.api import KINDS

    api = client.CustomObjectsApi(kube_api)
    live = []
    for _, doc in valid_examples():
        doc = copy.deepcopy(doc)
        doc["metadata"]["namespace"] = namespace
        plural = KINDS[doc["kind"]].PLURAL
        live.append(api.create_namespaced_custom_object("loraplane.io", "v1alpha1", namespace, plural, doc))
    return live


def chart_settings(installed: Installed):
    """The builders' settings of the chart's operator, from its container's env (as the operator reads them)."""
    from loraplane.controllers.settings import OperatorSettings

    (deploy,) = by_kind(installed.objs, "Deployment")
    env = {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return OperatorSettings.from_env().build
    finally:
        os.environ.clear()
        os.environ.update(saved)


def children_of(live: list[dict], installed: Installed) -> list[dict]:
    """What the chart's operator creates for these objects (the builders' output with its settings and the
    real owner uids) plus the Adapter a succeeded FineTuneJob produces."""
    from loraplane.api import parse
    from loraplane.builders import render
    from loraplane.builders.finetunejob import produced_adapter

    resources = [parse(obj) for obj in live]
    out = render(resources, chart_settings(installed))
    for r in resources:
        if r.kind == "FineTuneJob":
            produced = produced_adapter(r, "pvc://adapters/produced", None, None)
            produced["metadata"]["name"] = "produced-by-test"
            out.append(produced)
    return out


async def typical_calls(installed: Installed, namespace: str, live: list[dict], cluster_wide: bool) -> list[str]:
    """The API calls the operator makes, with the operator's own client; returns what was done."""
    from loraplane.api import KINDS
    from loraplane.kube.client import KubeClient, resource_path

    os.environ.pop("KUBERNETES_SERVICE_HOST", None)
    kube = KubeClient.from_environment(kubeconfig=str(installed.kubeconfig))
    done = []
    try:
        scope = None if cluster_wide else namespace
        watched_kinds = [(API, kind, None) for kind in KINDS] + [
            ("batch/v1", "Job", "loraplane.io/finetunejob"), ("v1", "Pod", "loraplane.io/finetunejob"),
            ("apps/v1", "Deployment", "loraplane.io/route")]

        async def list_and_watch(api_version: str, kind: str, selector: str | None) -> str:
            assert isinstance(await kube.list(api_version, kind, scope, selector), list)
            params = {"watch": "true", "timeoutSeconds": "1", **({"labelSelector": selector} if selector else {})}
            await kube.request("GET", resource_path(api_version, kind, scope), params=params)
            return f"list+watch {kind}"

        done += await asyncio.gather(*(list_and_watch(*w) for w in watched_kinds))  # as kopf's watchers do
        await kube.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        done.append("list CRDs")
        for child in children_of(live, installed):
            await kube.get(child["apiVersion"], child["kind"], namespace, child["metadata"]["name"])
            await kube.apply(child)
            done.append(f"apply {child['kind']}")
        for obj in live:
            meta = obj["metadata"]
            await kube.patch_status(API, obj["kind"], namespace, meta["name"],
                                    {"observedGeneration": meta["generation"]})
            done.append(f"patch {obj['kind']}/status")
        event = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "rbac-check.", "namespace": namespace},
                 "involvedObject": {"apiVersion": API, "kind": live[0]["kind"], "name": live[0]["metadata"]["name"],
                                    "namespace": namespace, "uid": live[0]["metadata"]["uid"]},
                 "type": "Normal", "reason": "RBACCheck", "message": "the operator may post Events",
                 "source": {"component": "loraplane-operator"}}
        await kube.request("POST", resource_path("v1", "Event", namespace), event)
        done.append("create Event")
        # the artifact store's claim (issue 16): read while a run waits for it, created when missing
        from loraplane.builders.finetunejob import artifact_claim
        from loraplane.builders.settings import BuildSettings

        await kube.get("v1", "PersistentVolumeClaim", namespace, "loraplane-artifacts")
        await kube.create_if_absent(artifact_claim(namespace, "loraplane-artifacts", BuildSettings()))
        done.append("create PersistentVolumeClaim")
    finally:
        await kube.close()
    return done


async def refused(kubeconfig: Path, method: str, path: str, body: dict | None = None,
                  content_type: str = "application/json") -> int:
    from loraplane.kube.client import ApiError, KubeClient

    kube = KubeClient.from_environment(kubeconfig=str(kubeconfig))
    try:
        await kube.request(method, path, body, content_type=content_type,
                           params={"fieldManager": "loraplane"} if method == "PATCH" else None)
        return 200
    except ApiError as exc:
        return exc.status
    finally:
        await kube.close()


# --- RBAC sufficient ------------------------------------------------------------------------------------------

def test_chart_token_makes_every_operator_call(kube_api, cluster_wide, watched):
    live = create_examples(kube_api, watched[1])
    done = asyncio.run(typical_calls(cluster_wide, watched[1], live, cluster_wide=True))
    applied = {d.split()[1] for d in done if d.startswith("apply")}
    # every kind the builders produce for the examples, the Roles the operator grants included
    assert {"ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job", "Deployment", "Service",
            "PodDisruptionBudget", "HorizontalPodAutoscaler", "Adapter"} <= applied, done
    assert "create Event" in done and "list CRDs" in done and "create PersistentVolumeClaim" in done


def test_namespaced_chart_token_works_in_its_namespace(kube_api, namespaced, watched):
    live = create_examples(kube_api, watched[0])
    done = asyncio.run(typical_calls(namespaced, watched[0], live, cluster_wide=False))
    assert any(d == "apply Role" for d in done) and "create Event" in done


def operator_process(installed: Installed, log_path: Path, in_cluster=None) -> tuple[subprocess.Popen, int]:
    """The chart's operator container as a local process: its command and env, with the token's kubeconfig; or,
    given `in_cluster` (the Cluster), as in a pod: no kubeconfig, KUBERNETES_SERVICE_HOST/PORT, and the token, CA
    and namespace at /var/run/secrets/kubernetes.io/serviceaccount in a private mount namespace (root only)."""
    (deploy,) = by_kind(installed.objs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    port = free_port()
    env = {e["name"]: e["value"] for e in container["env"]}
    env["LORAPLANE_METRICS_PORT"] = str(port)
    env["LORAPLANE_RESYNC_SECONDS"] = "5"
    command = [str(Path(sys.executable).parent / container["command"][0]), *container["command"][1:],
               *container.get("args", [])]
    assert container["command"] == ["loraplane", "operator"]
    full_env = {**{k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")},
                **env, "KUBECONFIG": str(installed.kubeconfig)}
    if in_cluster is not None:
        from loraplane.api.paths import SERVICE_ACCOUNT_PATH

        account = log_path.parent / "serviceaccount"
        account.mkdir()
        (account / "token").write_text(installed.token)
        (account / "namespace").write_text(installed.release_ns)
        (account / "ca.crt").write_bytes(in_cluster.ca_file.read_bytes())
        del full_env["KUBECONFIG"]
        full_env.update(KUBERNETES_SERVICE_HOST=in_cluster.bind_address, KUBERNETES_SERVICE_PORT=str(in_cluster.port))
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mkdir -p {SERVICE_ACCOUNT_PATH} && mount --bind "$0" {SERVICE_ACCOUNT_PATH} && exec "$@"',
                   str(account), *command]
    proc = subprocess.Popen(command, env=full_env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise TimeoutError(f"operator not healthy:\n{log_path.read_text()[-3000:]}")


def wait_reconciled(kube_api, namespace: str, names: list[tuple[str, str]], timeout: float = 60) -> dict:
    from kubernetes import client

    from loraplane.api import KINDS

    api = client.CustomObjectsApi(kube_api)
    deadline = time.monotonic() + timeout
    pending = {}
    while time.monotonic() < deadline:
        pending = {}
        for kind, name in names:
            obj = api.get_namespaced_custom_object("loraplane.io", "v1alpha1", namespace, KINDS[kind].PLURAL, name)
            if (obj.get("status") or {}).get("observedGeneration") != obj["metadata"]["generation"]:
                pending[(kind, name)] = obj.get("status")
        if not pending:
            return {}
        time.sleep(0.3)
    return pending


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced", "in-cluster"])
def test_operator_with_the_chart_token_reconciles_every_example(kube_api, kube_cluster, mode, cluster_wide,
                                                                  namespaced, watched, tmp_path):
    """`in-cluster`: the cluster-wide install's operator configured as in its pod (issue 11: the service-account
    token, the cluster's CA and KUBERNETES_SERVICE_HOST; TLS verified, no kubeconfig anywhere)."""
    from kubernetes import client

    if mode == "in-cluster" and os.geteuid() != 0:
        pytest.skip("the in-cluster mode mounts the service-account folder in a private mount namespace (root)")
    installed = namespaced if mode == "namespaced" else cluster_wide
    ns = watched[2] if mode == "namespaced" else make_namespace(kube_api, "lp-ex")
    log = tmp_path / "operator.log"
    proc, port = operator_process(installed, log, kube_cluster if mode == "in-cluster" else None)
    try:
        live = create_examples(kube_api, ns)
        names = [(o["kind"], o["metadata"]["name"]) for o in live]
        assert {k for k, _ in names} == {"FineTuneJob", "Adapter", "ModelRoute"}
        pending = wait_reconciled(kube_api, ns, names)
        assert not pending, f"not reconciled: {pending}\n{log.read_text()[-3000:]}"
        # the children exist: the training Job and the engine and router Deployments
        jobs = client.BatchV1Api(kube_api).list_namespaced_job(ns).items
        deploys = client.AppsV1Api(kube_api).list_namespaced_deployment(ns).items
        assert jobs and len(deploys) >= 2
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert "loraplane_operator_api_writes_total" in metrics
    finally:
        stop_process(proc)
        if mode != "namespaced":
            delete_namespace(kube_api, ns)
    # Writes into the namespace the test is deleting at its end are refused as "being terminated": not a finding.
    text = "\n".join(line for line in log.read_text().splitlines() if "because it is being terminated" not in line)
    denied = re.findall(r".*(?:HTTP 403|[Ff]orbidden|Not enough permissions).*", text)
    assert not denied, "\n".join(denied)[:3000]
    # Every reconcile of a new object succeeds at once: with RBAC enforced, a RoleBinding applied before its Role
    # was refused (HTTP 404, the escalation check) and the first reconcile of every job and route failed (issue 11).
    failed = re.findall(r".*reconcile failed.*", text)
    assert not failed, "\n".join(failed)[:3000]
    if mode == "in-cluster":
        assert "Kubernetes API credentials: in-cluster service account" in log.read_text()


# --- RBAC minimal ---------------------------------------------------------------------------------------------

def test_chart_token_is_refused_outside_its_role(cluster_wide, watched):
    kc, ns = cluster_wide.kubeconfig, watched[1]
    crb = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": "lp-escalate"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
           "subjects": [{"kind": "ServiceAccount", "name": "x", "namespace": ns}]}
    # a Role granting more than the operator holds: the API server's escalation check refuses it
    greedy = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
              "metadata": {"name": "lp-greedy", "namespace": ns},
              "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}
    cases = {
        "delete a namespace": ("DELETE", f"/api/v1/namespaces/{ns}", None),
        "read Secrets": ("GET", f"/api/v1/namespaces/{ns}/secrets", None),
        "read Secrets in its own namespace": ("GET", f"/api/v1/namespaces/{cluster_wide.release_ns}/secrets", None),
        "create a ClusterRoleBinding": ("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", crb),
        "grant what it does not hold": ("PATCH", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/lp-greedy",
                                        greedy),
        "delete a ModelRoute": ("DELETE", f"/apis/loraplane.io/v1alpha1/namespaces/{ns}/modelroutes/qwen-small", None),
        "delete the CRDs": ("DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/adapters.loraplane.io",
                            None),
        "create Pods": ("POST", f"/api/v1/namespaces/{ns}/pods",
                        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                         "spec": {"containers": [{"name": "x", "image": "x"}]}}),
    }
    got = {}
    for what, (method, path, body) in cases.items():
        ctype = "application/apply-patch+yaml" if method == "PATCH" else "application/json"
        got[what] = asyncio.run(refused(kc, method, path, body, ctype))
    assert got == {what: 403 for what in cases}, got


def test_namespaced_chart_token_is_refused_outside_its_namespaces(namespaced, watched):
    kc, (inside, outside, _) = namespaced.kubeconfig, watched
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe", "namespace": outside}}
    got = {
        "list ModelRoutes cluster-wide": asyncio.run(refused(kc, "GET", "/apis/loraplane.io/v1alpha1/modelroutes")),
        "list ModelRoutes outside": asyncio.run(refused(
            kc, "GET", f"/apis/loraplane.io/v1alpha1/namespaces/{outside}/modelroutes")),
        "apply a ConfigMap outside": asyncio.run(refused(
            kc, "PATCH", f"/api/v1/namespaces/{outside}/configmaps/probe", cm, "application/apply-patch+yaml")),
        "list Pods cluster-wide": asyncio.run(refused(kc, "GET", "/api/v1/pods")),
    }
    assert got == {k: 403 for k in got}, got
    # what kopf reads about the cluster is allowed
    assert asyncio.run(refused(kc, "GET", "/api/v1/namespaces")) == 200
    assert asyncio.run(refused(kc, "GET", f"/apis/loraplane.io/v1alpha1/namespaces/{inside}/modelroutes")) == 200
