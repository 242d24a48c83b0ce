"""spec.evaluation in the trainer without training: the metrics on known inputs, the evaluation set's checks
(bad data fails with InvalidDataset naming spec.evaluation.dataset and the lines), the previous version passed in
the trainer config, and the result's trip through the 4 KiB termination message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplane.api.evaluation import MAX_LABEL_SCORES, EvaluationResult, EvaluationScores
from loraplane.api.finetunejob import EvaluationSpec
from loraplane.api.orchestration import MAX_DECISION_TEXT_CHARS, classifier_max_tokens, classifier_prompt, parse_label
from loraplane.api.wire.trainer import (
    TERMINATION_MESSAGE_LIMIT, PreviousVersion, TerminationMessage, write_termination_message,
)
from loraplane.local.tinymodel import build_tokenizer, toy_corpus
from loraplane.trainer import data, evaluate
from loraplane.trainer.config import load_config
from loraplane.trainer.errors import InvalidConfig, InvalidDataset


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(toy_corpus(300, 0))  # the tiny model's tokenizer, without training a model


def source(tmp_path: Path, records: list) -> data.Source:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data.read_file(path, "spec.evaluation.dataset.uri")


def spec(**kw) -> EvaluationSpec:
    return EvaluationSpec.model_validate({"dataset": {"uri": "/e.jsonl"}, **kw})


# ---- metrics on known inputs --------------------------------------------------------------------------------

def ex(reference: str, pattern: str | None = None) -> evaluate.Example:
    return evaluate.Example(1, [1], reference, evaluate.compile_pattern(pattern) if pattern else None)


@pytest.mark.parametrize("completion, reference, exact, has", [
    ("the blue door", "the blue door", 1.0, 1.0),
    ("  the   blue\ndoor ", "the blue door", 1.0, 1.0),       # whitespace normalised
    ("The blue door", "the blue door", 0.0, 0.0),              # case-sensitive
    ("yes: the blue door sings", "the blue door", 0.0, 1.0),
    ("a red fox", "the blue door", 0.0, 0.0),
])
def test_exact_match_and_contains(completion, reference, exact, has):
    assert evaluate.score("exact_match", completion, ex(reference)) == exact
    assert evaluate.score("contains", completion, ex(reference)) == has


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    # LCS("the blue door sings at noon", "the door sings loudly") = the door sings: 3 words;
    # P = 3/4, R = 3/6, F1 = 2PR/(P+R) = 0.6.
    assert evaluate.rouge_l("the door sings loudly", "the blue door sings at noon") == pytest.approx(0.6)
    assert evaluate.rouge_l("The Blue Door", "the blue door") == 1.0   # lower-cased words, as rouge-score does
    assert evaluate.rouge_l("a red fox", "the blue door") == 0.0
    # Non-Latin text is scored too (rouge-score's default tokenizer keeps [a-z0-9] only and would give 0).
    assert evaluate.rouge_l("голубая дверь поёт", "голубая дверь") == pytest.approx(0.8)


def test_regex_uses_re2_search_and_refuses_what_re2_refuses():
    assert evaluate.score("regex", "the answer is 42.", ex("x", r"\b\d+\b")) == 1.0
    assert evaluate.score("regex", "no digits", ex("x", r"\d+")) == 0.0
    with pytest.raises(ValueError, match="RE2 refuses"):
        evaluate.compile_pattern(r"(a)\1")   # a backreference needs backtracking
    with pytest.raises(ValueError, match="at most"):
        evaluate.compile_pattern("a" * (evaluate.MAX_PATTERN_CHARS + 1))


# ---- the evaluation set -------------------------------------------------------------------------------------

def test_instruction_and_chat_records_become_prompts_and_references(tmp_path, tokenizer):
    inst = evaluate.prepare(spec(), source(tmp_path, [{"prompt": "who sings?\n", "response": "the blue door"}]),
                            tokenizer, 2048)
    (e,) = inst.examples
    assert e.reference == "the blue door"
    assert e.prompt_ids == tokenizer("who sings?\n", add_special_tokens=True)["input_ids"]   # as in training
    msgs = [{"role": "user", "content": "who sings?"}, {"role": "assistant", "content": "the blue door"}]
    chat = evaluate.prepare(spec(dataset={"uri": "/e", "format": "chat"}), source(tmp_path, [{"messages": msgs}]),
                            tokenizer, 2048)
    assert chat.examples[0].reference == "the blue door"
    assert chat.examples[0].prompt_ids == list(tokenizer.apply_chat_template(msgs[:1], add_generation_prompt=True,
                                                                             tokenize=True, return_dict=False))


def test_max_examples_takes_the_first_records(tmp_path, tokenizer):
    records = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    out = evaluate.prepare(spec(maxExamples=3), source(tmp_path, records), tokenizer, 2048)
    assert [e.reference for e in out.examples] == ["a0", "a1", "a2"] and out.records == 10


@pytest.mark.parametrize("records, kw, expected", [
    ([{"question": "q", "response": "a"}], {}, "spec.evaluation.dataset.promptField"),
    ([{"prompt": "q", "response": 3}], {}, "field 'response' must be a string"),
    ([{"prompt": "q", "response": "  "}], {}, "line 1: the reference answer is empty"),
    (["not an object"], {}, "line 1 is a str"),
    ([{"prompt": "q", "response": "a"}], {"metrics": ["regex"]}, "spec.evaluation.dataset.patternField"),
    ([{"prompt": "q", "response": "a", "pattern": "(x)\\1"}], {"metrics": ["regex"]}, "line 1: the pattern"),
    ([{"prompt": "word " * 40, "response": "a"}], {"maxNewTokens": 2000}, "leaves no room for maxNewTokens"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "more?"}]}], {"dataset": {"uri": "/e", "format": "chat"}},
     "the last message of 'messages' must be the assistant's reference answer"),
])
def test_bad_evaluation_data_is_invalid_dataset_naming_the_field_and_line(tmp_path, tokenizer, records, kw,
                                                                          expected):
    with pytest.raises(InvalidDataset) as err:
        evaluate.prepare(spec(**kw), source(tmp_path, records), tokenizer, 2048)
    assert expected in err.value.message and "spec.evaluation.dataset" in err.value.message


def test_an_evaluation_file_that_is_not_json_lines_names_the_field(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"prompt": "q"\n')
    with pytest.raises(InvalidDataset, match="spec.evaluation.dataset.uri"):
        evaluate.read_source(spec(dataset={"uri": str(path)}), tmp_path, tmp_path, None, tmp_path)


def test_the_evaluation_configmap_is_read_where_the_pod_mounts_it(tmp_path):
    (tmp_path / "cm").mkdir()
    (tmp_path / "cm" / "eval.jsonl").write_text('{"prompt": "q", "response": "a"}\n')
    got = evaluate.read_source(spec(dataset={"configMapRef": {"name": "cm", "key": "eval.jsonl"}}), tmp_path,
                               tmp_path, None, tmp_path)
    assert got.uri == "configmap://cm/eval.jsonl" and len(got.records) == 1


# ---- the previous version and the result on the wire --------------------------------------------------------

def test_the_trainer_reads_the_previous_version_from_its_config(tmp_path):
    doc = {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
           "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "/d.jsonl"},
                    "output": {"adapterName": "a"}},
           "previousVersion": {"uri": "s3://b/a/run-1", "version": "3"}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    job, previous = load_config(path)
    assert job.metadata.name == "j" and previous == PreviousVersion(uri="s3://b/a/run-1", version="3")
    path.write_text(json.dumps({**doc, "previousVersion": {"version": "3"}}))
    with pytest.raises(InvalidConfig, match="previousVersion"):
        load_config(path)


def test_an_unmounted_previous_version_is_reported_not_fatal(tmp_path):
    with pytest.raises(ValueError, match="not mounted"):
        evaluate.fetch_previous(PreviousVersion(uri="pvc://other-claim/a"), tmp_path, tmp_path)


def full_result() -> EvaluationResult:
    metrics = {"eval_loss": 1.2345, "perplexity": 3.4367, "exact_match": 0.5, "contains": 0.75, "regex": 0.25,
               "rouge_l": 0.8123}
    s = EvaluationScores(metrics=metrics, examples=200)
    # A classifier's result carries per-label accuracies too (at most MAX_LABEL_SCORES labels of 63 characters).
    labelled = EvaluationScores(metrics={**metrics, "accuracy": 0.9876}, examples=200,
                                labels={f"{i}" + "l" * 62: 0.1234 for i in range(MAX_LABEL_SCORES)})
    return EvaluationResult(primary_metric="rouge_l", candidate=labelled, base=s, previous=s, previous_version="12",
                            evaluated_at="2026-01-01T00:00:00Z", score=0.8123, base_score=0.8123,
                            message="time budget (900 s) reached: generation metrics cover 150 of 200 examples")


def test_the_evaluation_survives_the_termination_message_limit(tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("LORAPLANE_TERMINATION_LOG", str(log))
    message = TerminationMessage(
        reason="Succeeded", artifact={"uri": "s3://bucket/" + "p" * 1800, "sha256": "a" * 64},
        dataset_sha256="b" * 64, metrics={f"metric{i}": 1.0 / 3 for i in range(40)},
        library_versions={f"library-{i}": "1.2.3+cpu" for i in range(30)}, completed_at="2026-01-01T00:00:00Z",
        evaluation=full_result())
    assert len(json.dumps(message.to_json()).encode()) > TERMINATION_MESSAGE_LIMIT
    assert write_termination_message(message.to_json())
    text = log.read_text()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    read = TerminationMessage.parse(text)   # what the operator reads from the pod
    assert read.evaluation == full_result() and read.artifact.sha256 == "a" * 64


@pytest.mark.parametrize("note", ["x", "é"])
def test_a_worst_case_evaluation_still_fits_the_termination_message(tmp_path, monkeypatch, note):
    """The longest artifact URI, an evaluation message at its 1024-character limit (e.g. a previous version that
    failed to load, its error quoting a long URI; non-ASCII text is escaped to 6 bytes a character in JSON) and 8
    per-label accuracies: Kubernetes would cut such a JSON at 4 KiB and the operator could read none of it.
    The evaluation's message is shortened (then the per-label scores left out); the scores themselves arrive."""
    from loraplane.api.common import URI_MAX_LENGTH

    log = tmp_path / "termination-log"
    monkeypatch.setenv("LORAPLANE_TERMINATION_LOG", str(log))
    evaluation = full_result().model_copy(update={"message": note * 1022 + " …"})
    message = TerminationMessage(
        reason="Succeeded", artifact={"uri": "s3://bucket/" + "p" * (URI_MAX_LENGTH - 12), "sha256": "a" * 64},
        dataset_sha256="b" * 64, completed_at="2026-01-01T00:00:00Z", evaluation=evaluation)
    assert write_termination_message(message.to_json())
    text = log.read_text()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    read = TerminationMessage.parse(text)
    assert read is not None and read.evaluation is not None
    assert read.evaluation.candidate.metrics == evaluation.candidate.metrics and read.evaluation.score == 0.8123
    assert read.artifact.uri == message.artifact.uri and read.evaluation.message.endswith(" …")


