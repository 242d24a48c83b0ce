"""README command one: `loraplane run -f docs/examples/quickstart.yaml` trains, serves and answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraplane.local.pipeline import RunError, _replace_flag, _set_flag, load_plan
from loraplane.local.podspec import LocalPod, container_argv, container_env
from support.paths import ROOT

QUICKSTART = ROOT / "docs" / "examples" / "quickstart.yaml"


def test_plan_validates_like_the_operator(tmp_path):
    plan = load_plan(QUICKSTART)
    assert [j.metadata.name for j in plan.jobs] == ["quickstart"]
    assert [r.metadata.name for r in plan.routes] == ["quickstart"]
    assert "train.jsonl" in plan.configmaps["quickstart-data"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("r: 8", "r: 1024").replace("maxLoras: 2", "maxLoras: 0"))
    with pytest.raises(RunError) as err:
        load_plan(bad)
    assert "spec.method.r: Input should be less than or equal to 512" in str(err.value)
    assert "spec.engine.maxLoras: Input should be greater than or equal to 1" in str(err.value)


def test_pod_paths_and_env_map_to_local():
    pod = LocalPod(name="p-0", namespace="ns", paths={"/mnt/pvc": "/tmp/w/pvc", "/etc/loraplane": "/tmp/w/cfg"},
                   env_overrides={"HF_HOME": "/tmp/w/hf", "SECRET_ONLY": None})
    container = {
        "command": ["python3", "-m", "loraplane.trainer", "--config", "/etc/loraplane/finetunejob.json"],
        "args": ["--out=/mnt/pvc/claim/x", "/mnt/pvcfoo"],
        "env": [{"name": "A", "value": "/mnt/pvc/claim"},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                {"name": "HF_HOME", "value": "/models/hf"}],
    }
    argv = container_argv(container, pod)
    assert argv == [sys.executable, "-m", "loraplane.trainer", "--config", "/tmp/w/cfg/finetunejob.json",
                    "--out=/tmp/w/pvc/claim/x", "/mnt/pvcfoo"]  # a mere prefix of a name is not a path
    env = container_env(container, pod, base={"SECRET_ONLY": "x", "KEEP": "1"})
    assert env == {"A": "/tmp/w/pvc/claim", "NS": "ns", "POD": "p-0", "HF_HOME": "/tmp/w/hf", "KEEP": "1"}
    assert _set_flag(["--port", "1"], "--port", "2") == ["--port", "2"]
    assert _set_flag(["a"], "--port", "2") == ["a", "--port", "2"]
    assert _replace_flag(["--configmap", "x", "--n", "y"], "--configmap", ["--table", "f"]) == \
        ["--n", "y", "--table", "f"]


def test_local_run_fetches_an_https_base_model_like_the_init_container(tiny_model_dir, tmp_path):
    """`loraplane run` runs the engine pod's init container locally: the archive lands on the local model volume
    where the (path-mapped) vLLM command and the loader look. A real local HTTP server serves the archive."""
    import http.server
    import io
    import tarfile
    import threading

    from loraplane.storage.digest import sha256_dir
    from loraplane.builders.engine_pod import engine_command
    from loraplane.local.pipeline import LocalRun

    site = tmp_path / "site"
    site.mkdir()
    with tarfile.open(site / "tiny.tar.gz", "w:gz") as tar:
        tar.add(tiny_model_dir, arcname="tiny")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(site), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}/tiny.tar.gz"
    (tmp_path / "route.yaml").write_text(f"""
apiVersion: loraplane.io/v1alpha1
kind: ModelRoute
metadata: {{name: fetched}}
spec:
  baseModel: {{uri: "{uri}"}}
  engine: {{gpus: 0}}
