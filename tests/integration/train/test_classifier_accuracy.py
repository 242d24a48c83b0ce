"""The accuracy of a `classification` FineTuneJob (the content router's classifier), measured by the trainer's
evaluation on real peft training of the tiny model, no mocks.

The labelled prompt set (tests/support/orchestration_data.py) is trained with the standard settings
(CLASSIFIER_TRAINING) and a validation split; spec.evaluation then asks the new adapter each held-out text the way
the router will (classifier_prompt, greedy, the router's token budget, the answer read by parse_label) and reports
accuracy, per label too, against the base model's. The same adapter scored on records whose labels are wrong
gets a low accuracy: the number measures the answers, it is not a constant.
"""

from __future__ import annotations

import json

import pytest

from loraplane.api import FineTuneJob
from loraplane.trainer import evaluate as evalmod
from loraplane.trainer import resolve_runtime, run_training
from support.orchestration_data import LABELS, classifier_job, split, write_classification_dataset

pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]

BAR = 0.9   # issue 15's bar for the trained classifier (the bench measured 1.000 through vLLM)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One training run: the train and held-out prompts together, a quarter held out by validationSplit."""
    train, held_out = split()
    work = tmp_path_factory.mktemp("classifier-accuracy")
    job = classifier_job(tiny_model_dir, write_classification_dataset(work / "all.jsonl", train + held_out),
                         dataset_options={"validationSplit": 0.25})
    doc = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"]["evaluation"] = {"maxExamples": 100}
    job = FineTuneJob.model_validate(doc)
    result = run_training(job, resolve_runtime(job, output_dir=work / "adapter", checkpoint_dir=work / "ck",
                                               progress_bar=False), sinks=[])
    return {"result": result, "job": job, "work": work, "held_out": held_out, "model": tiny_model_dir}


def test_a_classification_job_reports_its_held_out_accuracy(trained):
    ev = trained["result"].evaluation
    print("\nclassifier evaluation:", json.dumps(ev.wire()))
    assert ev.primary_metric == "accuracy" and ev.score == ev.candidate.metrics["accuracy"]
    assert ev.candidate.examples == 60                      # round(240 * 0.25) held-out records, each asked once
    assert ev.score >= BAR
    assert ev.base_score < 0.5                              # the base model was never taught the labels
    assert set(ev.candidate.labels) == set(LABELS) and min(ev.candidate.labels.values()) >= 0.5
    assert "eval_loss" in ev.candidate.metrics              # the loss of the same split, as before
    written = json.loads((trained["result"].output_dir / "provenance.json").read_text())
    assert written["evaluation"] == ev.wire()


def test_wrong_labels_give_a_low_accuracy(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The held-out texts with each label moved to the next destination: the classifier's right answers are wrong.
    shift = dict(zip(LABELS, LABELS[1:] + LABELS[:1]))
    path = tmp_path / "wrong.jsonl"
    path.write_text("".join(json.dumps({"text": p.text, "label": shift[p.label]}) + "\n"
                            for p in trained["held_out"]))
    doc = trained["job"].model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"]["evaluation"] = {"dataset": {"uri": str(path), "format": "classification"}, "maxExamples": 30}
    spec = FineTuneJob.model_validate(doc).spec.evaluation
    tok = AutoTokenizer.from_pretrained(trained["model"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["model"]),
                                      trained["result"].output_dir)
    eval_set = evalmod.prepare(spec, evalmod.read_source(spec, tmp_path, tmp_path, None, tmp_path), tok, 256,
                               train_labels=LABELS)
    result = evalmod.evaluate(model, tok, spec, eval_set, None, 8, classification=True)
    print("\nwrong labels:", json.dumps(result.wire()))
    assert result.primary_metric == "accuracy" and result.candidate.examples == 30
    assert result.score <= 0.2
