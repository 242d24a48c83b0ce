"""Fixtures for tests marked `apiserver`: one real control plane per session, CRDs installed from crds/."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
import yaml

from harness.cluster import Cluster, start_cluster
from support.paths import ROOT


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory) -> Cluster:
    cluster = start_cluster(tmp_path_factory.mktemp("kube"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def kube_api(kube_cluster):
    """A `kubernetes.client.ApiClient` with cluster-admin rights."""
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=str(kube_cluster.kubeconfig))
    yield api_client
    api_client.close()


def wait_established(kube_api, name: str, timeout: float = 30) -> None:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(kube_api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(name)
        conds = {c.type: c.status for c in (crd.status.conditions or [])}
        if conds.get("Established") == "True":
            return
        time.sleep(0.2)
    raise TimeoutError(f"CRD {name} not Established: {conds}")


def install_crds(kube_api, crd_dir: Path = ROOT / "crds") -> list[str]:
    """Create or replace every CRD in `crd_dir` and wait until each is Established."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ext = client.ApiextensionsV1Api(kube_api)
    names = []
    for path in sorted(crd_dir.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = ext.read_custom_resource_definition(name)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(name, body)
        names.append(name)
    for name in names:
        wait_established(kube_api, name)
    return names


@pytest.fixture(scope="session")
def crds_installed(kube_api) -> list[str]:
    return install_crds(kube_api)


_ns_counter = iter(range(1_000_000))


@pytest.fixture
def namespace(kube_api, crds_installed) -> str:
    """A fresh namespace per test (deleted afterwards; the namespace controller cleans it up)."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    name = f"t{int(time.time()) % 100000}-{next(_ns_counter)}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def service_account_token(kube_api, namespace: str, name: str, timeout: float = 30) -> str:
    """The token the controller-manager's token controller minted for the ServiceAccount (v1.20: a Secret)."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sa = core.read_namespaced_service_account(name, namespace)
        for ref in sa.secrets or []:
            secret = core.read_namespaced_secret(ref.name, namespace)
            if secret.type == "kubernetes.io/service-account-token" and (secret.data or {}).get("token"):
                return base64.b64decode(secret.data["token"]).decode()
        time.sleep(0.2)
    raise TimeoutError(f"no token Secret for ServiceAccount {namespace}/{name}")


def engine_token(kube_api, namespace: str, route) -> str:
    """Create the engine pods' RBAC the operator builds for ModelRoute `route` (builders.modelroute.engine_rbac:
    ServiceAccount, Role, RoleBinding) in `namespace`, without owners (no ModelRoute object exists here), and
    return the ServiceAccount's token: a client with exactly the rights a replica has in a cluster."""
    from loraplane.builders.modelroute import engine_rbac

    return rbac_token(kube_api, namespace, engine_rbac(route))


def rbac_token(kube_api, namespace: str, manifests: list[dict]) -> str:
    """Create built RBAC manifests (one ServiceAccount, its Role and RoleBinding) in `namespace` without owners
    and return the ServiceAccount's token: a client with exactly the rights the builders grant."""
    from kubernetes import utils

    account = None
    for manifest in manifests:
        manifest["metadata"].pop("ownerReferences", None)   # no ModelRoute object here: no GC owner either
        utils.create_from_dict(kube_api, manifest, namespace=namespace)
        if manifest["kind"] == "ServiceAccount":
            account = manifest["metadata"]["name"]
    assert account, "the RBAC manifests hold no ServiceAccount"
    return service_account_token(kube_api, namespace, account)
