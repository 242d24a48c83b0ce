"""Autoscaling children of a ModelRoute (issue 16): scale to zero and back (the router's wake-up grant, KEDA's
activation on the router's held requests, the idle time before zero), HPA behavior sized for slow vLLM starts,
KEDA fallback, and the API's refusals of what cannot work."""

from __future__ import annotations

import copy
import re

import pytest
from pydantic import ValidationError

from loraplane.api import parse
from loraplane.builders import BuildSettings, modelroute, resolve
from loraplane.router.metrics import RouterMetrics


def route(autoscaling: dict | None = None, replicas: int | None = None, router: dict | None = None):
    spec: dict = {"baseModel": {"name": "m"}}
    if autoscaling is not None:
        spec["autoscaling"] = autoscaling
    if replicas is not None:
        spec["replicas"] = replicas
    if router is not None:
        spec["router"] = router
    return parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                  "metadata": {"name": "r", "namespace": "ns", "uid": "u1"}, "spec": spec})


def router_role(r) -> dict:
    return next(m for m in modelroute.router_rbac(r) if m["kind"] == "Role")


def test_hpa_routes_router_may_scale_exactly_its_engine_deployment():
    r = route({"backend": "hpa", "maxReplicas": 3})
    rules = router_role(r)["rules"]
    scale = [x for x in rules if x["resources"] == ["deployments/scale"]]
    assert scale == [{"apiGroups": ["apps"], "resources": ["deployments/scale"], "resourceNames": ["r-engine"],
                      "verbs": ["get", "patch"]}]
    args = modelroute.router_args(r)
    assert args[args.index("--wake-deployment") + 1] == "r-engine"
    # KEDA wakes its routes itself (on the router's metric); fixed replicas are the spec's: no grant, no wake-up.
    for other in (route({"backend": "keda", "minReplicas": 0, "maxReplicas": 3}), route(replicas=0), route()):
        assert all("deployments/scale" not in x["resources"] for x in router_role(other)["rules"])
        assert "--wake-deployment" not in modelroute.router_args(other)


def test_keda_activates_from_zero_on_the_routers_held_requests():
    r = route({"backend": "keda", "minReplicas": 0, "maxReplicas": 4, "target": 2, "scaleToZeroAfterSeconds": 900})
    spec = modelroute.keda_scaled_object(r)["spec"]
    assert spec["minReplicaCount"] == 0 and spec["cooldownPeriod"] == 900   # the idle time before zero
    engine, held, traffic = spec["triggers"]
    assert engine["name"] == "engine" and "vllm:num_requests_waiting" in engine["metadata"]["query"]
    # The engine metric does not exist at zero replicas: the routers' held requests (they stay up) do.
    assert held["name"] == "router-held"
    query = held["metadata"]["query"]
    assert query.startswith(f"sum({modelroute.HELD_REQUESTS_METRIC}{{") and 'namespace="ns"' in query
    pattern = re.search(r'pod=~"([^"]*)"', query).group(1)
    assert re.fullmatch(pattern, "r-router-7d9f8b6c5d-x2x4z") and not re.fullmatch(pattern, "r-engine-7d9f8-x2x4z")
    for t in (engine, held):  # both size the route: `target` per replica
        assert t["metadata"]["threshold"] == "2.0" and t["metadata"]["ignoreNullValues"] == "true"
    # A route that serves requests which never queue (engine metric 0, nothing held) is not idle: the routers'
    # request rate keeps it active, and asks for no more than one replica (sizing is the other triggers' job).
    assert traffic["name"] == "router-traffic"
    tq = traffic["metadata"]["query"]
    assert tq.startswith(f"sum(rate({modelroute.REQUESTS_METRIC}{{") and re.search(r'pod=~"([^"]*)"', tq).group(1) \
        == pattern and tq.endswith("[2m]))")
    assert float(traffic["metadata"]["threshold"]) >= 1e9 and traffic["metadata"]["ignoreNullValues"] == "true"
    # The metrics KEDA reads are ones the router exports (a counter `x` is exposed as `x_total`).
    families = {f.name: f.type for f in RouterMetrics().registry.collect()}
    assert families[modelroute.HELD_REQUESTS_METRIC] == "gauge"
    assert families[modelroute.REQUESTS_METRIC.removesuffix("_total")] == "counter"


