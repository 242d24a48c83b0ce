"""The rollout of a new Adapter version, decided without I/O: policy + evaluation + live figures + time -> the
next status.rollout, status.history, Events and when to look again (api.rollout has the policy and the states).

The Adapter controller gathers the facts (the stable version from the last status, whether every replica has
loaded the candidate, the routers' metrics over the analysis window) and applies the decision; the traffic share
the serving table gives the candidate is `candidate_weight(status.rollout)`.

Live figures are Prometheus counters and cumulative histograms read from each router pod; `Counts.minus` turns
two readings into a window, the way PromQL's `increase()` does (a counter that went down means the router
restarted: its reading is the window), and `quantile` estimates a percentile from histogram buckets with
PromQL's `histogram_quantile` linear interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from loraplane.api.evaluation import EvaluationResult, higher_is_better
from loraplane.api.reasons import Reason, reason_or_unknown
from loraplane.api.rollout import (
    AnalysisResult,
    AnalysisVerdict,
    EvaluationSummary,
    GateResult,
    HistoryEntry,
    Measured,
    RolloutAnalysis,
    RolloutGates,
    RolloutPolicy,
    RolloutState,
    RolloutStatus,
    duration_seconds,
)

# States in which the candidate is in the serving table (loaded beside the stable version).
CANDIDATE_SERVED = frozenset({RolloutState.Loading, RolloutState.Progressing, RolloutState.Paused})
# States whose traffic split is analysed live.
ANALYSED = frozenset({RolloutState.Progressing, RolloutState.Paused})
# The reason each state has when status carries none we know (written by hand or by a newer operator).
STATE_REASONS = {RolloutState.Stable: Reason.RolloutPromoted, RolloutState.Promoted: Reason.RolloutPromoted,
                 RolloutState.Loading: Reason.RolloutLoading, RolloutState.Progressing: Reason.RolloutProgressing,
                 RolloutState.Paused: Reason.RolloutPaused, RolloutState.GateFailed: Reason.RolloutGateFailed,
                 RolloutState.RolledBack: Reason.RolloutRolledBack, RolloutState.Aborted: Reason.RolloutAborted}
# A step without `pause` and without analysis lasts this long (seconds).
DEFAULT_PAUSE_SECONDS = 60.0
QUANTILE = 0.95


# --- live figures ---------------------------------------------------------------------------------------------

Buckets = tuple[tuple[float, float], ...]   # (upper bound `le`, cumulative count), ascending, +Inf last


@dataclass(frozen=True)
class Counts:
    """One served name's figures from one router (or summed over routers): requests answered, those answered
    with a 5xx status, and the cumulative duration and time-to-first-token histograms (seconds)."""

    requests: float = 0
    errors: float = 0
    latency: Buckets = ()
    ttft: Buckets = ()

    def plus(self, other: "Counts") -> "Counts":
        """The sum of two readings (two routers); histograms with other bounds than this one's are summed by
        bound (a bound only one side has counts from that side alone)."""
        return Counts(self.requests + other.requests, self.errors + other.errors,
                      _merge(self.latency, other.latency, 1), _merge(self.ttft, other.ttft, 1))

    def minus(self, earlier: "Counts | None") -> "Counts":
        """This reading less an `earlier` one of the same router: the window between them. When any counter went
        down (the router restarted) this reading is the window, as PromQL's increase() takes it."""
        if earlier is None or self.requests < earlier.requests or self.errors < earlier.errors:
            return self
        latency = _merge(self.latency, earlier.latency, -1)
        ttft = _merge(self.ttft, earlier.ttft, -1)
        if any(n < 0 for _, n in latency + ttft):
            return self
        return Counts(self.requests - earlier.requests, self.errors - earlier.errors, latency, ttft)


