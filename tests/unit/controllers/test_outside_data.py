"""Issue 12 (also): malformed data from outside the operator (a pod's report annotation, a container's
termination message, a pod's status reason) is validated where it is read: an unknown reason becomes
UnknownReason (quoted in the message), a long message is cut, and neither raises inside a reconcile, fails the
status patch, nor becomes an unbounded metric label."""

from __future__ import annotations

import json

from test_status_logic import FTJ, ROUTE, T, adapter, job, pod

from loraplane.api.adapter import AdapterStatus
from loraplane.api.common import Condition
from loraplane.api.reasons import Reason
from loraplane.api.wire.serving import REPORT_ANNOTATION
from loraplane.controllers.adapter import adapter_status
from loraplane.controllers.finetunejob import pod_failure, run_state
from loraplane.kube.events import EVENTS_POSTED, Event, EventRecorder, EventType


def test_a_hostile_report_annotation_never_raises_and_reads_as_unknown_reason():
    raw = {"replica": "r-1", "route": "r", "generation": 2, "engine_ready": True, "updated_at": T,
           "adapters": {"a--1": {"state": "Failed", "reason": "OutOfnvidia.com/gpu " + "x" * 5000,
                                 "message": "m" * 100_000, "since": T}}}
    p = pod("r-1", ready=True)
    p["metadata"]["annotations"][REPORT_ANNOTATION] = json.dumps(raw)
    st = adapter_status(adapter("a"), [ROUTE], {"r": [p]}, AdapterStatus(), 1, None)
    ready = st.condition("Ready")
    assert ready.reason == Reason.UnknownReason
    assert "reported reason 'OutOfnvidia.com/gpu" in ready.message and len(ready.message) < 5000
    Condition.model_validate(ready.model_dump())     # what the status patch carries passes the CRD's pattern


def test_an_unknown_termination_message_reason_is_not_carried_as_is():
    msg = json.dumps({"reason": "TotallyNewReason", "message": "boom"})
    seen = run_state(FTJ, job(("Failed", "BackoffLimitExceeded", "x"), failed=2),
                     [pod("p1", "Failed", {"exitCode": 1, "reason": "Error", "message": msg})])
    assert seen.failure.reason == Reason.UnknownReason
    assert "reported reason 'TotallyNewReason'" in seen.failure.message and "boom" in seen.failure.message


def test_a_kubelet_reason_outside_the_condition_pattern_is_not_carried_as_is():
    failed = pod("p1", "Failed")
    failed["status"]["reason"] = "OutOfnvidia.com/gpu"
    failed["status"]["message"] = "Node didn't have enough resource"
    seen = run_state(FTJ, job(("Failed", "BackoffLimitExceeded", "x"), failed=2), [failed])
    assert seen.failure.reason == Reason.UnknownReason and "OutOfnvidia.com/gpu" in seen.failure.message
    evicted = pod("p2", "Failed")
    evicted["status"]["reason"] = "Evicted"
    assert pod_failure(evicted).reason == "Evicted"    # a reason the operator acts on keeps its meaning


async def test_event_metric_labels_are_a_bounded_set():
    class Kube:
        async def post_event(self, *args):
            pass

    recorder = EventRecorder(Kube())
    await recorder.post({"kind": "Adapter", "metadata": {}}, Event(EventType.Warning, "Weird" + "x" * 50, "m"))
    await recorder.post({"kind": "Pod", "metadata": {}}, Event(EventType.Warning, Reason.NoEffect, "m"))
    labels = {tuple(s.labels.values()) for m in EVENTS_POSTED.collect() for s in m.samples}
    assert not any("Weird" in r or k == "Pod" for k, r in labels)
    assert ("Adapter", "Other") in labels and ("Other", "NoEffect") in labels
