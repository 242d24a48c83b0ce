"""`loraplane run`'s demo prompts and docs/quickstart.md's curl example ask in the training data's own format.
They used to send "what does the cat see?\\n" while the quickstart's ConfigMap trains on the question without the
newline: the served adapter answered something else while its evaluation (on the data's format) said
exact_match 1."""

from __future__ import annotations

import json
import re

from loraplane.local.pipeline import load_plan
from support.paths import ROOT

QUICKSTART = ROOT / "docs" / "examples" / "quickstart.yaml"


def quickstart_prompts() -> set[str]:
    plan = load_plan(QUICKSTART)
    return {json.loads(line)["prompt"] for data in plan.configmaps.values() for text in data.values()
            for line in text.splitlines() if line.strip()}


def test_the_demo_prompts_are_the_files_own_prompts_verbatim():
    from loraplane.local.pipeline import demo_prompts

    prompts = demo_prompts(load_plan(QUICKSTART))
    assert prompts == ["what does the cat see?", "describe the lake."]   # the first two of eval.jsonl
    assert set(prompts) <= quickstart_prompts()


def test_without_instruction_data_the_tiny_models_format_is_used(tmp_path):
    from loraplane.local.pipeline import DEFAULT_QUESTIONS, demo_prompts

    path = tmp_path / "route.yaml"
    path.write_text("""apiVersion: loraplane.io/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  baseModel: {name: loraplane/tiny-llama}
  routes: [{name: assistant, backends: [{adapter: a}]}]
""")
    plan = load_plan(path)
    assert not plan.jobs and plan.routes
    assert demo_prompts(plan) == [q + "\n" for q in DEFAULT_QUESTIONS]


def test_the_quickstart_curl_example_sends_a_prompt_of_the_training_data():
    doc = (ROOT / "docs" / "quickstart.md").read_text()
    bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*?\})'", doc)]
    prompts = [b["prompt"] for b in bodies if "prompt" in b]
    assert prompts and set(prompts) <= quickstart_prompts(), prompts