def _merge(a: Buckets, b: Buckets, sign: int) -> Buckets:
    if not b:
        return a
    if not a:
        return b if sign > 0 else tuple((le, -n) for le, n in b)
    by_le: dict[float, float] = dict(a)
    for le, n in b:
        by_le[le] = by_le.get(le, 0) + sign * n
    return tuple(sorted(by_le.items()))


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile (0..1) of a cumulative histogram, as PromQL's histogram_quantile estimates it: linear
    within the bucket the rank falls in (from 0 for the first bucket); the highest finite bound when it falls in
    the +Inf bucket. None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if le == float("inf"):
                return lower
            if cum == below:
                return le
            return lower + (le - lower) * (rank - below) / (cum - below)
        lower, below = le, cum
    return lower


def measured(counts: Counts) -> Measured:
    """The figures status shows for a window: requests, 5xx answers, error rate, p95 latency and p95 TTFT."""
    requests = int(counts.requests)
    return Measured(requests=requests, errors=int(counts.errors),
                    error_rate=round(counts.errors / requests, 6) if requests else None,
                    p95_latency_seconds=_round(quantile(QUANTILE, counts.latency)),
                    p95_time_to_first_token_seconds=_round(quantile(QUANTILE, counts.ttft)))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


@dataclass(frozen=True)
class Window:
    """The figures of one analysis window: the candidate's and the stable version's, and how long it was."""

    candidate: Counts
    stable: Counts | None
    seconds: float


# --- evaluation gates -----------------------------------------------------------------------------------------

def evaluate_gates(gates: RolloutGates | None, evaluation: EvaluationResult | None,
                   stable: str | None) -> list[GateResult]:
    """Each gate set in `gates` judged on `evaluation` (api.evaluation; the primary metric in the direction it
    improves), in the order minScore, mustBeatBase, mustNotRegressBy. `stable`: the version being replaced (None
    for an Adapter's first version: mustNotRegressBy then passes, there is nothing to regress from). A missing
    evaluation or score fails (gate `evaluation`, or the gate that needs it): a gate never passes on no data."""
    if gates is None or (gates.min_score is None and not gates.must_beat_base and gates.must_not_regress_by is None):
        return []
    if evaluation is None:
        return [GateResult(gate="evaluation", passed=False, message=(
            "spec.rollout.gates are set but this version has no evaluation (status.provenance.evaluation): "
            "train it with a FineTuneJob that has spec.evaluation, or promote it by hand (spec.rollout.promote)"))]
    metric = evaluation.primary_metric
    hib = higher_is_better(metric)
    word = "higher" if hib else "lower"
    cand = evaluation.candidate.metrics.get(metric)
    if cand is None:
        return [GateResult(gate="evaluation", passed=False, metric=metric, message=(
            f"the evaluation has no {metric} score for this version"))]

    def better(a: float, b: float) -> bool:
        return a > b if hib else a < b

    out: list[GateResult] = []
    if gates.min_score is not None:
        ok = cand >= gates.min_score if hib else cand <= gates.min_score
        out.append(GateResult(gate="minScore", passed=ok, metric=metric, candidate=cand, reference=gates.min_score,
                              message=f"{metric} {cand:g} {'meets' if ok else 'misses'} minScore {gates.min_score:g} "
                                      f"({word} is better)"))
    if gates.must_beat_base:
        base = evaluation.base.metrics.get(metric) if evaluation.base else None
        if base is None:
            out.append(GateResult(gate="mustBeatBase", passed=False, metric=metric, candidate=cand,
                                  message=f"the evaluation has no {metric} score for the base model"))
        else:
            ok = better(cand, base)
            out.append(GateResult(gate="mustBeatBase", passed=ok, metric=metric, candidate=cand, reference=base,
                                  message=f"{metric} {cand:g} {'beats' if ok else 'does not beat'} the base model's "
                                          f"{base:g} ({word} is better)"))
    if gates.must_not_regress_by is not None:
        limit = gates.must_not_regress_by
        prev = evaluation.previous.metrics.get(metric) if evaluation.previous else None
        if stable is None:
            out.append(GateResult(gate="mustNotRegressBy", passed=True, metric=metric, candidate=cand,
                                  message="first version of this Adapter: nothing to regress from"))
        elif evaluation.previous_version and evaluation.previous_version != stable:
            out.append(GateResult(gate="mustNotRegressBy", passed=False, metric=metric, candidate=cand, message=(
                f"the evaluation scored version {evaluation.previous_version} as the previous one, but the stable "
                f"version is {stable}")))
        elif prev is None:
            out.append(GateResult(gate="mustNotRegressBy", passed=False, metric=metric, candidate=cand,
                                  message=f"the evaluation has no {metric} score for the replaced version {stable}"))
        else:
            regression = (prev - cand) if hib else (cand - prev)
            ok = regression <= limit
            out.append(GateResult(gate="mustNotRegressBy", passed=ok, metric=metric, candidate=cand, reference=prev,
                                  message=f"{metric} {cand:g} vs {prev:g} for {stable}: "
                                          f"{'regresses' if regression > 0 else 'does not regress'} by "
                                          f"{max(regression, 0):g} ({'within' if ok else 'over'} "
                                          f"mustNotRegressBy {limit:g})"))
    return out


