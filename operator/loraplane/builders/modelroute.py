"""Children of a ModelRoute: the serving table ConfigMap, the vLLM replicas (Deployment with the adapter
loader beside each vLLM container, their RBAC, a headless Service, a PodDisruptionBudget, an HPA or a KEDA
ScaledObject) and the OpenAI-compatible router (RBAC, Deployment, Service).
"""

from __future__ import annotations

import re

from typing import Any

from loraplane.api.modelroute import ModelRoute
from loraplane.api.orchestration import router_url  # the one builder of a route's router URL (from names)
from loraplane.api.paths import API_KEYS_MOUNT, ENGINE_KEY_SECRET_KEY
from loraplane.builders import engine_pod
from loraplane.builders.common import (
    COMPONENT_LABEL,
    ROUTER_LABEL,
    Manifest,
    apply_pod_settings,
    component_pod_defaults,
    pvc_claims,
    base_labels,
    child_name,
    label_value,
    metadata,
    namespace_of,
    node_placement,
    pod_security_context,
    resources,
    container_security_context,
    scratch_env,
    scratch_mount,
    scratch_volume,
    role,
    role_binding,
    service_account,
    stringify_quantities,
    with_hash,
)
from loraplane.builders.settings import BuildSettings
from loraplane.api.wire.serving import (
    CONFIGMAP_KEY,
    ENGINE_PORT,
    LOADER_PORT,
    ROUTE_LABEL,
    ROUTER_PORT,
    ServingTable,
    configmap_name,
)

KEDA_API_VERSION = "keda.sh/v1alpha1"
ROUTER_CONTAINER = "router"   # the router pod's one container (its status names the router's problems)
NETWORK_POLICY_API_VERSION = "networking.k8s.io/v1"


def engine_name(route: ModelRoute) -> str:
    """Name of the vLLM replicas' Deployment, Service, PDB, autoscaler and RBAC: `<route>-engine`."""
    return child_name(route.metadata.name or "", "engine", 63, "dns1035")


def router_name(route: ModelRoute) -> str:
    """Name of the router's Deployment, Service and RBAC: `<route>-router`."""
    return router_service_name(route.metadata.name or "")


def router_service_name(route_name: str) -> str:
    """`router_name` from the route's name alone (another route's, read from the store)."""
    return child_name(route_name, "router", 63, "dns1035")


def endpoint(route: ModelRoute) -> str:
    """The router's in-cluster OpenAI base URL: `http://<route>-router.<ns>.svc:ROUTER_PORT/v1`."""
    return f"{router_url(route.metadata.name or '', namespace_of(route))}/v1"


def engine_selector(route: ModelRoute) -> dict[str, str]:
    """Labels that select the route's vLLM replicas (loraplane.io/route and component engine)."""
    # The API keeps route names to 50 characters, so the value is the name (the operator groups pods by it).
    return {ROUTE_LABEL: label_value(route.metadata.name or ""), COMPONENT_LABEL: "engine"}


def router_selector(route: ModelRoute) -> dict[str, str]:
    """Labels that select the route's router pods (loraplane.io/router and component router)."""
    return {ROUTER_LABEL: label_value(route.metadata.name or ""), COMPONENT_LABEL: "router"}


def engine_labels(route: ModelRoute) -> dict[str, str]:
    """All labels of the replicas and their objects: base labels plus `engine_selector`."""
    return {**base_labels(route, "engine"), **engine_selector(route)}


def router_labels(route: ModelRoute) -> dict[str, str]:
    """All labels of the router and its objects: base labels plus `router_selector`."""
    # Router pods do not carry loraplane.io/route: that label marks the replicas whose reports are aggregated.
    return {**base_labels(route, "router"), **router_selector(route)}


def serving_config_map(route: ModelRoute, table: ServingTable) -> Manifest:
    """The ConfigMap `<route>-serving` holding the serving table as JSON (what loaders and routers watch)."""
    return with_hash({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": metadata(route, configmap_name(route.metadata.name or ""),
                                           base_labels(route, "serving-table")),
                      "data": {CONFIGMAP_KEY: table.to_json() + "\n"}})