def test_a_result_with_fields_this_operator_does_not_know_is_still_read():
    """A trainer of another version adds fields (today's per-label `labels` is one): the wire contract says they
    are ignored, but the evaluation is an ApiModel (extra forbidden), so one unknown field inside it made the
    whole success message unreadable: the Adapter was then published without its sha256 and evaluation."""
    doc = TerminationMessage(reason="Succeeded", artifact={"uri": "s3://b/k", "sha256": "a" * 64},
                             evaluation=full_result()).to_json()
    doc["evaluation"]["calibration"] = 0.5
    doc["evaluation"]["candidate"]["labelCounts"] = {"support": 3}
    doc["futureField"] = True
    read = TerminationMessage.parse(json.dumps(doc))
    assert read is not None and read.artifact.sha256 == "a" * 64
    assert read.evaluation == full_result()
    assert TerminationMessage.parse(json.dumps({**doc, "reason": "bad reason"})) is None   # still not ours


# ---- the previous version's adapter_config.json is untrusted ----------------------------------------------------

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")]
EVIL = "(.|.)*x"   # exponential time under Python's backtracking re on a module name; linear under RE2


def test_the_previous_config_carries_no_pattern_peft_would_backtrack_on():
    """PEFT full-matches a string target_modules/exclude_modules and matches rank_pattern/alpha_pattern keys with
    Python's re; safe_previous_config resolves them with RE2 into plain names first (the same modules)."""
    import re
    import time

    cfg = {"peft_type": "LORA", "r": 8, "target_modules": r".*\.(q_proj|v_proj)", "exclude_modules": EVIL,
           "rank_pattern": {EVIL: 2, "v_proj": 4}, "alpha_pattern": {r"layers\.1\..*": 32}}
    start = time.monotonic()
    safe = evaluate.safe_previous_config(cfg, MODULES)
    assert time.monotonic() - start < 1
    assert safe["target_modules"] == [m for m in MODULES if m.endswith(("q_proj", "v_proj"))]
    assert safe["exclude_modules"] == []
    assert safe["rank_pattern"] == {re.escape(m): 4 for m in MODULES if m.endswith("v_proj")}
    assert safe["alpha_pattern"] == {re.escape(m): 32 for m in MODULES if ".1." in m}
    # PEFT's own reading of the rewritten keys picks the same values, and runs no untrusted pattern
    assert all(re.match(rf"(.*\.)?({k})$", m) for k in safe["rank_pattern"] for m in [k.replace("\\", "")])
    assert cfg["target_modules"] == r".*\.(q_proj|v_proj)"   # the input is not changed
    assert evaluate.safe_previous_config({"r": 8, "target_modules": ["q_proj"], "megatron_core": "megatron.core"},
                                         MODULES)["target_modules"] == ["q_proj"]


