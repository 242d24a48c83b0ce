"""FineTuneJob spec.evaluation: what admission accepts and refuses (with messages naming the field), the CEL rules
agreeing with their Python mirrors, and the printer columns `kubectl get ftj -o wide` reads."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from loraplane.api import cel
from loraplane.api.finetunejob import EvaluationDatasetSpec, EvaluationSpec, FineTuneJob, FineTuneJobSpec

BASE = {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
        "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "s3://b/train.jsonl"},
                 "output": {"adapterName": "a"}}}
EVAL_SET = {"uri": "s3://b/eval.jsonl"}


def job(evaluation: dict, **dataset) -> dict:
    doc = copy.deepcopy(BASE)
    doc["spec"]["evaluation"] = evaluation
    doc["spec"]["dataset"].update(dataset)
    return doc


@pytest.mark.parametrize("evaluation, dataset, primary", [
    ({"dataset": EVAL_SET}, {}, "rouge_l"),                                       # the default primary metric
    ({"dataset": EVAL_SET, "metrics": ["contains", "regex"]}, {}, "contains"),    # the first of the metrics
    ({"dataset": EVAL_SET, "metrics": ["regex"], "primaryMetric": "regex"}, {}, "regex"),
    ({}, {"validationSplit": 0.1}, "eval_loss"),                                  # loss metrics only
    ({"primaryMetric": "perplexity"}, {"validationUri": "s3://b/val.jsonl"}, "perplexity"),
    ({"dataset": {"configMapRef": {"name": "cm", "key": "eval.jsonl"}, "format": "chat"},
      "primaryMetric": "eval_loss"}, {"validationSplit": 0.2}, "eval_loss"),
])
def test_accepted_evaluations_and_their_primary_metric(evaluation, dataset, primary):
    assert FineTuneJob.model_validate(job(evaluation, **dataset)).spec.evaluation.primary() == primary


@pytest.mark.parametrize("evaluation, dataset, message", [
    ({}, {}, "spec.evaluation has nothing to score"),
    ({"primaryMetric": "eval_loss"}, {}, "needs a validation set"),
    ({"dataset": EVAL_SET, "primaryMetric": "eval_loss"}, {}, "needs a validation set"),
    ({"primaryMetric": "rouge_l"}, {"validationSplit": 0.1}, "evaluation.primaryMetric must be"),
    ({"dataset": EVAL_SET, "primaryMetric": "regex"}, {}, "one of evaluation.metrics"),
    ({"dataset": EVAL_SET, "metrics": ["bleu"]}, {}, "metrics.0"),
    ({"dataset": EVAL_SET, "metrics": []}, {}, "metrics"),
    ({"dataset": EVAL_SET, "metrics": ["regex", "regex"]}, {}, "lists a metric twice"),
    ({"dataset": {}}, {}, "set exactly one of evaluation.dataset.uri or evaluation.dataset.configMapRef"),
    ({"dataset": {**EVAL_SET, "configMapRef": {"name": "cm"}}}, {}, "set exactly one of evaluation.dataset.uri"),
    ({"dataset": {**EVAL_SET, "format": "text"}}, {}, "format"),
    ({"dataset": {"uri": "pvc://c/../x"}}, {}, "evaluation.dataset.uri: a pvc:// path must stay inside"),
    ({"dataset": {"uri": "ftp://x"}}, {}, "dataset.uri"),
    ({"dataset": EVAL_SET, "maxNewTokens": 0}, {}, "maxNewTokens"),
    ({"dataset": EVAL_SET, "maxExamples": 100000}, {}, "maxExamples"),
    ({"dataset": EVAL_SET, "timeoutSeconds": 1}, {}, "timeoutSeconds"),
])
def test_refused_evaluations_name_the_field(evaluation, dataset, message):
    with pytest.raises(ValidationError) as err:
        FineTuneJob.model_validate(job(evaluation, **dataset))
    assert message in str(err.value)


CASES = [
    {}, {"dataset": EVAL_SET}, {"primaryMetric": "rouge_l"}, {"primaryMetric": "eval_loss"},
    {"dataset": EVAL_SET, "primaryMetric": "regex"}, {"dataset": EVAL_SET, "metrics": ["regex"],
                                                      "primaryMetric": "regex"},
    {"dataset": EVAL_SET, "primaryMetric": "perplexity"}, {"dataset": EVAL_SET, "metrics": ["contains"],
                                                           "primaryMetric": "rouge_l"},
]


@pytest.mark.parametrize("evaluation", CASES)
@pytest.mark.parametrize("dataset", [{}, {"validationSplit": 0.1}, {"validationUri": "s3://b/v.jsonl"}])
def test_the_cel_rules_agree_with_their_python_mirrors(evaluation, dataset):
    # The API server evaluates the CEL; the operator and the CLI evaluate the Python mirror (CelRule.check).
    spec = {**BASE["spec"], "dataset": {**BASE["spec"]["dataset"], **dataset}, "evaluation": evaluation}
    for model, value in ((FineTuneJobSpec, spec), (EvaluationSpec, evaluation)):
        for rule in model.cel_rules:
            assert rule.check(value) == cel.evaluate(rule.rule, value), (rule.rule, value)
    for rule in EvaluationDatasetSpec.cel_rules:
        if rule.check is not None and "dataset" in evaluation:
            assert rule.check(evaluation["dataset"]) == cel.evaluate(rule.rule, evaluation["dataset"])


def test_kubectl_get_wide_shows_the_primary_metric_and_the_scores():
    columns = {c["name"]: c for c in FineTuneJob.PRINTER_COLUMNS}
    assert columns["Metric"]["jsonPath"] == ".status.evaluation.primaryMetric"
    assert columns["Score"]["jsonPath"] == ".status.evaluation.score"
    assert columns["BaseScore"]["jsonPath"] == ".status.evaluation.baseScore"
    assert all(columns[c].get("priority") == 1 for c in ("Metric", "Score", "BaseScore"))


# ---- accuracy: the content router's classifier (a `classification` job) --------------------------------------

CLASSIFICATION = {"format": "classification", "validationSplit": 0.2}
CLASSIFICATION_SET = {**EVAL_SET, "format": "classification"}


@pytest.mark.parametrize("evaluation, dataset, primary", [
    ({}, CLASSIFICATION, "accuracy"),                                             # the default for a classifier
    ({"metrics": ["accuracy"], "primaryMetric": "accuracy"}, CLASSIFICATION, "accuracy"),
    ({"primaryMetric": "eval_loss"}, CLASSIFICATION, "eval_loss"),
    ({"dataset": CLASSIFICATION_SET}, {"format": "classification"}, "accuracy"),  # no validation set needed
    ({"dataset": {**CLASSIFICATION_SET, "textField": "q", "labelField": "route"}}, {"format": "classification"},
     "accuracy"),
])
def test_a_classification_job_is_scored_by_accuracy(evaluation, dataset, primary):
    spec = FineTuneJob.model_validate(job(evaluation, **dataset)).spec
    assert spec.evaluation.primary(classification=True) == primary
    assert spec.evaluation.generation_metrics(classification=True) == ["accuracy"]


@pytest.mark.parametrize("evaluation, dataset, message", [
    # accuracy reads a classifier's label: refused for other formats, naming the field and the fix.
    ({"dataset": EVAL_SET, "metrics": ["accuracy"]}, {}, "accuracy scores a classifier's label and needs "
                                                         "spec.dataset.format classification"),
    ({"primaryMetric": "accuracy"}, {"validationSplit": 0.1}, "remove accuracy from spec.evaluation.metrics"),
    # a classifier is scored by accuracy only: free-text metrics against a label are refused.
    ({"metrics": ["exact_match"]}, CLASSIFICATION, "leave spec.evaluation.metrics unset or set it to [accuracy]"),
    ({"metrics": ["accuracy", "rouge_l"]}, CLASSIFICATION, "evaluation of a classification job scores accuracy"),
    ({"dataset": CLASSIFICATION_SET, "primaryMetric": "rouge_l"}, {"format": "classification"},
     "primaryMetric to accuracy, eval_loss or perplexity"),
    # the evaluation set's layout follows the job's.
    ({"dataset": EVAL_SET}, {"format": "classification"}, "spec.evaluation.dataset.format must be classification "
                                                           "exactly when spec.dataset.format is"),
    ({"dataset": CLASSIFICATION_SET}, {}, "spec.evaluation.dataset.format must be classification"),
    # The mistakes a user makes, each told the fix: a format left unset is instruction, so a classifier's
    # evaluation set without `format` is the wrong layout; a free-text primaryMetric on a classifier without an
    # evaluation set is refused by the evaluation's own rule, which must not suggest rouge_l for it.
    ({"dataset": {"uri": "s3://d/eval.jsonl"}}, {"format": "classification"},
     "(unset, it is instruction)"),
    ({"dataset": {"uri": "s3://d/eval.jsonl"}}, {"format": "classification"},
     "set spec.evaluation.dataset.format: classification for a classifier's evaluation set"),
    ({"primaryMetric": "rouge_l"}, {"format": "classification", "validationSplit": 0.2},
     "accuracy for a classification job (spec.dataset.format classification: no other metric)"),
])
def test_accuracy_outside_a_classification_job_and_other_metrics_inside_one_are_refused(evaluation, dataset,
                                                                                          message):
    with pytest.raises(ValidationError) as err:
        FineTuneJob.model_validate(job(evaluation, **dataset))
    assert message in str(err.value)


@pytest.mark.parametrize("evaluation", [
    {}, {"metrics": ["accuracy"]}, {"primaryMetric": "accuracy"}, {"metrics": ["exact_match"]},
    {"dataset": CLASSIFICATION_SET}, {"dataset": EVAL_SET}, {"dataset": EVAL_SET, "metrics": ["accuracy"]},
    {"primaryMetric": "perplexity"}, {"metrics": ["accuracy", "contains"], "primaryMetric": "rouge_l"},
])
@pytest.mark.parametrize("dataset", [{}, {"format": "classification"}, CLASSIFICATION, {"format": "chat"}])
def test_the_accuracy_rules_agree_with_their_python_mirrors(evaluation, dataset):
    spec = {**BASE["spec"], "dataset": {**BASE["spec"]["dataset"], **dataset}, "evaluation": evaluation}
    for model, value in ((FineTuneJobSpec, spec), (EvaluationSpec, evaluation)):
        for rule in model.cel_rules:
            assert rule.check(value) == cel.evaluate(rule.rule, value), (rule.rule, value)


def test_the_classifier_job_of_docs_orchestration_is_scored_by_accuracy():
    import re

    import yaml

    from support.paths import ROOT

    text = (ROOT / "docs" / "orchestration.md").read_text()
    [doc] = [d for block in re.findall(r"```yaml\n(.*?)```", text, re.S) for d in yaml.safe_load_all(block)
             if d and d.get("kind") == "FineTuneJob"]
    spec = FineTuneJob.model_validate(doc).spec
    assert spec.dataset.format == "classification" and spec.evaluation.primary(classification=True) == "accuracy"


@pytest.mark.parametrize("evaluation, dataset", [
    # A classifier's evaluation set with an instruction field: `responseField: route` meant labelField.
    ({"dataset": {**CLASSIFICATION_SET, "responseField": "route"}}, {"format": "classification"}),
    ({"dataset": {**CLASSIFICATION_SET, "patternField": "p"}}, {"format": "classification"}),
    # An instruction evaluation set (format unset) with a classification field; a chat one with a prompt field.
    ({"dataset": {**EVAL_SET, "textField": "t"}}, {}),
    ({"dataset": {**EVAL_SET, "format": "chat", "promptField": "q"}}, {"format": "chat"}),
    # The training data too: a classification set with `promptField` (its text is textField).
    ({}, {"format": "classification", "validationSplit": 0.2, "promptField": "question"}),
    ({}, {"format": "chat", "validationSplit": 0.2, "responseField": "answer"}),
])
def test_a_record_field_of_another_format_is_refused(evaluation, dataset):
    """Each format reads only its own record fields; one of another format was ignored, so the run read the
    default field instead and failed (InvalidDataset) only once the data was fetched, or scored the wrong field.
    Admission refuses it, naming the fields each format reads. A field set to its own default is harmless (code
    dumps a spec with its defaults): accepted."""
    with pytest.raises(ValidationError) as err:
        FineTuneJob.model_validate(job(evaluation, **dataset))
    assert "sets a record field of another format" in str(err.value)
    assert "classification: textField, labelField" in str(err.value)


def test_a_record_field_at_its_default_or_of_its_own_format_is_accepted():
    FineTuneJob.model_validate(job({"dataset": {**CLASSIFICATION_SET, "textField": "q", "labelField": "route",
                                                "promptField": "prompt", "patternField": "pattern"}},
                                   format="classification", textField="body", responseField="response"))
    FineTuneJob.model_validate(job({"dataset": {**EVAL_SET, "format": "chat", "messagesField": "m",
                                                "patternField": "p"}, "metrics": ["regex"]},
                                   format="chat", messagesField="turns", validationSplit=0.1))
    # Datasets dumped with every default (ApiModel.wire, the trainer's config) validate again.
    from loraplane.api.finetunejob import DatasetSpec, EvaluationDatasetSpec

    spec = FineTuneJob.model_validate(job({"dataset": CLASSIFICATION_SET}, format="classification")).spec
    DatasetSpec.model_validate(spec.dataset.wire())
    EvaluationDatasetSpec.model_validate(spec.evaluation.dataset.wire())
