"""Trainer pieces that need no training: config parsing, data formatting and masks, checkpoint selection,
progress rate limiting, error categories. Fast; not marked `train`."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import yaml

from loraplane.api.finetunejob import DatasetSpec, TrainingProgress
from loraplane.local.tinymodel import TOY_PHRASES, build_tokenizer, toy_corpus, write_toy_dataset
from loraplane.trainer import checkpoints, data, errors, progress
from loraplane.trainer.config import load_job, resolve_runtime
from support.paths import ROOT
from loraplane.trainer.errors import (
    EXIT_CODES,
    DatasetAccessDenied,
    DatasetNotFound,
    InvalidConfig,
    InvalidDataset,
)

JOB = {
    "apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns"},
    "spec": {"baseModel": {"name": "org/model"}, "dataset": {"uri": "/data/train.jsonl"},
             "output": {"adapterName": "a", "uri": "pvc://claim/ns/j"}},
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(toy_corpus(300, 0))  # the tiny model's tokenizer, without training a model


def write_job(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# ---- config ----------------------------------------------------------------------------------------------

def test_load_job_accepts_the_finetunejob(tmp_path):
    job = load_job(write_job(tmp_path, JOB))
    assert job.spec.base_model.name == "org/model" and job.spec.training.max_seq_length == 1024


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["spec"]["method"].update(r=0) if "method" in d["spec"] else d["spec"].update(method={"r": 0}),
     "spec.method.r"),
    (lambda d: d["spec"].update(training={"epochs": 1, "maxSteps": 3}), "at most one of training.epochs"),
    (lambda d: d["spec"]["dataset"].update(fromat="chat"), "spec.dataset.fromat"),
    (lambda d: d.update(kind="Adapter"), "exactly one FineTuneJob"),
])
def test_bad_config_names_the_field(tmp_path, mutate, needle):
    doc = json.loads(json.dumps(JOB))
    mutate(doc)
    with pytest.raises(InvalidConfig, match=needle.replace(".", r"\.")):
        load_job(write_job(tmp_path, doc))


def test_missing_config_file(tmp_path):
    with pytest.raises(InvalidConfig, match="cannot read the config file"):
        load_job(tmp_path / "nope.yaml")


def test_runtime_paths_from_spec_env_and_flags(tmp_path, monkeypatch):
    job = load_job(write_job(tmp_path, JOB))
    for var in ("LORAPLANE_OUTPUT_DIR", "LORAPLANE_CHECKPOINT_DIR", "LORAPLANE_JOB_NAME", "LORAPLANE_JOB_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LORAPLANE_PVC_ROOT", str(tmp_path / "pvc"))
    rt = resolve_runtime(job)
    assert rt.output_dir == tmp_path / "pvc" / "claim" / "ns" / "j"
    assert rt.checkpoint_dir == tmp_path / "pvc" / "claim" / "ns" / "j.checkpoints"
    assert rt.progress_file == rt.checkpoint_dir / "progress.json" and not rt.in_cluster
    monkeypatch.setenv("LORAPLANE_JOB_NAMESPACE", "ns")
    monkeypatch.setenv("LORAPLANE_JOB_NAME", "j")
    rt = resolve_runtime(job, output_dir=tmp_path / "o")
    assert rt.output_dir == tmp_path / "o" and rt.in_cluster
    with pytest.raises(InvalidConfig, match="must not be inside the adapter output dir"):
        resolve_runtime(job, output_dir=tmp_path / "o", checkpoint_dir=tmp_path / "o" / "ck")


def test_local_path_mapping(tmp_path):
    from loraplane.storage.uri import parse_uri

    assert parse_uri("pvc://c/a/b").local_path(tmp_path) == tmp_path / "c/a/b"
    assert parse_uri("file:///x/y").local_path(tmp_path) == Path("/x/y")
    assert parse_uri("s3://b/k").local_path(tmp_path) is None and parse_uri("https://h/x").local_path() is None


# ---- data ------------------------------------------------------------------------------------------------

def source(tmp_path: Path, lines: list, name: str = "d.jsonl") -> data.Source:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return data.read_file(path, "spec.dataset.uri")


def test_instruction_masks_the_prompt(tmp_path, tokenizer):
    src = source(tmp_path, [{"prompt": "what is near the lake?\n", "response": "the red fox"}])
    ex = data.tokenize(src, DatasetSpec(uri="/x"), tokenizer, 64)
    row = ex.rows[0]
    learned = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != data.IGNORE_INDEX]
    assert tokenizer.decode(learned) == "the red fox</s>"
    assert row["input_ids"][0] == tokenizer.bos_token_id and row["labels"][0] == data.IGNORE_INDEX


def test_chat_learns_assistant_turns_only(tmp_path, tokenizer):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "the dog"}]
    ex = data.tokenize(source(tmp_path, [{"messages": msgs}]), DatasetSpec(uri="/x", format="chat"), tokenizer, 128)
    row = ex.rows[0]
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(msgs, tokenize=False)
    spans, current = [], []
    for t, lab in zip(row["input_ids"], row["labels"]):
        if lab != data.IGNORE_INDEX:
            current.append(t)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    spans += [tokenizer.decode(current)] if current else []
    assert spans == ["the cat</s>", "the dog</s>"]


def test_text_is_truncated_and_packing_fills_blocks(tmp_path, tokenizer):
    src = source(tmp_path, [{"text": "the cat sees the house. " * 20}, {"text": "a bird sings."}])
    ex = data.tokenize(src, DatasetSpec(uri="/x", format="text"), tokenizer, 16)
    assert [len(r["input_ids"]) for r in ex.rows][0] == 16
    packed = data.tokenize(src, DatasetSpec(uri="/x", format="text"), tokenizer, 16, packing=True)
    assert all(len(r["input_ids"]) == 16 for r in packed.rows[:-1]) and len(packed.rows) > 2


def test_packing_rejects_masked_formats(tmp_path, tokenizer):
    src = source(tmp_path, [{"prompt": "a", "response": "b"}])
    with pytest.raises(InvalidConfig, match="packing works with the text format only"):
        data.tokenize(src, DatasetSpec(uri="/x"), tokenizer, 64, packing=True)


def test_wrong_fields_name_lines_settings_and_found_fields(tmp_path, tokenizer):
    src = source(tmp_path, [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(InvalidDataset) as exc:
        data.tokenize(src, DatasetSpec(uri="/x"), tokenizer, 64)
    msg = exc.value.message
    assert "line 1 has no field 'prompt' (spec.dataset.promptField)" in msg
    assert "answer, question" in msg and "spec.dataset.responseField='response'" in msg
    assert exc.value.reason == "InvalidDataset"
    # The fix the message suggests works.
    data.tokenize(src, DatasetSpec(uri="/x", promptField="question", responseField="answer"), tokenizer, 64)


@pytest.mark.parametrize("lines, needle", [
    (["not json", {"prompt": "a", "response": "b"}], "line 1: Expecting value"),
    ([["a list"]], "line 1 is a list, not a JSON object"),
    ([{"prompt": 3, "response": "b"}], "field 'prompt' must be a string, got int"),
])
def test_malformed_records(tmp_path, tokenizer, lines, needle):
    with pytest.raises(InvalidDataset, match=needle):
        data.tokenize(source(tmp_path, lines), DatasetSpec(uri="/x"), tokenizer, 64)


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "robot", "content": "hi"}], "'robot' is not one of"),
    ("hello", "non-empty list"),
])
def test_malformed_chat(tmp_path, tokenizer, messages, needle):
    with pytest.raises(InvalidDataset, match=needle):
        data.tokenize(source(tmp_path, [{"messages": messages}]), DatasetSpec(uri="/x", format="chat"), tokenizer, 64)


def test_jsonl_lines_end_at_newline_only(tmp_path, tokenizer):
    # json.dumps(ensure_ascii=False) writes U+2028/U+2029, U+0085 and \x1c-\x1e unescaped; str.splitlines()
    # split records there ("2 lines are not JSON") and shifted every later line number.
    odd = "a\u2028b\u2029c\x85d\x1ce\x1df\x1eg"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": odd, "response": "r"}, ensure_ascii=False) + "\r\n"
                    + json.dumps({"prompt": "p", "response": odd}, ensure_ascii=False) + "\n"
                    + "not json\n", encoding="utf-8")
    with pytest.raises(InvalidDataset, match=r"has 1 line\(s\) that are not JSON \(line 3: "):
        data.read_file(path, "spec.dataset.uri")
    path.write_text(path.read_text(encoding="utf-8").removesuffix("not json\n"), encoding="utf-8")
    src = data.read_file(path, "spec.dataset.uri")
    assert [(n, r["prompt"]) for n, r in src.records] == [(1, odd), (2, "p")]
    data.tokenize(src, DatasetSpec(uri="/x"), tokenizer, 64)


def test_chat_template_refusals_are_invalid_dataset_with_lines(tmp_path, tokenizer):
    # Templates refuse conversations with raise_exception (a jinja2 TemplateError); that is the data's fault:
    # InvalidDataset (not retried), naming the line and the template's own message, not InternalError.
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]
    lines = [{"messages": ok},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                           {"role": "assistant", "content": "the dog"}]},
             {"messages": [{"role": "system", "content": "be brief"}, *ok]}]
    spec = DatasetSpec(uri="/x", format="chat")
    with pytest.raises(InvalidDataset) as exc:
        data.tokenize(source(tmp_path, lines), spec, strict, 128)
    msg = exc.value.message
    assert "2 of 3 records are invalid" in msg
    assert "line 2: Conversation roles must alternate" in msg and "line 3: System role not supported" in msg
    assert exc.value.reason == "InvalidDataset" and not exc.value.retryable
    assert data.tokenize(source(tmp_path, lines[:1]), spec, strict, 128).lines == [1]
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = "{% for m in messages %}{{ m['content'] }"   # not valid Jinja: the model's fault
    with pytest.raises(InvalidConfig, match="chat template is not valid Jinja"):
        data.tokenize(source(tmp_path, lines[:1]), spec, broken, 128)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidDataset, match="is empty"):
        data.read_file(tmp_path / "empty.jsonl", "spec.dataset.uri")
    with pytest.raises(DatasetNotFound, match="no file at"):
        data.fetch(str(tmp_path / "missing.jsonl"), tmp_path, tmp_path)


def test_too_long_records_are_rejected_with_line_numbers(tmp_path, tokenizer):
    lines = [{"prompt": "q", "response": "a"}, {"prompt": "the cat " * 40, "response": "a"}]
    with pytest.raises(InvalidDataset, match=r"1 of 2 records are longer than spec\.training\.maxSeqLength=32 "
                                              r"tokens \(lines 2; the longest, line 2"):
        data.tokenize(source(tmp_path, lines), DatasetSpec(uri="/x"), tokenizer, 32)


def test_validation_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = write_toy_dataset(tmp_path / "d.jsonl", TOY_PHRASES[0], 20)
    ex = data.tokenize(data.read_file(path, "x"), DatasetSpec(uri="/x"), tokenizer, 64)
    train, val = data.split(ex, 0.25, seed=1)
    assert len(val.rows) == 5 and len(train.rows) == 15 and not set(train.lines) & set(val.lines)
    assert data.split(ex, 0.25, seed=1)[1].lines == val.lines
    with pytest.raises(InvalidDataset, match="leaves no training records"):
        data.split(data.Examples(ex.rows[:1], ex.lines[:1]), 0.25, seed=1)


def test_collator_pads_and_masks():
    batch = data.PaddingCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                     {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_https_dataset_fetch_and_404(tmp_path, http_root, monkeypatch):
    root, base = http_root
    # A loopback http server: refused unless the trainer has the opt-in (the chart's allowInsecureHttp).
    with pytest.raises(InvalidConfig, match="allowInsecureHttp"):
        data.fetch(f"{base}/train.jsonl", tmp_path / "dl", tmp_path)
    monkeypatch.setenv("LORAPLANE_ALLOW_INSECURE_HTTP", "true")
    write_toy_dataset(root / "train.jsonl", TOY_PHRASES[0], 4)
    src = data.fetch(f"{base}/train.jsonl", tmp_path / "dl", tmp_path)
    assert len(src.records) == 4 and src.uri.endswith("/train.jsonl")
    from loraplane.storage.digest import sha256_file

    assert src.sha256 == sha256_file(root / "train.jsonl")
    with pytest.raises(DatasetNotFound, match="404"):
        data.fetch(f"{base}/nope.jsonl", tmp_path / "dl", tmp_path)


def test_s3_dataset_errors_are_categorised(tmp_path, monkeypatch):
    """MOCK: S3 cannot run here; botocore's Stubber answers as S3 does for a missing key and a denied read."""
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    stub = Stubber(client)
    stub.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stub.add_client_error("head_object", service_error_code="403", http_status_code=403)
    stub.activate()
    from loraplane.storage.fetchers import s3

    monkeypatch.setattr(s3, "s3_client", lambda credentials=None, **_: client)
    with pytest.raises(DatasetNotFound, match="s3://bucket/train.jsonl does not exist"):
        data.fetch("s3://bucket/train.jsonl", tmp_path, tmp_path)
    with pytest.raises(DatasetAccessDenied, match="credentialsSecretRef"):
        data.fetch("s3://bucket/train.jsonl", tmp_path, tmp_path)
    with pytest.raises(InvalidConfig, match="must be s3://BUCKET/KEY"):
        data.fetch("s3://bucket-only", tmp_path, tmp_path)


