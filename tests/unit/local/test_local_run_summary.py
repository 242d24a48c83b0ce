"""The end of `loraplane run`'s output is truthful about what is still up: without --keep-serving every process
is stopped when the run returns, so the router's, loader's and vLLM's URLs it lists are marked stopped and the
user is told how to keep them (a new user curled the printed router URL and got `connection refused`)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from loraplane.local import pipeline
from loraplane.local.pipeline import LocalRun, ServingRoute, load_plan
from support.paths import ROOT

QUICKSTART = ROOT / "docs" / "examples" / "quickstart.yaml"


@pytest.fixture
def no_processes(monkeypatch, tmp_path):
    """Every step of the run that starts a process replaced: training returns the job's Adapter as if trained,
    serving returns fixed URLs, each request answers 'hi'."""
    plan = load_plan(QUICKSTART)

    class Exited:
        """A serving process that has exited (ends --keep-serving's wait at once)."""
        name, log_path, running = "router", tmp_path / "router.log", False

        def stop(self):
            pass

    def serve(self, route, adapters):
        self.processes.append(Exited())
        return ServingRoute(route=route, table_path=tmp_path / "serving.json", router_url="http://127.0.0.1:1",
                            engine_url="http://127.0.0.1:2", loader_url="http://127.0.0.1:3", logs=tmp_path,
                            public_models=["assistant"])

    monkeypatch.setattr(LocalRun, "prepare_models", lambda self: None)
    monkeypatch.setattr(LocalRun, "train", lambda self, ftj: plan.adapters[0] if plan.adapters else
                        pipeline.Adapter.model_validate({
                            "apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
                            "metadata": {"name": "quickstart-adapter", "namespace": "default"},
                            "spec": {"baseModel": {"name": "loraplane/tiny-llama"},
                                     "source": {"uri": "pvc://a/b"}, "version": "1"}}))
    monkeypatch.setattr(LocalRun, "serve", serve)
    monkeypatch.setattr(pipeline, "complete", lambda url, model, prompt, **kw: (200, "hi", 0.01))


def _run(tmp_path: Path, keep_serving: bool, monkeypatch) -> str:
    out = io.StringIO()
    if keep_serving:   # the serving loop ends at once: the run's one process has exited
        with pytest.raises(pipeline.ProcessFailed):
            pipeline.run(QUICKSTART, tmp_path / "work", keep_serving=True, out=out)
    else:
        assert pipeline.run(QUICKSTART, tmp_path / "work", out=out) == 0
    return out.getvalue()


def test_without_keep_serving_the_listed_urls_are_said_stopped_and_how_to_keep_them(tmp_path, no_processes,
                                                                                    monkeypatch):
    text = _run(tmp_path, False, monkeypatch)
    router_line = next(line for line in text.splitlines() if "router (OpenAI)" in line)
    assert router_line.endswith("(stopped now)"), router_line
    assert "processes are stopped" in text and "--keep-serving" in text, text


def test_with_keep_serving_the_urls_are_not_said_stopped(tmp_path, no_processes, monkeypatch):
    text = _run(tmp_path, True, monkeypatch)
    assert "stopped now" not in text and "processes are stopped" not in text, text
    assert "Serving; Ctrl-C stops every process this run started." in text


def test_adapter_activation_counts_from_the_loaders_start_not_from_the_routers(tmp_path, monkeypatch):
    """The loader loads while the router starts: timed from after the router was up, an adapter that had loaded
    meanwhile showed `adapter activation 0.0s` beside the loader's own `loaded ... in 0.22s`."""
    import json
    import time

    from loraplane.api.wire.serving import AdapterState

    class Proc:
        """vLLM, loader and router stand-ins: the router takes 0.3 s to listen."""

        def __init__(self, name, argv, env, log_path, cwd=None):
            self.name, self.log_path, self.running = name, log_path, True

        def start(self):
            return self

        def wait_until(self, ready, timeout, tick=None, what="ready"):
            if self.name == "router":
                time.sleep(0.3)
            assert ready()
            return 0.0

        def stop(self):
            pass

    plan = load_plan(QUICKSTART)
    adapter = pipeline.Adapter.model_validate({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
        "metadata": {"name": "quickstart-adapter", "namespace": "default"},
        "spec": {"baseModel": {"name": "loraplane/tiny-llama"}, "source": {"uri": "/tmp/a"}, "version": "1"}})
    served = adapter.served_name()

    class Answer(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    report = {"replica": "p", "route": "quickstart", "generation": 1, "engine_ready": True,
              "updated_at": "2026-12-07T00:00:00Z",
              "adapters": {served: {"state": AdapterState.Ready, "reason": "Loaded", "message": "",
                                    "since": "2026-12-07T00:00:00Z"}}}
    monkeypatch.setattr(pipeline, "ManagedProcess", Proc)
    monkeypatch.setattr(pipeline, "http_ok", lambda url, timeout=2: True)
    monkeypatch.setattr(pipeline.urllib.request, "urlopen", lambda url, timeout=2: Answer(json.dumps(report).encode()))
    run = LocalRun(plan, tmp_path, out=io.StringIO())
    run.serve(plan.routes[0], [adapter])
    assert run.timings["adapter activation"] >= 0.3, run.timings