def engine_rbac(route: ModelRoute) -> list[Manifest]:
    """The loader reads and watches its route's ConfigMap (that one only), and may do nothing else: no write
    of any kind. Its report reaches the Pod's annotation through the operator, which reads the loader's
    /status (controllers/reports.py): a grant to annotate its own Pod would be `patch pods` on the whole
    namespace (RBAC cannot name pods whose names are generated), letting an engine pod rewrite any pod."""
    name = engine_name(route)
    labels = engine_labels(route)
    rules = [
        {"apiGroups": [""], "resources": ["configmaps"],
         "resourceNames": [configmap_name(route.metadata.name or "")], "verbs": ["get", "list", "watch"]},
    ]
    return [service_account(route, name, labels), role(route, name, labels, rules),
            role_binding(route, name, labels, name, name)]


def wakes_engine(route: ModelRoute) -> bool:
    """Whether the router wakes the engine Deployment from zero through its scale subresource (router/wake.py):
    routes autoscaled by an HPA, which never scales a target at zero by itself. KEDA routes are woken by KEDA on
    the router's held-requests metric; fixed replicas are the spec's to set."""
    auto = route.spec.autoscaling
    return auto is not None and auto.backend == "hpa"


def router_rbac(route: ModelRoute) -> list[Manifest]:
    """The router reads and watches its route's ConfigMap; it finds replicas through DNS, not the API. When it
    wakes the replicas from zero (`wakes_engine`), it may also get and patch the scale subresource of its own
    engine Deployment, by name: the replica count of that one Deployment, nothing else."""
    name = router_name(route)
    labels = router_labels(route)
    rules = [{"apiGroups": [""], "resources": ["configmaps"],
              "resourceNames": [configmap_name(route.metadata.name or "")], "verbs": ["get", "list", "watch"]}]
    if wakes_engine(route):
        rules.append({"apiGroups": ["apps"], "resources": ["deployments/scale"],
                      "resourceNames": [engine_name(route)], "verbs": ["get", "patch"]})
    return [service_account(route, name, labels), role(route, name, labels, rules),
            role_binding(route, name, labels, name, name)]


def adapter_claims(table: ServingTable) -> list[str]:
    """PVCs holding the served adapters (mounted read-only so the loader can copy from them)."""
    return pvc_claims(*(a.uri for a in table.adapters))


def engine_deployment(route: ModelRoute, table: ServingTable, settings: BuildSettings) -> Manifest:
    """The replicas' Deployment: vLLM and the loader sidecar per pod, one new replica at a time
    (maxSurge 1, maxUnavailable 0); replicas left out when an autoscaler owns the count."""
    spec = route.spec
    ns = namespace_of(route)
    pod_spec: dict[str, Any] = {
        "serviceAccountName": engine_name(route),
        # The token is mounted in the loader only (engine_pod.loader_token_volume): vLLM gets none.
        "automountServiceAccountToken": False,
        # Pod Security `restricted` (docs/security.md, "Engine pods and network").
        "securityContext": pod_security_context(),
        "containers": [stringify_quantities(engine_pod.engine_container(route, settings.engine_image)),
                       stringify_quantities(engine_pod.loader_container(
                           route, ns, settings.image, adapter_claims=adapter_claims(table),
                           allow_insecure_http=settings.allow_insecure_http,
                           adapter_secrets=engine_pod.adapter_secrets(table)))],
        "volumes": engine_pod.serving_volumes(route, adapter_claims(table),
                                              adapter_secrets=engine_pod.adapter_secrets(table)),
        **({"initContainers": [fetch]} if (fetch := engine_pod.model_fetch_container(
            route, settings.image, settings.allow_insecure_http)) else {}),
        # vLLM drains in-flight requests on SIGTERM; long generations need more than the default 30 s.
        "terminationGracePeriodSeconds": 120,
        **node_placement(spec.engine.node_selector, spec.engine.gpu_type, spec.engine.gpu_type_label,
                         spec.engine.tolerations),
    }
    deploy_spec: dict[str, Any] = {
        "selector": {"matchLabels": engine_selector(route)},
        # One new replica at a time: each one loads a model (minutes) before it is Ready.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {
            "metadata": {"labels": engine_labels(route),
                         "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(ENGINE_PORT),
                                         "prometheus.io/path": "/metrics"}},
            "spec": pod_spec,
        },
    }
    # The chart's childPods and spec.engine.pod: pull secrets, security context, priority, labels, node selection.
    apply_pod_settings(deploy_spec["template"], component_pod_defaults(settings.child_pods, "engine"),
                       spec.engine.pod)
    # With an autoscaler the replica count is the autoscaler's field: leaving it out of the apply keeps
    # server-side apply from fighting over it.
    if spec.autoscaling is None:
        deploy_spec["replicas"] = 1 if spec.replicas is None else spec.replicas
    return with_hash({"apiVersion": "apps/v1", "kind": "Deployment",
                      "metadata": metadata(route, engine_name(route), engine_labels(route)), "spec": deploy_spec})


