"""Every pod the product renders passes upstream's restricted policy, enforced by upstream's admission code; a pod
refused by admission shows in the owner's status with the API server's message (issue 12, "Also").

Why a PodSecurityPolicy and not Pod Security admission: nothing that runs the Pod Security Standards' own checks
(k8s.io/pod-security-admission) can be had offline here: the Go module proxy is unreachable, no Debian, PyPI or
npm package carries it, and the test kube-apiserver is v1.20, which predates the PodSecurity plugin (1.22). It
does have the PodSecurityPolicy plugin, which enforces the standard's "restricted" controls written as a policy
(fixtures/restricted-psp.yaml: each rule names its control). So a second, short-lived control plane runs with
`--enable-admission-plugins=PodSecurityPolicy`; a ServiceAccount that may `use` only that policy creates, with
server-side dry-run, every pod the builders render (support.pod_security.every_pod_kind: trainer Job, engine and
router Deployments, with the variants that add init containers and volumes) and the chart's operator Deployment.
Where the PSP and the Pod Security Standard differ (PSP cannot require seccomp or a capabilities drop beyond
what it lists, and it reads seccomp from annotations as well as fields), tests/unit/builders/test_pod_security.py
keeps the port of the standard's checks as the second check (docs/security.md).

The second half: the API server's real refusal (a root pod, refused by the policy through the Deployment's
ReplicaSet and the Job controller, both run by the controller-manager) reaches ModelRoute and FineTuneJob status
through the product's own readers (controllers.pods.pods_refused, FineTuneJobController.pods_refused).
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from harness.cluster import Cluster
from support.kube import service_account_token
from support.pod_security import every_pod_kind

pytestmark = pytest.mark.apiserver

PSP = Path(__file__).parent / "fixtures" / "restricted-psp.yaml"
NS = "ml"                       # where the builders' test objects live (support.pod_security.every_pod_kind)
OPERATOR_NS = "loraplane-system"  # the chart's release namespace (support.chart_rendering)
AUTHOR = "pod-author"
# The plugin's two refusals: no policy the requester may use admits the pod (validation), or the one that would
# have to mutate it may not (admission).
REFUSED = re.compile(r"unable to validate against any pod security policy|PodSecurityPolicy: unable to admit pod")


@pytest.fixture(scope="module")
def psp_cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("kube-psp")).start(
        apiserver_args=("--enable-admission-plugins=PodSecurityPolicy",))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def admin(psp_cluster):
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(psp_cluster.kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="module")
def author(psp_cluster, admin, tmp_path_factory):
    """A client whose only PodSecurityPolicy is the restricted one: it may create pods in NS and OPERATOR_NS
    and `use` the policy `restricted`, nothing else."""
    from kubernetes import client, config, dynamic

    dyn = dynamic.DynamicClient(admin)
    psp = yaml.safe_load(PSP.read_text())
    dyn.resources.get(api_version="policy/v1beta1", kind="PodSecurityPolicy").create(body=psp)
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    for ns in (NS, OPERATOR_NS):
        core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service_account(NS, {"metadata": {"name": AUTHOR}})
    rbac.create_cluster_role({"metadata": {"name": "psp-restricted"}, "rules": [
        {"apiGroups": ["policy"], "resources": ["podsecuritypolicies"], "resourceNames": ["restricted"],
         "verbs": ["use"]}]})
    rbac.create_cluster_role({"metadata": {"name": "pod-creator"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]})
    subject = [{"kind": "ServiceAccount", "name": AUTHOR, "namespace": NS}]
    for ns in (NS, OPERATOR_NS):
        for role in ("psp-restricted", "pod-creator"):
            rbac.create_namespaced_role_binding(ns, {
                "metadata": {"name": role}, "subjects": subject,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}})
    token = service_account_token(admin, NS, AUTHOR)
    path = psp_cluster.kubeconfig_for_token(token, tmp_path_factory.mktemp("author") / "kubeconfig")
    api = config.new_client_from_config(config_file=str(path))
    yield api
    api.close()


def chart_operator_pod() -> tuple[str, dict]:
    pytest.importorskip("helm_python", reason="helm-python-sdk is in the `test` extra")
    from support.chart_rendering import by_kind, objects

    deployment = by_kind(objects(), "Deployment")[0]
    return f"chart Deployment/{deployment['metadata']['name']}", deployment["spec"]["template"]


def as_pod(owner: str, template: dict, namespace: str) -> dict:
    meta = copy.deepcopy(template.get("metadata") or {})
    meta["name"] = re.sub(r"[^a-z0-9-]", "-", owner.lower()).strip("-")[:60]
    meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(template["spec"])}


def create_dry_run(api, pod: dict):
    from kubernetes import client

    return client.CoreV1Api(api).create_namespaced_pod(pod["metadata"]["namespace"], pod, dry_run="All")


PODS = every_pod_kind()


@pytest.mark.parametrize("owner,template", PODS, ids=[o for o, _ in PODS])
def test_every_rendered_pod_is_admitted_under_the_restricted_policy(author, owner, template):
    created = create_dry_run(author, as_pod(owner, template, NS))
    # The admission plugin names the policy that admitted the pod: the restricted one, the only one it may use.
    assert created.metadata.annotations["kubernetes.io/psp"] == "restricted"


def test_the_charts_operator_pod_is_admitted_under_the_restricted_policy(author):
    owner, template = chart_operator_pod()
    created = create_dry_run(author, as_pod(owner, template, OPERATOR_NS))
    assert created.metadata.annotations["kubernetes.io/psp"] == "restricted"


ENGINE = next(t for o, t in PODS if o.endswith("-engine"))


def broken(change) -> dict:
    """The engine pod with one setting the restricted policy forbids."""
    pod = as_pod("negative", ENGINE, NS)
    change(pod["spec"])
    return pod


NEGATIVE = {
    "privileged": lambda s: s["containers"][0]["securityContext"].update(privileged=True),
    "root": lambda s: s["containers"][0]["securityContext"].update(runAsUser=0, runAsNonRoot=False),
    "hostPath": lambda s: s["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
    "hostNetwork": lambda s: s.update(hostNetwork=True),
    "escalation": lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
}


@pytest.mark.parametrize("what", sorted(NEGATIVE))
def test_a_pod_that_breaks_the_policy_is_refused(author, what):
    """The negative control: the same path refuses an engine pod with one forbidden setting, so the admissions
    above are not vacuous (the plugin is on, and the author has no looser policy)."""
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as refused:
        create_dry_run(author, broken(NEGATIVE[what]))
    assert refused.value.status == 403 and REFUSED.search(refused.value.body), refused.value.body


def wait_for(fetch, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := fetch()) is not None:
            return found
        time.sleep(0.5)
    raise TimeoutError(what)


def test_a_refused_engine_pod_shows_in_the_modelroute_status(admin, author):
    """The controller-manager's ReplicaSet controller is refused the pod; the Deployment's ReplicaFailure
    condition carries the API server's message, and the ModelRoute's Ready says PodsRefused with it."""
    from kubernetes import client

    from loraplane.api.modelroute import ModelRouteStatus
    from loraplane.builders import resolve
    from loraplane.controllers.modelroute import RouterFacts, route_status

    template = copy.deepcopy(ENGINE)
    NEGATIVE["root"](template["spec"])   # (a privileged container: this apiserver refuses it before admission)
    labels = {"app": "refused"}
    template["metadata"] = {"labels": labels}
    apps = client.AppsV1Api(admin)
    apps.create_namespaced_deployment(NS, {"metadata": {"name": "refused"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": labels}, "template": template}})

    def failed():
        d = admin.sanitize_for_serialization(apps.read_namespaced_deployment("refused", NS))
        return d if any(c.get("type") == "ReplicaFailure" for c in d.get("status", {}).get("conditions") or []) \
            else None

    deployment = wait_for(failed, "the Deployment never showed ReplicaFailure")
    route = route_model()
    status = route_status(route, resolve(route, []), deployment, [], 1, ModelRouteStatus(),
                          router=RouterFacts(deployment))
    ready = status.condition("Ready")
    assert (ready.status, ready.reason) == ("False", "PodsRefused")
    assert REFUSED.search(ready.message) and "runAsNonRoot" in ready.message


def test_a_refused_trainer_pod_shows_in_the_finetunejob_status(psp_cluster, admin):
    """The Job controller is refused the trainer pod and says so only in a FailedCreate Event; the FineTuneJob
    controller's reader finds it (a real list with the operator's own client) and run_state shows PodsRefused."""
    from kubernetes import client

    from loraplane.controllers.finetunejob import FineTuneJobController, run_state
    from loraplane.kube.client import KubeClient

    template = copy.deepcopy(next(t for o, t in PODS if o.startswith("Job/")))
    NEGATIVE["root"](template["spec"])
    template["metadata"] = {}
    batch = client.BatchV1Api(admin)
    batch.create_namespaced_job(NS, {"metadata": {"name": "refused"}, "spec": {
        "backoffLimit": 0, "template": template}})
    job = admin.sanitize_for_serialization(batch.read_namespaced_job("refused", NS))

    async def read() -> str | None:
        kube = KubeClient.from_environment(str(psp_cluster.kubeconfig))
        try:
            reader = SimpleNamespace(kube=kube, schedule_later=lambda *a: None)
            return await FineTuneJobController.pods_refused(reader, (NS, "refused"), job)
        finally:
            await kube.close()

    refused = wait_for(lambda: asyncio.run(read()), "no FailedCreate Event for the Job")
    ftj = ftj_model()
    state = run_state(ftj, job, [], refused)
    assert state.problem is not None and state.problem.reason == "PodsRefused"
    assert REFUSED.search(state.problem.message) and "runAsNonRoot" in state.problem.message


def route_model():
    from loraplane.api import ModelRoute

    return ModelRoute.model_validate({
        "kind": "ModelRoute", "metadata": {"name": "r", "namespace": NS, "generation": 1},
        "spec": {"baseModel": {"name": "org/base"}, "routes": [{"name": "m", "backends": [{"base": True}]}]}})


def ftj_model():
    from loraplane.api import FineTuneJob

    return FineTuneJob.model_validate({
        "kind": "FineTuneJob", "metadata": {"name": "refused", "namespace": NS, "uid": "u"},
        "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "/d.jsonl"},
                 "output": {"adapterName": "a"}}})


def test_the_operator_shows_real_refusals_in_modelroute_and_finetunejob_status(psp_cluster, admin, author,
                                                                               tmp_path_factory):
    """End to end, with the real operator on this cluster: the cluster's only policy becomes a stricter one (the
    restricted policy with the UIDs pinned to 1000-2000, as a platform might pin them), so the API server
    refuses the pods the operator's Deployments and Job ask for (they run as 65532). The ModelRoute's and the
    FineTuneJob's Ready say PodsRefused with the API server's message. Runs last in this module: it removes
    the restricted policy."""
    from kubernetes import client, dynamic

    from support.kube import install_crds
    from support.operator_process import OperatorProcess

    psps = dynamic.DynamicClient(admin).resources.get(api_version="policy/v1beta1", kind="PodSecurityPolicy")
    pinned = yaml.safe_load(PSP.read_text())
    pinned["metadata"]["name"] = "pinned-uids"
    pinned["spec"]["runAsUser"] = {"rule": "MustRunAs", "ranges": [{"min": 1000, "max": 2000}]}
    psps.create(body=pinned)
    psps.delete(name="restricted")
    install_crds(admin)
    custom = client.CustomObjectsApi(admin)
    ns, group, version = "pinned", "loraplane.io", "v1alpha1"
    client.CoreV1Api(admin).create_namespace({"metadata": {"name": ns}})
    custom.create_namespaced_custom_object(group, version, ns, "modelroutes", {
        "apiVersion": f"{group}/{version}", "kind": "ModelRoute", "metadata": {"name": "r"},
        "spec": {"baseModel": {"name": "org/base"}, "replicas": 1,
                 "routes": [{"name": "m", "backends": [{"base": True}]}]}})
    custom.create_namespaced_custom_object(group, version, ns, "finetunejobs", {
        "apiVersion": f"{group}/{version}", "kind": "FineTuneJob", "metadata": {"name": "j"},
        "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "s3://does-not-exist/train.jsonl"},
                 "output": {"adapterName": "a"}}})
    operator = OperatorProcess(psp_cluster.kubeconfig,
                               tmp_path_factory.mktemp("psp-operator") / "operator.log").start()
    try:
        def ready(plural: str, name: str):
            obj = custom.get_namespaced_custom_object(group, version, ns, plural, name)
            found = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"]
            return found[0] if found and found[0]["reason"] == "PodsRefused" else None

        route = wait_for(lambda: ready("modelroutes", "r"), "ModelRoute r never showed PodsRefused", 120)
        job = wait_for(lambda: ready("finetunejobs", "j"), "FineTuneJob j never showed PodsRefused", 120)
    except TimeoutError:
        print(operator.log_tail())
        raise
    finally:
        operator.stop()
    for condition in (route, job):
        assert condition["status"] == "False"
        assert REFUSED.search(condition["message"]) and "runAsUser" in condition["message"], condition["message"]
