"""The rollout policy of an Adapter (spec.rollout) and what the operator records about it (status.rollout,
status.history): how a new version goes live.

A new spec.version (the *candidate*) replaces the version the Adapter serves now (the *stable* one) in stages,
the shape Argo Rollouts and Flagger use for services:

1. **gates** on the version's evaluation (api.evaluation, in status.provenance.evaluation): `minScore`,
   `mustBeatBase`, `mustNotRegressBy`. A version that fails one is never loaded (state GateFailed);
2. the candidate is loaded beside the stable version on every replica (make-before-break; state Loading);
3. **steps**: the candidate gets `weight` % of the traffic of every public model the Adapter backs, for at
   least `pause`; during each step the **analysis** reads the routers' live metrics every `interval` and compares
   the candidate's error rate and p95 latency (absolute, and relative to the stable version) with thresholds.
   A failed analysis rolls back automatically (state RolledBack, a Warning Event, status.rollout.lastAnalysis
   with the measured values);
4. after the last step the candidate is promoted (state Promoted: it is the stable version), or waits for
   `promote` when `manualPromotion` is set (state Paused).

`promote`, `abort` and `rollbackTo` are spec fields naming a version, not imperative calls, so a GitOps
repository holds them; naming the version keeps a value left in the repository from acting on a later version.
The pure decision is builders.rollout.decide; the Adapter controller measures and applies it.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from loraplane.api.common import ApiModel, CelRule

# An Adapter version label (spec.version's pattern).
VERSION_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
# A duration as Argo Rollouts and Flagger write one: a whole number of seconds, minutes or hours.
DURATION_PATTERN = r"^[0-9]{1,6}(s|m|h)$"
_DURATION_RE = re.compile(DURATION_PATTERN)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
# How many versions status.history keeps by default, and at most.
DEFAULT_HISTORY_LIMIT = 5
MAX_HISTORY_LIMIT = 20


def duration_seconds(value: str) -> float:
    """Seconds in a DURATION_PATTERN string (`30s`, `5m`, `1h`). Raises ValueError naming the value otherwise
    (the API refuses such values before they get here)."""
    match = _DURATION_RE.match(value or "")
    if match is None:
        raise ValueError(f"duration {value!r} must be a whole number followed by s, m or h (e.g. 30s, 5m)")
    return float(int(value[:-1]) * _UNIT_SECONDS[value[-1]])


def _duration(default: str | None, description: str):
    return Field(default=default, pattern=DURATION_PATTERN, max_length=8, description=description)


def _version(description: str):
    return Field(default=None, max_length=63, pattern=VERSION_PATTERN, description=description)


class RolloutGates(ApiModel):
    """Gates on the candidate's evaluation (status.provenance.evaluation, api.evaluation). Each compares the
    evaluation's primary metric, in the direction it improves (higher for scores, lower for eval_loss and
    perplexity). Any gate set and no evaluation for the version: the gate fails (promote it by hand with
    spec.rollout.promote)."""

    min_score: float | None = Field(default=None, description="The candidate's primary metric must be at least this "
                                    "(at most, for eval_loss / perplexity).")
    must_beat_base: bool = Field(default=False, description="The candidate must score better than the base model "
                                 "alone on the same evaluation.")
    must_not_regress_by: float | None = Field(
        default=None, ge=0, description="The candidate may score worse than the version it replaces (the "
        "evaluation's `previous` scores) by at most this much, in the metric's own units (0: no worse at all). "
        "Skipped for an Adapter's first version.")


class RolloutStep(ApiModel):
    """One traffic step: the candidate's share of each public model the Adapter backs, held for `pause`."""

    weight: int = Field(ge=1, le=100, description="Percent of the traffic that goes to the candidate version.")
    pause: str | None = _duration(None, "How long the step lasts at least (e.g. 2m); default one analysis "
                                        "interval. With analysis, the step also needs one analysis that passed.")