# ---- checkpoints -----------------------------------------------------------------------------------------

def test_only_marked_checkpoints_are_resumed(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"x")
    checkpoints.mark_complete(tmp_path / "checkpoint-10", 10)
    checkpoints.mark_complete(tmp_path / "checkpoint-20", 20)
    assert checkpoints.latest_complete(tmp_path) == tmp_path / "checkpoint-20"  # 30 was half-written
    assert checkpoints.remove_incomplete(tmp_path) == [tmp_path / "checkpoint-30"]
    assert [p.name for _, p in checkpoints.checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]
    checkpoints.rotate(tmp_path, keep=1)
    assert [p.name for _, p in checkpoints.checkpoints(tmp_path)] == ["checkpoint-20"]
    assert checkpoints.latest_complete(tmp_path / "nothing") is None


def _fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    (path / "nested").mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w" * step)
    (path / "nested" / "rng_state.pth").write_bytes(b"r")
    if complete:
        checkpoints.mark_complete(path, step)
    return path


def test_s3_checkpoint_mirror_push_rotate_and_restore(s3_env, tmp_path):
    """MOCK S3 (moto): the mirror's object layout, marker-last rule, rotation and restore."""
    s3_env.client().create_bucket(Bucket="ckpt")
    mirror = checkpoints.S3CheckpointMirror("s3://ckpt/runs/job-a.checkpoints/", keep=2)
    pod1 = tmp_path / "pod1"
    for step in (10, 20, 30):
        assert mirror.push(_fake_checkpoint(pod1, step))
    assert mirror.complete_steps() == [20, 30]  # rotated remotely too
    assert s3_env.keys("ckpt", "runs/job-a.checkpoints/checkpoint-30/") == [
        f"runs/job-a.checkpoints/checkpoint-30/{f}" for f in
        ("adapter_model.safetensors", checkpoints.MARKER, "nested/rng_state.pth")]
    # An upload torn by a dying pod (files, no marker) is newer but never restored.
    torn = _fake_checkpoint(tmp_path / "torn", 40, complete=False)
    s3_env.client().upload_file(str(torn / "adapter_model.safetensors"), "ckpt",
                                "runs/job-a.checkpoints/checkpoint-40/adapter_model.safetensors")
    # A replaced pod starts with an empty scratch volume: it gets the newest complete checkpoint.
    pod2 = tmp_path / "pod2"
    restored = mirror.restore(pod2)
    assert restored == pod2 / "checkpoint-30" and checkpoints.latest_complete(pod2) == restored
    assert (restored / "adapter_model.safetensors").read_bytes() == b"w" * 30
    assert (restored / "nested" / "rng_state.pth").read_bytes() == b"r"
    assert mirror.restore(pod2) is None  # the local one is as new: nothing downloaded
    assert mirror.restore(pod1) is None
    # The next complete push cleans the torn upload older than it away.
    assert mirror.push(_fake_checkpoint(pod2, 50))
    assert mirror.complete_steps() == [30, 50]
    assert not s3_env.keys("ckpt", "runs/job-a.checkpoints/checkpoint-40/")


