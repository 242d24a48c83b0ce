"""What a new user meets in `validate` / `render`: each error names the field and says what to write instead,
every problem is reported at once where it can be, and nothing wrong passes silently (a missing metadata.name,
a duplicate YAML key). The messages come from api.validation, so the operator's status messages read the same."""

from __future__ import annotations

import argparse
import re

import pytest
from loraplane.api import KINDS
from loraplane.api.common import URI_PATTERN_FORMS
from loraplane.api.pods import PodSettings
from loraplane.cli import main
from loraplane.cli.render import add_render_arguments, render_main
from loraplane.cli.validate import validate_main

JOB = """apiVersion: loraplane.io/v1alpha1
kind: FineTuneJob
metadata: {name: j}
spec:
  baseModel: {name: m}
  dataset: {uri: "pvc://data/train.jsonl"}
  output: {adapterName: a}
"""
ADAPTER = """apiVersion: loraplane.io/v1alpha1
kind: Adapter
metadata: {name: sql}
spec: {baseModel: {name: m}, version: "1", source: {uri: "pvc://adapters/sql"}}
"""


def validate(tmp_path, capsys, text: str) -> tuple[int, str]:
    path = tmp_path / "in.yaml"
    path.write_text(text)
    rc = validate_main(argparse.Namespace(files=[path]))
    return rc, capsys.readouterr().out


def render(tmp_path, capsys, text: str) -> tuple[int, str]:
    path = tmp_path / "in.yaml"
    path.write_text(text)
    p = argparse.ArgumentParser()
    add_render_arguments(p)
    rc = render_main(p.parse_args(["-f", str(path)]))
    return rc, capsys.readouterr().err


def test_an_unknown_field_gets_the_closest_valid_name_or_the_list_of_them(tmp_path, capsys):
    rc, out = validate(tmp_path, capsys, JOB.replace("  output:", "  methd: {}\n  output:")
                       .replace("baseModel: {name: m}", "baseModel: {name: m, revison: main}"))
    assert rc == 1
    assert "spec.methd: unknown field 'methd': did you mean 'method'?" in out, out
    assert "spec.baseModel.revison: unknown field 'revison': did you mean 'revision'?" in out, out
    rc, out = validate(tmp_path, capsys, ADAPTER.replace('version: "1"', 'version: "1", zzz: 1'))
    assert "spec.zzz: unknown field 'zzz': the fields here are baseModel, rank, rollout, source, targetModules, version" \
        in out, out


def test_patterns_are_said_in_words_and_a_missing_field_says_what_to_add(tmp_path, capsys):
    rc, out = validate(tmp_path, capsys, ADAPTER.replace("{name: sql}", "{name: Sql_1}")
                       .replace('"pvc://adapters/sql"', '"pvc://adapters/sql", sha256: abc'))
    assert rc == 1
    assert "metadata.name: 'Sql_1' is not valid: expected a DNS-1123 name: lowercase letters, digits, '-'" in out
    assert "spec.source.sha256: 'abc' is not valid: expected 64 lowercase hex characters" in out
    rc, out = validate(tmp_path, capsys, JOB.replace("  output: {adapterName: a}\n", ""))
    assert re.search(r"spec\.output: required: add `output:` \(.+\)", out), out
    assert "Field required" not in out and "String should match pattern" not in out and "Extra inputs" not in out


