"""`loraplane run` on a ModelRoute with spec.contentRouting (issue 15): the local quickstart asks the content-routed
name (`auto`) too and shows where the router sent each prompt and why, from the answer's headers; a reference to
another route, which a local run cannot reach, is said, not silently dropped."""

from __future__ import annotations

import io
import json
import re

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def test_loraplane_run_asks_the_content_routed_model_and_shows_its_decision(tiny_model_dir, tmp_path):
    from loraplane.local import pipeline

    spec = tmp_path / "auto.yaml"
    spec.write_text(json.dumps({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "assistant"},
        "spec": {"baseModel": {"uri": str(tiny_model_dir)}, "servedModelName": "tiny", "replicas": 1,
                 "engine": {"dtype": "float32", "maxModelLen": 256, "gpus": 0},
                 "routes": [{"name": "general", "backends": [{"base": True}]},
                            {"name": "helper", "backends": [{"base": True}]}],
                 "contentRouting": [{"name": "auto", "default": "general", "methods": ["rules"],
                                     "destinations": [{"model": "helper", "rules": {"keywords": ["refund"]}},
                                                      {"model": "elsewhere", "rules": {"keywords": ["far"]}}]}]}}))
    out = io.StringIO()
    assert pipeline.run(spec, tmp_path / "work", prompts=["please refund my order", "tell me a story"],
                        out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert re.search(r"auto → '.*'   \(\d+ ms\)  \[via helper, rules\]", text), text
    assert re.search(r"auto → '.*'   \(\d+ ms\)  \[via general, default: no-match\]", text), text
    assert "spec.contentRouting, left out of this local run: content model 'auto': destinations[1].model " \
           "'elsewhere'" in text, text
