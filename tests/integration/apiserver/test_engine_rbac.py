"""The engine pods' RBAC enforced by a real kube-apiserver (issue 12 item 3): the loader's token reads its
route's ConfigMap and can change nothing, in particular no other pod of the namespace."""

from __future__ import annotations

import pytest

from loraplane.api.modelroute import ModelRoute

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(120)]


def test_the_engine_token_reads_its_configmap_and_cannot_touch_pods(kube_cluster, kube_api, namespace, tmp_path):
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from support.kube import engine_token

    route = ModelRoute.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                                       "metadata": {"name": "chat", "namespace": namespace},
                                       "spec": {"baseModel": {"name": "org/model"}}})
    admin = client.CoreV1Api(kube_api)
    admin.create_namespaced_config_map(namespace, {"metadata": {"name": "chat-serving"}, "data": {"k": "v"}})
    admin.create_namespaced_config_map(namespace, {"metadata": {"name": "other"}, "data": {"k": "v"}})
    admin.create_namespaced_pod(namespace, {"metadata": {"name": "victim"},
                                            "spec": {"containers": [{"name": "c", "image": "x"}]}})
    token = engine_token(kube_api, namespace, route)
    kubeconfig = kube_cluster.kubeconfig_for_token(token, tmp_path / "engine.kubeconfig")
    with config.new_client_from_config(config_file=str(kubeconfig)) as api:
        core = client.CoreV1Api(api)
        assert core.read_namespaced_config_map("chat-serving", namespace).data == {"k": "v"}

        def forbidden(call) -> bool:
            try:
                call()
            except ApiException as exc:
                return exc.status == 403
            return False

        patch = {"metadata": {"annotations": {"x": "y"}, "labels": {"loraplane.io/route": "chat"}}}
        assert forbidden(lambda: core.patch_namespaced_pod("victim", namespace, patch))
        assert forbidden(lambda: core.patch_namespaced_pod_status("victim", namespace, {"status": {}}))
        assert forbidden(lambda: core.delete_namespaced_pod("victim", namespace))
        assert forbidden(lambda: core.create_namespaced_pod(namespace, {
            "metadata": {"name": "mine"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}))
        assert forbidden(lambda: core.read_namespaced_config_map("other", namespace))
        assert forbidden(lambda: core.patch_namespaced_config_map("chat-serving", namespace, {"data": {"k": "w"}}))
    assert admin.read_namespaced_pod("victim", namespace).metadata.annotations is None


def test_the_engine_key_secret_is_created_once_and_never_overwritten(kube_cluster, kube_api, namespace):
    """KubeClient.create_if_absent against a real API server: the second create (a new operator process with a
    new random key) finds the Secret and leaves the first key in place."""
    import asyncio
    import base64

    from kubernetes import client

    from loraplane.builders.modelroute import engine_key_secret
    from loraplane.kube.client import KubeClient

    route = ModelRoute.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                                       "metadata": {"name": "chat", "namespace": namespace},
                                       "spec": {"baseModel": {"name": "org/model"}}})

    async def create(key: str) -> bool:
        kube = KubeClient.from_environment(str(kube_cluster.kubeconfig))
        try:
            secret = engine_key_secret(route, key)
            secret["metadata"].pop("ownerReferences", None)   # no ModelRoute object here
            return await kube.create_if_absent(secret)
        finally:
            await kube.close()

    assert asyncio.run(create("first-key")) is True
    assert asyncio.run(create("second-key")) is False
    stored = client.CoreV1Api(kube_api).read_namespaced_secret("chat-engine-key", namespace)
    assert base64.b64decode(stored.data["api-key"]).decode() == "first-key"
