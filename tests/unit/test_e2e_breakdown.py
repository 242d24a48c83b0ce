"""The e2e benchmark's latency splits (tests/support/e2e_flows.py), on canned objects: what each phase is measured
between, so a wrong mark shows here and not only as an odd number in a benchmark print."""

from __future__ import annotations

import json

from support.e2e_flows import first_token_breakdown, scale_from_zero_breakdown

T0 = 1_800_000_000.0   # an epoch second


def iso(offset: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(T0 + offset, timezone.utc).isoformat().replace("+00:00", "Z")


def pod(name: str, created: float, scheduled: float, started: float, ready: float | None, load: str) -> dict:
    report = {"adapters": {"a--1": {"state": "Ready", "since": iso(ready),
                                    "message": f"loaded: {load}"}}} if ready is not None else None
    return {"metadata": {"name": name, "creationTimestamp": iso(created),
                         "annotations": {"loraplane.io/adapters": json.dumps(report)} if report else {}},
            "status": {"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": iso(scheduled)}],
                       "containerStatuses": [{"name": "vllm", "state": {"running": {"startedAt": iso(started)}}}]}}


class FakeKubectl:
    def __init__(self, pods: list[dict]):
        self.pods = pods

    def get(self, *what: str) -> dict:
        if what[0] == "deployment":
            return {"metadata": {"creationTimestamp": iso(1)}}
        return {"items": self.pods}


def test_scale_from_zero_split_reads_the_woken_replica_only():
    # An old replica (created before the held request) still listed, and the woken one: sent at +100, pod at +102,
    # bound at +103, vLLM started at +105, the adapter Ready at +140 after 4 s of loader steps, answered at +141.5.
    kubectl = FakeKubectl([pod("old", 0, 1, 2, 30, "fetch 0.5s gate 0.1s load 1.0s probe 0.4s"),
                           pod("new", 102, 103, 105, 140, "fetch 1.0s gate 0.5s load 2.0s probe 0.5s")])
    split = scale_from_zero_breakdown(kubectl, "r", "a--1", T0 + 100, T0 + 141.5)
    assert split == {"wake": 2.0, "scheduling": 1.0, "process_start": 2.0, "vllm_start": 31.0, "adapter_load": 4.0,
                     "router_release": 1.5, "total": 41.5, "loader_fetch": 1.0, "loader_gate": 0.5,
                     "loader_load": 2.0, "loader_probe": 0.5}
    assert sum(v for k, v in split.items() if not k.startswith("loader_") and k != "total") == split["total"]


def test_first_token_split_is_unchanged():
    kubectl = FakeKubectl([pod("p", 2, 3, 5, 40, "gate 0.5s load 2.0s probe 0.5s")])
    split = first_token_breakdown(kubectl, "r", "a--1", T0, T0 + 42)
    assert split == {"operator": 1.0, "scheduling": 2.0, "process_start": 2.0, "vllm_start": 32.0,
                     "adapter_load": 3.0, "router_ready": 2.0, "total": 42.0, "loader_gate": 0.5, "loader_load": 2.0,
                     "loader_probe": 0.5}


def test_wake_timeline_counts_only_pods_after_start_and_first_times():
    from support.e2e_flows import WakeTimeline

    t = WakeTimeline()
    dep = {"kind": "Deployment", "spec": {"replicas": 0}}
    old = {"kind": "Pod", "metadata": {"name": "old"}, "spec": {"nodeName": "n"},
           "status": {"containerStatuses": [{"name": "vllm", "state": {"running": {}}}]}}
    t.observe(dep, 1.0)
    t.observe(old, 1.0)
    t._started = True
    t.observe(old, 2.0)                                    # still listed (terminating): not the woken pod
    t.observe(dep, 3.0)
    t.observe({**dep, "spec": {"replicas": 1}}, 4.0)
    new = {"kind": "Pod", "metadata": {"name": "new"}, "spec": {}, "status": {}}
    t.observe(new, 4.1)
    t.observe({**new, "spec": {"nodeName": "n"}}, 4.2)
    t.observe({**new, "spec": {"nodeName": "n"}, "status": {"containerStatuses": [
        {"name": "loader", "state": {"running": {}}}, {"name": "vllm", "state": {"waiting": {}}}]}}, 4.3)
    t.observe({**new, "spec": {"nodeName": "n"}, "status": {"containerStatuses": [
        {"name": "vllm", "state": {"running": {}}}]}}, 4.5)
    t.observe({**dep, "spec": {"replicas": 1}}, 9.0)
    assert t.stop() == {"woken": 4.0, "pod_created": 4.1, "scheduled": 4.2, "process_start": 4.5}


def test_scale_from_zero_split_with_watched_marks():
    kubectl = FakeKubectl([pod("new", 102, 103, 105, 140, "load 2.0s")])
    watched = {"woken": T0 + 100.05, "pod_created": T0 + 100.07, "scheduled": T0 + 100.1, "process_start": T0 + 100.5}
    split = scale_from_zero_breakdown(kubectl, "r", "a--1", T0 + 100, T0 + 141, watched)
    assert split == {"wake": 0.05, "replicaset": 0.02, "scheduling": 0.03, "process_start": 0.4, "vllm_start": 37.5,
                     "adapter_load": 2.0, "router_release": 1.0, "total": 41.0, "loader_load": 2.0}