@pytest.mark.parametrize("cfg,match", [
    ({"target_modules": r"(q)\1_proj"}, "target_modules .* cannot be matched safely"),
    ({"target_modules": EVIL}, "matches no module"),
    ({"target_modules": ["q_proj"], "modules_to_save": [EVIL]}, "modules_to_save must list plain module names"),
    ({"target_modules": ["q_proj"], "layers_pattern": EVIL}, "layers_pattern must list plain module names"),
    ({"target_modules": ["q_proj"], "rank_pattern": {r"(?=q)": 4}}, "rank_pattern key"),
    ({"target_modules": ["q_proj"], "rank_pattern": {f"k{i}": 4 for i in range(2000)}}, "at most 1024"),
    ({"target_modules": ["q_proj"], "layer_replication": [[0, 2], [0, 2]]}, "layer_replication"),
    ({"target_modules": ["q_proj"], "init_lora_weights": "pissa"}, "rewrites the base model's weights"),
    ({"peft_type": "IA3", "target_modules": ["q_proj"]}, "not LORA"),
    ({"target_modules": {"q_proj": 1}}, "neither a list"),
    ([], "not a JSON object"),
])
def test_a_previous_config_that_cannot_be_loaded_safely_is_refused_naming_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        evaluate.safe_previous_config(cfg, MODULES)


