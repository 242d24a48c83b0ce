"""spec.evaluation on real peft training of the tiny model, no mocks: an adapter trained on the right data scores
above the base model, one trained on a deliberately wrong dataset scores below it on the primary metric, and the
numbers travel from the trainer's termination message through the FineTuneJob controller into status.evaluation
and the Adapter's provenance. The wrong run also scores the right adapter as the version it would replace."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplane.api import FineTuneJob
from loraplane.api.wire.trainer import PREVIOUS_VERSION_KEY, PreviousVersion, TerminationMessage
from loraplane.local.tinymodel import TOY_PHRASES, instruction_prompt, quick_job, toy_prompts, write_toy_dataset
from loraplane.trainer import resolve_runtime, run_training
from loraplane.trainer import evaluate as evalmod
from loraplane.controllers.finetunejob import FineTuneJobController, FineTuneJobFacts, run_state
from support.paths import ROOT
from unit.controllers.test_controllers import context

pytestmark = pytest.mark.train

REFERENCE = TOY_PHRASES[0]                   # "the blue door sings at noon"
WRONG = "our teacher walks to market"        # corpus words, none of them in the reference
EVALUATION = {"metrics": ["rouge_l", "exact_match", "contains", "regex"], "maxNewTokens": 16, "maxExamples": 16}


def eval_set(path: Path) -> Path:
    # Questions the training data never asked (another seed), answered with the reference phrase.
    path.write_text("".join(json.dumps({"prompt": instruction_prompt(q), "response": REFERENCE,
                                        "pattern": r"\bblue door\b"}) + "\n" for q in toy_prompts(16, seed=99)))
    return path


def job_doc(model: Path, data: Path, evaluation: Path, name: str) -> dict:
    job = quick_job(model, data, name=name, steps=40, dataset_options={"validationSplit": 0.25})
    doc = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"]["evaluation"] = {**EVALUATION, "dataset": {"uri": str(evaluation)}}
    return doc


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The right run in-process; the wrong one through `python -m loraplane.trainer` (the pod's command) with the
    right adapter as previousVersion, its termination message read back as the operator reads it."""
    tmp = tmp_path_factory.mktemp("evaluation")
    evaluation = eval_set(tmp / "eval.jsonl")
    right_doc = job_doc(tiny_model_dir, write_toy_dataset(tmp / "right.jsonl", REFERENCE, 48), evaluation, "right")
    right_job = FineTuneJob.model_validate(right_doc)
    right = run_training(right_job, resolve_runtime(right_job, output_dir=tmp / "right", checkpoint_dir=tmp / "rck",
                                                    progress_bar=False), sinks=[])

    wrong_doc = job_doc(tiny_model_dir, write_toy_dataset(tmp / "wrong.jsonl", WRONG, 48), evaluation, "wrong")
    config = tmp / "config.json"
    config.write_text(json.dumps({**wrong_doc, PREVIOUS_VERSION_KEY: {"uri": str(right.output_dir),
                                                                      "version": "1"}}))
    log = tmp / "termination-log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator"), "OMP_NUM_THREADS": "1",
           "LORAPLANE_TERMINATION_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-m", "loraplane.trainer", "--config", str(config), "--output-dir",
                           str(tmp / "wrong"), "--no-progress-bar"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"right": right, "wrong_message": TerminationMessage.parse(log.read_text()), "wrong_doc": wrong_doc,
            "wrong_dir": tmp / "wrong", "stdout": proc.stdout, "model": tiny_model_dir, "eval": evaluation}


def primary(scores) -> float:
    return scores.metrics["rouge_l"]


def test_the_adapter_trained_on_the_right_data_beats_the_base(runs):
    ev = runs["right"].evaluation
    print("\nright:", json.dumps(ev.wire()))
    assert ev.primary_metric == "rouge_l" and ev.score == primary(ev.candidate) and ev.base_score == primary(ev.base)
    assert primary(ev.candidate) > primary(ev.base) + 0.3
    assert ev.candidate.metrics["exact_match"] > ev.base.metrics["exact_match"]
    assert ev.candidate.metrics["eval_loss"] < ev.base.metrics["eval_loss"]      # on its validation split
    assert ev.candidate.examples == ev.base.examples == 16 and ev.previous is None
    written = json.loads((runs["right"].output_dir / "provenance.json").read_text())
    assert written["evaluation"] == ev.wire() and written["evaluationSet"]["examples"] == 16


