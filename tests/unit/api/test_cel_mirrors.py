"""Every CEL rule has a Python mirror (CelRule.check) that gives the CEL's verdict, so parsing never runs cel-python.

The API server (>= 1.25) evaluates the CEL text; the operator, `loraplane validate` and `loraplane render` evaluate
the mirror (api.cel.failed_rules), because cel-python costs about 0.3 ms per rule and the operator parses every
spec it is given: before every rule had one, parsing a ModelRoute took ~10 ms and was the largest single cost of
the operator's settle (issue 17). Two checks: each rule has a mirror, and mirror and CEL agree on the values the
CRD schema admits (each node's samples, with each optional field absent, with edge values of each field) and on
hand-written cases, each rule seeing both verdicts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from loraplane.api import cel
from loraplane.api.adapter import Adapter
from loraplane.api.common import ApiModel
from loraplane.api.finetunejob import FineTuneJob
from loraplane.api.modelroute import ModelRoute
from loraplane.codegen.crds import all_crds
from test_cel_optional_fields import optional_paths, rule_nodes, sample, without

# Field values that sit on the edges of the rules (URIs the uri_rules refuse, the served-name separator, dot
# segments, archive suffixes, metric names); each string field of a sample takes each of them in turn.
EDGE_STRINGS = (
    "x", "a--b", " s3://b/k", "s3://b/k ", "pvc://c/../x", "pvc://c/a/..", "pvc://" + "c" * 254, "https://",
    "https://h/m.tar.gz", "https://h/m.tgz?sig=1", "https://h/m", "http://h/m.tar#.tar.gz", "s3://b/k", "hf://o/r",
    "/abs/path", "/a/./b", "/a/../b", "/a/b", "vllm:num_requests_waiting", "1bad", "classifier", "semantic",
    "rules", "keda", "hpa", "eval_loss", "rouge_l", "regex", "perplexity", "contains", "accuracy",
)
EDGE_NUMBERS = (0, 1, 2, 5, 100, 1000)

# Hand-written cases per model (wire form), for verdicts the schema samples alone do not reach.
CASES: dict[str, list[dict[str, Any]]] = {
    "RouteBackend": [{"adapter": "a"}, {"base": True}, {"base": False}, {"adapter": "a", "base": True},
                     {"adapter": "a", "base": False}, {}],
    "Route": [{"name": "n", "backends": [{"adapter": "a"}]}, {"backends": [{"adapter": "a"}]},
              {"name": "n", "backends": [{"adapter": "a", "weight": 50}, {"base": True, "weight": 50}]},
              {"name": "n", "backends": [{"adapter": "a", "weight": 50}, {"base": True}]},
              {"selector": {}}, {"selector": {}, "backends": [{"adapter": "a"}], "name": "n"}, {}],
    "ModelRouteSpec": [
        {"baseModel": {"name": "o/m"}}, {"baseModel": {"name": "o/m"}, "replicas": 1, "autoscaling": {"maxReplicas": 2}},
        {"baseModel": {"name": "o--m"}}, {"baseModel": {"name": "o--m"}, "servedModelName": "m"},
        {"baseModel": {"name": "o/m"}, "servedModelName": "a--b"},
        {"baseModel": {"uri": "https://h/m.tar.gz"}}, {"baseModel": {"uri": "https://h/m"}},
        {"baseModel": {"uri": "https://h/m.tar?sig=x.zip"}}, {"baseModel": {"uri": "s3://b/m"}},
        {"baseModel": {"name": "o/m"}, "routes": [{"name": "a", "selector": {}}, {"name": "a", "selector": {}}]},
        {"baseModel": {"name": "o/m"}, "routes": [{"name": "a", "selector": {}}, {"name": "b", "selector": {}},
                                                  {"selector": {}}, {"selector": {}}]},
        # An embedding route (engine.task embed) serves no adapters: both verdicts of that rule.
        {"baseModel": {"name": "o/m"}, "engine": {"task": "embed"}, "routes": [{"name": "e", "backends": [{"base": True}]}]},
        {"baseModel": {"name": "o/m"}, "engine": {"task": "embed"}, "routes": [{"name": "e", "backends": [{"adapter": "a"}]}]},
        {"baseModel": {"name": "o/m"}, "engine": {"task": "embed"}, "routes": [{"selector": {}}]},
    ],
    "AutoscalingSpec": [
        {"maxReplicas": 3}, {"maxReplicas": 3, "minReplicas": 4}, {"maxReplicas": 3, "minReplicas": 0},
        {"maxReplicas": 3, "minReplicas": 0, "backend": "keda"}, {"maxReplicas": 3, "metric": "bad metric"},
        {"maxReplicas": 3, "fallback": {"replicas": 2}}, {"maxReplicas": 3, "backend": "keda",
                                                          "fallback": {"replicas": 4}},
        {"maxReplicas": 3, "backend": "keda", "fallback": {"replicas": 2}},
        {"maxReplicas": 3, "scaleToZeroAfterSeconds": 60}, {"maxReplicas": 3, "backend": "hpa",
                                                            "scaleToZeroAfterSeconds": 60},
        {"maxReplicas": 3, "behavior": {}}, {"maxReplicas": 3, "behavior": {"scaleDown": {}}},
        {"maxReplicas": 3, "scaleDownStabilizationSeconds": 5,
         "behavior": {"scaleDown": {"stabilizationWindowSeconds": 5}}},
        {"maxReplicas": 3, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 5}}},
    ],
    "ModelCacheSpec": [{}, {"claimName": "c"}, {"hostPath": "/a/b"}, {"hostPath": "/a/./b"}, {"hostPath": "/a/.."},
                       {"hostPath": "/a/.b"}, {"claimName": "c", "hostPath": "/a"}, {"sizeLimit": "1Gi"},
                       {"sizeLimit": "1Gi", "claimName": "c"}],
    "ContentRoute": [{"name": "auto", "default": "m", "destinations": [{}]},
                     {"methods": ["rules", "classifier"]}, {"methods": ["classifier"], "classifier": {}},
                     {"methods": ["semantic"]}, {"methods": ["semantic"], "semantic": {}}, {"methods": []}],
    "ModelRef": [{"name": "o/m"}, {"uri": "s3://b/m"}, {"name": "o/m", "uri": "s3://b/m"}, {},
                 {"name": "o/m", "sha256": "0" * 64}, {"uri": "s3://b/m", "sha256": "0" * 64},
                 {"uri": "https://h/m.tar", "sha256": "0" * 64}, {"uri": "pvc://c/m", "sha256": "0" * 64}],
    "AdapterSource": [{"uri": "s3://b/k"}, {"fineTuneJobRef": {"name": "j"}}, {},
                      {"uri": "s3://b/k", "fineTuneJobRef": {"name": "j"}}],
    "DatasetSpec": [{"uri": "s3://b/k"}, {"configMapRef": {"name": "c"}}, {},
                    {"uri": "s3://b/k", "validationSplit": 0.1, "validationUri": "s3://b/v"},
                    # classification: the text and label columns must differ (both verdicts, defaults included).
                    {"uri": "s3://b/k", "format": "classification"},
                    {"uri": "s3://b/k", "format": "classification", "textField": "label"},
                    {"uri": "s3://b/k", "format": "classification", "textField": "q", "labelField": "q"}],
    "TrainingSpec": [{}, {"epochs": 1}, {"maxSteps": 10}, {"epochs": 1, "maxSteps": 10}],
    "EnvVarSource": [{"fieldRef": {"fieldPath": "x"}}, {"secretKeyRef": {"name": "s", "key": "k"}}],
    "FineTuneJobSpec": [{"dataset": {"uri": "s3://b/d"}, "evaluation": {}},
                        {"dataset": {"uri": "s3://b/d"}, "evaluation": {"dataset": {}, "primaryMetric": "eval_loss"}},
                        {"dataset": {"uri": "s3://b/d", "validationSplit": 0.1},
                         "evaluation": {"primaryMetric": "eval_loss"}},
                        # accuracy (issue 15's classifier): classification jobs only, and they score nothing else;
                        # the evaluation set's format follows the job's (both verdicts of each rule).
                        {"dataset": {"uri": "s3://b/d", "format": "classification", "validationSplit": 0.1},
                         "evaluation": {}},
                        {"dataset": {"uri": "s3://b/d", "format": "classification", "validationSplit": 0.1},
                         "evaluation": {"metrics": ["accuracy"], "primaryMetric": "accuracy"}},
                        {"dataset": {"uri": "s3://b/d", "format": "classification", "validationSplit": 0.1},
                         "evaluation": {"primaryMetric": "perplexity"}},
                        {"dataset": {"uri": "s3://b/d", "validationSplit": 0.1},
                         "evaluation": {"primaryMetric": "accuracy"}},
                        {"dataset": {"uri": "s3://b/d", "format": "instruction"},
                         "evaluation": {"dataset": {}, "metrics": ["accuracy"]}},
                        {"dataset": {"uri": "s3://b/d", "format": "classification", "validationSplit": 0.1},
                         "evaluation": {"metrics": ["accuracy", "exact_match"]}},
                        {"dataset": {"uri": "s3://b/d", "format": "classification", "validationSplit": 0.1},
                         "evaluation": {"primaryMetric": "rouge_l"}},
                        {"dataset": {"uri": "s3://b/d", "format": "classification"},
                         "evaluation": {"dataset": {"format": "classification"}}},
                        {"dataset": {"uri": "s3://b/d", "format": "classification"},
                         "evaluation": {"dataset": {"format": "instruction"}}},
                        {"dataset": {"uri": "s3://b/d", "format": "classification"}, "evaluation": {"dataset": {}}},
                        {"dataset": {"uri": "s3://b/d"}, "evaluation": {"dataset": {"format": "classification"}}},
                        {"dataset": {"uri": "s3://b/d", "format": "chat"}, "evaluation": {"dataset": {"format": "chat"}}}],
    "EvaluationSpec": [{"primaryMetric": "accuracy"}, {"primaryMetric": "rouge_l"},
                       {"dataset": {}, "primaryMetric": "rouge_l"}],
}


def every_model() -> Iterator[type[ApiModel]]:
    """ApiModel and every subclass that the three kinds (and what they import) define."""
    assert ModelRoute and Adapter and FineTuneJob  # imported for their subclasses
    pending, seen = [ApiModel], set()
    while pending:
        cls = pending.pop()
        if cls not in seen:
            seen.add(cls)
            pending.extend(cls.__subclasses__())
            yield cls


def models_by_rules() -> dict[tuple[str, ...], type[ApiModel]]:
    return {tuple(r.rule for r in cls.cel_rules): cls for cls in every_model() if cls.cel_rules}


def test_every_cel_rule_has_a_python_mirror():
    missing = [f"{cls.__module__}.{cls.__name__}: {r.rule}" for cls in every_model()
               for r in cls.__dict__.get("cel_rules") or () if r.check is None]
    assert not missing, "rules without CelRule.check (parsing would run cel-python):\n" + "\n".join(missing)


def edge_variants(value: Any, text: str) -> Iterator[Any]:
    """`value` with one string, number or boolean field (at any depth) that the rules' `text` names replaced by each
    edge value."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in text:
                continue
            if isinstance(v, bool):
                yield {**value, k: not v}
            elif isinstance(v, str):
                for e in EDGE_STRINGS:
                    yield {**value, k: e}
            elif isinstance(v, (int, float)):
                for e in EDGE_NUMBERS:
                    yield {**value, k: e}
            else:
                for sub in edge_variants(v, text):
                    yield {**value, k: sub}
    elif isinstance(value, list) and value:
        for sub in edge_variants(value[0], text):
            yield [sub, *value[1:]]
        yield [value[0], copy.deepcopy(value[0])]  # two equal entries (unique-name rules)