def test_every_pattern_of_the_api_is_said_in_words():
    """So that no refused value is answered with a regular expression (a new pattern needs its words)."""
    from loraplane.api.validation import PATTERN_WORDS

    patterns: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    patterns.add(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for model in (*KINDS.values(), PodSettings):
        walk(model.model_json_schema(by_alias=True))
    assert patterns and not patterns - PATTERN_WORDS.keys() - URI_PATTERN_FORMS.keys()


def test_the_api_version_is_reported_under_its_field_and_a_uri_by_the_part_that_is_wrong(tmp_path, capsys):
    rc, out = validate(tmp_path, capsys, ADAPTER.replace("v1alpha1", "v1alpha2")
                       .replace("pvc://adapters/sql", "pvc://Bad_Claim/x"))
    assert rc == 1
    assert "  apiVersion: must be loraplane.io/v1alpha1, not 'loraplane.io/v1alpha2'" in out, out
    assert "<object>" not in out
    assert "spec.source.uri: invalid pvc:// URI 'pvc://Bad_Claim/x': the claim name (CLAIM) must be a DNS-1123" in out
    assert "unsupported URI" not in out
    # A scheme the field does not take is still answered with the forms it does take.
    rc, out = validate(tmp_path, capsys, JOB.replace("{adapterName: a}", "{adapterName: a, uri: 'hf://org/repo'}"))
    assert "spec.output.uri: unsupported URI 'hf://org/repo': use pvc://CLAIM/PATH, s3://BUCKET/PREFIX" in out, out


@pytest.mark.parametrize("run", [validate, render])
def test_an_object_without_metadata_name_is_refused(run, tmp_path, capsys):
    for text in (ADAPTER.replace("metadata: {name: sql}", "metadata: {}"),
                 ADAPTER.replace("metadata: {name: sql}\n", "")):
        rc, out = run(tmp_path, capsys, text)
        assert rc == 1 and "metadata.name: required" in out, out


@pytest.mark.parametrize("run", [validate, render])
def test_rule_errors_hidden_behind_schema_errors_are_reported_with_them(run, tmp_path, capsys):
    """A bad sha256 used to hide the version rule (`--`): one run now reports both, and says that the rules of
    fields still wrong follow."""
    rc, out = run(tmp_path, capsys, ADAPTER.replace('version: "1"', 'version: "a--b"')
                  .replace('"pvc://adapters/sql"', '"pvc://adapters/sql", sha256: abc'))
    assert rc == 1
    assert "spec.source.sha256:" in out and "spec.version must not contain '--'" in out, out
    assert "fix these first" in out
    # A field left out to check the rest does not produce errors of its own (source needs uri or a job ref).
    rc, out = run(tmp_path, capsys, ADAPTER.replace("pvc://adapters/sql", "pvc://Bad_Claim/x"))
    assert "exactly one of" not in out, out
    # A wrong metadata.name does not hide a rule whose message says "name" in passing.
    rc, out = run(tmp_path, capsys, ADAPTER.replace("{name: sql}", "{name: Sql}").replace('"1"', '"a--b"'))
    assert "metadata.name:" in out and "spec.version must not contain '--'" in out, out


@pytest.mark.parametrize("run", [validate, render])
def test_a_duplicate_key_is_refused_naming_it_and_its_lines(run, tmp_path, capsys):
    rc, out = run(tmp_path, capsys, ADAPTER.replace("{name: sql}", "{name: sql}\nmetadata: {name: other}"))
    assert rc == 1 and "duplicate key 'metadata' (first on line 3)" in out and "line 4" in out, out
    rc, out = run(tmp_path, capsys, ADAPTER.replace("{name: m}", "{name: m, name: n}"))
    assert rc == 1 and "duplicate key 'name'" in out, out


def test_a_metadata_address_is_refused_over_https_too_and_whatever_the_chart_allows(tmp_path, capsys):
    """validate's warning is the fetchers' own rule: link-local / metadata addresses are never fetched."""
    for uri in ("https://169.254.169.254/a.tar.gz", "http://169.254.169.254/a.tar.gz", "https://[fe80::1]/a.tar.gz"):
        rc, out = validate(tmp_path, capsys, ADAPTER.replace("pvc://adapters/sql", uri))
        assert rc == 0 and "refused at run time (InsecureSource) even with operator.allowInsecureHttp" in out, out
    rc, out = validate(tmp_path, capsys, ADAPTER.replace("pvc://adapters/sql", "https://example.com/a.tar.gz"))
    assert "warn" not in out


@pytest.mark.parametrize("command", ["validate", "render"])
@pytest.mark.parametrize("spelling", [["-f"], ["--filename"], ["--file"]])
@pytest.mark.parametrize("values", ["--values", "--policy"])
def test_validate_and_render_take_the_same_flag_spellings(command, spelling, values, tmp_path, capsys):
    path, chart = tmp_path / "in.yaml", tmp_path / "values.yaml"
    path.write_text(ADAPTER)
    chart.write_text("operator: {policy: {}}\n")
    assert main([command, *spelling, str(path), values, str(chart)]) == 0, capsys.readouterr()


@pytest.mark.parametrize("spelling", ["-f", "--file", "--filename"])
def test_run_takes_the_same_file_spellings(spelling, tmp_path):
    from loraplane.cli.run import add_run_arguments

    p = argparse.ArgumentParser()
    add_run_arguments(p)
    assert p.parse_args([spelling, str(tmp_path / "x.yaml")]).file == tmp_path / "x.yaml"


@pytest.mark.parametrize("field,value,fix", [
    ("methods", "rules", "expected a list, got a string 'rules': write `methods: [rules]`"),
    ("keywords", "my order", "expected a list, got a string 'my order': write `keywords: [my order]`"),
    ("keywords", "a: b", "expected a list, got a string 'a: b': write `keywords: [\"a: b\"]`"),
    ("backends", {"base": True}, "expected a list, got a mapping \"{'base': True}\": write `backends: [{...}]`"),
])
def test_a_scalar_or_mapping_where_a_list_belongs_says_how_to_write_the_list(tmp_path, capsys, field, value, fix):
    import json

    route = {"apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r"},
             "spec": {"baseModel": {"name": "m"}, "routes": [{"name": "general", "backends": [{"base": True}]}],
                      "contentRouting": [{"name": "auto", "default": "general",
                                          "destinations": [{"model": "general", "rules": {"keywords": ["x"]}}]}]}}
    where = {"methods": route["spec"]["contentRouting"][0],
             "keywords": route["spec"]["contentRouting"][0]["destinations"][0]["rules"],
             "backends": route["spec"]["routes"][0]}[field]
    where[field] = value
    rc, out = validate(tmp_path, capsys, json.dumps(route))
    assert rc == 1 and fix in out, out


