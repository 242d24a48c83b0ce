"""The loader in its cluster role, against a real kube-apiserver: it follows its ConfigMap and reports what
its vLLM really serves on /status (the operator copies it into the Pod's annotation: controllers/reports.py);
its token may write nothing, so the Pod stays unannotated by the loader itself."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from support.adapters import write_adapter
from support.loader_run import desired
from loraplane.api.wire.serving import CONFIGMAP_KEY, REPORT_ANNOTATION, ReplicaReport, ServingTable
from loraplane.local.tinymodel import MODEL_NAME
from support.vllm_server import free_port

pytestmark = [pytest.mark.apiserver, pytest.mark.vllm, pytest.mark.timeout(300)]


def table(server, generation: int, adapters) -> str:
    engine = server.route.spec.engine
    return ServingTable(route="tiny", namespace="x", generation=generation, base_model=MODEL_NAME,
                        served_model_name=server.served_name, model_path=str(server.model_dir),
                        max_lora_rank=engine.max_lora_rank, max_loras=engine.max_loras,
                        adapters=adapters).to_json()


def wait_report(port, predicate, timeout=90) -> ReplicaReport:
    deadline = time.monotonic() + timeout
    report = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
                report = ReplicaReport.model_validate_json(resp.read())
        except OSError:
            report = None
        if report and predicate(report):
            return report
        time.sleep(0.2)
    raise TimeoutError(f"report never matched; last: {report}")


def loader_kubeconfig(kube_cluster, kube_api, namespace: str, server, tmp_path) -> str:
    """A kubeconfig with the token of the replica's ServiceAccount, bound to the Role the operator builds for
    it: the loader runs with exactly the rights it has in a cluster."""
    from support.kube import engine_token
    from support.vllm_server import tiny_route

    route = tiny_route(server.model_dir)
    route.metadata.namespace = namespace
    token = engine_token(kube_api, namespace, route)
    return str(kube_cluster.kubeconfig_for_token(token, tmp_path / "loader.kubeconfig"))


def test_loader_follows_its_configmap_and_reports_on_status(kube_cluster, kube_api, namespace, vllm_server,
                                                            tmp_path):
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    kubeconfig = loader_kubeconfig(kube_cluster, kube_api, namespace, vllm_server, tmp_path)
    core.create_namespaced_pod(namespace, {"metadata": {"name": "replica-0"},
                                           "spec": {"containers": [{"name": "vllm", "image": "vllm"}]}})
    # In a cluster the loader reads no local paths (LocalSourceRefused): the adapters sit on a "mounted PVC".
    write_adapter(tmp_path / "pvc" / "claim" / "good", scale=0.05)
    write_adapter(tmp_path / "pvc" / "claim" / "wide", r=32)
    good, wide = "pvc://claim/good", "pvc://claim/wide"
    core.create_namespaced_config_map(namespace, {
        "metadata": {"name": "tiny-serving"},
        "data": {CONFIGMAP_KEY: table(vllm_server, 1, [desired("good", good), desired("wide", wide)])}})
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplane.loader", "--configmap", "tiny-serving", "--namespace", namespace,
         "--kubeconfig", kubeconfig, "--pod-name", "replica-0", "--vllm-url",
         vllm_server.base_url, "--cache-dir", str(tmp_path / "cache"), "--pvc-root", str(tmp_path / "pvc"), "--port", str(port),
         "--host", "127.0.0.1"], stdout=open(tmp_path / "loader.log", "wb"), stderr=subprocess.STDOUT)
    try:
        report = wait_report(port, lambda r: r.generation == 1
                             and {a.state for a in r.adapters.values()} <= {"Ready", "Incompatible"})
        assert report.replica == "replica-0" and report.engine_ready
        assert (report.adapters["good--v1"].state, report.adapters["wide--v1"].reason) == ("Ready", "RankTooLarge")

        # A new version arrives through the ConfigMap: loaded; the old one unloaded and gone from the report.
        core.patch_namespaced_config_map("tiny-serving", namespace, {"data": {
            CONFIGMAP_KEY: table(vllm_server, 2, [desired("good", good, version="v2")])}})
        report = wait_report(port, lambda r: r.generation == 2
                             and r.adapters.get("good--v2") and r.adapters["good--v2"].state == "Ready"
                             and set(r.adapters) == {"good--v2"})
        # An unreadable table is refused; the loader keeps serving the last good one.
        core.patch_namespaced_config_map("tiny-serving", namespace, {"data": {CONFIGMAP_KEY: "{not json"}})
        time.sleep(2)
        assert proc.poll() is None
        assert set(wait_report(port, lambda r: True).adapters) == {"good--v2"}
        # The loader wrote nothing to the API server (its Role only reads its ConfigMap).
        assert REPORT_ANNOTATION not in (core.read_namespaced_pod("replica-0", namespace).metadata.annotations or {})
        assert "not a valid serving table" in (tmp_path / "loader.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