def test_the_adapter_trained_on_the_wrong_data_scores_below_the_base_and_the_operator_records_it(runs):
    message = runs["wrong_message"]
    ev = message.evaluation
    print("\nwrong:", json.dumps(ev.wire()))
    assert primary(ev.candidate) < primary(ev.base)
    # The right adapter, passed as the version being replaced, is scored on the same examples.
    assert ev.previous_version == "1" and ev.previous.examples == ev.candidate.examples == 16
    assert primary(ev.previous) > primary(ev.base) > primary(ev.candidate)
    assert "evaluation: rouge_l: adapter" in runs["stdout"]
    # The artifact holds the new adapter only (the previous one was loaded beside it to be scored).
    assert not (runs["wrong_dir"] / "previous").exists()
    assert sorted(p.name for p in runs["wrong_dir"].iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "provenance.json"]

    # The operator's side: the pod's termination message -> FineTuneJob status and Adapter provenance.
    body = {**runs["wrong_doc"], "metadata": {"name": "wrong", "namespace": "ns", "uid": "u", "generation": 1},
            "status": {"phase": "Running"}}
    ftj = FineTuneJob.model_validate({k: v for k, v in body.items() if k != "status"})
    job = {"spec": {}, "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    pod = {"metadata": {"name": "p", "creationTimestamp": "t"},
           "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 0, "message": json.dumps(message.to_json())}}}]}}
    plan = FineTuneJobController(context()).plan(FineTuneJobFacts(body, ftj, run=run_state(ftj, job, [pod]),
                                                                  now="t"))
    assert plan.status["evaluation"]["score"] < plan.status["evaluation"]["baseScore"]
    assert plan.adapter.provenance["evaluation"] == plan.status["evaluation"] == ev.wire()


def test_the_time_budget_and_an_unreachable_previous_version_are_reported_not_fatal(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(runs["model"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["model"]), runs["right"].output_dir)
    spec = FineTuneJob.model_validate(runs["wrong_doc"]).spec.evaluation
    examples = evalmod.prepare(spec, evalmod.read_source(spec, runs["wrong_dir"], runs["wrong_dir"], None,
                                                         runs["wrong_dir"]), tok, 2048)
    ticks = iter(range(0, 10**6, spec.timeout_seconds))   # every reading of the clock is one budget later
    unreachable = PreviousVersion(uri="pvc://not-mounted/a/run-1", version="7")
    result = evalmod.evaluate(model, tok, spec, examples, None, 8, previous=unreachable, scratch=runs["wrong_dir"],
                              pvc_root=runs["wrong_dir"], clock=lambda: next(ticks))
    assert result.candidate.examples == result.base.examples == 1
    assert "time budget (900 s) reached: generation metrics cover 1 of 16 examples" in result.message
    # A previous version that cannot be scored is left out with the reason; the evaluation goes on.
    assert result.previous is None and result.previous_version is None
    assert "previous version 7 not scored: pvc://not-mounted/a/run-1 is not mounted in this pod" in result.message


def test_loraplane_run_shows_the_quickstart_evaluation(tmp_path):
    """`loraplane run`'s training step on the quickstart file: the trainer container with the evaluation set from
    the file's ConfigMap, and the scores printed (the rest of the run, serving, is the e2e test's)."""
    import io

    from loraplane.local.pipeline import LocalRun, load_plan

    plan = load_plan(ROOT / "docs" / "examples" / "quickstart.yaml")
    out = io.StringIO()
    run = LocalRun(plan, tmp_path, None, out)
    try:
        run.prepare_models()
        run.train(plan.jobs[0])
    finally:
        run.stop()
    text = out.getvalue()
    print(text)
    line = next(x for x in text.splitlines() if "evaluation (8 examples)" in x)
    adapter, base = (float(v) for v in re.findall(r"(?:adapter|base) ([0-9.]+)", line))
    assert adapter > base, line
    assert "    base: contains=" in text


_LOAD_PREVIOUS = """
import json, sys, time
from pathlib import Path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from loraplane.api.wire.trainer import PreviousVersion
from loraplane.trainer import evaluate
model_dir, work, target, rank_key = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
prev = work / "prev"
model.save_pretrained(str(prev))
cfg = json.loads((prev / "adapter_config.json").read_text())
cfg.update(target_modules=target, rank_pattern={rank_key: 4})
(prev / "adapter_config.json").write_text(json.dumps(cfg))
try:
    evaluate.load_previous(model, PreviousVersion(uri=str(prev)), work, work, cfg.get("base_model_name_or_path") or "")
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A
    same = bool((a["default"].weight == a["previous"].weight).all())
    print(json.dumps({"loaded": True, "same_weights": same}))
except ValueError as exc:
    print(json.dumps({"loaded": False, "why": str(exc)}))
"""


@pytest.mark.parametrize("target,rank_key,loads", [
    (r".*\.(q_proj|v_proj)", "q_proj", True),      # a regex PEFT itself accepts: resolved, the same weights load
    ("(.|.)*q_proj$x", "q_proj", False),           # backtracking target_modules: refused at once
    (r".*\.(q_proj|v_proj)", "(.|.)*x", True),     # backtracking rank_pattern key: matches nothing, at once
])
def test_a_hostile_previous_version_config_cannot_hold_the_trainer(tiny_model_dir, tmp_path, target, rank_key, loads):
    """The version being replaced is fetched and loaded into the trained model after training, before the new
    adapter is saved; its adapter_config.json comes from whoever set the Adapter's source. PEFT would run its
    regex fields with Python's backtracking re: `(.|.)*q_proj$x` held the trainer for hours. Bounded to 120 s."""
    try:
        done = subprocess.run([sys.executable, "-c", _LOAD_PREVIOUS, str(tiny_model_dir), str(tmp_path), target,
                               rank_key], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "operator")})
    except subprocess.TimeoutExpired:
        pytest.fail("loading the previous version ran an untrusted pattern with a backtracking engine (> 120 s)")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] is loads, result
    if loads:
        assert result["same_weights"] is True
    else:
        assert "target_modules" in result["why"]
