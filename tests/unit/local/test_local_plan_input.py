"""`loraplane run -f FILE` reads its file as `validate` does (local.manifests): a file a user gets wrong is one
error naming the document and the fix, nothing is run, never a traceback, and nothing `validate` refuses runs
(a key written twice, an object without a name used to train a job called None)."""

from __future__ import annotations

import pytest

from loraplane.local.pipeline import RunError, load_plan
from support.paths import ROOT

QUICKSTART = (ROOT / "docs" / "examples" / "quickstart.yaml").read_text()

CASES = {
    "top-level list": ("- a\n- b\n", "a document must be one object"),
    "scalar document": ("just a string\n", "a document must be one object"),
    "bad yaml": ("foo: [unclosed\n", "not valid YAML (line 2"),
    "key twice": (QUICKSTART.replace("    maxSteps: 60\n", "    maxSteps: 60\n    maxSteps: 6\n"),
                  "duplicate key 'maxSteps'"),
    "job without a name": (QUICKSTART.replace("kind: FineTuneJob\nmetadata:\n  name: quickstart\n",
                                              "kind: FineTuneJob\nmetadata: {}\n"),
                           "metadata.name: required"),
    "configmap data not a mapping": ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: d}\ndata: [1]\n---\n"
                                     + QUICKSTART.split("---\n", 1)[1],
                                     "data: a ConfigMap's data maps keys to strings"),
    "another api's object": ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n"
                             + QUICKSTART.split("---\n", 1)[1],
                             "Deployment/d\n  a local run takes FineTuneJobs, Adapters, ModelRoutes"),
    "snake_case field": (QUICKSTART.replace("maxSteps: 60", "max_steps: 60"),
                         "unknown field 'max_steps': did you mean 'maxSteps'?"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_file_is_one_error_per_document_never_a_traceback(case, tmp_path):
    text, expected = CASES[case]
    path = tmp_path / "in.yaml"
    path.write_text(text)
    with pytest.raises(RunError) as err:
        load_plan(path)
    assert "nothing was run" in str(err.value) and expected in str(err.value), str(err.value)


def test_the_quickstart_still_loads(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(QUICKSTART)
    plan = load_plan(path)
    assert [j.metadata.name for j in plan.jobs] == ["quickstart"]
    assert "eval.jsonl" in plan.configmaps["quickstart-data"]
