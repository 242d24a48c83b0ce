"""`loraplane validate --policy values.yaml`: the operator's spec policy (issue 12, item 6) checked before an apply,
from the same chart values the operator is installed with."""

from __future__ import annotations

import pytest
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


FTJ_EXAMPLE = ROOT / "docs" / "examples" / "finetunejob.yaml"
# Pod settings that loosen the restricted profile: refused whatever the policy says (docs/security.md), so
# without --policy/--values too (the default operator refuses them).
LOOSENING = [({"securityContext": {"runAsNonRoot": False}}, "securityContext.runAsNonRoot"),
             ({"securityContext": {"runAsUser": 0}}, "securityContext.runAsUser"),
             ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, "securityContext.seccompProfile.type"),
             ({"containerSecurityContext": {"privileged": True}}, "containerSecurityContext.privileged"),
             ({"containerSecurityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}},
              "containerSecurityContext.capabilities.add[0]"),
             ({"containerSecurityContext": {"readOnlyRootFilesystem": False}},
              "containerSecurityContext.readOnlyRootFilesystem")]


def _with_pod(tmp_path, where: str, pod: dict) -> str:
    """The FineTuneJob (spec.pod) or ModelRoute (spec.engine.pod / spec.router.pod) example with `pod` there."""
    doc = yaml.safe_load((FTJ_EXAMPLE if where == "spec.pod" else EXAMPLE).read_text())
    node = doc
    for part in where.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[where.split(".")[-1]] = pod
    path = tmp_path / "obj.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_validate_and_render_refuse_a_loosened_security_context_without_the_chart_values(tmp_path, capsys):
    """A new user's report: `validate`/`render` without --policy/--values printed `ok` / rendered a privileged
    pod for spec.pod / spec.engine.pod / spec.router.pod settings no policy allows."""
    for where in ("spec.pod", "spec.engine.pod", "spec.router.pod"):
        for pod, field in LOOSENING:
            path = _with_pod(tmp_path, where, pod)
            assert cli_main(["validate", path]) == 1, (where, pod)
            out = capsys.readouterr().out
            assert "PolicyViolation" in out and f"{where}.{field}" in out, out
            # The "how to allow" part reads naturally when nothing allows it.
            assert "refused whatever the operator's policy says (the restricted Pod Security profile" in out, out
            assert "setting: none" not in out
            assert cli_main(["render", "-f", path]) == 1, (where, pod)
            captured = capsys.readouterr()
            assert captured.out == "" and f"{where}.{field}" in captured.err
    # What a policy can allow is still only checked against the chart's values (the examples stay valid).
    assert cli_main(["validate", _route_with(tmp_path, image="evil.example/vllm:1")]) == 0
    assert cli_main(["validate", str(EXAMPLE), str(FTJ_EXAMPLE)]) == 0


def test_the_policy_message_does_not_send_the_user_to_the_platform_team_for_what_nobody_can_allow():
    from loraplane.api import parse
    from loraplane.builders.policy import policy_message, unconditional_violations

    doc = yaml.safe_load(FTJ_EXAMPLE.read_text())
    doc["spec"]["pod"] = {"containerSecurityContext": {"privileged": True}}
    message = policy_message(unconditional_violations(parse(doc)))
    assert message.endswith("Nothing was created or changed: change the spec"), message
    assert "platform team" not in message and "setting:" not in message


@pytest.mark.parametrize("values, expected", [
    ("operator: {policy: {allowedImage: [x]}}\n", "operator.policy.allowedImage: unknown key: did you mean "
                                                  "'allowedImages'?"),
    ("operator: [1]\n", "operator must be a mapping"),
])
def test_a_policy_key_the_chart_does_not_have_is_an_error_not_ignored(values, expected, tmp_path, capsys):
    """A misspelt policy key was ignored and the examples checked against the default policy: `ok` for what the
    intended one refuses. The chart's values schema refuses such a key at install; validate does too."""
    bad = tmp_path / "values.yaml"
    bad.write_text(values)
    assert cli_main(["validate", "--policy", str(bad), str(EXAMPLE)]) == 1
    assert expected in capsys.readouterr().out


def test_the_policy_keys_are_the_charts():
    import json

    schema = json.loads((ROOT / "charts" / "loraplane" / "values.schema.json").read_text())
    from loraplane.cli.validate import POLICY_KEYS

    assert set(POLICY_KEYS) == set(schema["properties"]["operator"]["properties"]["policy"]["properties"])
