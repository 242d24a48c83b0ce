"""The chart's gateway (issue 15, gateway.enabled): `loraplane router --gateway` from the operator image, under the
restricted Pod Security profile, with a Role that reads ModelRoutes of its own namespace and nothing else. Lint,
strict schema validation and labels run over the `gateway` value set in test_chart.py."""

from __future__ import annotations

import pytest

from support.chart_rendering import RELEASE, RELEASE_NAMESPACE, by_kind, objects, rule_grants
from support.pod_security import violations

pytest.importorskip("helm_python", reason="helm-python-sdk is in the `test` extra")

ON = {"gateway": {"enabled": True}}


def gateway_objects(values: dict) -> list[dict]:
    return [o for o in objects(values)
            if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"]


def test_the_gateway_is_off_by_default():
    assert gateway_objects({}) == []
    assert not [o for o in objects() if "gateway" in o["metadata"]["name"]]


def test_the_gateway_runs_the_router_in_gateway_mode_restricted():
    objs = gateway_objects(ON)
    assert sorted(o["kind"] for o in objs) == ["Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    assert {o["metadata"]["namespace"] for o in objs} == {RELEASE_NAMESPACE}
    (deploy,) = by_kind(objs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/loraplane/loraplane:0.1.0"   # the operator image
    assert c["command"] == ["loraplane", "router", "--gateway"]
    assert c["args"] == [f"--namespace={RELEASE_NAMESPACE}", "--host=0.0.0.0", "--port=8080"]
    assert violations(pod, deploy["spec"]["template"]["metadata"]) == []
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["serviceAccountName"] == f"{RELEASE}-loraplane-gateway"
    (svc,) = by_kind(objs, "Service")
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    # The gateway's pods are not the operator's: the operator's selector does not pick them.
    (operator,) = [d for d in by_kind(objects(ON), "Deployment") if d is not deploy and
                   d["metadata"]["name"] == f"{RELEASE}-loraplane"]
    assert not operator["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"][
        "labels"].items()


def test_the_gateway_reads_modelroutes_of_its_namespace_only():
    values = {"gateway": {"enabled": True, "namespace": "team-a", "routeSelector": {"tier": "prod", "app": "chat"},
                          "apiKeySecret": "gw-keys"}}
    objs = gateway_objects(values)
    assert {o["metadata"]["namespace"] for o in objs} == {"team-a"}
    (role,) = by_kind(objs, "Role")
    assert rule_grants(role["rules"]) == {("loraplane.io", "modelroutes", v) for v in ("get", "list", "watch")}
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-loraplane-gateway",
                                    "namespace": "team-a"}]
    (deploy,) = by_kind(objs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["--namespace=team-a", "--route-selector=app=chat,tier=prod", "--host=0.0.0.0",
                         "--port=8080", "--api-keys-dir=/etc/loraplane/api-keys"]
    assert {"name": "api-keys", "mountPath": "/etc/loraplane/api-keys", "readOnly": True} in c["volumeMounts"]
    assert {"name": "api-keys", "secret": {"secretName": "gw-keys"}} in pod["volumes"]
    # The operator's own grants do not change with the gateway.
    assert by_kind(objects(values), "ClusterRole") == by_kind(objects(), "ClusterRole")


def test_the_chart_gateway_args_are_what_the_router_cli_accepts():
    """The rendered command line parses with the router's own argument parser and passes its checks."""
    import argparse

    from loraplane.router.cli import _configure, add_router_arguments
    from loraplane.router.gateway import parse_route_selector

    values = {"gateway": {"enabled": True, "routeSelector": {"tier": "prod"}, "apiKeySecret": "k"}}
    (deploy,) = by_kind(gateway_objects(values), "Deployment")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    args = parser.parse_args([*c["command"][2:], *c["args"]])
    assert args.gateway and _configure(args) is None
    assert parse_route_selector(args.route_selector) == "tier=prod"
    assert str(args.api_keys_file) == "/etc/loraplane/api-keys" and args.port == 8080


def test_notes_say_where_the_gateway_is():
    from support.chart_rendering import notes

    assert "gateway" not in notes().lower()
    text = notes({"gateway": {"enabled": True, "namespace": "team-a"}})
    assert f"http://{RELEASE}-loraplane-gateway.team-a.svc:8080/v1" in text
