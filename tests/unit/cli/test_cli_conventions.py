"""Issue 16, CLI conventions: `loraplane --version` (one version source), `render -n/--namespace`, `render -o
yaml|json`, `render --values` (the chart's childPods and policy), `validate -` (stdin)."""

from __future__ import annotations

import io
import json
import sys
import tomllib

import pytest
import yaml

import loraplane
from loraplane.cli import main
from support.paths import ROOT

FTJ = """apiVersion: loraplane.io/v1alpha1
kind: FineTuneJob
metadata: {name: t}
spec:
  baseModel: {name: org/m}
  dataset: {uri: "s3://b/train.jsonl"}
  output: {adapterName: a}
"""


def run(argv: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        rc = main(argv)
    except SystemExit as exc:   # argparse's --version and usage errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_version_prints_the_one_version(capsys):
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"loraplane {loraplane.__version__}"


def test_the_version_has_one_source():
    """pyproject reads the version from loraplane.__version__ (no second copy); the chart's version, appVersion
    and the default image tags are that version."""
    from setuptools.config.pyprojecttoml import read_configuration

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert read_configuration(ROOT / "pyproject.toml", expand=True)["project"]["version"] == loraplane.__version__
    chart = yaml.safe_load((ROOT / "charts" / "loraplane" / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == loraplane.__version__
    from loraplane.builders.settings import DEFAULT_IMAGE

    assert DEFAULT_IMAGE.endswith(f":{loraplane.__version__}")


def test_render_namespace_short_flag_and_json_output(capsys, monkeypatch):
    rc, out, err = run(["render", "-f", "-", "-n", "team-a"], capsys, FTJ, monkeypatch)
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out))
    assert docs and {d["metadata"]["namespace"] for d in docs} == {"team-a"}
    rc, out, err = run(["render", "-f", "-", "--namespace", "team-a", "-o", "json"], capsys, FTJ, monkeypatch)
    assert rc == 0, err
    listed = json.loads(out)
    assert listed["apiVersion"] == "v1" and listed["kind"] == "List" and listed["items"] == docs
    rc, _, err = run(["render", "-f", "-", "-o", "xml"], capsys, FTJ, monkeypatch)
    assert rc == 2 and "invalid choice" in err


def test_render_with_chart_values_shows_child_pod_settings_and_refuses_what_the_policy_refuses(
        tmp_path, capsys, monkeypatch):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"imagePullSecrets": [{"name": "regcred"}],
                                      "childPods": {"securityContext": {"fsGroup": 3000},
                                                    "labels": {"kueue.x-k8s.io/queue-name": "q"}}}))
    rc, out, err = run(["render", "-f", "-", "--values", str(values)], capsys, FTJ, monkeypatch)
    assert rc == 0, err
    pod = next(d for d in yaml.safe_load_all(out) if d["kind"] == "Job")["spec"]["template"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["securityContext"]["fsGroup"] == 3000
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    refused = FTJ + "  pod: {priorityClassName: system-node-critical}\n"
    rc, out, err = run(["render", "-f", "-", "--values", str(values)], capsys, refused, monkeypatch)
    assert rc == 1 and out == "" and "PolicyViolation" in err and "spec.pod.priorityClassName" in err
    values.write_text(yaml.safe_dump({"childPods": {"containerSecurityContext": {"privileged": True}}}))
    rc, out, err = run(["render", "-f", "-", "--values", str(values)], capsys, FTJ, monkeypatch)
    assert rc == 1 and out == "" and "childPods.containerSecurityContext.privileged" in err


def test_validate_reads_stdin(capsys, monkeypatch):
    rc, out, _ = run(["validate", "-"], capsys, FTJ, monkeypatch)
    assert rc == 0 and out.startswith("ok    -#0 FineTuneJob/t")


@pytest.mark.parametrize("argv", [["render", "--help"], ["validate", "--help"]])
def test_help_documents_the_conventions(argv, capsys):
    rc, out, _ = run(argv, capsys)
    assert rc == 0
    if argv[0] == "render":
        assert "-n NAMESPACE, --namespace NAMESPACE" in out and "-o {yaml,json}" in out
