"""The generated CRDs against a real kube-apiserver (v1.20.2, built locally): accepted, Established,
valid examples round-trip unchanged, invalid ones are rejected with a message naming the field."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.examples import EXAMPLES, invalid_examples, load_docs, valid_examples

pytestmark = pytest.mark.apiserver

KUBECTL = str(Path(sys.executable).parent / "kubectl")


def custom_api(kube_api):
    from kubernetes import client

    return client.CustomObjectsApi(kube_api)


def create(kube_api, namespace: str, doc: dict) -> dict:
    from loraplane.api import KINDS

    plural = KINDS[doc["kind"]].PLURAL
    return custom_api(kube_api).create_namespaced_custom_object("loraplane.io", "v1alpha1", namespace, plural, doc)


def test_crds_established_with_expected_names(kube_api, crds_installed):
    from kubernetes import client

    assert sorted(crds_installed) == ["adapters.loraplane.io", "finetunejobs.loraplane.io",
                                      "modelroutes.loraplane.io"]
    ext = client.ApiextensionsV1Api(kube_api)
    crd = ext.read_custom_resource_definition("modelroutes.loraplane.io")
    assert crd.status.accepted_names.short_names == ["mr"]
    assert crd.status.accepted_names.categories == ["loraplane"]
    # The server accepted every construct (a non-structural schema would set NonStructuralSchema).
    for name in crds_installed:
        conds = {c.type: c for c in ext.read_custom_resource_definition(name).status.conditions}
        assert "NonStructuralSchema" not in conds, conds["NonStructuralSchema"].message


@pytest.mark.parametrize("name,doc", valid_examples(), ids=[v[0] for v in valid_examples()])
def test_valid_example_round_trips_unchanged(kube_api, namespace, name, doc):
    doc = json.loads(json.dumps(doc))
    doc["metadata"]["namespace"] = namespace
    created = create(kube_api, namespace, doc)
    # Nothing pruned, nothing defaulted: the stored spec is byte-for-byte what the user wrote.
    assert created["spec"] == doc["spec"]
    plural = {"FineTuneJob": "finetunejobs", "Adapter": "adapters", "ModelRoute": "modelroutes"}[doc["kind"]]
    read = custom_api(kube_api).get_namespaced_custom_object("loraplane.io", "v1alpha1", namespace, plural,
                                                             doc["metadata"]["name"])
    assert read["spec"] == doc["spec"]


SCHEMA_INVALID = [v for v in invalid_examples() if v[2] == "schema"]


@pytest.mark.parametrize("name,doc,by,expect", SCHEMA_INVALID, ids=[v[0] for v in SCHEMA_INVALID])
def test_invalid_example_rejected_naming_the_field(kube_api, namespace, name, doc, by, expect):
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as err:
        create(kube_api, namespace, doc)
    assert err.value.status == 422
    body = json.loads(err.value.body)
    # v1.20 names list items without their index (spec.routes.backends.weight); newer servers add it.
    fields = [re.sub(r"\[\d+\]", "", c.get("field", "")) for c in body["details"]["causes"]]
    expect = re.sub(r"\[\d+\]", "", expect)
    assert any(f == expect or f.startswith(expect + ".") or f.startswith(expect + "[") for f in fields), \
        body["details"]["causes"]


def test_status_subresource_and_kubectl(kube_cluster, kube_api, namespace):
    """A user's view: `kubectl apply` the examples, `kubectl get` shows the printer columns, and a status
    write through the subresource does not touch the spec."""
    env = {**os.environ, "KUBECONFIG": str(kube_cluster.kubeconfig)}
    for path in ("finetunejob.yaml", "adapter.yaml", "modelroute.yaml"):
        docs = load_docs(EXAMPLES / path)
        for d in docs:
            d["metadata"]["namespace"] = namespace
        out = subprocess.run([KUBECTL, "apply", "-f", "-"], input=yaml.safe_dump_all(docs), env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    api = custom_api(kube_api)
    api.patch_namespaced_custom_object_status(
        "loraplane.io", "v1alpha1", namespace, "finetunejobs", "support-bot-v1",
        {"status": {"phase": "Running", "progress": {"step": 40, "totalSteps": 100, "loss": 1.25}}})
    got = subprocess.run([KUBECTL, "get", "ftj", "-n", namespace], env=env, capture_output=True, text=True,
                         timeout=60)
    assert got.returncode == 0, got.stderr
    header, row = got.stdout.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "PHASE", "STEP", "TOTAL", "LOSS", "BASE"]
    assert row.split()[:6] == ["support-bot-v1", "Running", "40", "100", "1.25", "Qwen/Qwen2.5-1.5B-Instruct"]
    cat = subprocess.run([KUBECTL, "get", "loraplane", "-n", namespace, "-o", "name"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert sorted(cat.stdout.split()) == sorted([
        "finetunejob.loraplane.io/support-bot-v1", "adapter.loraplane.io/sql-helper",
        "adapter.loraplane.io/support-bot-canary", "modelroute.loraplane.io/qwen-small"])
    # A spec write through the main resource does not change status and vice versa.
    obj = api.get_namespaced_custom_object("loraplane.io", "v1alpha1", namespace, "finetunejobs", "support-bot-v1")
    assert obj["status"]["progress"]["step"] == 40
    assert obj["spec"] == load_docs(EXAMPLES / "finetunejob.yaml")[0]["spec"]


def test_a_null_field_is_pruned_as_validate_drops_it(kube_api, namespace):
    """The API server prunes a null where the CRD declares a field (none is nullable): `training:` with every line
    under it commented out is taken as left out. `loraplane validate` drops it the same way
    (local.manifests.without_pruned_nulls); it refused it with `Input should be a valid dictionary`."""
    from loraplane.local.manifests import parse_document

    doc = {"apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "nulls", "namespace": namespace},
           "spec": {"baseModel": {"name": "m"}, "dataset": {"uri": "pvc://data/train.jsonl"},
                    "output": {"adapterName": "a"}, "training": None, "method": {"r": None}}}
    created = create(kube_api, namespace, doc)
    assert "training" not in created["spec"] and created["spec"]["method"] == {}, created["spec"]
    obj, problems = parse_document(doc)
    assert problems is None and obj.spec.training.learning_rate == parse_document(
        {**doc, "spec": created["spec"]})[0].spec.training.learning_rate, problems