def evaluation_summary(evaluation: EvaluationResult | None) -> EvaluationSummary | None:
    """The primary metric of the candidate, the base and the previous version, for status.history."""
    if evaluation is None:
        return None
    m = evaluation.primary_metric
    return EvaluationSummary(metric=m, candidate=evaluation.candidate.metrics.get(m),
                             base=evaluation.base.metrics.get(m) if evaluation.base else None,
                             previous=evaluation.previous.metrics.get(m) if evaluation.previous else None)


# --- live analysis --------------------------------------------------------------------------------------------

def judge(analysis: RolloutAnalysis, window: Window, at: str) -> AnalysisResult:
    """One analysis of `window` against the thresholds, checked in the order maxErrorRate,
    maxP95LatencySeconds, maxP95LatencyRatio (when the stable version had minRequests too),
    maxP95TimeToFirstTokenSeconds (when the window has streaming requests). Fewer than minRequests candidate
    requests: Inconclusive."""
    cand = measured(window.candidate)
    stable = measured(window.stable) if window.stable is not None else None

    def result(verdict: AnalysisVerdict, check: str | None = None, message: str = "") -> AnalysisResult:
        return AnalysisResult(at=at, window_seconds=round(window.seconds, 3), candidate=cand, stable=stable,
                              verdict=verdict, failed_check=check, message=message)

    if cand.requests < analysis.min_requests:
        return result(AnalysisVerdict.Inconclusive, message=(
            f"{cand.requests} candidate requests in {window.seconds:.0f}s, fewer than minRequests "
            f"{analysis.min_requests}: the window grows until it has enough"))
    if analysis.max_error_rate is not None and (cand.error_rate or 0) > analysis.max_error_rate:
        return result(AnalysisVerdict.Failed, "maxErrorRate", (
            f"error rate {cand.error_rate:.4g} ({cand.errors} of {cand.requests} requests answered 5xx) is above "
            f"maxErrorRate {analysis.max_error_rate:g}"))
    p95 = cand.p95_latency_seconds
    if analysis.max_p95_latency_seconds is not None and p95 is not None and p95 > analysis.max_p95_latency_seconds:
        return result(AnalysisVerdict.Failed, "maxP95LatencySeconds", (
            f"p95 latency {p95:.4g}s is above maxP95LatencySeconds {analysis.max_p95_latency_seconds:g}"))
    if (analysis.max_p95_latency_ratio is not None and p95 is not None and stable is not None
            and stable.requests >= analysis.min_requests and stable.p95_latency_seconds):
        ratio = p95 / stable.p95_latency_seconds
        if ratio > analysis.max_p95_latency_ratio:
            return result(AnalysisVerdict.Failed, "maxP95LatencyRatio", (
                f"p95 latency {p95:.4g}s is {ratio:.3g}x the stable version's {stable.p95_latency_seconds:.4g}s, "
                f"above maxP95LatencyRatio {analysis.max_p95_latency_ratio:g}"))
    ttft = cand.p95_time_to_first_token_seconds
    limit = analysis.max_p95_time_to_first_token_seconds
    if limit is not None and ttft is not None and ttft > limit:
        return result(AnalysisVerdict.Failed, "maxP95TimeToFirstTokenSeconds", (
            f"p95 time to first token {ttft:.4g}s is above maxP95TimeToFirstTokenSeconds {limit:g}"))
    return result(AnalysisVerdict.Passed, message=(
        f"{cand.requests} requests, error rate {cand.error_rate:.4g}, p95 latency "
        f"{'-' if p95 is None else f'{p95:.4g}s'}: within the thresholds"))


