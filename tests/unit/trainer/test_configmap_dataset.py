"""A dataset or evaluation set named by configMapRef, read where the trainer pod has the ConfigMap mounted: outside
the pod (`loraplane train -f` on the quickstart) the error names the ConfigMap and key and how to train there;
it said `dataset path: no file at /data/quickstart-data/train.jsonl; check the path (and that its volume is
mounted)`, naming neither the field nor a flag."""

from __future__ import annotations

import pytest

from loraplane.api.finetunejob import EvaluationSpec
from loraplane.trainer import data, evaluate
from loraplane.trainer.errors import DatasetNotFound


def test_a_missing_configmap_key_names_the_ref_and_the_local_flags(tmp_path):
    with pytest.raises(DatasetNotFound) as err:
        data.read_configmap_key(tmp_path, "quickstart-data", "train.jsonl", "spec.dataset.configMapRef")
    message = str(err.value.message)
    assert message.startswith("spec.dataset.configMapRef: ConfigMap quickstart-data key train.jsonl is not mounted")
    assert "--dataset-path FILE" in message and "LORAPLANE_CONFIGMAP_ROOT" in message


def test_the_evaluation_sets_configmap_says_the_same(tmp_path):
    spec = EvaluationSpec.model_validate({"dataset": {"configMapRef": {"name": "d", "key": "eval.jsonl"}}})
    with pytest.raises(DatasetNotFound) as err:
        evaluate.read_source(spec, tmp_path, tmp_path, None, tmp_path)
    assert "spec.evaluation.dataset.configMapRef: ConfigMap d key eval.jsonl is not mounted" in err.value.message
    assert "--evaluation-path FILE" in err.value.message


def test_a_mounted_key_is_read(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    source = data.read_configmap_key(tmp_path, "d", "train.jsonl", "spec.dataset.configMapRef")
    assert source.uri == "configmap://d/train.jsonl" and len(source.records) == 1