class RolloutAnalysis(ApiModel):
    """Live analysis during the steps: every `interval`, the routers' metrics of the candidate (and of the stable
    version) over the interval are compared with the thresholds set here. An interval in which the candidate
    answered fewer than `minRequests` requests is inconclusive: the window grows until it has enough."""

    cel_rules: ClassVar = (
        CelRule(rule="has(self.maxErrorRate) || has(self.maxP95LatencySeconds) || has(self.maxP95LatencyRatio) "
                     "|| has(self.maxP95TimeToFirstTokenSeconds)",
                check=lambda obj: any(obj.get(k) is not None for k in (
                    "maxErrorRate", "maxP95LatencySeconds", "maxP95LatencyRatio", "maxP95TimeToFirstTokenSeconds")),
                message="spec.rollout.analysis needs at least one threshold: maxErrorRate, maxP95LatencySeconds, "
                        "maxP95LatencyRatio or maxP95TimeToFirstTokenSeconds"),
    )

    interval: str = _duration("1m", "How often the metrics are read and judged (e.g. 30s).")
    min_requests: int = Field(default=20, ge=1, le=1_000_000,
                              description="Fewest candidate requests in a window for it to be judged.")
    max_error_rate: float | None = Field(default=None, ge=0, le=1, description="Highest share of the candidate's "
                                         "requests answered with a 5xx status (0.01 = 1 %).")
    max_p95_latency_seconds: float | None = Field(default=None, gt=0, description="Highest p95 of the candidate's "
                                                  "request duration (seconds, to the last byte).")
    max_p95_latency_ratio: float | None = Field(
        default=None, ge=1, description="Highest candidate p95 / stable p95 of request duration (1.5: at most 50 % "
        "slower). Checked when the stable version also had minRequests requests in the window.")
    max_p95_time_to_first_token_seconds: float | None = Field(
        default=None, gt=0, description="Highest p95 time to first token of the candidate's streaming requests "
        "(seconds); checked when the window has streaming requests.")
    failure_limit: int = Field(default=1, ge=1, le=100,
                               description="Failed analyses in one rollout before it is rolled back.")


class RolloutDefaults(ApiModel):
    """A ModelRoute's default rollout policy for the Adapters it serves (spec.adapterRollout): the policy without
    the fields that name an Adapter's versions (promote, abort, rollbackTo). An Adapter's own spec.rollout
    overrides it field by field."""

    gates: RolloutGates | None = None
    steps: list[RolloutStep] = Field(default_factory=list, max_length=20, description=(
        "Traffic steps, e.g. 10, 50, 100. Empty: straight to 100 % once the gates pass and the version is loaded. "
        "An Adapter's first version skips the steps (there is nothing to split with)."))
    analysis: RolloutAnalysis | None = None
    manual_promotion: bool = Field(default=False, description="After the last step, wait (state Paused) until "
                                   "`promote` names the version.")
    history_limit: int = Field(default=DEFAULT_HISTORY_LIMIT, ge=1, le=MAX_HISTORY_LIMIT,
                               description="How many versions status.history keeps.")


class RolloutPolicy(RolloutDefaults):
    """How a new version of this Adapter goes live (spec.rollout): the route's defaults' fields plus the ones that
    name this Adapter's versions. Without it a new version takes all the traffic as soon as every replica has
    loaded it."""

    promote: str | None = _version("Promote this version now: skips the remaining gates, steps and analysis "
                                   "(it is still loaded on every replica first). Ignored for other versions.")
    abort: str | None = _version("Abort the rollout of this version: all traffic back to the stable version. "
                                 "Ignored for other versions.")
    rollback_to: str | None = _version("Serve this earlier version (from status.history) instead of spec.version; "
                                       "remove it to roll spec.version out again.")


class RolloutState(StrEnum):
    """status.rollout.state."""

    Stable = "Stable"
    """spec.version is the stable version; nothing is rolling out."""
    Loading = "Loading"
    """The candidate passed its gates and is being loaded beside the stable version; it gets no traffic yet."""
    Progressing = "Progressing"
    """The candidate gets `weight` % of the traffic (step `step`), analysed live."""
    Paused = "Paused"
    """The steps passed; waiting for spec.rollout.promote to name the version (manualPromotion)."""
    Promoted = "Promoted"
    """The candidate became the stable version."""
    GateFailed = "GateFailed"
    """An evaluation gate failed: the candidate is never loaded; the stable version keeps all the traffic."""
    RolledBack = "RolledBack"
    """The live analysis failed, or spec.rollout.rollbackTo names an earlier version: traffic went back."""
    Aborted = "Aborted"
    """spec.rollout.abort names the candidate: all traffic back to the stable version."""