def engine_service(route: ModelRoute) -> Manifest:
    """Headless: the router resolves it to the replicas' addresses and balances across them itself."""
    return with_hash({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(route, engine_name(route), engine_labels(route)),
        "spec": {"clusterIP": "None", "selector": engine_selector(route),
                 "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": ENGINE_PORT, "protocol": "TCP"},
                           {"name": "loader", "port": LOADER_PORT, "targetPort": LOADER_PORT, "protocol": "TCP"}]},
    })


def engine_network_policy(route: ModelRoute) -> Manifest:
    """Ingress to the route's engine pods: vLLM's port (ENGINE_PORT) only from the route's own router pods; the
    loader's port (LOADER_PORT: /status, /metrics, /healthz and vLLM's metrics at ENGINE_METRICS_PATH, all
    read-only) from anywhere, for the operator's report relay and Prometheus. Everything else is refused. The
    loader reaches vLLM over localhost, which a NetworkPolicy does not govern. No other peer is ever let in to
    ENGINE_PORT, not even to scrape: vLLM answers routes outside /v1 without its key (/invocations, SageMaker's
    POST /adapters, which loads weights), so a peer chosen by a pod label is anyone who can label a pod.
    NetworkPolicies add up: another policy selecting these pods can allow more."""
    ingress: list[dict[str, Any]] = [
        {"from": [{"podSelector": {"matchLabels": router_selector(route)}}],
         "ports": [{"protocol": "TCP", "port": ENGINE_PORT}]},
        {"ports": [{"protocol": "TCP", "port": LOADER_PORT}]},
    ]
    return with_hash({
        "apiVersion": NETWORK_POLICY_API_VERSION, "kind": "NetworkPolicy",
        "metadata": metadata(route, engine_name(route), engine_labels(route)),
        "spec": {
            "podSelector": {"matchLabels": engine_selector(route)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    })


def pod_disruption_budget(route: ModelRoute, settings: BuildSettings) -> Manifest:
    """PodDisruptionBudget of the replicas: at most one unavailable at a time during voluntary disruptions."""
    # A drain takes replicas one at a time, so serving capacity drops by at most one replica.
    return with_hash({
        "apiVersion": settings.pdb_api_version, "kind": "PodDisruptionBudget",
        "metadata": metadata(route, engine_name(route), engine_labels(route)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": engine_selector(route)}},
    })


def promql_string(value: str) -> str:
    """`value` as a PromQL double-quoted string literal (backslash, quote and newline escaped, as Go's
    strconv.Quote-style escapes PromQL accepts)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def hpa_metric_name(metric: str) -> str:
    """Prometheus adapters expose `vllm:num_requests_waiting` as `vllm_num_requests_waiting` (':' is not
    allowed in a custom-metrics API name); see docs/operator.md for the adapter rule."""
    return metric.replace(":", "_")


def horizontal_pod_autoscaler(route: ModelRoute, settings: BuildSettings) -> Manifest:
    """HPA on the replicas' Pods metric (named per `hpa_metric_name`), averaged per pod; at least one
    replica (an HPA cannot scale to zero). Requires spec.autoscaling."""
    auto = route.spec.autoscaling
    assert auto is not None
    return with_hash({
        "apiVersion": settings.hpa_api_version, "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(route, engine_name(route), engine_labels(route)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": engine_name(route)},
            "minReplicas": max(auto.min_replicas, 1),  # an HPA cannot scale to zero; KEDA can
            "maxReplicas": auto.max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": hpa_metric_name(auto.metric)},
                "target": {"type": "AverageValue", "averageValue": _quantity(auto.target)}}}],
            "behavior": scaling_behavior(route),
        },
    })


# Sized for vLLM replicas, which take minutes (scheduling, image, model load, adapters) before they serve: the
# metric stays high meanwhile, and without a limit the HPA keeps adding replicas every 15 s for the same
# pressure. Scale up only after 60 s of it, by at most one pod or doubling per 180 s (whichever is more).
DEFAULT_SCALE_UP = {"stabilizationWindowSeconds": 60, "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 180},
                                 {"type": "Percent", "value": 100, "periodSeconds": 180}]}
# Scale down one pod a minute at most: each replica holds loaded adapters and warm caches.
DEFAULT_SCALE_DOWN_POLICIES = [{"type": "Pods", "value": 1, "periodSeconds": 60}]


def scaling_behavior(route: ModelRoute) -> dict[str, Any]:
    """The HPA `behavior` of an autoscaled route (the HPA's, or the one KEDA creates): spec.autoscaling.behavior
    per direction where given (its fields in the API's camelCase, as autoscaling/v2 spells them), else
    DEFAULT_SCALE_UP and a scale-down of scaleDownStabilizationSeconds with DEFAULT_SCALE_DOWN_POLICIES.
    Requires spec.autoscaling."""
    auto = route.spec.autoscaling
    assert auto is not None
    given = auto.behavior.model_dump(by_alias=True, exclude_none=True) if auto.behavior else {}
    scale_down = given.get("scaleDown") or {"policies": DEFAULT_SCALE_DOWN_POLICIES}
    scale_down.setdefault("stabilizationWindowSeconds", auto.scale_down_stabilization_seconds)
    return {"scaleUp": given.get("scaleUp") or DEFAULT_SCALE_UP, "scaleDown": scale_down}


def _quantity(value: float) -> str:
    """A float target as a Kubernetes quantity string (milli-units when fractional)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{int(round(value * 1000))}m"


# How Kubernetes names a Deployment's pods: the ReplicaSet is `<deployment>-<pod-template-hash>` and each pod
# `<replicaset>-` cut to 58 characters plus 5 random characters (k8s.io/apiserver/pkg/storage/names,
# maxGeneratedNameLength = 63 - 5). The hash (SafeEncodeString of a uint32: 1 to 10 characters) and the suffix
# (rand.String) are drawn from this alphabet (k8s.io/apimachinery/pkg/util/rand), which has no vowels.
POD_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
GENERATED_NAME_BASE = 58
POD_TEMPLATE_HASH_MAX = 10


def replica_pod_regex(deployment: str) -> str:
    """An RE2 pattern (PromQL `=~` anchors it) matching exactly the pod names the Deployment `deployment` can
    give its pods, cut to 58 characters where Kubernetes cuts them.

    It matches no other route's pods: every engine Deployment name ends in `-engine`, whose vowels the hash and
    the suffix never contain, so a longer route name that starts with this one (`a` and `a-engine-b`, whose pods
    `a-engine-b-engine-…` a prefix match `a-engine-.*` also summed) cannot fit the hash-dash-suffix tail."""
    if not re.fullmatch(r"[a-z0-9-]+", deployment):
        raise ValueError(f"{deployment!r} is not a DNS-1035 name")   # so it is its own regex, literally
    char = f"[{POD_NAME_ALPHABET}]"
    alternatives, whole = [], []
    for h in range(1, POD_TEMPLATE_HASH_MAX + 1):
        base = f"{deployment}-{'#' * h}-"[:GENERATED_NAME_BASE]
        tail = base[len(deployment):]            # '', '-', '-###' or '-###-' once the cut is applied
        hashes = tail.count("#")
        if hashes == h and tail.endswith("-"):
            whole.append(h)                      # not cut: one alternative for all such hash lengths below
            continue
        alternatives.append(base[:len(deployment)] + (tail.replace("#" * hashes, f"{char}{{{hashes}}}")
                                                       if hashes else tail) + f"{char}{{5}}")
    if whole:
        alternatives.insert(0, f"{deployment}-{char}{{{min(whole)},{max(whole)}}}-{char}{{5}}")
    return "(" + "|".join(dict.fromkeys(alternatives)) + ")"


# The router's gauge of requests held while no replica is up (router/metrics.py): KEDA's activation signal.
HELD_REQUESTS_METRIC = "loraplane_router_held_requests"
# The router's counter of answered requests (its exposition name): the route's traffic, which keeps it awake.
REQUESTS_METRIC = "loraplane_router_requests_total"
# Window of the traffic trigger's rate(): a route is idle once its routers counted no request for this long.
TRAFFIC_WINDOW = "2m"
# The traffic trigger's threshold per replica: so large that it asks for at most one replica (ceil(rate /
# threshold)), never more; it keeps a serving route active, sizing is the other triggers' job.
ACTIVATION_ONLY_THRESHOLD = "1000000000"
DEFAULT_PROMETHEUS = "http://prometheus.monitoring.svc:9090"


def pods_query(metric: str, namespace: str, deployment: str) -> str:
    """PromQL summing `metric` (a validated metric name) over the pods of Deployment `deployment` in `namespace`.

    Label values are quoted as PromQL string literals. Pods are selected by the exact shape of the Deployment's
    pod names (replica_pod_regex), not a prefix: `<route>-engine-.*` also matched the pods of route
    `<route>-engine-x`. (The `pod` and `namespace` labels are the ones every Kubernetes scrape config attaches; a
    route label would need a relabelling rule the cluster may not have.)"""
    return (f'sum({metric}{{namespace={promql_string(namespace)},'
            f'pod=~{promql_string(replica_pod_regex(deployment))}}})')


def keda_scaled_object(route: ModelRoute) -> Manifest:
    """KEDA ScaledObject of the replicas, with three Prometheus triggers:
    - `engine`: the metric summed over the engine pods, `target` per replica (what scales between 1 and
      maxReplicas);
    - `router-held`: the requests the route's router pods hold because no replica is up, `target` per replica.
      At zero replicas the engine metric does not exist (no pod exports it), so this is what activates the route
      from zero; it is exported by the routers, which stay up;
    - `router-traffic`: the rate of requests the routers answered over TRAFFIC_WINDOW, with a threshold no rate
      reaches (ACTIVATION_ONLY_THRESHOLD): it never asks for more than one replica, but keeps a route that serves
      traffic active. Without it a route serving requests that never queue (engine metric 0) would count as idle.
    With minReplicas 0 the route goes to zero once all three are 0 for scaleToZeroAfterSeconds (cooldownPeriod).
    `fallback` (default: max(minReplicas, 1) replicas after 3 failed queries) keeps the route serving while
    Prometheus cannot be read. The HPA behavior is `scaling_behavior`'s. Requires spec.autoscaling."""
    auto = route.spec.autoscaling
    assert auto is not None
    ns = namespace_of(route)
    server = auto.prometheus_address or DEFAULT_PROMETHEUS
    fallback = auto.fallback.model_dump(by_alias=True) if auto.fallback else {
        "failureThreshold": 3, "replicas": max(auto.min_replicas, 1)}

    def trigger(name: str, query: str, threshold: str = str(auto.target)) -> dict[str, Any]:
        # ignoreNullValues: an empty result (no pod exports the metric yet) reads as 0, not as a failed query.
        return {"type": "prometheus", "name": name, "metadata": {
            "serverAddress": server, "query": query, "threshold": threshold, "ignoreNullValues": "true"}}

    routers = promql_string(replica_pod_regex(router_name(route)))
    traffic = (f"sum(rate({REQUESTS_METRIC}{{namespace={promql_string(ns)},pod=~{routers}}}"
               f"[{TRAFFIC_WINDOW}]))")

    return with_hash({
        "apiVersion": KEDA_API_VERSION, "kind": "ScaledObject",
        "metadata": metadata(route, engine_name(route), engine_labels(route)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": engine_name(route)},
            "minReplicaCount": auto.min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "cooldownPeriod": auto.scale_to_zero_after_seconds,
            "fallback": fallback,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": scaling_behavior(route)}},
            "triggers": [trigger("engine", pods_query(auto.metric, ns, engine_name(route))),
                         trigger("router-held", pods_query(HELD_REQUESTS_METRIC, ns, router_name(route))),
                         trigger("router-traffic", traffic, ACTIVATION_ONLY_THRESHOLD)],
        },
    })


def router_args(route: ModelRoute) -> list[str]:
    """The router's CLI arguments: its route's ConfigMap, the replicas' headless Service DNS name, its port
    and the API key directory when spec.router.apiKeySecretRef is set."""
    ns = namespace_of(route)
    # Watching the ConfigMap through the API applies a routing change in about a second; a mounted volume
    # would wait for the kubelet's sync (60-90 s).
    args = ["--configmap", configmap_name(route.metadata.name or ""), "--namespace", ns,
            "--replicas-dns", f"{engine_name(route)}.{ns}.svc",
            "--host", "0.0.0.0", "--port", str(ROUTER_PORT)]
    if route.spec.router.api_key_secret_ref:
        args += ["--api-keys-dir", API_KEYS_MOUNT]
    if wakes_engine(route):
        args += ["--wake-deployment", engine_name(route)]
    return args


def router_deployment(route: ModelRoute, settings: BuildSettings) -> Manifest:
    """The router's Deployment: `python3 -m loraplane.router`, /readyz and /healthz probes, the API key
    Secret mounted read-only when set."""
    spec = route.spec.router
    volumes: list[dict[str, Any]] = [scratch_volume("tmp", "64Mi")]
    mounts: list[dict[str, Any]] = [scratch_mount("tmp")]
    if spec.api_key_secret_ref:
        secret: dict[str, Any] = {"secretName": spec.api_key_secret_ref.name}
        if spec.api_key_secret_ref.key:
            secret["items"] = [{"key": spec.api_key_secret_ref.key, "path": spec.api_key_secret_ref.key}]
        volumes.append({"name": "api-keys", "secret": secret})
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    container: dict[str, Any] = {
        "name": ROUTER_CONTAINER,
        "image": spec.image or settings.image,
        "command": ["python3", "-m", "loraplane.router", *router_args(route)],
        "env": scratch_env(),
        "ports": [{"name": "http", "containerPort": ROUTER_PORT}],
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # Ready once it holds a routing table; alive while its event loop answers.
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": ROUTER_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": ROUTER_PORT}, "periodSeconds": 15,
                          "failureThreshold": 4},
    }
    # The route's engine key: the router authenticates to vLLM with it (never with a client's key).
    container["env"] = [*container["env"], *engine_pod.engine_key_env(route)]
    if r := resources(0, "", spec.cpu, spec.memory):
        container["resources"] = r
    template: dict[str, Any] = {
        "metadata": {"labels": router_labels(route),
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(ROUTER_PORT)}},
        "spec": {"serviceAccountName": router_name(route), "securityContext": pod_security_context(),
                 "containers": [container], "volumes": volumes},
    }
    # The chart's childPods and spec.router.pod: pull secrets, security context, priority, labels, node selection.
    apply_pod_settings(template, component_pod_defaults(settings.child_pods, "router"), spec.pod)
    return with_hash({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(route, router_name(route), router_labels(route)),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": router_selector(route)},
            "template": template,
        },
    })


def engine_key_secret(route: ModelRoute, key: str) -> Manifest:
    """The Secret `<route>-engine-key-<route uid>` (engine_pod.engine_key_secret_name) holding `key` (ENGINE_KEY_SECRET_KEY), owned by the route. Not a
    child the applier keeps in sync: the operator only creates it, once, with a random key
    (controllers/modelroute.py), and never reads or overwrites it."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": metadata(route, engine_pod.engine_key_secret_name(route), engine_labels(route)),
            "stringData": {ENGINE_KEY_SECRET_KEY: key}}


def router_service(route: ModelRoute) -> Manifest:
    """The ClusterIP Service in front of the router on ROUTER_PORT (the route's `endpoint`)."""
    return with_hash({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(route, router_name(route), router_labels(route)),
        "spec": {"selector": router_selector(route),
                 "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": ROUTER_PORT, "protocol": "TCP"}]},
    })


