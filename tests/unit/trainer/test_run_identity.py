"""Issue 13 item 4b in the trainer: the config the operator renders gives each run (FineTuneJob uid) its own
adapter and checkpoint locations, so a job recreated under the same name starts fresh while a preempted pod of the
same run resumes; an s3:// artifact prefix holds exactly the uploaded artifact (no stale keys)."""

from __future__ import annotations

import json
from pathlib import Path

from loraplane.api import FineTuneJob
from loraplane.builders import finetunejob as ftj_builders
from loraplane.builders.settings import BuildSettings
from loraplane.trainer import checkpoints
from loraplane.trainer.config import job_from_dict, resolve_runtime
from loraplane.trainer.run import resume_point, upload_s3


def _rendered_job(uid: str, output: str) -> FineTuneJob:
    """The FineTuneJob exactly as the trainer reads it from the ConfigMap the operator renders for `uid`."""
    ftj = FineTuneJob.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": uid},
        "spec": {"baseModel": {"name": "org/m"}, "dataset": {"uri": "/d.jsonl"},
                 "output": {"adapterName": "a", "uri": output}}})
    cm = ftj_builders.config_map(ftj, BuildSettings())
    return job_from_dict(json.loads(cm["data"][ftj_builders.CONFIG_KEY]))


def _checkpoint(folder: Path, step: int) -> None:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w")
    checkpoints.mark_complete(path, step)


def test_a_recreated_job_does_not_resume_the_old_runs_checkpoints_but_a_preempted_pod_does(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLANE_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.delenv("LORAPLANE_CHECKPOINT_URI", raising=False)
    first = resolve_runtime(_rendered_job("aaaaaaaa-1111", "pvc://adapters/sql"))
    assert first.output_dir == tmp_path / "pvc" / "adapters" / "sql" / "run-aaaaaaaa"
    assert first.checkpoint_dir == tmp_path / "pvc" / "adapters" / "sql" / "run-aaaaaaaa.checkpoints"
    _checkpoint(first.checkpoint_dir, 40)
    # the same run's next pod (preempted, retried) resumes where it stopped
    same_run = resolve_runtime(_rendered_job("aaaaaaaa-1111", "pvc://adapters/sql"))
    assert resume_point(same_run)[0] == first.checkpoint_dir / "checkpoint-40"
    # the job deleted and created again under the same name: another uid, nothing of the old run is touched
    recreated = resolve_runtime(_rendered_job("bbbbbbbb-2222", "pvc://adapters/sql"))
    assert recreated.output_dir != first.output_dir and recreated.checkpoint_dir != first.checkpoint_dir
    assert resume_point(recreated)[0] is None


def test_the_s3_checkpoint_mirror_is_per_run(monkeypatch):
    monkeypatch.delenv("LORAPLANE_CHECKPOINT_URI", raising=False)
    a = resolve_runtime(_rendered_job("aaaaaaaa-1111", "s3://b/adapters/sql"))
    b = resolve_runtime(_rendered_job("bbbbbbbb-2222", "s3://b/adapters/sql"))
    assert a.checkpoint_uri == "s3://b/adapters/sql/run-aaaaaaaa.checkpoints"
    assert b.checkpoint_uri == "s3://b/adapters/sql/run-bbbbbbbb.checkpoints"


def test_an_s3_upload_leaves_no_stale_keys_and_never_touches_the_checkpoints(s3_env, tmp_path):
    """MOCK S3 (moto). Before: the upload wrote over the prefix and left the previous upload's other files."""
    client = s3_env.client()
    client.create_bucket(Bucket="out-bucket")
    client.put_object(Bucket="out-bucket", Key="adapters/sql/run-1/old-weights.bin", Body=b"stale")
    client.put_object(Bucket="out-bucket", Key="adapters/sql/run-1.checkpoints/checkpoint-5/x", Body=b"c")
    client.put_object(Bucket="out-bucket", Key="adapters/sql/run-10/keep", Body=b"other run")
    art = tmp_path / "art"
    art.mkdir()
    (art / "adapter_config.json").write_text("{}")
    (art / "adapter_model.safetensors").write_bytes(b"w")
    upload_s3(art, "s3://out-bucket/adapters/sql/run-1")
    assert s3_env.keys("out-bucket") == ["adapters/sql/run-1.checkpoints/checkpoint-5/x", "adapters/sql/run-1/adapter_config.json",
                                "adapters/sql/run-1/adapter_model.safetensors", "adapters/sql/run-10/keep"]
