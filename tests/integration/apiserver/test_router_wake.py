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


async def test_a_held_request_wakes_the_engine_deployment_through_the_router(kube_cluster, kube_api, namespace,
                                                                            tmp_path):
    """The whole path as it runs in a route's router pod: its table from the ConfigMap, its token from the Role the
    operator builds, `--wake-deployment`; a request at zero replicas is held, the engine Deployment goes to 1
    replica, and the request is answered 503 with Retry-After when no replica came within the bound."""
    import random
    import time

    import aiohttp
    from kubernetes import client

    from loraplane.api.wire.serving import CONFIGMAP_KEY, configmap_name
    from loraplane.builders.modelroute import engine_name, router_rbac
    from loraplane.router.replicas import ReplicaPool
    from loraplane.router.server import Router
    from loraplane.router.service import RouterService
    from support.kube import rbac_token
    from support.router_running import table_json

    route = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                   "metadata": {"name": "chat", "namespace": namespace, "uid": "u1"},
                   "spec": {"baseModel": {"name": "org/model"},
                            "autoscaling": {"backend": "hpa", "minReplicas": 1, "maxReplicas": 3}}})
    apps = client.AppsV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, deployment(engine_name(route)))
    client.CoreV1Api(kube_api).create_namespaced_config_map(namespace, {
        "metadata": {"name": configmap_name("chat")},
        "data": {CONFIGMAP_KEY: table_json({"chat": [("v1", 100)]}, cold_start_wait_seconds=3,
                                           cold_start_max_requests=10)}})
    kubeconfig = kube_cluster.kubeconfig_for_token(rbac_token(kube_api, namespace, router_rbac(route)),
                                                   tmp_path / "router.kubeconfig")
    service = RouterService(Router(ReplicaPool(poll_interval=0.2), rng=random.Random(1)),
                            configmap=(namespace, configmap_name("chat")), kubeconfig=kubeconfig,
                            host="127.0.0.1", port=0, wake_deployment=engine_name(route))
    await service.start()
    try:
        deadline = time.monotonic() + 20
        while service.router.table is None:
            assert time.monotonic() < deadline, "table never arrived from the ConfigMap"
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession(base_url=service.url) as c:
            sent = time.monotonic()
            async with c.post("/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
                waited = time.monotonic() - sent
                assert resp.status == 503 and resp.headers["Retry-After"] == "15", await resp.text()
                assert (await resp.json())["error"]["code"] == "cold_start_timeout"
        assert waited >= 2.9
        # The demand reached the API server while the request was held: the Deployment asks for a replica.
        assert apps.read_namespaced_deployment(engine_name(route), namespace).spec.replicas == 1
    finally:
        await service.stop()