def test_keda_fallback_default_and_given():
    r = route({"backend": "keda", "minReplicas": 0, "maxReplicas": 4})
    assert modelroute.keda_scaled_object(r)["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 1}
    r = route({"backend": "keda", "minReplicas": 2, "maxReplicas": 4, "fallback": {"failureThreshold": 5, "replicas": 3}})
    assert modelroute.keda_scaled_object(r)["spec"]["fallback"] == {"failureThreshold": 5, "replicas": 3}


def test_hpa_behavior_defaults_sized_for_slow_starts_and_overrides():
    r = route({"backend": "hpa", "maxReplicas": 8})
    behavior = modelroute.horizontal_pod_autoscaler(r, BuildSettings())["spec"]["behavior"]
    up = behavior["scaleUp"]
    assert up["stabilizationWindowSeconds"] >= 60
    assert all(p["periodSeconds"] >= 120 for p in up["policies"])   # no +N every 15 s while one starts
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    r = route({"backend": "keda", "maxReplicas": 8, "scaleDownStabilizationSeconds": 120,
               "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0,
                                        "policies": [{"type": "Pods", "value": 4, "periodSeconds": 60}]}}})
    keda_behavior = modelroute.keda_scaled_object(r)["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert keda_behavior["scaleUp"] == {"stabilizationWindowSeconds": 0,
                                        "policies": [{"type": "Pods", "value": 4, "periodSeconds": 60}]}
    assert keda_behavior["scaleDown"]["stabilizationWindowSeconds"] == 120
    r = route({"maxReplicas": 8, "behavior": {"scaleDown": {"selectPolicy": "Disabled"}}})
    down = modelroute.horizontal_pod_autoscaler(r, BuildSettings())["spec"]["behavior"]["scaleDown"]
    assert down == {"selectPolicy": "Disabled", "stabilizationWindowSeconds": 300}


@pytest.mark.parametrize("autoscaling,message", [
    ({"maxReplicas": 3, "minReplicas": 0}, "minReplicas 0 needs backend: keda"),
    ({"backend": "hpa", "maxReplicas": 3, "minReplicas": 0}, "minReplicas 0 needs backend: keda"),
    ({"maxReplicas": 3, "fallback": {"replicas": 1}}, "fallback is KEDA's"),
    ({"backend": "keda", "maxReplicas": 3, "fallback": {"replicas": 4}}, "fallback.replicas must be <="),
    ({"maxReplicas": 3, "scaleDownStabilizationSeconds": 60,
      "behavior": {"scaleDown": {"stabilizationWindowSeconds": 30}}}, "not both"),
    ({"maxReplicas": 3, "behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 60}]}}},
     "value"),
    ({"backend": "keda", "maxReplicas": 3, "scaleToZeroAfterSeconds": 5}, "scaleToZeroAfterSeconds"),
    ({"maxReplicas": 3, "scaleToZeroAfterSeconds": 600}, "scaleToZeroAfterSeconds is KEDA's"),
])
def test_autoscaling_that_cannot_work_is_refused_naming_the_field(autoscaling, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        route(autoscaling)


def test_cold_start_bounds_reach_the_routers_table():
    table = resolve(route({"backend": "keda", "minReplicas": 0, "maxReplicas": 2},
                          router={"coldStart": {"maxWaitSeconds": 120, "maxRequests": 7}}), []).table
    assert (table.router.cold_start_wait_seconds, table.router.cold_start_max_requests) == (120, 7)
    assert resolve(route(), []).table.router.cold_start_wait_seconds == 300      # held by default
    # A route parked at fixed `replicas: 0` will not come up: its requests are answered at once.
    assert resolve(route(replicas=0), []).table.router.cold_start_wait_seconds == 0


@pytest.mark.parametrize("autoscaling", [
    {"backend": "keda", "minReplicas": 0, "maxReplicas": 4},
    {"backend": "keda", "minReplicas": 2, "maxReplicas": 4, "target": 2.5, "fallback": {"replicas": 3},
     "behavior": {"scaleUp": {"selectPolicy": "Min", "policies": [{"type": "Percent", "value": 50, "periodSeconds": 30}]},
                  "scaleDown": {"stabilizationWindowSeconds": 0}}},
])
def test_scaled_object_validates_against_kedas_crd(autoscaling):
    """Strictly, against KEDA's ScaledObject CRD (tests/support/thirdparty_crds, with its source): a misspelled or
    mistyped field fails here instead of being pruned by the API server."""
    from support.thirdparty import schema_errors

    so = modelroute.keda_scaled_object(route(autoscaling))
    assert schema_errors(so) == []
    broken = copy.deepcopy(so)
    broken["spec"]["fallback"]["replica"] = 1
    assert any("replica" in e for e in schema_errors(broken))
