"""`loraplane validate --policy values.yaml`: the operator's spec policy (issue 12, item 6) checked before an apply,
from the same chart values the operator is installed with."""

from __future__ import annotations

import yaml

from loraplane.cli import main as cli_main
from support.paths import ROOT

CHART_VALUES = ROOT / "charts" / "loraplane" / "values.yaml"
EXAMPLE = ROOT / "docs" / "examples" / "modelroute.yaml"


def _route_with(tmp_path, **engine) -> str:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["engine"].update(engine)
    path = tmp_path / "route.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_validate_checks_the_policy_of_the_chart_values(tmp_path, capsys):
    assert cli_main(["validate", "--policy", str(CHART_VALUES), str(EXAMPLE)]) == 0
    risky = _route_with(tmp_path, extraArgs=["--trust-remote-code"], image="evil.example/vllm:1")
    assert cli_main(["validate", risky]) == 0                        # schema only: valid
    capsys.readouterr()
    assert cli_main(["validate", "--policy", str(CHART_VALUES), risky]) == 1
    out = capsys.readouterr().out
    assert "PolicyViolation" in out and "spec.engine.image" in out and "spec.engine.extraArgs[0]" in out
    assert "operator.policy.allowTrustRemoteCode" in out and "operator.policy.allowedImages" in out

    values = yaml.safe_load(CHART_VALUES.read_text())
    values["operator"]["policy"].update(allowTrustRemoteCode=True, allowedImages=["evil.example/*"])
    allowing = tmp_path / "values.yaml"
    allowing.write_text(yaml.safe_dump(values))
    assert cli_main(["validate", "--policy", str(allowing), risky]) == 0


def test_a_bad_policy_file_is_an_error_not_a_crash(tmp_path, capsys):
    bad = tmp_path / "values.yaml"
    bad.write_text("operator: {policy: {allowedImages: 3}}\n")
    assert cli_main(["validate", "--policy", str(bad), str(EXAMPLE)]) == 1
    assert "operator.policy.allowedImages must be a list of strings" in capsys.readouterr().out