def unwanted_children(route: ModelRoute, settings: BuildSettings) -> list[tuple[str, str, str, str]]:
    """(apiVersion, kind, namespace, name) of optional children the spec does not ask for now: the
    autoscaler of the other backend, or both when the route has fixed replicas; the NetworkPolicy when
    settings.network_policies is off."""
    ns, name = namespace_of(route), engine_name(route)
    hpa = (settings.hpa_api_version, "HorizontalPodAutoscaler", ns, name)
    keda = (KEDA_API_VERSION, "ScaledObject", ns, name)
    policy = [] if settings.network_policies else [(NETWORK_POLICY_API_VERSION, "NetworkPolicy", ns, name)]
    auto = route.spec.autoscaling
    if auto is None:
        return [hpa, keda, *policy]
    return [hpa, *policy] if auto.backend == "keda" else [keda, *policy]


def children(route: ModelRoute, table: ServingTable, settings: BuildSettings) -> list[Manifest]:
    """Everything the operator applies for a ModelRoute, in apply order."""
    # The NetworkPolicy before the replicas: a new vLLM is never reachable from other pods, not even briefly.
    policy = [engine_network_policy(route)] if settings.network_policies else []
    out = [serving_config_map(route, table), *engine_rbac(route), *policy, engine_deployment(route, table, settings),
           engine_service(route), pod_disruption_budget(route, settings)]
    auto = route.spec.autoscaling
    if auto is not None:
        out.append(keda_scaled_object(route) if auto.backend == "keda"
                   else horizontal_pod_autoscaler(route, settings))
    out += [*router_rbac(route), router_deployment(route, settings), router_service(route)]
    return out