def nodes() -> Iterator[Any]:
    for crd in all_crds().values():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for where, node in rule_nodes(schema):
            if any(not cel.is_transition_rule(r["rule"]) for r in node["x-kubernetes-validations"]):
                yield pytest.param(node, id=f"{crd['spec']['names']['kind']}:{where}")


@pytest.mark.parametrize("node", list(nodes()))
def test_each_mirror_gives_the_cel_verdict(node):
    # Transition rules (self == oldSelf on immutable fields) run on updates only and have no mirror to compare.
    rules = tuple(r["rule"] for r in node["x-kubernetes-validations"] if not cel.is_transition_rule(r["rule"]))
    model = models_by_rules()[rules]
    full = sample(node)
    values = [full, sample(node, full=False), *(without(full, p) for p in optional_paths(node)),
              *edge_variants(full, " ".join(rules)), *edge_variants(sample(node, full=False), " ".join(rules)),
              *CASES.get(model.__name__, [])]
    disagree, seen = [], {r.rule: set() for r in model.cel_rules}
    for rule in model.cel_rules:
        if cel.is_transition_rule(rule.rule):
            continue
        for value in values:
            try:
                want = cel.evaluate(rule.rule, value)
            except Exception:  # noqa: BLE001 - not a value the schema admits (test_cel_optional_fields covers errors)
                continue
            got = rule.check(value)
            seen[rule.rule].add(want)
            if got != want:
                disagree.append(f"{model.__name__}: {rule.rule!r} on {value!r}: CEL {want}, Python {got}")
    assert not disagree, "\n".join(disagree[:20])
    one_sided = [f"{model.__name__}: {r!r} only ever {v}" for r, v in seen.items() if v and len(v) < 2]
    assert not one_sided, "add a case to CASES that gives the other verdict:\n" + "\n".join(one_sided)


def test_parsing_the_kinds_runs_no_cel_python(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("cel-python evaluated a rule while parsing")

    monkeypatch.setattr(cel, "evaluate", refuse)
    ModelRoute.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r"},
        "spec": {"baseModel": {"name": "o/m"}, "autoscaling": {"maxReplicas": 3, "minReplicas": 1},
                 "engine": {"modelCache": {"claimName": "c"}},
                 "routes": [{"name": "p", "backends": [{"adapter": "a", "weight": 60}, {"base": True, "weight": 40}]},
                            {"selector": {"matchLabels": {"g": "x"}}, "prefix": "g/"}],
                 "contentRouting": [{"name": "auto", "default": "p", "destinations": [{"model": "p"}]}]}})
    Adapter.model_validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter", "metadata": {"name": "a"},
                            "spec": {"baseModel": {"name": "o/m"}, "source": {"uri": "s3://b/k"}, "version": "1"}})
