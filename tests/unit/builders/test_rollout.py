"""builders.rollout: the pure rollout decision (gates, steps, analysis, rollback, promote/abort, history)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from loraplane.api.evaluation import EvaluationResult, EvaluationScores
from loraplane.api.reasons import Reason
from loraplane.api.rollout import AnalysisVerdict, HistoryEntry, RolloutPolicy, RolloutState, duration_seconds
from loraplane.builders.rollout import (
    Candidate,
    Counts,
    RolloutFacts,
    Window,
    analysis_due,
    candidate_served,
    candidate_weight,
    decide,
    evaluate_gates,
    judge,
    quantile,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
LAT = (0.1, 0.25, 0.5, 1.0, 2.5, float("inf"))


def hist(*values: float, bounds=LAT) -> tuple:
    """Cumulative buckets of `values` over `bounds`."""
    return tuple((b, sum(1 for v in values if v <= b)) for b in bounds)


def counts(requests: int, errors: int = 0, latency: float = 0.2, ttft: float | None = None) -> Counts:
    return Counts(requests, errors, hist(*[latency] * requests),
                  hist(*[ttft] * requests) if ttft is not None else ())


def evaluation(cand: float, base: float | None = None, previous: float | None = None, metric: str = "rouge_l",
               previous_version: str | None = "v1") -> EvaluationResult:
    return EvaluationResult(
        primary_metric=metric, candidate=EvaluationScores(metrics={metric: cand}, examples=50),
        base=EvaluationScores(metrics={metric: base}, examples=50) if base is not None else None,
        previous=EvaluationScores(metrics={metric: previous}, examples=50) if previous is not None else None,
        previous_version=previous_version if previous is not None else None)


POLICY = {"gates": {"minScore": 0.5, "mustBeatBase": True, "mustNotRegressBy": 0.02},
          "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "2m"}],
          "analysis": {"interval": "30s", "minRequests": 10, "maxErrorRate": 0.05, "maxP95LatencySeconds": 2,
                       "maxP95LatencyRatio": 1.5}}
GOOD = evaluation(0.7, base=0.4, previous=0.65)


def policy(**overrides) -> RolloutPolicy:
    return RolloutPolicy.model_validate({**POLICY, **overrides})


def facts(prev=None, *, pol=None, ev=GOOD, ready=True, now=T0, window=None, history=(), version="v2",
          stable="v1") -> RolloutFacts:
    return RolloutFacts(policy=policy() if pol is None else pol,
                        candidate=Candidate(version, f"s3://b/sql/{version}", "a" * 64), evaluation=ev,
                        previous=prev, history=list(history), candidate_ready=ready, now=now, stable=stable,
                        window=window)


def run(prev=None, **kw):
    return decide(facts(prev, **kw))


# --- gates ----------------------------------------------------------------------------------------------------

def test_every_gate_passes_on_a_good_evaluation():
    results = evaluate_gates(policy().gates, GOOD, "v1")
    assert [(g.gate, g.passed) for g in results] == [("minScore", True), ("mustBeatBase", True),
                                                      ("mustNotRegressBy", True)]


@pytest.mark.parametrize("ev,gate,cand,ref", [
    (evaluation(0.45, base=0.4, previous=0.44), "minScore", 0.45, 0.5),
    (evaluation(0.55, base=0.6, previous=0.54), "mustBeatBase", 0.55, 0.6),
    (evaluation(0.6, base=0.4, previous=0.65), "mustNotRegressBy", 0.6, 0.65),
])
def test_each_gate_fails_with_its_numbers(ev, gate, cand, ref):
    failed = [g for g in evaluate_gates(policy().gates, ev, "v1") if not g.passed]
    assert [(g.gate, g.candidate, g.reference) for g in failed] == [(gate, cand, ref)]
    assert f"{cand:g}" in failed[0].message and f"{ref:g}" in failed[0].message


def test_lower_is_better_metrics_compare_the_other_way():
    gates = policy(gates={"minScore": 1.5, "mustBeatBase": True, "mustNotRegressBy": 0.1}).gates
    good = evaluation(1.2, base=1.9, previous=1.25, metric="eval_loss")
    assert all(g.passed for g in evaluate_gates(gates, good, "v1"))
    bad = evaluation(2.0, base=1.9, previous=1.5, metric="eval_loss")
    assert [g.gate for g in evaluate_gates(gates, bad, "v1") if not g.passed] == [
        "minScore", "mustBeatBase", "mustNotRegressBy"]


def test_missing_data_never_passes_a_gate():
    gates = policy().gates
    assert [(g.gate, g.passed) for g in evaluate_gates(gates, None, "v1")] == [("evaluation", False)]
    no_base = [g for g in evaluate_gates(gates, evaluation(0.7, previous=0.7), "v1") if not g.passed]
    assert [g.gate for g in no_base] == ["mustBeatBase"]
    no_prev = [g for g in evaluate_gates(gates, evaluation(0.7, base=0.1), "v1") if not g.passed]
    assert [g.gate for g in no_prev] == ["mustNotRegressBy"]
    wrong_prev = evaluation(0.7, base=0.1, previous=0.7, previous_version="v0")
    assert "stable version is v1" in [g for g in evaluate_gates(gates, wrong_prev, "v1") if not g.passed][0].message
    other_metric = EvaluationResult(primary_metric="exact_match", candidate=EvaluationScores(metrics={"rouge_l": 1}))
    assert evaluate_gates(gates, other_metric, "v1")[0].gate == "evaluation"


def test_first_version_has_nothing_to_regress_from_and_no_gates_means_none():
    assert all(g.passed for g in evaluate_gates(policy().gates, evaluation(0.7, base=0.1), None))
    assert evaluate_gates(None, None, "v1") == []
    assert evaluate_gates(RolloutPolicy.model_validate({"gates": {}}).gates, None, "v1") == []


def test_a_version_worse_than_the_base_is_not_promoted_and_status_names_gate_and_numbers():
    d = run(ev=evaluation(0.31, base=0.42, previous=0.5))
    s = d.status
    assert (s.state, s.reason, s.weight) == (RolloutState.GateFailed, Reason.RolloutGateFailed, 0)
    assert not candidate_served(s) and candidate_weight(s) == 0
    failed = [g for g in s.gates if not g.passed]
    assert {g.gate for g in failed} == {"minScore", "mustBeatBase", "mustNotRegressBy"}
    beat = next(g for g in failed if g.gate == "mustBeatBase")
    assert (beat.candidate, beat.reference) == (0.31, 0.42)
    assert "0.31" in s.message and "0.42" in s.message
    assert [(e.warning, e.reason) for e in d.events] == [(True, Reason.RolloutGateFailed)]
    assert (d.history[0].version, d.history[0].outcome, d.history[0].evaluation.base) == (
        "v2", RolloutState.GateFailed, 0.42)
    # Stays failed, with no new Event, until something changes.
    again = run(s, ev=evaluation(0.31, base=0.42, previous=0.5), history=d.history)
    assert again.status.state == RolloutState.GateFailed and again.events == []


def test_a_gate_failure_is_promoted_by_hand():
    failed = run(ev=evaluation(0.31, base=0.42, previous=0.5)).status
    d = run(failed, pol=policy(promote="v2"), ev=evaluation(0.31, base=0.42, previous=0.5), ready=False)
    assert d.status.state == RolloutState.Loading     # still loaded on every replica first
    d = run(d.status, pol=policy(promote="v2"), ev=evaluation(0.31, base=0.42, previous=0.5))
    assert (d.status.state, d.status.stable) == (RolloutState.Promoted, "v2")


# --- steps and analysis ---------------------------------------------------------------------------------------

def progressing():
    loading = run(ready=False).status
    assert (loading.state, loading.weight, candidate_served(loading)) == (RolloutState.Loading, 0, True)
    d = run(loading)
    assert (d.status.state, d.status.step, d.status.weight, d.new_window) == (RolloutState.Progressing, 1, 10, True)
    assert d.requeue_seconds == 30
    return d.status


def test_a_healthy_rollout_walks_the_steps_and_is_promoted():
    s = progressing()
    assert not analysis_due(s, policy(), T0 + timedelta(seconds=29))
    assert analysis_due(s, policy(), T0 + timedelta(seconds=30))
    good = Window(counts(40), counts(360), 30)
    # After 30s: one passed analysis, but the 1m pause is not over.
    d = run(s, now=T0 + timedelta(seconds=30), window=good)
    assert (d.status.step, d.status.passed_analyses, d.new_window) == (1, 1, True)
    assert d.status.last_analysis.verdict == AnalysisVerdict.Passed and d.events == []
    # After 60s: step 2 at 50 %.
    d = run(d.status, now=T0 + timedelta(seconds=60), window=good)
    assert (d.status.state, d.status.step, d.status.weight, d.status.passed_analyses) == (
        RolloutState.Progressing, 2, 50, 0)
    assert [e.reason for e in d.events] == [Reason.RolloutStepAdvanced]
    # Step 2 needs its own analysis and 2m.
    t = T0 + timedelta(seconds=60 + 120)
    held = run(d.status, now=t)
    assert held.status.step == 2 and held.requeue_seconds == 30
    d = run(d.status, now=t, window=good)
    assert (d.status.state, d.status.stable, d.status.weight) == (RolloutState.Promoted, "v2", 100)
    assert [(e.warning, e.reason) for e in d.events] == [(False, Reason.RolloutPromoted)]
    assert d.history[0].outcome == RolloutState.Promoted and d.history[0].promoted_at
    # Settled: Promoted stays, no more Events.
    d2 = run(d.status, now=t + timedelta(hours=1), history=d.history)
    assert d2.status.state == RolloutState.Promoted and d2.events == []


def test_errors_roll_back_at_the_first_failed_analysis_with_the_measured_values():
    s = progressing()
    bad = Window(counts(40, errors=12), counts(360), 30)
    d = run(s, now=T0 + timedelta(seconds=30), window=bad)
    st = d.status
    assert (st.state, st.weight, st.stable, st.reason) == (RolloutState.RolledBack, 0, "v1", Reason.RolloutRolledBack)
    assert not candidate_served(st)
    la = st.last_analysis
    assert (la.verdict, la.failed_check, la.candidate.requests, la.candidate.errors, la.candidate.error_rate) == (
        AnalysisVerdict.Failed, "maxErrorRate", 40, 12, 0.3)
    assert "0.3" in st.message and "maxErrorRate 0.05" in st.message
    assert [(e.warning, e.reason) for e in d.events] == [(True, Reason.RolloutRolledBack)]
    assert d.history[0].outcome == RolloutState.RolledBack and d.history[0].rolled_back_at
    # It stays rolled back (never retried by itself).
    again = run(st, now=T0 + timedelta(hours=1), history=d.history)
    assert again.status.state == RolloutState.RolledBack and again.events == []


@pytest.mark.parametrize("window,check", [
    (Window(counts(40, latency=3.0), counts(360), 30), "maxP95LatencySeconds"),
    (Window(counts(40, latency=0.9), counts(360, latency=0.2), 30), "maxP95LatencyRatio"),
])
def test_latency_thresholds_roll_back(window, check):
    d = run(progressing(), now=T0 + timedelta(seconds=30), window=window)
    assert (d.status.state, d.status.last_analysis.failed_check) == (RolloutState.RolledBack, check)


def test_ttft_threshold_and_failure_limit():
    pol = policy(analysis={**POLICY["analysis"], "maxP95TimeToFirstTokenSeconds": 0.5, "failureLimit": 2})
    loading = run(pol=pol, ready=False).status
    s = run(loading, pol=pol).status
    slow = Window(counts(40, ttft=2.0), counts(40, ttft=0.1), 30)
    d = run(s, pol=pol, now=T0 + timedelta(seconds=30), window=slow)
    assert (d.status.state, d.status.failed_analyses) == (RolloutState.Progressing, 1)
    assert d.status.last_analysis.failed_check == "maxP95TimeToFirstTokenSeconds"
    d = run(d.status, pol=pol, now=T0 + timedelta(seconds=60), window=slow)
    assert d.status.state == RolloutState.RolledBack


def test_too_few_requests_is_inconclusive_and_holds_the_step():
    s = progressing()
    d = run(s, now=T0 + timedelta(seconds=90), window=Window(counts(3, errors=3), counts(100), 90))
    assert (d.status.state, d.status.step, d.new_window) == (RolloutState.Progressing, 1, False)
    assert d.status.last_analysis.verdict == AnalysisVerdict.Inconclusive
    assert "fewer than minRequests 10" in d.status.last_analysis.message


def test_latency_ratio_needs_enough_stable_requests():
    # The stable version had 2 requests in the window: the ratio is not judged (no false rollback).
    r = judge(policy().analysis, Window(counts(40, latency=0.9), counts(2, latency=0.1), 30), "t")
    assert r.verdict == AnalysisVerdict.Passed


def test_manual_promotion_pauses_after_the_last_step():
    pol = policy(steps=[{"weight": 20, "pause": "30s"}], manualPromotion=True)
    s = run(run(pol=pol, ready=False).status, pol=pol).status
    good = Window(counts(40), counts(100), 30)
    d = run(s, pol=pol, now=T0 + timedelta(seconds=30), window=good)
    assert (d.status.state, d.status.weight, d.status.reason) == (RolloutState.Paused, 20, Reason.RolloutPaused)
    assert "spec.rollout.promote: v2" in d.status.message
    held = run(d.status, pol=pol, now=T0 + timedelta(hours=2))
    assert held.status.state == RolloutState.Paused and held.events == []
    done = run(d.status, pol=policy(steps=[{"weight": 20, "pause": "30s"}], manualPromotion=True, promote="v2"))
    assert (done.status.state, done.status.stable) == (RolloutState.Promoted, "v2")


# --- promote, abort, rollbackTo, history ----------------------------------------------------------------------

def test_promote_names_a_version_and_only_that_version():
    s = progressing()
    assert run(s, pol=policy(promote="v9")).status.state == RolloutState.Progressing
    d = run(s, pol=policy(promote="v2"))
    assert (d.status.state, d.status.weight) == (RolloutState.Promoted, 100)


def test_abort_sends_all_traffic_back_and_sticks():
    s = progressing()
    assert run(s, pol=policy(abort="v1")).status.state == RolloutState.Progressing
    d = run(s, pol=policy(abort="v2"))
    assert (d.status.state, d.status.weight, d.status.stable) == (RolloutState.Aborted, 0, "v1")
    assert [(e.warning, e.reason) for e in d.events] == [(True, Reason.RolloutAborted)]
    assert run(d.status).status.state == RolloutState.Aborted   # abort removed: still aborted


def test_rollback_to_a_named_earlier_version_is_one_field():
    history = [HistoryEntry(version="v2", uri="s3://b/sql/v2", outcome=RolloutState.Promoted),
               HistoryEntry(version="v1", uri="s3://b/sql/v1", outcome=RolloutState.Promoted)]
    stable_v3 = run(None, version="v3", stable="v3", history=history).status
    assert stable_v3.state == RolloutState.Stable
    d = run(stable_v3, version="v3", pol=policy(rollbackTo="v1"), history=history)
    assert (d.status.state, d.status.stable, d.status.reason, candidate_weight(d.status)) == (
        RolloutState.RolledBack, "v1", Reason.RolloutManualRollback, 0)
    assert d.history[0].version == "v1" and d.history[0].promoted_at
    assert [e.reason for e in d.events] == [Reason.RolloutManualRollback]
    # Removing rollbackTo rolls v3 out again, against v1, from the gates.
    again = run(d.status, version="v3", ev=evaluation(0.7, base=0.4, previous=0.69), history=d.history,
                ready=False)
    assert (again.status.state, again.status.stable, again.status.candidate) == (RolloutState.Loading, "v1", "v3")


def test_rollback_to_an_unknown_version_changes_nothing_and_says_so():
    s = progressing()
    d = run(s, pol=policy(rollbackTo="v0"))
    assert (d.status.state, d.status.weight, d.status.reason) == (RolloutState.Progressing, 10,
                                                                  Reason.RolloutTargetUnknown)
    assert "v0" in d.status.message and d.events[0].warning


def test_a_newer_version_supersedes_one_in_progress():
    s = progressing()
    d = run(s, version="v3", ev=evaluation(0.8, base=0.4, previous=0.65), ready=False)
    assert (d.status.state, d.status.candidate, d.status.stable) == (RolloutState.Loading, "v3", "v1")
    assert d.history[0].version == "v2" and d.history[0].reason == Reason.RolloutSuperseded


def test_first_version_skips_the_steps_and_history_is_bounded():
    d = run(None, stable=None, ev=evaluation(0.7, base=0.4))
    assert (d.status.state, d.status.stable, candidate_weight(d.status)) == (RolloutState.Promoted, "v2", 100)
    assert candidate_weight(run(None, stable=None, ready=False).status) == 100  # nothing to share with
    history = [HistoryEntry(version=f"v{i}", uri="u", outcome=RolloutState.Promoted) for i in range(30, 10, -1)]
    d = run(None, pol=policy(historyLimit=3, gates=None, steps=[]), history=history)
    assert [h.version for h in d.history] == ["v2", "v30", "v29"]


def test_no_policy_promotes_once_loaded():
    loading = run(None, pol=RolloutPolicy(), ev=None, ready=False)
    assert loading.status.state == RolloutState.Loading and candidate_weight(loading.status) == 0
    assert run(loading.status, pol=RolloutPolicy(), ev=None).status.state == RolloutState.Promoted


# --- figures ----------------------------------------------------------------------------------------------------

def test_quantile_interpolates_like_histogram_quantile():
    assert quantile(0.95, ()) is None
    assert quantile(0.5, ((1.0, 0), (2.0, 10), (float("inf"), 10))) == pytest.approx(1.5)
    assert quantile(0.95, ((1.0, 10), (float("inf"), 20))) == 1.0   # in +Inf: the highest finite bound


def test_window_is_the_difference_and_a_restart_is_its_own_window():
    before, after = counts(10, errors=1), counts(30, errors=5, latency=0.2)
    w = after.minus(before)
    assert (w.requests, w.errors) == (20, 4)
    assert dict(w.latency)[0.25] == 20
    restarted = counts(5).minus(counts(100))
    assert restarted.requests == 5
    assert counts(3).plus(counts(4)).requests == 7


def test_durations():
    assert [duration_seconds(d) for d in ("30s", "2m", "1h")] == [30, 120, 3600]
    with pytest.raises(ValueError, match="whole number"):
        duration_seconds("1.5m")


def test_the_operator_can_read_every_router_pods_metrics_port():
    """The live analysis reads each router pod's /metrics on the router port (controllers.rollout_metrics): no
    NetworkPolicy the operator renders for a route may select the router pods without allowing that port from
    anywhere (the operator's pods carry none of the route's labels)."""
    from loraplane.api.paths import ROUTER_PORT
    from loraplane.builders import modelroute
    from loraplane.builders.resolution import resolve
    from loraplane.builders.settings import BuildSettings
    from test_builders import example, load_examples, with_uid

    route = with_uid(example("ModelRoute"))
    table = resolve(route, [a for a in load_examples() if a.kind == "Adapter"]).table
    kids = modelroute.children(route, table, BuildSettings(network_policies=True))
    policies = [c for c in kids if c["kind"] == "NetworkPolicy"]
    assert policies, "the route renders its engine NetworkPolicy"
    router_labels = modelroute.router_selector(route)
    for policy in policies:
        match = policy["spec"]["podSelector"].get("matchLabels") or {}
        if not all(router_labels.get(k) == v for k, v in match.items()):
            continue   # does not select the router pods
        open_ports = [p for rule in policy["spec"].get("ingress") or [] if not rule.get("from")
                      for p in rule.get("ports") or []]
        assert any(p.get("port") == ROUTER_PORT for p in open_ports), policy


def test_a_status_written_by_hand_never_wedges_the_decision():
    s = progressing().model_copy(update={"reason": "NotAReason"})
    s = s.model_copy(update={"step_started_at": "yesterday"})
    d = run(s, now=T0 + timedelta(seconds=30), window=Window(counts(40, errors=40), counts(100), 30))
    assert (d.status.state, d.status.reason) == (RolloutState.RolledBack, Reason.RolloutRolledBack)
    held = run(s.model_copy(update={"state": RolloutState.RolledBack}))
    assert held.status.reason == Reason.RolloutRolledBack
