"""The router's wake-up from zero against a real kube-apiserver (issue 16): with the RBAC the operator builds for
an HPA-autoscaled route's router, its token scales exactly its own engine Deployment from 0 to 1 through the
scale subresource, and is refused on every other Deployment and on the Deployment itself."""

from __future__ import annotations

import asyncio

import pytest

from loraplane.api import parse

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(120)]


def deployment(name: str) -> dict:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "c", "image": "x"}]}}}}


def test_the_router_scales_exactly_its_engine_deployment_from_zero(kube_cluster, kube_api, namespace, tmp_path):
    from kubernetes import client

    from loraplane.builders.modelroute import engine_name, router_rbac
    from loraplane.kube.client import KubeClient
    from loraplane.router.metrics import RouterMetrics
    from loraplane.router.wake import ScaleWaker
    from support.kube import rbac_token

    route = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                   "metadata": {"name": "chat", "namespace": namespace, "uid": "u1"},
                   "spec": {"baseModel": {"name": "org/model"},
                            "autoscaling": {"backend": "hpa", "minReplicas": 1, "maxReplicas": 3}}})
    apps = client.AppsV1Api(kube_api)
    for name in (engine_name(route), "other"):
        apps.create_namespaced_deployment(namespace, deployment(name))
    token = rbac_token(kube_api, namespace, router_rbac(route))
    kubeconfig = kube_cluster.kubeconfig_for_token(token, tmp_path / "router.kubeconfig")
    metrics = RouterMetrics()

    async def wake(name: str) -> str:
        kube = KubeClient.from_environment(str(kubeconfig))
        try:
            return await ScaleWaker(kube, namespace, name, metrics).wake()
        finally:
            await kube.close()

    def replicas(name: str) -> int:
        return apps.read_namespaced_deployment(name, namespace).spec.replicas

    assert asyncio.run(wake("chat-engine")) == "scaled"
    assert replicas("chat-engine") == 1
    assert asyncio.run(wake("chat-engine")) == "not_zero"     # a replica is already asked for: left alone
    assert replicas("chat-engine") == 1
    # Another Deployment of the namespace: refused by RBAC (resourceNames), left at zero.
    assert asyncio.run(wake("other")) == "error"
    assert replicas("other") == 0

    async def forbidden(method: str, path: str, body=None) -> bool:
        from loraplane.kube.client import ApiError

        kube = KubeClient.from_environment(str(kubeconfig))
        try:
            await kube.request(method, path, body, content_type="application/merge-patch+json")
        except ApiError as exc:
            return exc.status == 403
        finally:
            await kube.close()
        return False

    base = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    assert asyncio.run(forbidden("PATCH", f"{base}/other/scale", {"spec": {"replicas": 1}}))
    # Its own Deployment's pod template (image, command) is not the scale subresource: refused.
    assert asyncio.run(forbidden("PATCH", f"{base}/chat-engine",
                                 {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "evil"}]}}}}))
    assert asyncio.run(forbidden("GET", base))
    samples = {s.labels["result"]: s.value for f in metrics.registry.collect() for s in f.samples
               if s.name == "loraplane_router_scale_wakeups_total"}
    assert samples == {"scaled": 1.0, "not_zero": 1.0, "error": 1.0}
