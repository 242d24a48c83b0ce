"""The `classification` dataset format (issue 15): {text, label} rows trained as the content router's classifier
prompt with the label as the answer, loss on the label only; hostile rows refused with the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraplane.api import cel
from loraplane.api.finetunejob import DatasetSpec, FineTuneJobSpec
from loraplane.api.orchestration import MAX_DECISION_TEXT_CHARS, classifier_completion, classifier_prompt
from loraplane.local.tinymodel import build_tokenizer, toy_corpus
from loraplane.trainer import data
from loraplane.trainer.errors import InvalidConfig, InvalidDataset
from support.orchestration_data import LABELS, RULES, classification_records, content_model, split

SPEC = DatasetSpec(uri="/x", format="classification")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(toy_corpus(300, 0))  # the tiny model's tokenizer, without training a model


def source(tmp_path: Path, lines: list) -> data.Source:
    path = tmp_path / "d.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return data.read_file(path, "spec.dataset.uri")


def test_a_row_is_the_classifier_prompt_and_the_label_and_only_the_label_is_learned(tmp_path, tokenizer):
    ex = data.tokenize(source(tmp_path, [{"text": "where is my order?", "label": "support"}]), SPEC, tokenizer, 128)
    row = ex.rows[0]
    # What the router sends (classifier_prompt, tokenised alone as vLLM does) is the masked context ...
    prompt_ids = tokenizer(classifier_prompt("where is my order?"))["input_ids"]
    assert row["input_ids"][:len(prompt_ids)] == prompt_ids
    assert set(row["labels"][:len(prompt_ids)]) == {data.IGNORE_INDEX}
    # ... and the loss is on the completion the router reads (" support") and EOS, nothing else.
    learned = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != data.IGNORE_INDEX]
    assert tokenizer.decode(learned) == classifier_completion("support") + "</s>"
    assert len(row["input_ids"]) == len(prompt_ids) + len(learned)


def test_field_names_are_settings(tmp_path, tokenizer):
    src = source(tmp_path, [{"q": "select all users", "kind": "sql"}])
    spec = DatasetSpec(uri="/x", format="classification", textField="q", labelField="kind")
    assert len(data.tokenize(src, spec, tokenizer, 128).rows) == 1
    with pytest.raises(InvalidDataset, match=r"no field 'text' \(spec.dataset.textField\).*no field 'label' "
                                             r"\(spec.dataset.labelField\).*the records have fields: kind, q"):
        data.tokenize(src, SPEC, tokenizer, 128)


@pytest.mark.parametrize("record, needle", [
    ({"label": "sql"}, r"line 1 has no field 'text' \(spec.dataset.textField\)"),
    ({"text": "hi"}, r"line 1 has no field 'label' \(spec.dataset.labelField\)"),
    ({"text": 7, "label": "sql"}, "line 1: field 'text' must be a string, got int"),
    ({"text": "hi", "label": ["sql"]}, "line 1: field 'label' must be a string, got list"),
    ({"text": "hi", "label": None}, "line 1: field 'label' must be a string, got NoneType"),
    ({"text": "   ", "label": "sql"}, "line 1: field 'text' is empty"),
    ({"text": "x" * (MAX_DECISION_TEXT_CHARS + 1), "label": "sql"},
     f"line 1: field 'text' has {MAX_DECISION_TEXT_CHARS + 1} characters, more than the {MAX_DECISION_TEXT_CHARS}"),
    ({"text": "hi", "label": "SQL"}, "line 1: field 'label' is 'SQL', not a label"),
    ({"text": "hi", "label": "sql query"}, "line 1: field 'label' is 'sql query', not a label"),
    ({"text": "hi", "label": ""}, "line 1: field 'label' is '', not a label"),
    ({"text": "hi", "label": "-sql"}, "line 1: field 'label' is '-sql', not a label"),
    ({"text": "hi", "label": "a" * 64}, "line 1: field 'label' is 'a{40}…', not a label .*at most 63"),
    ({"text": "hi", "label": "sql\n"}, "not a label"),
])
def test_hostile_rows_name_the_line_and_the_field(tmp_path, tokenizer, record, needle):
    with pytest.raises(InvalidDataset, match=needle):
        data.tokenize(source(tmp_path, [record]), SPEC, tokenizer, 128)


def test_every_bad_row_is_counted_and_good_rows_pass(tmp_path, tokenizer):
    lines = [{"text": "ok", "label": "sql"}, {"text": "ok", "label": "Bad"}, "[1]", {"text": "", "label": "sql"}]
    with pytest.raises(InvalidDataset, match=r"^3 of 4 records are invalid: line 2: .*; line 3 is a list.*; line 4: "):
        data.tokenize(source(tmp_path, lines), SPEC, tokenizer, 128)


def test_a_row_longer_than_max_seq_length_is_refused_not_cut(tmp_path, tokenizer):
    with pytest.raises(InvalidDataset, match=r"1 of 1 records are longer than spec.training.maxSeqLength=32"):
        data.tokenize(source(tmp_path, [{"text": "a long request " * 5, "label": "sql"}]), SPEC, tokenizer, 32)


def test_packing_is_refused_by_admission_and_by_the_trainer(tmp_path, tokenizer):
    with pytest.raises(InvalidConfig, match="packing works with the text format only"):
        data.tokenize(source(tmp_path, [{"text": "hi", "label": "sql"}]), SPEC, tokenizer, 64, packing=True)
    base = {"baseModel": {"name": "org/m"}, "output": {"adapterName": "a"}}
    with pytest.raises(ValidationError, match="packing works with spec.dataset.format text only"):
        FineTuneJobSpec.model_validate({**base, "dataset": {"uri": "/d", "format": "classification"},
                                        "training": {"packing": True}})
    FineTuneJobSpec.model_validate({**base, "dataset": {"uri": "/d", "format": "text"}, "training": {"packing": True}})


def test_text_and_label_fields_must_differ():
    with pytest.raises(ValidationError, match="textField and dataset.labelField name the same field"):
        DatasetSpec.model_validate({"uri": "/d", "format": "classification", "labelField": "text"})
    DatasetSpec.model_validate({"uri": "/d", "format": "text", "textField": "body"})
    # An instruction set does not read labelField: set to other than its default it is a mistake, refused by the
    # rule on fields of another format (test_a_record_field_of_another_format_is_refused), not by this one.
    with pytest.raises(ValidationError, match="sets a record field of another format"):
        DatasetSpec.model_validate({"uri": "/d", "format": "instruction", "labelField": "text"})


@pytest.mark.parametrize("value", [
    {}, {"format": "classification"}, {"format": "classification", "labelField": "text"},
    {"format": "classification", "textField": "label"}, {"format": "classification", "textField": "q",
                                                        "labelField": "q"},
    {"format": "classification", "textField": "q", "labelField": "k"}, {"format": "text", "labelField": "text"},
])
def test_dataset_rule_in_python_and_in_cel_agree(value):
    rule = next(r for r in DatasetSpec.cel_rules if "labelField" in r.rule)
    assert rule.check(value) == cel.evaluate(rule.rule, value), value


@pytest.mark.parametrize("value", [
    {"dataset": {}}, {"dataset": {}, "training": {}}, {"dataset": {}, "training": {"packing": False}},
    {"dataset": {}, "training": {"packing": True}}, {"dataset": {"format": "text"}, "training": {"packing": True}},
    {"dataset": {"format": "chat"}, "training": {"packing": True}},
    {"dataset": {"format": "classification"}, "training": {"packing": True}},
])
def test_packing_rule_in_python_and_in_cel_agree(value):
    rule = next(r for r in FineTuneJobSpec.cel_rules if "packing" in r.rule)
    assert rule.check(value) == cel.evaluate(rule.rule, value), value


def test_label_counts():
    src = data.Source("x", [(1, {"text": "a", "label": "sql"}), (2, {"text": "b", "label": "support"}),
                            (3, {"text": "c", "label": "sql"})], "0" * 64)
    assert data.label_counts(src, SPEC) == {"sql": 2, "support": 1}


# ---- the labelled prompt set (tests/support/orchestration_data.py) ----------------------------------------

def test_the_prompt_set_is_deterministic_disjoint_and_balanced(tmp_path, tokenizer):
    train, held_out = split()
    assert (train, held_out) == split()                                  # seeded: same on every run
    assert not {p.text for p in train} & {p.text for p in held_out}     # no held-out prompt was trained on
    assert len({p.text for p in train}) == len(train)
    for part, n in ((train, 60), (held_out, 20)):
        assert {lb: sum(p.label == lb for p in part) for lb in LABELS} == {lb: n for lb in LABELS}
    assert split(seed=16)[0] != train
    # Every row is a valid classification record that fits the tiny model's context with the prompt.
    src = source(tmp_path, classification_records(train + held_out))
    assert len(data.tokenize(src, SPEC, tokenizer, 128).rows) == len(train) + len(held_out)
    model = content_model(methods=("rules", "semantic", "classifier"), classifier="router", embedding_model="emb",
                          train=train)
    assert [d.label for d in model.destinations] == list(LABELS) and model.default == "general"
    assert all(d.examples for d in model.destinations) and RULES["sql"].pattern