# --- the decision ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """The version spec asks for: its label and artifact (what status.history keeps to serve it again)."""

    version: str
    uri: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class RolloutFacts:
    """Everything `decide` needs. `previous`: the last status.rollout (None before the first); `stable`: the
    version serving now when `previous` does not say (an Adapter from before rollouts: its status.version), None
    for an Adapter's first version; `candidate_ready`: every replica that will serve the candidate has it loaded;
    `window`: the live figures since the window began, given only when an analysis is due
    (`analysis_due`)."""

    policy: RolloutPolicy | None
    candidate: Candidate
    evaluation: EvaluationResult | None
    previous: RolloutStatus | None
    history: list[HistoryEntry]
    candidate_ready: bool
    now: datetime
    stable: str | None = None
    window: Window | None = None


@dataclass(frozen=True)
class RolloutEvent:
    """An Event the decision asks for (on state changes only): Warning for a gate failure, rollback or abort."""

    warning: bool
    reason: Reason
    message: str


@dataclass
class RolloutDecision:
    """The next status.rollout and status.history, the Events to post, when to reconcile again (seconds; None:
    when something changes), and whether the analysis window starts anew (a judged window, a new step)."""

    status: RolloutStatus
    history: list[HistoryEntry]
    events: list[RolloutEvent] = field(default_factory=list)
    requeue_seconds: float | None = None
    new_window: bool = False


def rfc3339(t: datetime) -> str:
    """`t` (timezone-aware) as RFC 3339 UTC with seconds, as Kubernetes writes times."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 time from status (ours), None when absent or unreadable (status is outside input)."""
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def candidate_weight(status: RolloutStatus | None) -> int:
    """The candidate's traffic share (percent) in the serving table: the step's weight while Progressing or
    Paused, 0 while Loading and after a gate failure, rollback or abort, 100 once promoted, and 100 when there is
    no stable version to share with (an Adapter's first version; no rollout status yet)."""
    if status is None or not status.stable:
        return 100
    return status.weight


def candidate_served(status: RolloutStatus | None) -> bool:
    """Whether the candidate (spec.version) is in the serving table: while it loads, progresses or waits, and
    once promoted. After a gate failure, rollback or abort only the stable version is."""
    return status is None or status.state in CANDIDATE_SERVED or status.state in (RolloutState.Promoted,
                                                                                RolloutState.Stable)


def served_version(status: RolloutStatus | None, spec_version: str | None) -> str | None:
    """The version that takes the traffic the candidate does not: status.rollout.stable, else spec.version."""
    if status is not None and status.stable:
        return status.stable
    return spec_version


def analysis_interval(policy: RolloutPolicy | None) -> float | None:
    """Seconds between two analyses; None without analysis."""
    if policy is None or policy.analysis is None:
        return None
    return duration_seconds(policy.analysis.interval)


def analysis_due(status: RolloutStatus | None, policy: RolloutPolicy | None, now: datetime) -> bool:
    """Whether the controller should read the routers' metrics and pass a Window: the traffic is split (Progressing
    or Paused), the policy has analysis, and an interval has passed since the last analysis (or the step began)."""
    interval = analysis_interval(policy)
    if interval is None or status is None or status.state not in ANALYSED:
        return False
    since = parse_time(status.last_analysis_at) or parse_time(status.step_started_at)
    return since is None or (now - since).total_seconds() >= interval


def _step_pause(policy: RolloutPolicy, index: int) -> float:
    step = policy.steps[index]
    if step.pause:
        return duration_seconds(step.pause)
    return analysis_interval(policy) or DEFAULT_PAUSE_SECONDS


def _find(history: list[HistoryEntry], version: str | None) -> HistoryEntry | None:
    return next((h for h in history if h.version == version), None)