# ---- accuracy of a classification job (the content router's classifier) -----------------------------------------

def classification_spec(**kw) -> EvaluationSpec:
    return EvaluationSpec.model_validate({"dataset": {"uri": "/e.jsonl", "format": "classification"}, **kw})


@pytest.mark.parametrize("completion, label, right", [
    (" support", "support", 1.0), ("Support! how can I help", "support", 1.0),   # the router's reading: first word,
    ("\n sql\n", "sql", 1.0),                                                      # lower-cased, after whitespace
    (" supportive", "support", 0.0), (" sql", "support", 0.0), ("", "support", 0.0), ("!support", "support", 0.0),
    (" billing-eu", "billing-eu", 1.0), (" billing", "billing-eu", 0.0),
])
def test_accuracy_reads_the_answer_as_the_router_does(completion, label, right):
    example = evaluate.Example(1, [1], "", label=label)
    assert evaluate.score("accuracy", completion, example) == right
    assert (parse_label(completion) == label) == bool(right)   # the router's own reading (api.orchestration)


def test_a_classification_evaluation_set_is_asked_as_the_router_asks(tmp_path, tokenizer):
    records = [{"q": "where is my order?", "route": "support"}, {"q": "select 1", "route": "sql"},
               {"q": "tell me a joke", "route": "general"}, {"q": "refund", "route": "refunds-eu"}]
    spec = classification_spec(dataset={"uri": "/e", "format": "classification", "textField": "q",
                                        "labelField": "route"}, maxExamples=3)
    out = evaluate.prepare(spec, source(tmp_path, records), tokenizer, 2048, train_labels=["support", "sql"])
    assert out.classification and out.records == 4 and [e.line for e in out.examples] == [1, 2, 3]
    first = out.examples[0]
    assert first.prompt_ids == tokenizer(classifier_prompt("where is my order?"))["input_ids"]
    assert first.label == "support"
    # The router's answer budget, for the longest label the classifier may answer ("support", 7 characters).
    assert out.max_new_tokens == classifier_max_tokens(7) == 9
    assert out.notes == ["1 label(s) of the evaluated records are not in the training data (general): they count "
                         "as wrong"]