def test_validate_strict_fails_on_a_content_routing_typo_that_is_otherwise_only_a_warning(tmp_path, capsys):
    """A contentRouting name no route among the files publishes is a warning (another route in the cluster may
    publish it); --strict makes it fail CI, with the suggestion of the name meant."""
    path = tmp_path / "in.yaml"
    path.write_text("""apiVersion: loraplane.io/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  baseModel: {name: m}
  routes: [{name: general, backends: [{base: true}]}]
  contentRouting: [{name: auto, default: generl, destinations: [{model: general, rules: {keywords: [x]}}]}]
""")
    assert validate_main(argparse.Namespace(files=[path])) == 0
    assert "did you mean 'general'?" in capsys.readouterr().out
    assert validate_main(argparse.Namespace(files=[path], strict=True)) == 1
    assert "error 1 warning(s) with --strict" in capsys.readouterr().out
    assert main(["validate", "--strict", str(path)]) == 1


def test_a_python_field_name_is_an_unknown_field_as_the_api_server_says(tmp_path, capsys):
    """A manifest's fields are the CRD schema's camelCase names. `validation_split` (the Python name, which
    ApiModel's populate_by_name admits for code) passed `loraplane validate` and `loraplane train` as if it were
    `validationSplit`, while kubectl refuses it (strict field validation) or the API server prunes it: the 20%
    the user meant to hold out was not. It is an unknown field naming the wire name, in every reader of files."""
    from loraplane.trainer.config import InvalidConfig, job_from_dict

    job = JOB.replace('{uri: "pvc://data/train.jsonl"}', '{uri: "pvc://data/train.jsonl", validation_split: 0.2}')
    rc, out = validate(tmp_path, capsys, job)
    assert rc == 1
    assert "spec.dataset.validation_split: unknown field 'validation_split': did you mean 'validationSplit'?" \
        in out, out
    rc, out = validate(tmp_path, capsys, JOB.replace("baseModel: {name: m}", "base_model: {name: m}"))
    assert rc == 1 and "did you mean 'baseModel'?" in out, out
    import yaml
    with pytest.raises(InvalidConfig, match="validation_split"):
        job_from_dict(yaml.safe_load(job))
    rc, out = validate(tmp_path, capsys, JOB.replace("pvc://data/train.jsonl\"}", "pvc://data/train.jsonl\", "
                                                     "validationSplit: 0.2}"))
    assert rc == 0, out


ROUTE_WEIGHTS = """apiVersion: loraplane.io/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  baseModel: {name: m}
  routes:
    - name: s
      backends: [{adapter: a, weight: W1}, {adapter: b, weight: W2}]
"""


@pytest.mark.parametrize("run", [validate, render])
@pytest.mark.parametrize("w1, w2, says_sum", [
    ("-10", "110", False),    # out of range each, but they do sum to 100
    ('"x"', "50", False),     # a weight of the wrong type: reported on its field, no guess about the sum
    ("200", "50", True),      # the user's weights really do not sum to 100
])
def test_a_rule_above_a_wrong_field_is_reported_only_when_the_users_values_break_it(run, w1, w2, says_sum, tmp_path,
                                                                                     capsys):
    """A wrong field is left out to check the rest, and takes its default: two weights -10 and 110 each counted
    100 and `the weights of a route's backends must sum to 100` was reported, though they sum to 100. The route's
    rule is now evaluated on the values as written."""
    rc, out = run(tmp_path, capsys, ROUTE_WEIGHTS.replace("W1", w1).replace("W2", w2))
    assert rc == 1 and "spec.routes[0].backends[0].weight:" in out, out
    assert ("spec.routes[0]: the weights of a route's backends must sum to 100" in out) == says_sum, out


