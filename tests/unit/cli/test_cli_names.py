"""`loraplane validate` and `loraplane render -f` on the inputs of issue 13 (names at the seams)."""

from __future__ import annotations

import argparse

import yaml

from loraplane.cli.render import add_render_arguments, render_main
from loraplane.cli.validate import validate_main

API = "loraplane.io/v1alpha1"


def adapter(name: str, version: str, labels: dict | None = None) -> dict:
    return {"apiVersion": API, "kind": "Adapter", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": f"s3://b/{name}"}, "version": version}}


def route(routes: list) -> dict:
    return {"apiVersion": API, "kind": "ModelRoute", "metadata": {"name": "r"},
            "spec": {"baseModel": {"name": "org/base"}, "routes": routes}}


def validate(tmp_path, docs, capsys) -> tuple[int, str]:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    rc = validate_main(argparse.Namespace(files=[path]))
    return rc, capsys.readouterr().out


def render(tmp_path, docs, capsys) -> tuple[int, str, str]:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    p = argparse.ArgumentParser()
    add_render_arguments(p)
    rc = render_main(p.parse_args(["-f", str(path)]))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_item1_an_adapter_version_with_the_separator_is_refused(tmp_path, capsys):
    docs = [adapter("sql", "v2--1"), adapter("sql--v2", "1"),
            route([{"name": "a", "backends": [{"adapter": "sql"}]}, {"name": "b", "backends": [{"adapter": "sql--v2"}]}])]
    rc, out = validate(tmp_path, docs, capsys)
    assert rc == 1 and "spec.version must not contain '--'" in out and out.count("error") == 1
    rc, _, err = render(tmp_path, docs, capsys)
    assert rc == 1 and "spec.version" in err


def test_item2_a_public_name_conflict_is_reported_and_rendered_once(tmp_path, capsys):
    docs = [adapter("sql", "1", {"team": "analytics"}),
            route([{"name": "analytics-sql", "backends": [{"base": True}]},
                   {"selector": {"matchLabels": {"team": "analytics"}}, "prefix": "analytics-"}])]
    rc, out = validate(tmp_path, docs, capsys)
    assert rc == 0 and "warn" in out and "analytics-sql" in out and "Adapter sql" in out
    rc, manifests, err = render(tmp_path, docs, capsys)
    assert rc == 0 and "analytics-sql" in err
    cm = next(m for m in yaml.safe_load_all(manifests) if m["kind"] == "ConfigMap")
    table = yaml.safe_load(next(iter(cm["data"].values())))
    assert [m["name"] for m in table["models"]] == ["analytics-sql"]


def test_item3_what_the_api_server_would_refuse_is_refused_with_the_field(tmp_path, capsys):
    bad_selector = route([{"selector": {"matchLabels": ["team"]}}])
    dup_env = route([])
    dup_env["metadata"]["name"] = "r2"
    dup_env["spec"]["engine"] = {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}
    rc, out = validate(tmp_path, [bad_selector, dup_env], capsys)
    assert rc == 1 and "spec.routes[0].selector.matchLabels" in out and "spec.engine.env" in out
    # A 69-character FineTuneJob and a dotted claim are valid: their children are made valid (test_names.py).
    ftj = {"apiVersion": API, "kind": "FineTuneJob", "metadata": {"name": "f" * 69},
           "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "pvc://my.claim/d.jsonl"},
                    "output": {"adapterName": "a"}}}
    rc, manifests, _ = render(tmp_path, [ftj], capsys)
    assert rc == 0
    for m in yaml.safe_load_all(manifests):
        assert all(len(v) <= 63 for v in m["metadata"]["labels"].values()), m["kind"]
        if m["kind"] == "Job":
            volumes = [v["name"] for v in m["spec"]["template"]["spec"]["volumes"]]
            assert all("." not in v for v in volumes), volumes
