"""End-to-end flows (issue 11): what a user does, on a real control plane whose pods really run.

The operator runs as a pod from the chart's manifests (in-cluster config, the chart's RBAC enforced), objects are
applied with `kubectl`, and pods run on the node stand-in (tests/harness/node.py): trainer, vLLM (CPU build),
loader and router processes in their own network and mount namespaces. The flows share one quickstart
(tests/e2e/conftest.py) so vLLM starts once per run, and run in this file's order:

1. quickstart: FineTuneJob trains → Adapter with provenance → vLLM + loader load it → the router answers with the
   adapter, and with the base model for `base`; `kubectl wait --for=condition=Ready` on all three objects and
   `kubectl get ftj,lora,mr` columns filled;
2. failure truth: an adapter the loader's gate refuses and one with no effect → the Adapter's phase, reason and
   message are the ones the real loader reported on its pod;
3. replica lifecycle: a deleted vLLM pod is replaced and the adapter restored before the pod serves it;
4. training preemption: the trainer pod deleted mid-run → the Job's next pod resumes from a checkpoint;
5. deletion: deleting the ModelRoute and the FineTuneJob leaves no pods, processes or namespaces.

Each flow prints its wall time; together they must stay within the CI budget (issue 11: 10 minutes on 2 cores).
"""

from __future__ import annotations

import json
import time

import pytest

from support.e2e_flows import (ADAPTER_ANSWER, ARTIFACT_CLAIM, MODEL_URI, PROMPTS, QS_NS, complete, condition,
                         router_url, status_of)
from support.adapters import write_adapter

# Also marked with what they need (a real API server, vLLM, training), so selections that leave those out (the
# fast set: -m "not vllm and not train and not apiserver") leave the e2e flows out too.
pytestmark = [pytest.mark.e2e, pytest.mark.apiserver, pytest.mark.vllm, pytest.mark.train, pytest.mark.timeout(900)]

FLOW_TIMES: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _timed(request):
    started = time.monotonic()
    yield
    FLOW_TIMES[request.node.name] = time.monotonic() - started
    print(f"\n[e2e] {request.node.name}: {FLOW_TIMES[request.node.name]:.1f}s")


def ask(qs, model: str, prompt: str, timeout: float = 120) -> str:
    """The router's greedy answer for `model`, waiting (up to `timeout`) for the router Service to have a ready
    endpoint and the model to answer 200."""
    last = (0, "")

    def answered():
        nonlocal last
        url = router_url(qs.kubectl, "quickstart")
        if url is None:
            return None
        last = complete(url, model, prompt)
        return last[1] if last[0] == 200 else None

    try:
        return qs.plane.wait(answered, timeout, f"an answer for {model}")
    except TimeoutError:
        raise AssertionError(f"no answer for {model}: last {last}\n{qs.diagnostics()}")


def test_quickstart(quickstart):
    qs, k = quickstart, quickstart.kubectl
    try:
        qs.timings["ftj_ready_s"] = k.wait("condition=Ready", "ftj/quickstart", timeout=420)
        adapter = k.get("adapter", "quickstart-adapter")
        qs.timings["adapter_ready_s"] = k.wait("condition=Ready", "adapter/quickstart-adapter", timeout=420)
        qs.timings["route_ready_s"] = k.wait("condition=Ready", "mr/quickstart", timeout=300)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{qs.diagnostics()}")
    # The Adapter the operator created for the job: the trained artifact, with where it came from.
    prov = adapter["status"].get("provenance") or {}
    assert prov.get("fineTuneJob") == "quickstart" and prov.get("fineTuneJobUid"), adapter["status"]
    assert prov.get("baseModel") == MODEL_URI or adapter["spec"]["baseModel"].get("uri") == MODEL_URI
    assert adapter["spec"]["source"]["uri"].startswith(f"pvc://{ARTIFACT_CLAIM}/"), adapter["spec"]
    # Requests through the router's Service: the adapter's answer, and the base model's for `base`.
    for prompt in PROMPTS:
        assert ask(qs, "assistant", prompt).strip().startswith(ADAPTER_ANSWER)
        assert not ask(qs, "base", prompt).strip().startswith(ADAPTER_ANSWER)
    qs.timings["first_answer_s"] = time.monotonic() - qs.applied_monotonic
    # What `kubectl get` shows a user: the printer columns filled.
    rows = {r["KIND"]: r for r in k.table("ftj,lora,mr")}
    ftj, lora, mr = (rows["finetunejob.loraplane.io"], rows["adapter.loraplane.io"],
                     rows["modelroute.loraplane.io"])
    assert ftj["PHASE"] == "Succeeded" and ftj["STEP"] == ftj["TOTAL"] == "60" and ftj["LOSS"] not in ("", "<none>"), ftj
    assert ftj["ADAPTER"] == "quickstart-adapter", ftj
    assert lora["PHASE"] == "Ready" and lora["READY"] == "True" and lora["RANK"] == "8", lora
    assert lora["REASON"] == "Loaded", lora
    assert mr["READY"] == "1" and mr["REPLICAS"] == "1" and mr["PHASE"] == "Ready", mr
    assert mr["ENDPOINT"] == "http://quickstart-router.quickstart.svc:8080/v1", mr
    print(f"\n[e2e] quickstart timings: {json.dumps({k_: round(v, 1) for k_, v in qs.timings.items()})}")