@pytest.mark.parametrize("run", [validate, render])
@pytest.mark.parametrize("field, written, expected", [
    ("replicas", '"2"', "spec.replicas: '2' is a string, the field takes an integer (the API server refuses it): "
                        "write it without quotes (`replicas: 2`)"),
    ("learningRate", '"0.001"', "spec.training.learningRate: '0.001' is a string, the field takes a number"),
    ("gradientCheckpointing", '"no"', "spec.training.gradientCheckpointing: 'no' is a string, the field takes true "
                                      "or false"),
    ("version", "3", "spec.version: 3 is an integer, the field takes a string (the API server refuses it): quote it "
                     "(`version: \"3\"`)"),
    ("replicas", "true", "spec.replicas: true is a boolean, the field takes an integer (the API server refuses it): "
                         "write a number"),
])
def test_a_value_of_another_json_type_than_the_crds_is_refused_with_the_fix(run, field, written, expected, tmp_path,
                                                                             capsys):
    """pydantic converted `replicas: "2"` to 2 and `gradientCheckpointing: "no"` to false, so validate passed what
    `kubectl apply` refuses (the CRD's type); and `version: 3` got `Input should be a valid string`, no fix."""
    text = {"replicas": "apiVersion: loraplane.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: r}\n"
                        "spec: {baseModel: {name: m}, replicas: VALUE, routes: [{name: b, backends: [{base: true}]}]}\n",
            "version": ADAPTER.replace('version: "1"', "version: VALUE")}.get(
        field, JOB.replace("spec:\n", f"spec:\n  training: {{{field}: VALUE}}\n", 1))
    rc, out = run(tmp_path, capsys, text.replace("VALUE", written))
    assert rc == 1 and expected in out, out
    assert "Input should be a valid string" not in out, out


def test_a_number_with_an_exponent_is_read_as_kubectl_reads_it(tmp_path, capsys):
    """`learningRate: 2e-4` is a float for kubectl (YAML 1.2) but a string for PyYAML: read as kubectl does."""
    rc, out = validate(tmp_path, capsys, JOB.replace("spec:\n", "spec:\n  training: {learningRate: 2e-4}\n", 1))
    assert rc == 0, out


# What kubectl (go-yaml v2) sends for a YAML spelling PyYAML reads otherwise (`kubectl label --local -o json` shows
# it): (the spelling in place of a field, whether validate passes, a text its output must have).
KUBECTL_READS = [
    # a date is the string written: PyYAML made a datetime, refused with `Input should be a valid string`
    ("version: 2024-06-01", 0, ""),
    # "1:30", not base 60: validate said `version: 90 is an integer ... quote it ("90")`
    ("version: 1:30", 1, "'1:30' is not valid"),
    ("version: 0o17", 1, "spec.version: 15 is an integer"),      # octal, as Go reads it
    ("version: 09", 1, "spec.version: 9.0 is a number"),         # not octal: a number, not a string
    ("training: {gradientCheckpointing: y}", 0, ""),             # y/n are booleans
    ("training: {learningRate: +.5e-3}", 0, ""),                 # a sign, a leading dot, an exponent
]


@pytest.mark.parametrize("run", [validate, render])
@pytest.mark.parametrize("written, rc_expected, expected", KUBECTL_READS, ids=[k[0] for k in KUBECTL_READS])
def test_yaml_is_read_as_kubectl_reads_it(run, written, rc_expected, expected, tmp_path, capsys):
    """validate/render/run read a value as kubectl sends it to the API server, so they pass what it admits and
    refuse (with the fix) what it refuses."""
    if written.startswith("version:"):
        text = ADAPTER.replace('version: "1"', written)
    else:
        text = JOB.replace("spec:\n", f"spec:\n  {written}\n", 1)
    rc, out = run(tmp_path, capsys, text)
    assert rc == rc_expected and expected in out, out
    assert "90" not in out, out


@pytest.mark.parametrize("run", [validate, render])
@pytest.mark.parametrize("list_kind", ["apiVersion: v1\nkind: List", "apiVersion: loraplane.io/v1alpha1\nkind: AdapterList"])
def test_the_items_of_a_list_are_checked_as_kubectl_applies_them(run, list_kind, tmp_path, capsys):
    """`kubectl get adapters -o yaml` exports a `kind: List` that `kubectl apply -f` applies item by item: its
    items were skipped as another API's object (`no loraplane.io object`), a valid export refused and a wrong
    item never checked."""
    item = "\n".join("  " + line for line in ADAPTER.strip().splitlines())
    text = f"{list_kind}\nitems:\n- {item.strip()}\n"
    rc, out = run(tmp_path, capsys, text)
    assert rc == 0, out
    rc, out = run(tmp_path, capsys, text.replace('version: "1"', "version: 3"))
    assert rc == 1 and "#0.items[0] Adapter/sql" in out and "spec.version: 3 is an integer" in out, out


@pytest.mark.parametrize("run", [validate, render])
def test_a_null_field_is_taken_as_left_out_as_the_api_server_prunes_it(run, tmp_path, capsys):
    """`training:` with every line under it commented out is null, which the API server prunes (no field of the
    CRDs is nullable; tests/integration/apiserver/test_crds.py checks it there): validate refused it with
    `Input should be a valid dictionary`."""
    text = JOB + "  training:\n    # learningRate: 2e-4\n  method: {r: }\n  resources:\n"
    rc, out = run(tmp_path, capsys, text)
    assert rc == 0, out
