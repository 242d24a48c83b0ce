"""`validate` and `render` on input a user gets wrong: one clear error per file or document, never a traceback,
and never a silent pass (a mistyped loraplane.io kind used to be skipped like a Secret and exit 0)."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pytest
from loraplane.cli.render import add_render_arguments, render_main
from loraplane.cli.validate import validate_main
from support.paths import ROOT

ADAPTER = """apiVersion: loraplane.io/v1alpha1
kind: Adapter
metadata: {name: sql}
spec: {baseModel: {name: m}, version: "1", source: {uri: "pvc://adapters/sql"}}
"""

CASES = {
    "mistyped kind": ("apiVersion: loraplane.io/v1alpha1\nkind: Adaptor\nmetadata: {name: a}\n",
                      "kind: 'Adaptor' is not a loraplane.io kind"),
    "bad yaml": ("a: [1\n", "not valid YAML (line 2"),
    "top-level list": ("- 1\n- 2\n", "a document must be one object"),
    "no loraplane object": ("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n", "no loraplane.io object"),
}


def run_validate(files, capsys) -> tuple[int, str]:
    rc = validate_main(argparse.Namespace(files=files))
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("case", CASES)
def test_validate_refuses_what_is_not_a_usable_manifest(case, tmp_path, capsys):
    text, expected = CASES[case]
    path = tmp_path / "in.yaml"
    path.write_text(text)
    rc, out = run_validate([path], capsys)
    assert rc == 1 and expected in out, out


@pytest.mark.parametrize("case", [c for c in CASES if c != "no loraplane object"])
def test_render_refuses_what_is_not_a_usable_manifest(case, tmp_path, capsys):
    text, expected = CASES[case]
    path = tmp_path / "in.yaml"
    path.write_text(text)
    p = argparse.ArgumentParser()
    add_render_arguments(p)
    rc = render_main(p.parse_args(["-f", str(path)]))
    captured = capsys.readouterr()
    assert rc == 1 and expected in captured.err and captured.out == "", captured


def test_validate_reads_stdin_and_names_a_missing_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(ADAPTER))
    rc, out = run_validate([Path("-")], capsys)
    assert rc == 0 and "ok    -#0 Adapter/sql" in out
    rc, out = run_validate([tmp_path / "missing.yaml"], capsys)
    assert rc == 1 and "cannot read the file" in out


def test_errors_name_fields_as_kubectl_does_and_uris_by_the_forms_the_field_takes(tmp_path, capsys):
    """List indexes in brackets (`spec.routes[0]...`, the notation of kubectl and the docs), and a URI of an
    unsupported scheme answered with the forms the field takes, not the field's regular expression."""
    path = tmp_path / "in.yaml"
    path.write_text(ADAPTER.replace("pvc://adapters/sql", "gs://bucket/sql") + """---
apiVersion: loraplane.io/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  baseModel: {name: m}
  routes: [{name: a, backends: [{adapter: sql, weight: "x"}]}]
""")
    rc, out = run_validate([path], capsys)
    assert rc == 1
    assert "spec.source.uri: unsupported URI 'gs://bucket/sql': use pvc://CLAIM/PATH, s3://BUCKET/PREFIX" in out
    assert "^(" not in out
    assert "spec.routes[0].backends[0].weight" in out, out


def test_validate_warns_about_plain_http_sources_without_showing_credentials(tmp_path, capsys):
    """A plain http:// URI passes the schema (the operator may allow it) but is refused at run time by default:
    validate says so before it is applied, naming the field, and never prints the URI's credentials."""
    path = tmp_path / "in.yaml"
    path.write_text(ADAPTER.replace("pvc://adapters/sql", "http://user:s3cret@host/sql.tar.gz"))
    rc, out = run_validate([path], capsys)
    assert rc == 0 and "warn  Adapter/sql: spec.source.uri (" in out and "http:// refused" in out
    assert "unless the operator allows it (chart value operator.allowInsecureHttp)" in out
    assert "s3cret" not in out


def test_validate_warns_about_backends_the_operator_would_leave_out(tmp_path, capsys):
    """What the route's status would say after apply, said before: a backend whose Adapter is in none of the
    files (it may exist in the cluster) and one the route cannot serve (its rank over engine.maxLoraRank)."""
    path = tmp_path / "in.yaml"
    path.write_text(ADAPTER.replace('version: "1"', 'version: "1", rank: 64') + """---
apiVersion: loraplane.io/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  baseModel: {name: m}
  engine: {maxLoraRank: 8}
  routes:
  - {name: a, backends: [{adapter: sql, weight: 100}]}
  - {name: b, backends: [{adapter: nope, weight: 100}]}
""")
    rc, out = run_validate([path], capsys)
    assert rc == 0, out
    assert "backend nope of 'b' is left out (AdapterNotFound)" in out and "namespace default" in out
    assert "backend sql of 'a' is left out (RankTooLarge)" in out, out


