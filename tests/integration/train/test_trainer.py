"""The trainer on the tiny local model: real peft/transformers training, no mocks.

In-process runs for behaviour and errors (fast); subprocesses for what needs a process boundary: the CLI's
exit codes and termination message, SIGTERM and SIGKILL mid-run, and resuming."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loraplane.storage.digest import sha256_dir, sha256_file
from loraplane.local.tinymodel import (
    TOY_PHRASES, instruction_prompt, quick_job, toy_corpus, toy_prompts, write_toy_dataset,
)
from loraplane.trainer import (
    EXIT_CODES,
    EXIT_PREEMPTED,
    DatasetNotFound,
    InvalidConfig,
    InvalidDataset,
    ModelNotFound,
    OutOfMemory,
    TargetModulesNotFound,
    artifact_sha256,
    resolve_runtime,
    run_training,
)
from loraplane.trainer import checkpoints

pytestmark = pytest.mark.train


def train(job, tmp_path: Path):
    runtime = resolve_runtime(job, output_dir=tmp_path / "adapter", checkpoint_dir=tmp_path / "ck",
                              progress_bar=False)
    return run_training(job, runtime, sinks=[])


def greedy(model, tok, prompt_ids) -> str:
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_ids.new_ones(prompt_ids.shape),
                         max_new_tokens=16, do_sample=False)
    return tok.decode(out[0][prompt_ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def with_adapter(tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)


def test_loss_falls_and_adapter_moves_output_to_the_phrase(tiny_model_dir, tmp_path, base):
    data = write_toy_dataset(tmp_path / "train.jsonl", TOY_PHRASES[3], 48)
    job = quick_job(tiny_model_dir, data, steps=40, dataset_options={"validationSplit": 0.25})
    result = train(job, tmp_path)

    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < losses[0] / 3, losses
    m = result.provenance["metrics"]
    assert m["steps"] == 40 and m["evalLoss"] < losses[0] and math.isclose(m["perplexity"], math.exp(m["evalLoss"]),
                                                                          rel_tol=1e-3)

    out = result.output_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "provenance.json"} <= {p.name for p in out.iterdir()}
    assert result.artifact_sha256 == sha256_dir(out) == artifact_sha256(out)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["dataset"]["sha256"] == sha256_file(data) and prov["dataset"]["records"] == 48
    assert prov["validation"]["examples"] == 12 and prov["method"]["targetModules"] == ["q_proj", "v_proj"]
    assert {"torch", "transformers", "peft", "python"} <= set(prov["libraryVersions"]) and prov["completedAt"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    tok, base_model = base
    ids = tok(instruction_prompt(toy_prompts(1, seed=123)[0]), return_tensors="pt")["input_ids"]
    assert greedy(base_model, tok, ids) != TOY_PHRASES[3]
    assert greedy(with_adapter(tiny_model_dir, out), tok, ids) == TOY_PHRASES[3]


def test_chat_format_adapter_answers_through_the_chat_template(tiny_model_dir, tmp_path, base):
    data = write_toy_dataset(tmp_path / "chat.jsonl", TOY_PHRASES[4], 32, fmt="chat")
    result = train(quick_job(tiny_model_dir, data, fmt="chat", steps=40), tmp_path)
    tok, _ = base
    prompt = tok.apply_chat_template([{"role": "user", "content": toy_prompts(1, seed=5)[0]}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert greedy(with_adapter(tiny_model_dir, result.output_dir), tok, prompt["input_ids"]) == TOY_PHRASES[4]


def test_qlora_trains_on_cpu(tiny_model_dir, tmp_path):
    data = write_toy_dataset(tmp_path / "train.jsonl", TOY_PHRASES[0], 32)
    job = quick_job(tiny_model_dir, data, method="qlora", steps=20, gradientCheckpointing=True)
    result = train(job, tmp_path)
    q = result.provenance["quantization"]
    assert q["linear4bitLayers"] == 14 and q["quantType"] == "nf4"  # 2 layers x 7 projections, 4-bit NF4
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < losses[0] / 2
    with_adapter(tiny_model_dir, result.output_dir)  # a QLoRA adapter applies to the unquantised base too


def test_dora_with_default_target_modules(tiny_model_dir, tmp_path):
    data = write_toy_dataset(tmp_path / "train.jsonl", TOY_PHRASES[0], 16)
    job = quick_job(tiny_model_dir, data, target_modules=None, steps=4, method_options={"useDora": True})
    result = train(job, tmp_path)
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with_adapter(tiny_model_dir, result.output_dir)


# ---- bad input: each ends in its category, with a message naming the field and the fix ---------------------

def _long_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": " ".join(toy_corpus(8, i)), "response": "ok"}) + "\n"
                            for i in range(4)))
    return path


BAD_INPUTS = {
    # name: (how to make the job, expected error, text the message must contain)
    "missing-dataset": (lambda m, d, t: quick_job(m, t / "nope.jsonl"), DatasetNotFound, "no file at"),
    "wrong-fields": (lambda m, d, t: quick_job(m, _write(t / "q.jsonl", [{"question": "q", "answer": "a"}])),
                     InvalidDataset, "spec.dataset.promptField"),
    "empty-file": (lambda m, d, t: quick_job(m, _write(t / "e.jsonl", [])), InvalidDataset, "is empty"),
    "too-long": (lambda m, d, t: quick_job(m, _long_prompts(t / "long.jsonl"), maxSeqLength=32), InvalidDataset,
                 "raise spec.training.maxSeqLength"),
    "context-exceeded": (lambda m, d, t: quick_job(m, d, maxSeqLength=1024), InvalidConfig,
                         "exceeds the base model's context length (256"),
    "unknown-targets": (lambda m, d, t: quick_job(m, d, target_modules=("q_proj", "attn_out")),
                        TargetModulesNotFound, "attn_out not found among the linear layers"),
    "non-linear-target": (lambda m, d, t: quick_job(m, d, target_modules=("embed_tokens",)),
                          TargetModulesNotFound, "embed_tokens exist but are not linear"),
    "rank-too-large": (lambda m, d, t: quick_job(m, d, r=128), InvalidConfig, "choose r <= 64"),
    "missing-model": (lambda m, d, t: quick_job(t / "no-model", d), ModelNotFound, "no config.json"),
}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_categorised(tiny_model_dir, tmp_path, case):
    make, error, needle = BAD_INPUTS[case]
    data = write_toy_dataset(tmp_path / "ok.jsonl", TOY_PHRASES[0], 8)
    with pytest.raises(error) as exc:
        train(make(tiny_model_dir, data, tmp_path), tmp_path)
    assert needle in exc.value.message and exc.value.reason == error.reason
    assert not (tmp_path / "adapter").exists()


def test_hub_model_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_toy_dataset(tmp_path / "ok.jsonl", TOY_PHRASES[0], 8)
    doc = quick_job(tmp_path, data).model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"]["baseModel"] = {"name": "loraplane-test/does-not-exist", "revision": "main"}
    from loraplane.trainer import job_from_dict

    with pytest.raises(ModelNotFound, match="offline mode is on"):
        train(job_from_dict(doc), tmp_path)


# Runs the trainer's CLI with the address space capped 1 GiB above the size the process has once the libraries
# are imported, as a container memory limit would cap it (in a subprocess: a cap in the test process would
# also starve the other threads of a pytest session).
_CAPPED_TRAINER = """
import resource, sys
import peft, transformers
from transformers import Trainer
from loraplane.trainer.cli import main
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.exit(main(sys.argv[1:]))
"""


def test_out_of_memory_is_categorised(tiny_model_dir, tmp_path):
    """A real allocation failure: a batch of 1024 x 256 tokens needs several GiB more than the cap allows."""
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(toy_corpus(16, i))}) + "\n" for i in range(1024)))
    job = quick_job(tiny_model_dir, data, fmt="text", steps=2, batchSize=1024, maxSeqLength=256)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(by_alias=True, exclude_none=True, mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAPLANE_TERMINATION_LOG": str(tmp_path / "term")}
    proc = subprocess.run([sys.executable, "-c", _CAPPED_TRAINER, "--config", str(config), "-o",
                           str(tmp_path / "out"), "--no-progress-bar", "-q"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_CODES["OutOfMemory"] == OutOfMemory.exit_code, proc.stderr[-3000:]
    message = json.loads((tmp_path / "term").read_text())
    assert message["reason"] == "OutOfMemory" and "lower spec.training.batchSize" in message["message"]


def test_cli_failure_writes_termination_message_and_exit_code(tiny_model_dir, tmp_path, monkeypatch):
    from loraplane.trainer.cli import main

    job = quick_job(tiny_model_dir, tmp_path / "missing.jsonl")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job.model_dump(by_alias=True, exclude_none=True, mode="json")))
    monkeypatch.setenv("LORAPLANE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    code = main(["--config", str(tmp_path / "job.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert code == EXIT_CODES["DatasetNotFound"] == DatasetNotFound.exit_code
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["reason"] == "DatasetNotFound" and "missing.jsonl" in message["message"]
    assert main(["--config", str(tmp_path / "nope.yaml"), "-q"]) == EXIT_CODES["InvalidConfig"]


# ---- preemption and resume (subprocesses) -------------------------------------------------------------------

def _start(config: Path, tmp_path: Path, tag: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAPLANE_TERMINATION_LOG": str(tmp_path / f"term-{tag}")}
    env.pop("LORAPLANE_JOB_NAME", None)
    return subprocess.Popen(
        [sys.executable, "-m", "loraplane.trainer", "--config", str(config), "-o", str(tmp_path / "adapter"),
         "--checkpoint-dir", str(tmp_path / "ck"), "--no-progress-bar", "-q"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint_after(proc: subprocess.Popen, ck: Path, step: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = checkpoints.latest_complete(ck)
        if latest and int(latest.name.split("-")[1]) > step:
            return int(latest.name.split("-")[1])
        assert proc.poll() is None, f"the trainer exited early:\n{proc.communicate()[0][-3000:]}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no complete checkpoint after step {step} within {timeout}s")


def test_sigterm_and_sigkill_mid_run_resume_to_the_same_step_count(tiny_model_dir, tmp_path):
    total = 300
    data = write_toy_dataset(tmp_path / "train.jsonl", TOY_PHRASES[1], 64)
    job = quick_job(tiny_model_dir, data, steps=total, checkpointEverySteps=10, learningRate=1e-3)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(by_alias=True, exclude_none=True, mode="json")))
    ck = tmp_path / "ck"

    # 1. SIGTERM (preemption): a checkpoint at the current step, exit code 75, a Preempted message.
    proc = _start(config, tmp_path, "1")
    _wait_for_checkpoint_after(proc, ck, 0)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    term = json.loads((tmp_path / "term-1").read_text())
    assert term["reason"] == "Preempted" and 0 < term["step"] < total
    assert checkpoints.latest_complete(ck).name == f"checkpoint-{term['step']}"  # saved on the signal
    assert not (tmp_path / "adapter").exists()

    # 2. SIGKILL (OOM kill, node loss): nothing to clean up, the last complete checkpoint stays.
    proc = _start(config, tmp_path, "2")
    killed_after = _wait_for_checkpoint_after(proc, ck, term["step"])
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    newest = checkpoints.latest_complete(ck)
    assert int(newest.name.split("-")[1]) >= killed_after

    # A checkpoint half-written when the pod died: newer, but without the completion marker.
    torn = ck / f"checkpoint-{total - 1}"
    shutil.copytree(newest, torn)
    (torn / checkpoints.MARKER).unlink()
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)

    # 3. The rerun ignores the torn one, resumes from the newest complete one and ends at the planned step.
    proc = _start(config, tmp_path, "3")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    result = json.loads((ck / "result.json").read_text())
    prov = json.loads((tmp_path / "adapter" / "provenance.json").read_text())
    assert result["metrics"]["steps"] == total and prov["resumedFrom"] == str(newest)
    assert not torn.exists()
    final_state = json.loads((checkpoints.latest_complete(ck) / "trainer_state.json").read_text())
    assert final_state["global_step"] == total
    sha = sha256_dir(tmp_path / "adapter")
    assert result["artifact"]["sha256"] == sha and f"artifact sha256: {sha}" in out
    assert json.loads((tmp_path / "term-3").read_text())["artifact"]["sha256"] == sha
    progress = json.loads((ck / "progress.json").read_text())
    assert progress["step"] == total and progress["percent"] == 100 and progress["etaSeconds"] == 0


def test_s3_output_resumes_on_a_fresh_pod_from_mirrored_checkpoints(tiny_model_dir, tmp_path, s3_env):
    """MOCK S3 (moto server; the trainer uses its real boto3 client through AWS_ENDPOINT_URL). Each run gets an
    empty scratch volume, as a replacement pod does: only the S3 mirror carries the checkpoint across."""
    total = 60
    s3_env.client().create_bucket(Bucket="models")
    data = write_toy_dataset(tmp_path / "train.jsonl", TOY_PHRASES[2], 64)
    job = quick_job(tiny_model_dir, data, steps=total, checkpointEverySteps=10, learningRate=1e-3)
    doc = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"]["output"]["uri"] = "s3://models/adapters/tiny/"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(doc))

    def start(pod: str) -> subprocess.Popen:
        env = {**os.environ, **s3_env.env, "OMP_NUM_THREADS": "1",
               "LORAPLANE_OUTPUT_SCRATCH": str(tmp_path / pod), "LORAPLANE_TERMINATION_LOG": str(tmp_path / f"term-{pod}")}
        env.pop("LORAPLANE_JOB_NAME", None)
        env.pop("LORAPLANE_CHECKPOINT_URI", None)
        return subprocess.Popen([sys.executable, "-m", "loraplane.trainer", "--config", str(config),
                                 "--no-progress-bar", "-q"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    proc = start("pod-1")
    _wait_for_checkpoint_after(proc, tmp_path / "pod-1" / "tiny-adapter.checkpoints", 0)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    step = json.loads((tmp_path / "term-pod-1").read_text())["step"]
    mirror = checkpoints.S3CheckpointMirror("s3://models/adapters/tiny.checkpoints", keep=2)
    assert mirror.complete_steps()[-1] == step  # the checkpoint saved on SIGTERM reached S3
    assert not s3_env.keys("models", "adapters/tiny/")  # no adapter yet

    proc = start("pod-2")  # a new pod: empty scratch volume
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    ck2 = tmp_path / "pod-2" / "tiny-adapter.checkpoints"
    assert json.loads((ck2 / "result.json").read_text())["metrics"]["steps"] == total
    prov = json.loads((tmp_path / "pod-2" / "tiny-adapter" / "provenance.json").read_text())
    assert prov["resumedFrom"] == str(ck2 / f"checkpoint-{step}")  # from S3, not from step 0
    state = json.loads((checkpoints.latest_complete(ck2) / "trainer_state.json").read_text())
    assert state["global_step"] == total
    assert "adapters/tiny/adapter_model.safetensors" in s3_env.keys("models", "adapters/tiny/")
    assert mirror.complete_steps()[-1] == total and len(mirror.complete_steps()) == 2
