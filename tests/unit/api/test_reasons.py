"""Reasons are one enum (api/reasons.py), documented in docs/troubleshooting.md, and never spelled by hand."""

from __future__ import annotations

import ast
from pathlib import Path

from loraplane.api import reasons
from loraplane.api.adapter import AdapterPhase
from loraplane.api.finetunejob import FineTuneJobPhase
from loraplane.api.modelroute import ModelRoutePhase
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterState
from loraplane.api.wire.trainer import EXIT_CODES, FAILURES
from support.paths import ROOT

PKG = ROOT / "operator" / "loraplane"
# Every folder of the product that decides a state, a reason or a report.
AREAS = ("controllers", "builders", "trainer", "loader", "router", "storage", "kube", "local")
# Vocabulary of Kubernetes and S3 that the code reads from their objects and errors to categorise them, and that
# happens to coincide with one of our reasons (container reason "OOMKilled", scheduler reason "Unschedulable", S3
# error code "AccessDenied", Job condition reasons). Other foreign words that coincide (pod condition "Ready", Job
# condition "Failed") are named once as module constants (POD_READY, JOB_FAILED), which the scan allows.
FOREIGN = {"OOMKilled", "Unschedulable", "AccessDenied", "DeadlineExceeded", "BackoffLimitExceeded"}

def string_literals(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, leaving out docstrings, `__all__` and named module constants
    (`POD_READY = "Ready"`: a foreign term given a name once)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "").isupper() or getattr(t, "id", "") == "__all__"
                                                for t in node.targets):
            skip.update(id(c) for c in ast.walk(node.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_no_reason_or_adapter_state_is_spelled_as_a_string():
    words = {e.value for enum in (Reason, AdapterState, AdapterPhase, FineTuneJobPhase, ModelRoutePhase) for e in enum}
    bare = {f"{path.relative_to(PKG)}:{line}": value
            for area in AREAS for path in sorted((PKG / area).rglob("*.py"))
            for line, value in string_literals(path)
            if value in words and value not in FOREIGN}
    assert not bare, f"write Reason.X / AdapterState.X / <Kind>Phase.X instead of the string: {bare}"


def test_the_scan_sees_a_hand_spelled_reason(tmp_path):
    # Not vacuous: the scanner finds a reason written as a string, and ignores docstrings.
    module = tmp_path / "m.py"
    module.write_text('"""RankTooLarge in a docstring."""\nreason = "RankTooLarge"\nPOD_READY = "Ready"\n')
    assert string_literals(module) == [(2, "RankTooLarge")]


def test_every_reason_is_documented():
    for r in Reason:
        assert r.value[0].isupper() and " " not in r.value
        assert r.where and r.means and r.fix and r.__doc__ == r.means, r


def test_trainer_failure_reasons_are_reasons():
    assert set(EXIT_CODES) <= set(reasons.BY_NAME)
    assert set(FAILURES) <= set(reasons.BY_NAME)


def test_job_reasons_the_operator_maps_are_documented():
    # Kubernetes' own Job failure reasons are copied into status.failure.reason.
    assert {"DeadlineExceeded", "BackoffLimitExceeded", "OOMKilled", "ImagePull"} <= set(reasons.BY_NAME)


def test_troubleshooting_is_generated():
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert text == reasons.render_troubleshooting(), "run `loraplane crds`"
    for r in Reason:
        assert f"`{r.value}`" in text
