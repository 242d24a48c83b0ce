"""builders.finetunejob.trainer_config: the config the operator (and `loraplane run`) writes for the trainer is a
FineTuneJob the trainer reads back with the same rules (trainer.config.job_from_dict). It is dumped with its
defaults resolved, so a default a rule refuses for some jobs made the trainer refuse its own config: a
`classification` job with spec.evaluation got the default metrics (rouge_l, exact_match, contains), which the API
refuses for a classifier, and every such run failed with InvalidConfig before training."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from loraplane.api import parse
from loraplane.builders.finetunejob import trainer_config
from loraplane.builders.settings import BuildSettings
from loraplane.trainer.config import job_from_dict
from support.paths import ROOT

BASE = {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "t"},
        "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "s3://b/train.jsonl"},
                 "output": {"adapterName": "a"}}}
CLASSIFIER = {"format": "classification", "validationSplit": 0.2}


def job(evaluation: dict | None, **dataset) -> dict:
    doc = copy.deepcopy(BASE)
    doc["spec"]["dataset"].update(dataset)
    if evaluation is not None:
        doc["spec"]["evaluation"] = evaluation
    return doc


def documented_jobs() -> list[dict]:
    """Every FineTuneJob of the docs' YAML blocks and docs/examples (the invalid ones excepted)."""
    out = []
    for md in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```yaml\n(.*?)```", md.read_text(), re.S):
            out += [d for d in yaml.safe_load_all(block) if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    for path in sorted((ROOT / "docs" / "examples").glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)
                and d.get("kind") == "FineTuneJob"]
    return out


CASES = [
    job({}, **CLASSIFIER),
    job({"primaryMetric": "eval_loss"}, **CLASSIFIER),
    job({"metrics": ["accuracy"]}, **CLASSIFIER),
    job({"dataset": {"uri": "s3://b/eval.jsonl", "format": "classification", "textField": "q"}},
        format="classification", textField="body"),
    job({}, validationSplit=0.1),
    job({"dataset": {"uri": "s3://b/eval.jsonl"}, "metrics": ["regex", "rouge_l"]}),
    job({"dataset": {"uri": "s3://b/eval.jsonl", "format": "chat"}}, format="chat", validationSplit=0.1),
    job(None, format="text", textField="body"),
]


@pytest.mark.parametrize("doc", CASES + documented_jobs(), ids=lambda d: str(d["spec"].get("evaluation")))
def test_the_trainer_reads_back_the_config_it_is_given(doc):
    ftj = parse(doc)
    config = trainer_config(ftj, BuildSettings())
    back = job_from_dict(config)
    # The same job: every field the user set keeps its value, and the evaluation scores the same metrics.
    assert back.spec.dataset == ftj.spec.dataset and back.spec.method == ftj.spec.method
    if ftj.spec.evaluation is not None:
        classification = ftj.spec.dataset.format == "classification"
        assert back.spec.evaluation.primary(classification) == ftj.spec.evaluation.primary(classification)
        assert back.spec.evaluation.generation_metrics(classification) == \
            ftj.spec.evaluation.generation_metrics(classification)


def test_the_documented_jobs_include_an_evaluated_classifier():
    """The round trip above covers the docs' classifier (docs/orchestration.md), the case that failed."""
    assert any(d["spec"]["dataset"].get("format") == "classification" and "evaluation" in d["spec"]
               for d in documented_jobs())