def test_an_adapter_a_finetunejob_in_the_files_will_create_is_not_reported_missing(tmp_path, capsys):
    """The quickstart shape: a FineTuneJob and the route that serves its adapter, applied together. The Adapter
    does not exist until the job succeeds; that is not a mistake to warn about."""
    rc, out = run_validate([ROOT / "docs" / "examples" / "quickstart.yaml"], capsys)
    assert rc == 0 and "left out" not in out, out


def test_render_writes_every_value_where_it_is_without_yaml_anchors(capsys):
    """The engine's probes share one httpGet dict in the builders: rendered, each probe spells it out (PyYAML
    printed `httpGet: &id001` once and `httpGet: *id001` for the others)."""
    import yaml

    p = argparse.ArgumentParser()
    add_render_arguments(p)
    rc = render_main(p.parse_args(["-f", str(ROOT / "docs" / "examples" / "modelroute.yaml"),
                                   "-f", str(ROOT / "docs" / "examples" / "adapter.yaml")]))
    out = capsys.readouterr().out
    assert rc == 0
    assert "&id" not in out and "*id" not in out, [line for line in out.splitlines() if "id0" in line]
    engine = next(m for m in yaml.safe_load_all(out) if m["kind"] == "Deployment"
                  and any(c["name"] == "vllm" for c in m["spec"]["template"]["spec"]["containers"]))
    vllm = next(c for c in engine["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")
    assert vllm["startupProbe"]["httpGet"] == vllm["livenessProbe"]["httpGet"] == {"path": "/health", "port": 8000}


@pytest.mark.parametrize("edit, expected", [
    (("    r: 8\n", "    r: 32\n"),
     "backend quickstart-adapter of 'assistant' is left out (RankTooLarge): adapter quickstart-adapter has rank 32, "
     "above ModelRoute quickstart's engine.maxLoraRank 16; raise maxLoraRank or train with a smaller method.r "
     "(the Adapter FineTuneJob quickstart creates)"),
    (("kind: ModelRoute\nmetadata:\n  name: quickstart\nspec:\n  baseModel:\n    name: loraplane/tiny-llama\n",
      "kind: ModelRoute\nmetadata:\n  name: quickstart\nspec:\n  baseModel:\n    name: Qwen/Qwen2.5-0.5B\n"),
     "(BaseModelMismatch): adapter quickstart-adapter was trained on loraplane/tiny-llama, but ModelRoute quickstart "
     "serves Qwen/Qwen2.5-0.5B; serve it on a ModelRoute of loraplane/tiny-llama, or retrain it on Qwen/Qwen2.5-0.5B"),
])
def test_validate_checks_the_adapter_a_finetunejob_will_create_against_the_route(edit, expected, tmp_path, capsys):
    """A FineTuneJob whose adapter the route of the same files cannot serve (method.r over engine.maxLoraRank,
    another base model) is warned about before its GPU hours are spent; it used to pass without a word (the
    produced Adapter was only exempted from AdapterNotFound, never checked)."""
    text = (ROOT / "docs" / "examples" / "quickstart.yaml").read_text()
    assert edit[0] in text
    path = tmp_path / "in.yaml"
    path.write_text(text.replace(*edit))
    rc, out = run_validate([path], capsys)
    assert rc == 0 and expected in out, out


def test_validate_warns_about_an_adapter_a_selector_matches_but_the_route_cannot_serve(tmp_path, capsys):
    path = tmp_path / "in.yaml"
    path.write_text(ADAPTER.replace("metadata: {name: sql}", "metadata: {name: sql, labels: {team: a}}")
                    .replace('version: "1"', 'version: "1", rank: 64') + """---
apiVersion: loraplane.io/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  baseModel: {name: m}
  engine: {maxLoraRank: 8}
  routes:
  - selector: {matchLabels: {team: a}}
""")
    rc, out = run_validate([path], capsys)
    assert rc == 0, out
    assert ("Adapter sql, which a selector of spec.routes matches, is not served (RankTooLarge): adapter sql has "
            "rank 64") in out, out


def test_an_invalid_finetunejob_does_not_also_make_its_adapter_reported_missing(tmp_path, capsys):
    """The quickstart with a mistake in its FineTuneJob: the job's error is the finding; the route's backend
    naming the Adapter that job creates used to be warned AdapterNotFound too, sending the user to the wrong
    object."""
    path = tmp_path / "in.yaml"
    path.write_text((ROOT / "docs" / "examples" / "quickstart.yaml").read_text()
                    .replace("targetModules: [q_proj, v_proj]", "targetModules: q_proj"))
    rc, out = run_validate([path], capsys)
    assert rc == 1 and "spec.method.targetModules: expected a list" in out, out
    assert "AdapterNotFound" not in out, out
