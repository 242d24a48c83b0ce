"""Engine env entries are typed (api.common.EnvVar): a malformed `valueFrom` ("x", a list, an empty or double
source, a key ref without its key) is InvalidSpec with the field named, at admission (the CRD schema and its CEL
rules) and in `loraplane validate`, never an AttributeError in the policy check (an endless operator retry with
no status, or a CLI traceback)."""

from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import ValidationError

from loraplane.api import ModelRoute, cel
from loraplane.api.common import EnvVar, EnvVarSource
from loraplane.builders import engine_pod
from loraplane.builders.policy import SpecPolicy, _env_violations
from loraplane.cli import main as cli_main
from loraplane.codegen.crds import crd_for
from support.paths import ROOT

EXAMPLE = ROOT / "docs" / "examples" / "modelroute.yaml"
ROUTE_BODY = {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute",
              "metadata": {"name": "r", "namespace": "ns", "uid": "ru", "generation": 3},
              "spec": {"baseModel": {"name": "org/base"}, "routes": [{"name": "m", "backends": [{"base": True}]}]}}


def route(env) -> ModelRoute:
    body = copy.deepcopy(ROUTE_BODY)
    body["spec"]["engine"] = {"env": env}
    return ModelRoute.model_validate(body)


BAD = [
    ({"name": "A", "valueFrom": "x"}, "spec.engine.env.0.valueFrom"),
    ({"name": "A", "valueFrom": ["x"]}, "spec.engine.env.0.valueFrom"),
    ({"name": "A", "valueFrom": {}}, "exactly one of fieldRef"),
    ({"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"},
                                 "configMapKeyRef": {"name": "c", "key": "k"}}}, "exactly one of fieldRef"),
    ({"name": "A", "valueFrom": {"secretKeyRef": "s"}}, "spec.engine.env.0.valueFrom.secretKeyRef"),
    ({"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}, "spec.engine.env.0.valueFrom.secretKeyRef.key"),
    ({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}, "value": "1"}, "not both"),
    ({"name": "A", "valueFrom": {"sneaky": {}}}, "spec.engine.env.0.valueFrom.sneaky"),
    ({"name": "A", "value": 7}, "spec.engine.env.0.value"),
    ({"value": "1"}, "spec.engine.env.0.name"),
]


@pytest.mark.parametrize("entry, named", BAD)
def test_a_malformed_env_entry_is_refused_naming_the_field(entry, named):
    with pytest.raises(ValidationError) as exc:
        route([entry])
    assert named in str(exc.value).replace("\n", " ")


def test_well_formed_entries_pass_unchanged_into_the_engine_container():
    env = [{"name": "A", "value": "1"},
           {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "C", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
           {"name": "D", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k", "optional": True}}}]
    r = route(env)
    assert r.spec.engine.env == env and r.wire()["spec"]["engine"]["env"] == env
    container = engine_pod.engine_container(r)
    assert all(e in container["env"] for e in env)


def test_the_crd_schema_types_env_and_its_cel_rules_agree_with_the_python_checks():
    crd = crd_for(ModelRoute)
    items = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "engine"]["properties"]["env"]["items"]
    assert "x-kubernetes-preserve-unknown-fields" not in items and items["required"] == ["name"]
    assert items["properties"]["valueFrom"]["type"] == "object"
    for model, values in ((EnvVarSource, [{}, {"fieldRef": {}}, {"fieldRef": {}, "secretKeyRef": {}}]),
                          (EnvVar, [{"name": "a"}, {"name": "a", "value": ""}, {"name": "a", "value": "",
                                                                               "valueFrom": {}}])):
        for value in values:
            for rule in model.cel_rules:
                assert cel.evaluate(rule.rule, value) == rule.check(value), (rule.rule, value)


def test_the_policy_check_does_not_crash_on_a_malformed_entry_it_is_given_anyway():
    # The operator parses before it checks; this is the second line, for any caller that passes raw dicts.
    # Names the default allow-list (allowedEngineEnv) admits, so only the valueFrom shapes are under test.
    env = [{"name": "OMP_NUM_THREADS", "valueFrom": "x"}, {"name": "VLLM_LOGGING_LEVEL", "valueFrom": ["x"]},
           {"name": "TOKENIZERS_PARALLELISM", "valueFrom": {"secretKeyRef": "s"}}, "junk"]
    violations = _env_violations(env, set(), SpecPolicy(), "spec.engine.env")
    assert [v.field for v in violations] == ["spec.engine.env[2].valueFrom.secretKeyRef"]


def test_validate_with_the_policy_reports_a_malformed_env_entry_without_a_traceback(tmp_path, capsys):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["engine"]["env"] = [{"name": "X", "valueFrom": "configMapKeyRef"}]
    path = tmp_path / "route.yaml"
    path.write_text(yaml.safe_dump(doc))
    values = ROOT / "charts" / "loraplane" / "values.yaml"
    assert cli_main(["validate", "--policy", str(values), str(path)]) != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "spec.engine.env" in captured.out + captured.err