def _record(history: list[HistoryEntry], entry: HistoryEntry, limit: int) -> list[HistoryEntry]:
    """`entry` first, replacing an older entry of its version; at most `limit` entries, newest first."""
    return ([entry] + [h for h in history if h.version != entry.version])[:limit]


def decide(facts: RolloutFacts) -> RolloutDecision:
    """The next rollout status of an Adapter (pure; see the module and api.rollout for the states).

    Order of precedence: `rollbackTo` (an earlier version), then a new candidate (gates), then `abort`, then
    `promote`, then the state's own progress (loading, steps with analysis, manual promotion)."""
    policy = facts.policy or RolloutPolicy()
    prev = facts.previous
    if prev is not None and reason_or_unknown(prev.reason) == Reason.UnknownReason:
        # status is outside input (anyone with status access can write it): an unknown reason reads as its state's.
        prev = prev.model_copy(update={"reason": STATE_REASONS[RolloutState(prev.state)]})
    cand = facts.candidate.version
    now_s = rfc3339(facts.now)
    limit = policy.history_limit
    history = list(facts.history)
    stable = (prev.stable if prev is not None else None) or facts.stable
    steps_n = len(policy.steps)
    evaluation = facts.evaluation

    def status(state: RolloutState, reason: Reason, message: str, **kw) -> RolloutStatus:
        base = dict(state=state, candidate=cand, stable=stable, steps=steps_n, reason=reason, message=message)
        base.update(kw)
        return RolloutStatus(**base)

    def entry(outcome: RolloutState, reason: Reason, message: str, version: str | None = None) -> HistoryEntry:
        old = _find(history, version or cand)
        mine = (version or cand) == cand
        return HistoryEntry(
            version=version or cand,
            uri=facts.candidate.uri if mine else (old.uri if old else None),
            sha256=facts.candidate.sha256 if mine else (old.sha256 if old else None),
            evaluation=evaluation_summary(evaluation) if mine else (old.evaluation if old else None),
            promoted_at=now_s if outcome == RolloutState.Promoted else (old.promoted_at if old else None),
            rolled_back_at=(now_s if outcome in (RolloutState.RolledBack, RolloutState.Aborted)
                            else (old.rolled_back_at if old else None)),
            outcome=outcome, reason=reason, message=message)

    def changed(new: RolloutStatus) -> bool:
        return prev is None or (prev.state, prev.candidate, prev.stable, prev.step, prev.reason) != (
            new.state, new.candidate, new.stable, new.step, new.reason)

    # --- rollbackTo: serve an earlier version -----------------------------------------------------------------
    if policy.rollback_to and policy.rollback_to != cand:
        target = policy.rollback_to
        known = _find(history, target)
        if known is None or not known.uri:
            held = (prev or RolloutStatus(state=RolloutState.Stable, candidate=cand, stable=stable)).model_copy(
                update={"reason": Reason.RolloutTargetUnknown, "message": (
                    f"spec.rollout.rollbackTo names {target}, which status.history does not hold with an artifact "
                    f"(known: {', '.join(h.version for h in history if h.uri) or 'none'}); nothing changed")})
            events = [RolloutEvent(True, Reason.RolloutTargetUnknown, held.message or "")] if changed(held) else []
            return RolloutDecision(held, history, events)
        stable = target
        message = (f"serving {target} (spec.rollout.rollbackTo); {cand} gets no traffic: remove rollbackTo to roll "
                   f"{cand} out again")
        new = status(RolloutState.RolledBack, Reason.RolloutManualRollback, message, weight=0)
        if not changed(new):
            return RolloutDecision(prev.model_copy(update={"steps": steps_n}), history)
        if prev is not None and prev.candidate == cand and prev.state in CANDIDATE_SERVED:
            history = _record(history, entry(RolloutState.RolledBack, Reason.RolloutManualRollback, message), limit)
        history = _record(history, entry(RolloutState.Promoted, Reason.RolloutManualRollback, message, target),
                          limit)
        return RolloutDecision(new, history, [RolloutEvent(False, Reason.RolloutManualRollback, message)])

    # rollbackTo removed after a manual rollback: the spec's version rolls out again from the gates.
    restarted = (prev is not None and prev.candidate == cand and prev.state == RolloutState.RolledBack
                 and prev.reason == Reason.RolloutManualRollback)

    # --- the spec's version is the stable one ---------------------------------------------------------------
    if cand == stable and not restarted:
        state = prev.state if prev is not None and prev.candidate == cand and prev.state == RolloutState.Promoted \
            else RolloutState.Stable
        reason = Reason.RolloutPromoted
        new = status(state, reason, f"{cand} is the stable version", weight=100,
                     gates=prev.gates if prev is not None and prev.candidate == cand else [],
                     last_analysis=prev.last_analysis if prev is not None and prev.candidate == cand else None)
        if _find(history, cand) is None and facts.candidate.uri:
            history = _record(history, entry(RolloutState.Promoted, Reason.RolloutPromoted,
                                             f"{cand} was serving when rollouts began"), limit)
        return RolloutDecision(new, history)

    events: list[RolloutEvent] = []
    fresh = prev is None or prev.candidate != cand or restarted
    if fresh and prev is not None and prev.candidate and prev.candidate != cand and prev.state in CANDIDATE_SERVED:
        message = f"{prev.candidate} was replaced by {cand} while rolling out"
        history = _record(history, entry(RolloutState.Aborted, Reason.RolloutSuperseded, message, prev.candidate),
                          limit)
        events.append(RolloutEvent(False, Reason.RolloutSuperseded, message))
    promote = policy.promote == cand
    gates = evaluate_gates(policy.gates, evaluation, stable)
    failed_gate = next((g for g in gates if not g.passed), None)
    state = None if fresh else prev.state

    def finish(new: RolloutStatus, *, warning: bool = False, requeue: float | None = None,
               new_window: bool = False, record: bool = False) -> RolloutDecision:
        hist = history
        if record:
            hist = _record(hist, entry(RolloutState(new.state), reason_or_unknown(new.reason), new.message or ""), limit)
        evs = list(events)
        if changed(new):
            evs.append(RolloutEvent(warning, reason_or_unknown(new.reason), new.message or ""))
        return RolloutDecision(new, hist, evs, requeue, new_window)

    def promoted(how: str) -> RolloutDecision:
        nonlocal stable
        old = stable
        stable = cand
        message = f"{cand} is the stable version ({how})" + (f"; {old} is unloaded once unused" if old else "")
        return finish(status(RolloutState.Promoted, Reason.RolloutPromoted, message, weight=100, gates=gates,
                             last_analysis=None if fresh else prev.last_analysis), record=True)

    # --- abort --------------------------------------------------------------------------------------------
    if policy.abort == cand and state in (*CANDIDATE_SERVED, None):
        message = f"spec.rollout.abort names {cand}: all traffic back to {stable}"
        return finish(status(RolloutState.Aborted, Reason.RolloutAborted, message, weight=0, gates=gates,
                             last_analysis=None if fresh else prev.last_analysis), warning=True, record=True)

    # --- gates (before the candidate is loaded) -------------------------------------------------------------
    if state in (None, RolloutState.GateFailed):
        if failed_gate is not None and not promote:
            message = "evaluation gate failed: " + "; ".join(g.message for g in gates if not g.passed)
            return finish(status(RolloutState.GateFailed, Reason.RolloutGateFailed, message, weight=0, gates=gates),
                          warning=True, record=state is None)
        state = RolloutState.Loading
    elif state in (RolloutState.RolledBack, RolloutState.Aborted):
        if not promote:
            return RolloutDecision(prev.model_copy(update={"steps": steps_n}), history, events)
        state = RolloutState.Loading

    # --- loading (make-before-break: no traffic before every replica has it) ------------------------------
    if state == RolloutState.Loading:
        if not facts.candidate_ready:
            return finish(status(RolloutState.Loading, Reason.RolloutLoading,
                                 f"loading {cand} beside {stable} on every replica; no traffic yet", weight=0,
                                 gates=gates))
        if stable is None:
            return promoted("first version: no steps")
        if promote:
            return promoted("spec.rollout.promote")
        if not policy.steps:
            return promoted("gates passed, no steps")
        return _enter_step(facts, policy, 0, status, gates, finish)

    # --- progressing / paused -------------------------------------------------------------------------------
    if promote:
        return promoted("spec.rollout.promote")
    assert prev is not None
    current = prev.model_copy(update={"steps": steps_n, "stable": stable})
    new_window = False
    if facts.window is not None and policy.analysis is not None:
        result = judge(policy.analysis, facts.window, now_s)
        update: dict = {"last_analysis": result, "last_analysis_at": now_s}
        if result.verdict == AnalysisVerdict.Passed:
            update["passed_analyses"] = current.passed_analyses + 1
            new_window = True
        elif result.verdict == AnalysisVerdict.Failed:
            update["failed_analyses"] = current.failed_analyses + 1
            new_window = True
        current = current.model_copy(update=update)
        if current.failed_analyses >= policy.analysis.failure_limit:
            message = (f"analysis failed at {current.weight}% (step {current.step}/{steps_n}): {result.message}; "
                       f"all traffic back to {stable}")
            return finish(current.model_copy(update={"state": RolloutState.RolledBack, "weight": 0,
                                                      "reason": Reason.RolloutRolledBack, "message": message}),
                          warning=True, record=True)
    if current.state == RolloutState.Paused:
        return finish(current, requeue=analysis_interval(policy), new_window=new_window)
    index = max((current.step or 1) - 1, 0)
    if index >= steps_n:   # the policy lost steps mid-rollout: what is left is to promote
        return promoted("steps passed")
    started = parse_time(current.step_started_at) or facts.now
    left = _step_pause(policy, index) - (facts.now - started).total_seconds()
    analysed = policy.analysis is None or current.passed_analyses >= 1
    if left > 0 or not analysed:
        interval = analysis_interval(policy)
        waits = [w for w in (left if left > 0 else None, interval) if w is not None]
        return finish(current, requeue=max(min(waits), 1.0) if waits else None, new_window=new_window)
    if index + 1 < steps_n:
        return _enter_step(facts, policy, index + 1, status, gates, finish, current)
    if policy.manual_promotion:
        message = (f"all {steps_n} steps passed at {current.weight}%; set spec.rollout.promote: {cand} to promote "
                   f"it, or spec.rollout.abort: {cand}")
        return finish(current.model_copy(update={"state": RolloutState.Paused, "reason": Reason.RolloutPaused,
                                                  "message": message}),
                      requeue=analysis_interval(policy), new_window=new_window)
    return promoted(f"{steps_n} steps passed")


