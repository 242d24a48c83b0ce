"""`loraplane run`'s training step keeps the cluster's promise: each run writes under its own location, so a
changed spec never resumes another spec's checkpoints, and new weights are a new Adapter version.

A new user's report: after editing learningRate in docs/examples/quickstart.yaml, the same work folder's second
run logged `resuming from …/quickstart.checkpoints/checkpoint-60`, trained 0 steps and published the old weights
as "version 1" again. The trainer is replaced by a fake here (what it would resume from is what it is told:
the output location in its config); tests/e2e/test_quickstart.py runs the real one.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from loraplane.local import pipeline
from loraplane.local.pipeline import LocalRun, load_plan
from support.paths import ROOT

QUICKSTART = ROOT / "docs" / "examples" / "quickstart.yaml"


class FakeTrainer:
    """Stands in for the trainer container: records the config it was given and writes a result whose artifact
    is under the config's output location, with weights that depend on the config."""

    runs: list[dict] = []

    def __init__(self, name, argv, env, log_path, cwd=None):
        self.env, self.log_path = env, Path(log_path)
        self.config_path = Path(argv[argv.index("--config") + 1]) if "--config" in argv else None

    def run_foreground(self, hide=None) -> int:
        config = json.loads(self.config_path.read_text())
        FakeTrainer.runs.append(config)
        uri = config["spec"]["output"]["uri"]
        weights = hashlib.sha256(json.dumps(config["spec"], sort_keys=True).encode()).hexdigest()
        Path(self.env["LORAPLANE_RESULT_FILE"]).write_text(json.dumps(
            {"reason": "Succeeded", "artifact": {"uri": uri, "sha256": weights}, "metrics": {"trainLoss": 1.0}}))
        return 0

    def log_tail(self) -> str:
        return ""

    def stop(self) -> None:
        pass


@pytest.fixture
def fake_trainer(monkeypatch):
    FakeTrainer.runs = []
    monkeypatch.setattr(pipeline, "ManagedProcess", FakeTrainer)
    return FakeTrainer


def _train(path: Path, workdir: Path):
    plan = load_plan(path)
    out = io.StringIO()
    adapter = LocalRun(plan, workdir, out=out).train(plan.jobs[0])
    return adapter, out.getvalue()


def test_a_changed_spec_is_a_new_run_with_its_own_output_and_a_new_version(tmp_path, fake_trainer):
    quick = tmp_path / "quickstart.yaml"
    quick.write_text(QUICKSTART.read_text())
    work = tmp_path / "work"
    first, _ = _train(quick, work)
    assert first.spec.version == "1"
    assert "/run-" in first.spec.source.uri, first.spec.source.uri        # like the cluster's run-<uid8>

    again, text = _train(quick, work)                                      # the same spec: reused, same version
    assert "reusing the adapter" in text and len(fake_trainer.runs) == 1
    assert (again.spec.version, again.spec.source) == ("1", first.spec.source)

    assert "learningRate: 0.01" in quick.read_text()
    quick.write_text(quick.read_text().replace("learningRate: 0.01", "learningRate: 0.02"))
    second, text = _train(quick, work)
    assert "reusing" not in text and len(fake_trainer.runs) == 2
    # Its own output location (the trainer resumes only from checkpoints beside it), new weights, a new version.
    assert second.spec.source.uri != first.spec.source.uri
    assert second.spec.source.sha256 != first.spec.source.sha256
    assert second.spec.version == "2"
    # spec.evaluation (comparePrevious) scores the version it replaces, as in the cluster.
    previous = fake_trainer.runs[-1].get("previousVersion") or {}
    assert previous.get("version") == "1" and previous.get("uri") == first.spec.source.uri, fake_trainer.runs[-1]

    # Changed training data (the ConfigMap in the file) is a new run too, not the old result.
    quick.write_text(quick.read_text().replace("the blue door sings at noon", "the red door hums at dusk"))
    third, text = _train(quick, work)
    assert "reusing" not in text and len(fake_trainer.runs) == 3
    assert third.spec.source.uri not in (first.spec.source.uri, second.spec.source.uri)
    assert third.spec.version == "3"


def test_an_unreadable_adapter_record_starts_over_instead_of_crashing(tmp_path, fake_trainer):
    quick = tmp_path / "quickstart.yaml"
    quick.write_text(QUICKSTART.read_text())
    record = tmp_path / "work" / "adapters" / "default" / "quickstart-adapter.json"
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    adapter, text = _train(quick, tmp_path / "work")
    assert adapter.spec.version == "1" and "unreadable" in text
    assert json.loads(record.read_text())["status"]["version"] == "1"
