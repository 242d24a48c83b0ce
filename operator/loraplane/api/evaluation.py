"""Evaluation results: the contract between the trainer (which scores a new adapter version after training), the
FineTuneJob and Adapter status that carry the scores, and the rollout gates that compare them.

The trainer scores three models on the same evaluation data when it can: the new adapter (`candidate`), the base
model alone (`base`), and the version the Adapter serves now (`previous`, when known). Each is an
`EvaluationScores`: metric name -> value. The gates (`minScore`, `mustBeatBase`, `mustNotRegressBy`) compare one
metric, `EvaluationResult.primary_metric`, in the direction `higher_is_better` gives.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from loraplane.api.common import ApiModel


class EvaluationMetric(StrEnum):
    """Named metrics an evaluation reports (the keys of `EvaluationScores.metrics`).

    The generation metrics score a greedy completion of each evaluation prompt against its reference, averaged
    over the examples (0..1): exact_match (after whitespace normalisation), contains (the reference occurs in the
    completion), regex (the example's pattern matches the completion; linear-time RE2), rouge_l (ROUGE-L F1, Lin
    2004, as computed by the `rouge-score` library). accuracy scores a `classification` adapter as the content
    router asks it: the fraction of examples whose greedy answer to `classifier_prompt(text)`, read by
    `api.orchestration.parse_label`, is the record's label. eval_loss is the mean token cross-entropy on the
    validation split (nats) and perplexity its exponential."""

    exact_match = "exact_match"
    contains = "contains"
    regex = "regex"
    rouge_l = "rouge_l"
    accuracy = "accuracy"
    eval_loss = "eval_loss"
    perplexity = "perplexity"


# Per-label accuracies reported (EvaluationScores.labels) for at most this many labels: the result travels in the
# trainer's 4 KiB termination message (api.wire.trainer), 63-character labels included.
MAX_LABEL_SCORES = 8

# Metrics where a smaller value is better; every other metric is better when larger.
LOWER_IS_BETTER = frozenset({EvaluationMetric.eval_loss, EvaluationMetric.perplexity})


def higher_is_better(metric: str) -> bool:
    """True when a larger value of `metric` means a better model (all but eval_loss and perplexity)."""
    return metric not in LOWER_IS_BETTER


class EvaluationScores(ApiModel):
    """One model's scores on the evaluation: metric name (an `EvaluationMetric`) -> value."""

    metrics: dict[str, float] = Field(default_factory=dict, description="Metric name -> value.")
    examples: int = Field(default=0, ge=0, description="How many evaluation examples were scored.")
    # Added with `accuracy` (optional; readers must not require it):
    labels: dict[str, float] | None = Field(
        default=None, max_length=MAX_LABEL_SCORES, description=(
            "Classification only, the new adapter only: each true label's accuracy (of the examples with this "
            f"label, the fraction answered with it), when the examples have at most {MAX_LABEL_SCORES} labels."))


class EvaluationResult(ApiModel):
    """The evaluation of one adapter version after training: its scores, the base model's and the previous
    version's on the same data. Written to FineTuneJob `status.evaluation` and the Adapter's
    `status.provenance.evaluation`."""

    primary_metric: str = Field(description="The metric the rollout gates compare (spec.evaluation.primaryMetric).")
    candidate: EvaluationScores = Field(description="The new adapter version.")
    base: EvaluationScores | None = Field(default=None, description="The base model alone, on the same data.")
    previous: EvaluationScores | None = Field(default=None, description="The version being replaced, when known.")
    previous_version: str | None = Field(default=None, description="Which version `previous` scored.")
    evaluated_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    # Added after the first version of this contract (optional; readers must not require them):
    score: float | None = Field(default=None, description="The candidate's primary metric (`kubectl get -o wide`).")
    base_score: float | None = Field(default=None, description="The base model's primary metric.")
    message: str | None = Field(default=None, max_length=1024,
                                description="What was not scored and why (time budget reached, previous version "
                                            "unavailable).")

    def summary(self) -> str:
        """`<primary metric>: adapter <v>, base <v>[, previous <version> <v>]` for logs, Events and `loraplane run`."""
        p = self.primary_metric

        def value(scores: EvaluationScores | None) -> str:
            return f"{scores.metrics[p]:.4g}" if scores is not None and p in scores.metrics else "n/a"

        out = f"{p}: adapter {value(self.candidate)}, base {value(self.base)}"
        if self.previous is not None:
            out += f", previous{' ' + self.previous_version if self.previous_version else ''} {value(self.previous)}"
        return out