class AnalysisVerdict(StrEnum):
    """status.rollout.lastAnalysis.verdict."""

    Passed = "Passed"
    Failed = "Failed"
    Inconclusive = "Inconclusive"
    """Fewer than minRequests candidate requests in the window: not judged yet, the window grows."""


class Measured(ApiModel):
    """One version's figures over an analysis window, summed over the routers (seconds for latencies)."""

    requests: int = Field(default=0, ge=0, description="Requests answered (any status).")
    errors: int = Field(default=0, ge=0, description="Requests answered with a 5xx status.")
    error_rate: float | None = Field(default=None, description="errors / requests.")
    p95_latency_seconds: float | None = None
    p95_time_to_first_token_seconds: float | None = None


class AnalysisResult(ApiModel):
    """The last analysis: when, over how long, the figures, and the check that failed (if one did)."""

    at: str = Field(json_schema_extra={"format": "date-time"})
    window_seconds: float = Field(ge=0)
    candidate: Measured
    stable: Measured | None = None
    verdict: AnalysisVerdict
    failed_check: str | None = Field(default=None, description="The threshold that failed, e.g. maxErrorRate.")
    message: str = ""


class GateResult(ApiModel):
    """One evaluation gate's outcome with the numbers it compared."""

    gate: str = Field(description="minScore, mustBeatBase, mustNotRegressBy or evaluation.")
    passed: bool
    metric: str | None = None
    candidate: float | None = None
    reference: float | None = Field(default=None, description="The threshold, the base's or the previous score.")
    message: str = ""


class RolloutStatus(ApiModel):
    """Where the rollout of spec.version stands (status.rollout)."""

    state: RolloutState
    candidate: str | None = Field(default=None, description="The version being rolled out (spec.version).")
    stable: str | None = Field(default=None, description="The version that serves the rest of the traffic.")
    step: int | None = Field(default=None, ge=0, description="The current step, 1-based (0 before the first).")
    steps: int | None = Field(default=None, ge=0, description="How many steps the policy has.")
    weight: int = Field(default=0, ge=0, le=100, description="The candidate's share of the traffic (percent).")
    reason: str | None = Field(default=None, description="Why it is in this state (a Reason).")
    message: str | None = None
    step_started_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    last_analysis_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    passed_analyses: int = Field(default=0, ge=0, description="Analyses passed in the current step.")
    failed_analyses: int = Field(default=0, ge=0, description="Analyses failed in this rollout.")
    last_analysis: AnalysisResult | None = None
    gates: list[GateResult] = Field(default_factory=list, description="The evaluation gates' results.")


class EvaluationSummary(ApiModel):
    """A version's primary evaluation metric, and the base model's and the previous version's on the same data."""

    metric: str
    candidate: float | None = None
    base: float | None = None
    previous: float | None = None


class HistoryEntry(ApiModel):
    """One version the Adapter rolled out: what it was (so a rollback can serve it again), its evaluation, and
    when it was promoted or rolled back and why."""

    version: str
    uri: str | None = Field(default=None, description="The artifact's URI.")
    sha256: str | None = Field(default=None, description="The artifact's digest when known.")
    evaluation: EvaluationSummary | None = None
    promoted_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    rolled_back_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    outcome: RolloutState = Field(description="The rollout state it ended in: Promoted, GateFailed, RolledBack or "
                                              "Aborted.")
    reason: str | None = Field(default=None, description="Why (a Reason).")
    message: str | None = None


def effective_policy(own: RolloutPolicy | None, defaults: RolloutDefaults | None) -> RolloutPolicy | None:
    """The policy an Adapter rolls out with: `defaults` (its route's spec.adapterRollout), overridden by each
    field its own spec.rollout sets; None when neither exists."""
    if defaults is None:
        return own
    merged = RolloutPolicy.model_validate(defaults.model_dump())
    if own is None:
        return merged
    return merged.model_copy(update={name: getattr(own, name) for name in own.model_fields_set})


__all__ = ["AnalysisResult", "AnalysisVerdict", "RolloutDefaults", "effective_policy", "DURATION_PATTERN", "EvaluationSummary", "GateResult", "HistoryEntry", "Measured",
           "RolloutAnalysis", "RolloutGates", "RolloutPolicy", "RolloutState", "RolloutStatus", "RolloutStep",
           "VERSION_PATTERN", "duration_seconds"]