@pytest.mark.parametrize("record, needle", [
    ({"question": "hi", "label": "sql"}, "line 1 has no field 'text' (spec.evaluation.dataset.textField)"),
    ({"text": "hi"}, "line 1 has no field 'label' (spec.evaluation.dataset.labelField)"),
    ({"text": "hi", "label": 3}, "line 1: field 'label' must be a string, got int"),
    ({"text": "hi", "label": "SQL"}, "line 1: field 'label' is 'SQL', not a label"),
    ({"text": "hi", "label": "a" * 64}, "not a label"),
    ({"text": "  ", "label": "sql"}, "line 1: field 'text' is empty"),
    ({"text": "x" * (MAX_DECISION_TEXT_CHARS + 1), "label": "sql"}, "more than the 4096 the content router reads"),
    (["text", "label"], "line 1 is a list, not a JSON object"),
])
def test_hostile_classification_records_are_refused_by_line_and_field(tmp_path, tokenizer, record, needle):
    with pytest.raises(InvalidDataset) as err:
        evaluate.prepare(classification_spec(), source(tmp_path, [{"text": "ok", "label": "sql"}, record]),
                         tokenizer, 2048)
    assert needle.replace("line 1", "line 2") in err.value.message


def test_a_classification_prompt_that_leaves_no_room_for_the_label_is_refused(tmp_path, tokenizer):
    with pytest.raises(InvalidDataset, match="line 1: the classifier prompt has .* no room for the label"):
        evaluate.prepare(classification_spec(), source(tmp_path, [{"text": "word " * 60, "label": "sql"}]),
                         tokenizer, 64)


class _Tokens:
    """A tokenizer and model stand-in: each example's prompt is one token (its line); an answer is one token
    decoding to a text of `answers` (the candidate's, by line) or `junk` (the base model's)."""

    def __init__(self, answers: dict[int, str], junk: str = " ?"):
        import torch

        self.answers, self.junk, self.texts = answers, junk, [junk, *answers.values()]
        self.pad_token_id, self.training, self.adapter_off, self.max_new_tokens = 0, True, False, set()
        self._weight = torch.zeros(1)

    # tokenizer
    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(self.texts[int(i) - 10_000] for i in ids)

    # model
    def parameters(self):
        return iter([self._weight])

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def set_adapter(self, name):
        pass

    def disable_adapter(self):
        from contextlib import contextmanager

        @contextmanager
        def off():
            self.adapter_off = True
            try:
                yield
            finally:
                self.adapter_off = False
        return off()

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        import torch

        self.max_new_tokens.add(max_new_tokens)
        line = int(input_ids[0, 0])
        text = self.junk if self.adapter_off else self.answers[line]
        return torch.cat([input_ids, torch.tensor([[10_000 + self.texts.index(text)]])], dim=1)