""")
    try:
        plan = load_plan(tmp_path / "route.yaml")
        run = LocalRun(plan, tmp_path / "work", out=io.StringIO())
        run.prepare_models()
        (route,) = plan.routes
        pod = run.pod("fetched-engine-local-0")
        argv = [pod.map_path(a) for a in engine_command(route)]
        model = Path(argv[argv.index("--model") + 1])
        assert model.is_relative_to(tmp_path / "work") and sha256_dir(model) == sha256_dir(tiny_model_dir)
        assert argv[argv.index("--served-model-name") + 1] == "tiny"
        # A failed fetch stops the run with the init container's message.
        bad = load_plan(tmp_path / "route.yaml")
        bad.routes[0].spec.base_model.uri = uri.replace("tiny.tar.gz", "gone.tar.gz")
        with pytest.raises(RunError, match="fetching the base model of ModelRoute fetched failed(.|\n)*HTTP 404"):
            LocalRun(bad, tmp_path / "work2", out=io.StringIO()).prepare_models()
    finally:
        server.shutdown()


@pytest.mark.vllm
@pytest.mark.train
def test_quickstart_runs_end_to_end(tmp_path):
    """The real command: tiny model, real training, vLLM (CPU) + loader + router, answers side by side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "loraplane.cli", "run", "-f", str(QUICKSTART),
                          "--workdir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    text = out.stdout
    assert "✓ quickstart-adapter--1: Ready (Loaded)" in text, text
    answers = re.findall(r"^\s+(assistant|base) → '(.*)'", text, re.M)
    assert len(answers) == 4, text  # two prompts, each to both public models
    # The adapter learned the dataset's phrase and, asked in the data's own format (demo_prompts), says it to
    # every prompt, as its evaluation reports; the base model never says it.
    assert all("the blue door sings at noon" in a for m, a in answers if m == "assistant"), text
    assert "prompt: 'what does the cat see?'\n" in text, text   # repr: a trailing newline would show
    assert not any("the blue door" in a for m, a in answers if m == "base"), text
    assert "Timings:" in text and "router (OpenAI)" in text


@pytest.mark.train
def test_second_run_reuses_the_trained_adapter(tmp_path):
    """Training runs the FineTuneJob's trainer container locally once; a second run with the same spec reuses
    its adapter, and a changed spec trains again."""
    import io

    from loraplane.local.pipeline import LocalRun

    quick = tmp_path / "quick.yaml"
    quick.write_text(QUICKSTART.read_text().replace("maxSteps: 60", "maxSteps: 4")
                     .replace("checkpointEverySteps: 20", "checkpointEverySteps: 4"))
    plan = load_plan(quick)
    out = io.StringIO()
    lr = LocalRun(plan, tmp_path / "work", out=out)
    lr.prepare_models()
    first = lr.train(plan.jobs[0])
    assert "training (the trainer container of Job quickstart-train" in out.getvalue()
    assert first.spec.source.sha256 and first.spec.version == "1"
    assert first.spec.base_model.name == "loraplane/tiny-llama"  # the identity, not a local path
    out.truncate(0)
    second = lr.train(plan.jobs[0])
    assert "reusing the adapter trained by an earlier run" in out.getvalue()
    assert second.spec.source == first.spec.source
    # A changed spec is a new run (a new user's report: the learning rate changed, the trainer resumed the old
    # spec's last checkpoint, trained 0 steps and published the old weights as version 1 again).
    quick.write_text(quick.read_text().replace("learningRate: 0.01", "learningRate: 0.02"))
    changed = load_plan(quick)
    out.truncate(0)
    log = tmp_path / "work" / "runs" / "quickstart" / "trainer.log"
    seen = log.stat().st_size if log.is_file() else 0
    third = lr.train(changed.jobs[0])
    text = out.getvalue()
    assert "reusing" not in text and third.spec.source.sha256 != first.spec.source.sha256
    assert third.spec.source.uri != first.spec.source.uri and third.spec.version == "2"
    assert "resuming" not in log.read_text()[seen:], log.read_text()[seen:]
    loss = float(re.search(r"trainLoss=([0-9.e+-]+)", text).group(1))
    assert loss > 0, text