def _reported(qs, served: str) -> dict | None:
    """The entry for `served` in the loader report on the quickstart's engine pod (its annotation)."""
    pods = qs.kubectl.get("pods", "-l", "loraplane.io/route=quickstart")["items"]
    for pod in pods:
        raw = (pod["metadata"].get("annotations") or {}).get("loraplane.io/adapters")
        entry = json.loads(raw)["adapters"].get(served) if raw else None
        if entry:
            return {**entry, "replica": pod["metadata"]["name"]}
    return None


def test_failure_truth(quickstart):
    """Two bad adapters on the quickstart's route (artifacts on the claim its replicas already mount): the gate
    refuses one (rank 32 > maxLoraRank 16), the smoke test finds the other changes nothing. The Adapters say
    what the real loader reported, phase from its state, reason and message from its report."""
    qs, k = quickstart, quickstart.kubectl
    store = qs.installed.pvc_dir(QS_NS, ARTIFACT_CLAIM) / "e2e"
    bad = {"too-wide": write_adapter(store / "too-wide", r=32, base=""),
           "no-effect": write_adapter(store / "no-effect", zero_b=True, base="")}
    k.apply([{"apiVersion": "loraplane.io/v1alpha1", "kind": "Adapter",
              "metadata": {"name": name, "labels": {"e2e": "bad"}},
              "spec": {"baseModel": {"uri": MODEL_URI}, "version": "1",
                       "source": {"uri": f"pvc://{ARTIFACT_CLAIM}/e2e/{name}"}}} for name in bad])
    k("patch", "mr", "quickstart", "--type=merge", "-p", json.dumps({"spec": {"routes": [
        {"name": "assistant", "backends": [{"adapter": "quickstart-adapter", "weight": 100}]},
        {"name": "base", "backends": [{"base": True}]},
        {"selector": {"matchLabels": {"e2e": "bad"}}, "prefix": "bad/"}]}}))
    expected = {"too-wide": ("Incompatible", "Incompatible", "RankTooLarge"),
                "no-effect": ("Failed", "Failed", "NoEffect")}
    for name, (state, phase, reason) in expected.items():
        sent = qs.plane.wait(lambda: (e := _reported(qs, f"{name}--1")) and e["state"] in ("Failed", "Incompatible")
                             and e, 240, f"the loader's report of {name}")
        assert (sent["state"], sent["reason"]) == (state, reason), sent
        st = qs.plane.wait(lambda: (s := status_of(k, "adapter", name)).get("phase") == phase and s, 60,
                           f"Adapter {name} {phase}")
        ready = condition(st, "Ready")
        assert ready["reason"] == reason and ready["message"] == f"replica {sent['replica']}: {sent['message']}", st
    # The good adapter is untouched by its neighbours' failures.
    assert ask(qs, "assistant", PROMPTS[0]).strip().startswith(ADAPTER_ANSWER)