def test_s3_checkpoint_mirror_errors_name_the_fix(s3_env, tmp_path):
    """MOCK S3 (moto): a missing bucket fails before training (not retryable); a failed upload only warns."""
    mirror = checkpoints.S3CheckpointMirror("s3://no-such-bucket/x.checkpoints", keep=2)
    with pytest.raises(errors.InvalidConfig, match="no-such-bucket.*NoSuchBucket.*spec.output.uri.s bucket"):
        mirror.restore(tmp_path / "ck")
    assert mirror.push(_fake_checkpoint(tmp_path / "ck", 10)) is False  # logged; training goes on
    assert checkpoints.latest_complete(tmp_path / "ck").name == "checkpoint-10"


def test_adapter_upload_to_a_missing_bucket_is_output_write_failed(s3_env, tmp_path):
    """MOCK S3 (moto): boto3 wraps the PutObject error; it must still become OutputWriteFailed (exit 73)."""
    from loraplane.trainer.run import upload_s3

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    with pytest.raises(errors.OutputWriteFailed, match="spec.output.uri: uploading the adapter to s3://gone/a"):
        upload_s3(tmp_path / "a", "s3://gone/a")


def test_checkpoint_mirror_follows_an_s3_output(monkeypatch, tmp_path):
    spec = {"baseModel": {"name": "org/m"}, "dataset": {"uri": "/d.jsonl"}}
    s3_job = quick_job_like({**spec, "output": {"adapterName": "a", "uri": "s3://b/adapters/a/"}})
    pvc_job = quick_job_like({**spec, "output": {"adapterName": "a", "uri": "pvc://adapters/a"}})
    monkeypatch.delenv("LORAPLANE_CHECKPOINT_URI", raising=False)
    monkeypatch.setenv("LORAPLANE_OUTPUT_SCRATCH", str(tmp_path))
    assert resolve_runtime(s3_job).checkpoint_uri == "s3://b/adapters/a.checkpoints"
    assert resolve_runtime(pvc_job, output_dir=tmp_path / "o").checkpoint_uri is None  # the volume survives
    monkeypatch.setenv("LORAPLANE_CHECKPOINT_URI", "none")
    assert resolve_runtime(s3_job).checkpoint_uri is None
    monkeypatch.setenv("LORAPLANE_CHECKPOINT_URI", "s3://other/ck")
    assert resolve_runtime(pvc_job, output_dir=tmp_path / "o").checkpoint_uri == "s3://other/ck"
    monkeypatch.setenv("LORAPLANE_CHECKPOINT_URI", "/mnt/ck")
    with pytest.raises(errors.InvalidConfig, match="LORAPLANE_CHECKPOINT_URI.*LORAPLANE_CHECKPOINT_DIR"):
        resolve_runtime(s3_job)