def test_evaluate_scores_accuracy_per_label_with_the_routers_budget():
    # support: 2 of 3 right; sql: 1 of 2; general: 0 of 1 (an empty answer routes nowhere).
    labels = {1: "support", 2: "support", 3: "support", 4: "sql", 5: "sql", 6: "general"}
    answers = {1: " support", 2: " Support!", 3: " supportive", 4: "sql\n", 5: " general", 6: ""}
    stub = _Tokens(answers)
    examples = [evaluate.Example(n, [n], "", label=label) for n, label in labels.items()]
    eval_set = evaluate.classification_set(data.Source("/v", [], "0" * 64), examples, ["support", "sql", "general"])
    spec = classification_spec()
    result = evaluate.evaluate(stub, stub, spec, eval_set, None, 8, classification=True)
    assert result.primary_metric == "accuracy" and result.score == 0.5 and result.base_score == 0.0
    assert result.candidate.metrics == {"accuracy": 0.5} and result.candidate.examples == 6
    assert result.candidate.labels == {"general": 0.0, "sql": 0.5, "support": 0.6667}
    assert result.base.labels is None                       # per label: the new adapter only
    assert stub.max_new_tokens == {classifier_max_tokens(len("support"))}   # not spec.maxNewTokens (64)
    assert stub.training and result.message is None


def test_per_label_accuracy_is_left_out_past_its_bound():
    labels = [f"label-{i}" for i in range(MAX_LABEL_SCORES + 1)]
    stub = _Tokens({n: f" {label}" for n, label in enumerate(labels, start=1)})
    examples = [evaluate.Example(n, [n], "", label=label) for n, label in enumerate(labels, start=1)]
    eval_set = evaluate.classification_set(data.Source("/v", [], "0" * 64), examples, labels)
    result = evaluate.evaluate(stub, stub, classification_spec(), eval_set, None, 8, classification=True)
    assert result.score == 1.0 and result.candidate.labels is None
    assert f"per-label accuracy left out: the examples have {MAX_LABEL_SCORES + 1} labels" in result.message


@pytest.mark.parametrize("validation", ["split", "uri"])
def test_a_classification_jobs_validation_records_are_its_accuracy_examples(tmp_path, tokenizer, validation):
    """prepare_data: without evaluation.dataset, a classification job's held-out records (by their line in the file
    they came from) are asked as the router asks; the loss rows and the accuracy examples are the same records."""
    from types import SimpleNamespace

    from loraplane.local.tinymodel import quick_job
    from loraplane.trainer import resolve_runtime
    from loraplane.trainer.run import BaseModel, prepare_data

    rows = [{"text": f"request {i}", "label": ("support", "sql")[i % 2]} for i in range(20)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = [{"text": "refund my order", "label": "support"}, {"text": "select 1", "label": "billing"}]
    options = {"validationSplit": 0.25}
    if validation == "uri":
        (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
        options = {"validationUri": str(tmp_path / "val.jsonl")}
    job = quick_job(tmp_path, train, fmt="classification", dataset_options=options)
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"evaluation": EvaluationSpec(maxExamples=4)})})
    base = BaseModel(None, tokenizer, SimpleNamespace(max_position_embeddings=256), 128)
    runtime = resolve_runtime(job, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ck")
    prepared = prepare_data(job, runtime, tmp_path / "scratch", base, 1)
    got = prepared.validation_labels
    source = dict(data.read_file(tmp_path / ("val.jsonl" if validation == "uri" else "train.jsonl"), "x").records)
    assert prepared.evaluation is None and got.classification
    assert [e.line for e in got.examples] == prepared.validation.lines[:4]
    for example in got.examples:
        record = source[example.line]
        assert example.label == record["label"]
        assert example.prompt_ids == tokenizer(classifier_prompt(record["text"]))["input_ids"]
    assert got.max_new_tokens == classifier_max_tokens(len("support"))
    if validation == "uri":   # a held-out label the classifier was never trained on is said, not hidden
        assert got.notes and "(billing)" in got.notes[0]
    else:
        assert len(got.examples) == 4 and not got.notes   # maxExamples of the 5 held out