def _enter_step(facts: RolloutFacts, policy: RolloutPolicy, index: int, status, gates, finish,
                current: RolloutStatus | None = None) -> RolloutDecision:
    """Status at the start of step `index` (0-based): its weight, a new window, the requeue at its pause."""
    step = policy.steps[index]
    now_s = rfc3339(facts.now)
    message = (f"{facts.candidate.version} gets {step.weight}% of the traffic (step {index + 1}/{len(policy.steps)})"
               + (f", analysed every {policy.analysis.interval}" if policy.analysis else ""))
    new = status(RolloutState.Progressing, Reason.RolloutProgressing, message, step=index + 1, weight=step.weight,
                 step_started_at=now_s, gates=gates, passed_analyses=0,
                 failed_analyses=current.failed_analyses if current else 0,
                 last_analysis=current.last_analysis if current else None,
                 last_analysis_at=now_s if policy.analysis else None)
    requeue = min(w for w in (_step_pause(policy, index), analysis_interval(policy)) if w is not None)
    decision = finish(new, requeue=max(requeue, 1.0), new_window=True)
    if index > 0:   # one Event per step: the step's own reason reads better than RolloutProgressing again
        decision.events = [e if e.reason != Reason.RolloutProgressing
                           else RolloutEvent(False, Reason.RolloutStepAdvanced, e.message) for e in decision.events]
    return decision


__all__ = ["Candidate", "Counts", "RolloutDecision", "RolloutEvent", "RolloutFacts", "Window", "analysis_due",
           "candidate_served", "candidate_weight", "decide", "evaluate_gates", "judge", "measured", "quantile",
           "served_version"]