def test_s3_base_model_is_fetched_verified_and_reused(s3_env, tiny_model_dir, tmp_path):
    """MOCK S3 (moto): the trainer fetches an s3:// base model with the serving replicas' code, checks
    spec.baseModel.sha256, and a rerun in the same pod reuses the verified copy."""
    from loraplane.storage.digest import sha256_dir
    from loraplane.trainer.model import resolve_source

    client = s3_env.client()
    client.create_bucket(Bucket="models")
    for f in sorted(p for p in Path(tiny_model_dir).rglob("*") if p.is_file()):
        client.upload_file(str(f), "models", f"tiny/{f.relative_to(tiny_model_dir).as_posix()}")
    digest = sha256_dir(tiny_model_dir)
    base = {"dataset": {"uri": "/d.jsonl"}, "output": {"adapterName": "a"}}
    job = quick_job_like({**base, "baseModel": {"uri": "s3://models/tiny", "sha256": digest}})
    runtime = resolve_runtime(job, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ck")
    source = resolve_source(job, runtime, tmp_path / "ck" / "inputs")
    assert sha256_dir(Path(source.location)) == digest and source.identity == "s3://models/tiny"
    wrong = quick_job_like({**base, "baseModel": {"uri": "s3://models/tiny", "sha256": "0" * 64}})
    with pytest.raises(errors.InvalidConfig, match="spec.baseModel.sha256: artifact sha256 is"):
        resolve_source(wrong, runtime, tmp_path / "other")
    client.delete_objects(Bucket="models", Delete={"Objects": [{"Key": k} for k in s3_env.keys("models")]})
    assert resolve_source(job, runtime, tmp_path / "ck" / "inputs").location == source.location  # reused
    missing = quick_job_like({**base, "baseModel": {"uri": "s3://models/none"}})
    with pytest.raises(errors.ModelNotFound, match="spec.baseModel.uri s3://models/none: .*credentialsSecretRef"):
        resolve_source(missing, runtime, tmp_path / "other")


def quick_job_like(spec: dict):
    from loraplane.api import FineTuneJob

    return FineTuneJob.model_validate({"kind": "FineTuneJob", "metadata": {"name": "j"}, "spec": spec})


# ---- progress --------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_cluster_sink_is_rate_limited_and_sends_the_final_update():
    clock, sent = FakeClock(), []
    sink = progress.ClusterSink("ns", "job", interval=10, patch=sent.append, clock=clock)
    for step in range(1, 101):  # 100 steps, 0.5 s apart: 50 s
        sink.update(TrainingProgress(step=step, total_steps=100))
        clock.now += 0.5
    steps = [b["status"]["progress"]["step"] for b in sent]
    assert steps == [1, 21, 41, 61, 81]  # at most one patch per 10 s
    sink.update(TrainingProgress(step=100, total_steps=100), final=True)
    assert sent[-1] == {"status": {"progress": {"step": 100, "totalSteps": 100}}}
    assert sink.patches == 6


def test_cluster_sink_survives_api_errors_and_flushes_on_close():
    clock, calls = FakeClock(), []

    def flaky(body):
        calls.append(body)
        if len(calls) == 1:
            raise RuntimeError("apiserver unavailable")

    sink = progress.ClusterSink("ns", "job", interval=10, patch=flaky, clock=clock)
    sink.update(TrainingProgress(step=1))
    assert sink.failures == 1
    clock.now += 1
    sink.update(TrainingProgress(step=2))  # rate-limited: kept pending
    sink.close()
    assert calls[-1]["status"]["progress"]["step"] == 2 and sink.patches == 1


def test_tracker_computes_eta_throughput_and_percent(tmp_path):
    clock, seen = FakeClock(), []

    class Recorder:
        def update(self, p, final=False):
            seen.append((p, final))

        def close(self):
            pass

    local = progress.LocalSink(tmp_path / "p.json", bar=False, clock=clock)
    tracker = progress.ProgressTracker([Recorder(), local], clock=clock)
    tracker.report(step=10, total_steps=110, tokens_seen=1000, loss=2.0, learning_rate=1e-3)
    clock.now += 20
    p = tracker.report(step=30, total_steps=110, tokens_seen=5000)
    assert (p.eta_seconds, p.tokens_per_second, p.percent, p.loss) == (80, 200.0, 27, 2.0)
    p = tracker.report(step=110, total_steps=110, tokens_seen=9000, final=True)
    assert p.eta_seconds == 0 and p.percent == 100 and seen[-1][1] is True
    on_disk = json.loads((tmp_path / "p.json").read_text())
    assert on_disk["step"] == 110 and set(on_disk) == {
        "step", "totalSteps", "loss", "learningRate", "tokensPerSecond", "etaSeconds", "percent", "updatedAt"}
    TrainingProgress.model_validate(on_disk)


# ---- errors ----------------------------------------------------------------------------------------------

def test_exit_codes_are_distinct_and_documented():
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
    assert EXIT_CODES["Preempted"] == errors.EXIT_PREEMPTED == 75
    doc = (ROOT / "docs" / "trainer.md").read_text()
    for reason, code in EXIT_CODES.items():
        assert f"| {code} | `{reason}`" in doc, f"docs/trainer.md lacks the row for {reason}"


def test_termination_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLANE_TERMINATION_LOG", str(tmp_path / "term"))
    assert errors.write_termination_message(InvalidDataset("x" * 10000).as_dict())
    written = (tmp_path / "term").read_text()
    assert len(written.encode()) <= errors.TERMINATION_MESSAGE_LIMIT
    assert json.loads(written)["reason"] == "InvalidDataset"
    monkeypatch.setenv("LORAPLANE_TERMINATION_LOG", str(tmp_path / "no" / "such" / "dir"))
    assert errors.write_termination_message({"reason": "X"}) is False  # not in a pod: skipped silently


def test_out_of_memory_detection():
    import torch

    assert errors.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert errors.is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"))
    assert not errors.is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("endpoint, opt_in", [("http://127.0.0.1:{port}", False), ("http://169.254.169.254", True),
                                              ("https://[::ffff:169.254.169.254]", True)])
def test_dataset_s3_endpoint_obeys_the_fetch_policy(endpoint, opt_in, tmp_path, monkeypatch):
    """Review p3: the dataset Secret is mapped onto the trainer's environment, so its AWS_ENDPOINT_URL is the
    user's: plain http needs the opt-in, link-local / metadata never; refused (InvalidConfig) before a request."""
    from loraplane.api.wire.trainer import INSECURE_HTTP_ENV

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):   # noqa: N802
            hits.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.format(port=server.server_address[1]))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        if opt_in:
            monkeypatch.setenv(INSECURE_HTTP_ENV, "true")
        else:
            monkeypatch.delenv(INSECURE_HTTP_ENV, raising=False)
        with pytest.raises(InvalidConfig, match="AWS_ENDPOINT_URL"):
            data.fetch("s3://latest/meta-data.jsonl", tmp_path / "d", tmp_path / "pvc")
        assert hits == []
    finally:
        server.shutdown()
