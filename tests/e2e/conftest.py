"""The e2e flows' shared state: loraplane installed as a user installs it, and the quickstart running.

Once per test run (session scope), on the control plane + node stand-in of `support.e2e` (`e2e_plane`):

- `installed`: the chart rendered by the Helm SDK with the values a 1.20 cluster's capabilities select
  (`V120`), applied with real `kubectl` (CRDs, then the rest: the operator Deployment, its ServiceAccount and
  RBAC), and `kubectl wait` for the operator Deployment. The operator then runs as a pod: in-cluster config
  from its projected service-account token, its RBAC enforced by the API server.
- `quickstart`: docs/examples/quickstart.yaml's objects applied with `kubectl apply` in namespace `quickstart`,
  with the base model on a PVC (`baseModel.uri: pvc://models/tiny-llama`, what the file's header tells cluster
  users to do: a pod cannot build the embedded tiny model) and the PVCs the file expects to exist (`models`,
  and the chart's artifact store `loraplane-artifacts`). The flows of tests/e2e/test_flows.py share it, so
  vLLM starts once per run.

Heavy: run under `flock /tmp/heavy.lock` on shared machines.
"""

from __future__ import annotations

import shutil
import time

import pytest

from support.e2e_flows import (ARTIFACT_CLAIM, MODEL_CLAIM, QS_NS, RELEASE_NAMESPACE, V120, Installed, Kubectl,
                               Quickstart, claim, install_chart, quickstart_docs)


@pytest.fixture(scope="session")
def installed(e2e_plane) -> Installed:
    """The chart installed with kubectl and the operator Deployment Available (its pod Ready)."""
    kubectl = Kubectl(e2e_plane.kubeconfig)
    started = time.monotonic()
    chart = install_chart(e2e_plane, kubectl, V120)
    deployment = next(o for o in chart if o["kind"] == "Deployment")["metadata"]["name"]
    inst = Installed(e2e_plane, kubectl, chart)
    try:
        kubectl.ns(RELEASE_NAMESPACE).wait("condition=Available", f"deployment/{deployment}", timeout=180)
    except Exception as exc:
        raise AssertionError(f"the operator did not become Available: {exc}\n{inst.diagnostics(RELEASE_NAMESPACE)}")
    inst.timings["install_s"] = time.monotonic() - started
    print(f"\nloraplane installed with kubectl, operator Available in {inst.timings['install_s']:.1f}s")
    return inst


@pytest.fixture(scope="session")
def quickstart(installed, tiny_model_dir) -> Quickstart:
    """The quickstart's objects applied (not waited for: the flows wait for what they check)."""
    k = installed.kubectl
    k("create", "namespace", QS_NS)
    model = installed.pvc_dir(QS_NS, MODEL_CLAIM) / "tiny-llama"
    if not model.exists():
        shutil.copytree(tiny_model_dir, model)
    qk = k.ns(QS_NS)
    qk.apply([claim(MODEL_CLAIM), claim(ARTIFACT_CLAIM)])
    applied_at, applied_monotonic = time.time(), time.monotonic()
    qk.apply(quickstart_docs())
    return Quickstart(installed, qk, applied_at, applied_monotonic)
