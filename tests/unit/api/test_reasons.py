"""Reasons are one enum (api/reasons.py), documented in docs/troubleshooting.md, and never spelled by hand."""

from __future__ import annotations

import ast
from pathlib import Path

from loraplane.api.adapter import AdapterPhase
from loraplane.api.finetunejob import FineTuneJobPhase
from loraplane.api.modelroute import ModelRoutePhase
from loraplane.api.rollout import AnalysisVerdict, RolloutState
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import AdapterState
from loraplane.api.wire.trainer import EXIT_CODES, FAILURES
from loraplane.codegen import troubleshooting
from support.paths import ROOT

PKG = ROOT / "operator" / "loraplane"
# Every folder of the product that decides a state, a reason or a report.
AREAS = ("api", "controllers", "builders", "trainer", "loader", "router", "storage", "kube", "local")
# Vocabulary of Kubernetes and S3 that the code reads from their objects and errors to categorise them, and that
# happens to coincide with one of our reasons (container reason "OOMKilled", scheduler reason "Unschedulable", S3
# error code "AccessDenied", Job condition reasons). Other foreign words that coincide (pod condition "Ready", Job
# condition "Failed") are named once as module constants (POD_READY, JOB_FAILED), which the scan allows.
REASON_NAMES = {r.value for r in Reason}
FOREIGN = {"OOMKilled", "Unschedulable", "AccessDenied", "DeadlineExceeded", "BackoffLimitExceeded"}

def string_literals(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, leaving out docstrings, `__all__`, a constant naming one foreign word
    (`POD_READY = "Ready"`), CRD printer-column headers, and the members of enums (where each word is spelled,
    once)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.ClassDef) and any(getattr(b, "id", getattr(b, "attr", "")).endswith("Enum")
                                                  for b in node.bases):
            skip.update(id(c) for stmt in node.body if isinstance(stmt, ast.Assign) for c in ast.walk(stmt.value))
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        names = {getattr(t, "id", "") for t in targets}
        value = getattr(node, "value", None)
        # A foreign word named once (`POD_READY = "Ready"`), `__all__`, and CRD printer-column headers ("Ready").
        if value is not None and (names & {"__all__", "PRINTER_COLUMNS"} or (
                any(n.isupper() for n in names) and isinstance(value, ast.Constant))):
            skip.update(id(c) for c in ast.walk(value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_no_reason_or_adapter_state_is_spelled_as_a_string():
    words = {e.value for enum in (Reason, AdapterState, AdapterPhase, FineTuneJobPhase, ModelRoutePhase,
                                                     RolloutState, AnalysisVerdict) for e in enum}
    bare = {f"{path.relative_to(PKG)}:{line}": value
            for area in AREAS for path in sorted((PKG / area).rglob("*.py"))
            for line, value in string_literals(path)
            if value in words and value not in FOREIGN}
    assert not bare, f"write Reason.X / AdapterState.X / <Kind>Phase.X instead of the string: {bare}"


def test_the_scan_sees_a_hand_spelled_reason(tmp_path):
    # Not vacuous: the scanner finds a reason written as a string, and ignores docstrings.
    module = tmp_path / "m.py"
    module.write_text('"""RankTooLarge in a docstring."""\nreason = "RankTooLarge"\nPOD_READY = "Ready"\n'
                      'STATES = ("Ready", "Failed")\n')
    assert sorted(string_literals(module)) == [(2, "RankTooLarge"), (4, "Failed"), (4, "Ready")]


def test_every_reason_is_documented():
    for r in Reason:
        assert r.value[0].isupper() and " " not in r.value
        assert r.where and r.means and r.fix and r.__doc__ == r.means, r


def test_trainer_failure_reasons_are_reasons():
    assert set(EXIT_CODES) <= REASON_NAMES
    assert set(FAILURES) <= REASON_NAMES


def test_job_reasons_the_operator_maps_are_documented():
    # Kubernetes' own Job failure reasons are copied into status.failure.reason.
    assert {"DeadlineExceeded", "BackoffLimitExceeded", "OOMKilled", "ImagePull"} <= REASON_NAMES


def test_troubleshooting_is_generated():
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert text == troubleshooting.render(), "run `loraplane crds`"
    for r in Reason:
        assert f"`{r.value}`" in text


def test_every_reason_says_whether_it_stalls():
    """Issue 13 review (Stalled): each Reason names its Progress (a required argument of Reason.__new__, so a new
    reason cannot be declared without it), and every terminal refusal is Stalled, never 'Progressing' forever."""
    import inspect

    from loraplane.api.conditions import STALLED_REASONS, Progress, progress_of
    from loraplane.loader.reconciler import OUTCOMES
    from loraplane.storage import cache

    assert inspect.signature(Reason._new_member_).parameters["progress"].default is inspect.Parameter.empty
    assert all(isinstance(r.progress, Progress) for r in Reason)
    terminal = {Reason.UnsafeArtifact, Reason.ArtifactTooLarge, Reason.InsecureSource, Reason.PublicNameConflict,
                Reason.InvalidTargetModules, Reason.AdapterExists, Reason.ArtifactChanged}
    # The loader's non-retryable outcomes (its one outcome table: gate refusals, refused fetches, broken
    # adapters) and fetch errors that are never retried.
    terminal |= {r for r, outcome in OUTCOMES.items() if not outcome.retry}
    terminal |= {c.reason for c in vars(cache).values()
                 if isinstance(c, type) and issubclass(c, cache.FetchError) and not c.retryable}
    for r in terminal:
        assert progress_of(r) == Progress.Stalled and r in STALLED_REASONS, r
    for r in Reason:   # a reason whose fix asks for nothing is never Stalled
        if r.fix.startswith("Nothing"):
            assert r.progress != Progress.Stalled, r
