"""Pure status aggregation: how Job/Pod states and loader reports become FineTuneJob, ModelRoute and
Adapter status (the apiserver tests drive the same code through the real API)."""

from __future__ import annotations

import json

from loraplane.api.reasons import Reason
from loraplane.api import Adapter, FineTuneJob, ModelRoute
from loraplane.api.adapter import AdapterStatus
from loraplane.api.modelroute import ModelRouteStatus
from loraplane.builders import resolve
from loraplane.controllers.adapter import adapter_status
from loraplane.controllers.finetunejob import immutable_changes, run_state
from loraplane.controllers.modelroute import RouterFacts, route_status
from loraplane.api.wire.serving import REPORT_ANNOTATION, AdapterReport, ReplicaReport
from loraplane.api.wire.trainer import TerminationMessage
from support.loader_reports import check_sendable

T = "2026-01-01T00:00:00Z"
FTJ = FineTuneJob.model_validate({
    "kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns", "uid": "u"},
    "spec": {"baseModel": {"name": "org/base"}, "dataset": {"uri": "/d.jsonl"}, "output": {"adapterName": "a"},
             "backoffLimit": 1, "activeDeadlineSeconds": 600}})


def pod(name, phase="Pending", terminated=None, waiting=None, created=T, ready=False, report=None,
        labels=None):
    state = {}
    if terminated:
        state = {"terminated": terminated}
    elif waiting:
        state = {"waiting": waiting}
    elif phase == "Running":
        state = {"running": {"startedAt": T}}
    p = {"metadata": {"name": name, "creationTimestamp": created, "labels": labels or {}, "annotations": {}},
         "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}],
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
    if report:
        p["metadata"]["annotations"][REPORT_ANNOTATION] = report.to_annotation()
    return p


def job(*conditions, active=0, failed=0, succeeded=0):
    return {"spec": {}, "status": {"active": active, "failed": failed, "succeeded": succeeded, "startTime": T,
                                   "conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                                   "lastTransitionTime": T} for t, r, m in conditions]}}


def test_pending_running_and_image_pull():
    assert run_state(FTJ, None, []).phase == "Pending"
    assert run_state(FTJ, job(active=1), [pod("p", "Running")]).phase == "Running"
    seen = run_state(FTJ, job(active=1), [pod("p", waiting={"reason": "ImagePullBackOff", "message": "nope"})])
    assert seen.phase == "Pending" and seen.problem.reason == "ImagePull" and "nope" in seen.problem.message


def test_oom_after_backoff_limit_is_reported_as_oom():
    oom = {"exitCode": 137, "reason": "OOMKilled"}
    seen = run_state(FTJ, job(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                            failed=2), [pod("p1", "Failed", oom, created=T), pod("p2", "Failed", oom)])
    assert seen.phase == "Failed" and seen.failure.reason == "OOMKilled"
    assert "failed 2 time(s)" in seen.failure.message and "batchSize" in seen.failure.message


def test_trainer_reason_from_termination_message():
    msg = json.dumps({"reason": "DatasetNotFound", "message": "s3://b/k: NoSuchKey"})
    seen = run_state(FTJ, job(("Failed", "BackoffLimitExceeded", "x"), failed=2),
                   [pod("p1", "Failed", {"exitCode": 1, "reason": "Error", "message": msg})])
    assert (seen.failure.reason, seen.failure.message) == ("DatasetNotFound", "pod p1: s3://b/k: NoSuchKey (failed 1 time(s); "
                                                  "backoffLimit 1 reached)")


def test_deadline_and_plain_backoff():
    seen = run_state(FTJ, job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")), [])
    assert seen.failure.reason == "DeadlineExceeded" and "activeDeadlineSeconds=600" in seen.failure.message
    seen = run_state(FTJ, job(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")),
                   [])
    assert seen.failure.reason == "BackoffLimitExceeded"


def test_retrying_after_a_failed_pod():
    seen = run_state(FTJ, job(active=1, failed=1),
                   [pod("p1", "Failed", {"exitCode": 137, "reason": "OOMKilled"}), pod("p2", created="2027")])
    assert seen.phase == "Pending" and seen.problem.reason == "Retrying"


def policy_job(*conditions, **counts):
    j = job(*conditions, **counts)
    j["spec"]["podFailurePolicy"] = {"rules": []}  # as builders.finetunejob.job writes it on Kubernetes >= 1.26
    return j


def test_input_error_fails_at_once_under_the_pod_failure_policy():
    msg = json.dumps({"reason": "InvalidDataset", "message": "line 3: missing field text"})
    seen = run_state(FTJ, policy_job(("Failed", "PodFailurePolicy", "Container trainer for pod ns/p1 failed with "
                                    "exit code 65 matching FailJob rule at index 2"), failed=1),
                   [pod("p1", "Failed", {"exitCode": 65, "reason": "Error", "message": msg})])
    assert seen.phase == "Failed"
    assert (seen.failure.reason, seen.failure.message) == ("InvalidDataset", "pod p1: line 3: missing field text (not retried: a new pod "
                                                 "would fail the same way)")


def test_preemption_is_reported_as_such_and_counts_only_without_a_policy():
    preempted = pod("p1", "Failed", {"exitCode": 75, "reason": "Error",
                                     "message": json.dumps({"reason": "Preempted", "message": "checkpoint at 40"})})
    # Under the policy Kubernetes ignores it: status.failed stays 0.
    seen = run_state(FTJ, policy_job(active=1, failed=0), [preempted, pod("p2", created="2027")])
    assert seen.problem.reason == "Preempted"
    assert "resumes from the newest checkpoint" in seen.problem.message and "do not count" in seen.problem.message
    seen = run_state(FTJ, job(active=1, failed=1), [preempted, pod("p2", created="2027")])
    assert seen.problem.reason == "Preempted" and "(1 of 1 retries used)" in seen.problem.message
    # An eviction (the DisruptionTarget condition, no trainer message) is a disruption too.
    evicted = pod("p1", "Failed", {"exitCode": 137, "reason": "Error"})
    evicted["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True",
                                            "reason": "EvictionByEvictionAPI"})
    assert run_state(FTJ, policy_job(active=1), [evicted, pod("p2", created="2027")]).problem.reason == "Preempted"
    # A crash under the policy counts: the used retries come from the Job, not from the pods seen.
    crashed = pod("p1", "Failed", {"exitCode": 70, "reason": "Error"})
    seen = run_state(FTJ, policy_job(active=1, failed=1), [evicted, crashed, pod("p3", created="2027")])
    assert seen.problem.reason == "Retrying" and "(1 of 1 retries used)" in seen.problem.message


def test_success_result_from_termination_message():
    result = {"reason": "Succeeded", "artifact": {"uri": "s3://b/a", "sha256": "c" * 64},
              "metrics": {"train_loss": 1.5}}
    seen = run_state(FTJ, job(("Complete", None, None), succeeded=1),
                   [pod("p", "Succeeded", {"exitCode": 0, "reason": "Completed", "message": json.dumps(result)})])
    assert seen.phase == "Succeeded" and seen.result == TerminationMessage.model_validate(result)


def test_immutable_changes_name_the_fields():
    a = {"baseModel": {"name": "x"}, "backoffLimit": 1, "image": "i"}
    b = {"baseModel": {"name": "y"}, "backoffLimit": 5, "image": "j"}
    assert immutable_changes(a, b) == ["spec.baseModel", "spec.image"]


ROUTE = ModelRoute.model_validate({
    "kind": "ModelRoute", "metadata": {"name": "r", "namespace": "ns", "generation": 2},
    "spec": {"baseModel": {"name": "org/base"}, "engine": {"maxLoraRank": 16},
             "routes": [{"name": "m", "backends": [{"adapter": "a", "weight": 50}, {"base": True, "weight": 50}]},
                        {"selector": {"matchLabels": {"team": "x"}}, "prefix": "x/"}]}})
# The route's router Deployment, rolled out with one available pod (route_status needs it for Ready).
ROUTER_UP = RouterFacts({"metadata": {"generation": 1}, "spec": {"replicas": 1},
                         "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
                                    "availableReplicas": 1, "readyReplicas": 1}})


def adapter(name, rank=8, base="org/base", labels=None):
    return Adapter.model_validate({"kind": "Adapter", "metadata": {"name": name, "namespace": "ns",
                                                                    "labels": labels or {}},
                                   "spec": {"baseModel": {"name": base}, "source": {"uri": f"s3://b/a/{name}"},
                                            "version": "1", "rank": rank}})


def report(pod_name, adapters, engine_ready=True):
    """A hand-written replica report for the status logic's unit tests: only (state, reason) pairs the real
    loader sends (support.loader_reports; tests/unit/controllers/test_failure_truth.py takes them from it)."""
    for s, r in adapters.values():
        check_sendable(s, r)
    return ReplicaReport(replica=pod_name, route="r", generation=2, engine_ready=engine_ready, updated_at=T,
                         adapters={k: AdapterReport(state=s, reason=r, since=T) for k, (s, r) in adapters.items()})


def test_route_status_counts_ready_backends_per_model():
    adapters = [adapter("a"), adapter("big", rank=64, labels={"team": "x"})]
    res = resolve(ROUTE, adapters)
    pods = [pod("r-1", ready=True, report=report("r-1", {"a--1": ("Ready", "Loaded")})),
            pod("r-2", ready=True, report=report("r-2", {"a--1": ("Loading", "Loading")})),
            pod("r-3", ready=False, report=report("r-3", {"a--1": ("Ready", "Loaded")}))]
    deployment = {"status": {"replicas": 3, "updatedReplicas": 3, "readyReplicas": 2}}
    st = route_status(ROUTE, res, deployment, pods, 2, ModelRouteStatus(), router=ROUTER_UP)
    assert (st.replicas, st.ready_replicas, st.phase, st.observed_generation) == (3, 2, "Ready", 2)
    m = st.models[0]
    assert m.name == "m" and m.ready
    assert [(b.served_name, b.ready_replicas) for b in m.backends] == [("a--1", 1), ("org/base", 2)]
    assert st.condition("Ready").status == "True"
    assert res.selected["big"].reason == "RankTooLarge"
    st0 = route_status(ROUTE, res, {"status": {"replicas": 1}}, [], 2, ModelRouteStatus(), router=ROUTER_UP)
    assert st0.phase == "Progressing" and st0.condition("Ready").reason == "NoReadyReplicas"
    assert st0.endpoint == "http://r-router.ns.svc:8080/v1"


def engine_pod(name, created=T, conditions=(), containers=None, init=None):
    """An engine pod as the API server shows it (no kubelet here: statuses written as kubelet would)."""
    status = {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}, *conditions],
              "containerStatuses": [{"name": n, "ready": False, "restartCount": cs.pop("restartCount", 0), **cs}
                                    for n, cs in (containers or {}).items()]}
    if init:
        status["initContainerStatuses"] = [{"name": n, "ready": False, "restartCount": cs.pop("restartCount", 0),
                                            **cs} for n, cs in init.items()]
    return {"metadata": {"name": name, "creationTimestamp": created, "labels": {}, "annotations": {}},
            "status": status}


def test_route_status_says_why_no_replica_is_ready():
    res = resolve(ROUTE, [adapter("a")])
    deployment = {"status": {"replicas": 1}}

    def ready_of(*pods):
        c = route_status(ROUTE, res, deployment, list(pods), 2, ModelRouteStatus(), router=ROUTER_UP).condition("Ready")
        return c.reason, c.message

    gpus = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}
    reason, message = ready_of(engine_pod("r-1", conditions=[gpus]))
    assert reason == "Unschedulable" and "Insufficient nvidia.com/gpu" in message and "spec.engine.gpus" in message
    assert message.startswith("0 of 1 engine replicas are ready: pod r-1 cannot be scheduled")

    pull = {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}},
            "image": "registry.internal/vllm:v0.11.0"}
    reason, message = ready_of(engine_pod("r-1", containers={"vllm": pull, "adapter-loader": {}}))
    assert reason == "ImagePull" and "vllm container (registry.internal/vllm:v0.11.0)" in message

    crash = {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "restartCount": 3,
             "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "ValueError: The model's "
                                          "max seq len (32768) is larger than the KV cache (21000)"}}}
    reason, message = ready_of(engine_pod("r-1", containers={"vllm": crash, "adapter-loader": {}}))
    assert reason == "EngineFailing"
    assert "container vllm exited with code 1 (3 restarts): ValueError: The model's max seq len" in message

    fetch = {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "restartCount": 1,
             "lastState": {"terminated": {"exitCode": 1, "message": "spec.baseModel.uri s3://m/x: no objects"}}}
    reason, message = ready_of(engine_pod("r-1", init={"model-fetch": fetch}))
    assert reason == "ModelFetchFailed" and "spec.baseModel.uri s3://m/x: no objects" in message
    written = json.dumps({"reason": "ModelFetchFailed", "message": "spec.baseModel.uri s3://m/x: no objects"})
    fetch = {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "restartCount": 1,  # as fetch-model writes it
             "lastState": {"terminated": {"exitCode": 1, "message": written}}}
    reason, message = ready_of(engine_pod("r-1", init={"model-fetch": fetch}))
    assert reason == "ModelFetchFailed" and message.endswith("(1 restarts): spec.baseModel.uri s3://m/x: no objects")

    # The newest pod speaks; a pod that is only starting gives no reason (still NoReadyReplicas).
    old = engine_pod("r-0", created="2025-01-01T00:00:00Z", conditions=[gpus])
    starting = engine_pod("r-1", containers={"vllm": {"state": {"running": {}}}, "adapter-loader": {}})
    assert ready_of(old, starting)[0] == "Unschedulable"
    assert ready_of(starting)[0] == "NoReadyReplicas"
    oom = {"state": {"running": {}}, "restartCount": 2,
           "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
    assert "OOMKilled (raise the memory limit)" in ready_of(engine_pod("r-1", containers={"vllm": oom}))[1]


def test_trainer_pod_that_fits_no_node_says_so():
    unschedulable = pod("p1")
    unschedulable["status"]["conditions"].append(
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."})
    seen = run_state(FTJ, job(active=1), [unschedulable])
    assert seen.problem.reason == "Unschedulable" and "spec.resources" in seen.problem.message


def test_adapter_status_from_routes_and_reports():
    a = adapter("a")
    pods = {"r": [pod("r-1", ready=True, report=report("r-1", {"a--1": ("Ready", "Loaded")}))]}
    st = adapter_status(a, [ROUTE], pods, AdapterStatus(), 1, None)
    assert st.phase == "Ready" and st.routes == ["r"] and st.loaded_on[0].replica == "r-1"
    assert st.condition("Ready").reason == "Loaded" and st.condition("Compatible").status == "True"
    refused = {"r": [pod("r-1", ready=True, report=report("r-1", {"a--1": ("Incompatible", "RankTooLarge")}))]}
    st = adapter_status(a, [ROUTE], refused, AdapterStatus(), 1, None)
    assert st.phase == "Incompatible" and st.condition("Ready").reason == "RankTooLarge"
    # The loader reports a no-effect adapter as Failed (it was loaded and probed), never as Incompatible.
    broken = {"r": [pod("r-1", ready=True, report=report("r-1", {"a--1": ("Failed", "NoEffect")}))]}
    st = adapter_status(a, [ROUTE], broken, AdapterStatus(), 1, None)
    assert st.phase == "Failed" and st.condition("Ready").reason == "NoEffect"
    big = adapter("big", rank=64, labels={"team": "x"})
    st = adapter_status(big, [ROUTE], {}, AdapterStatus(), 1, None)
    assert st.phase == "Incompatible" and st.condition("Compatible").reason == "RankTooLarge"
    lonely = adapter("lonely")
    st = adapter_status(lonely, [ROUTE], {}, AdapterStatus(), 1, None)
    assert st.phase == "Pending" and st.condition("Ready").reason == "NoRoute"


# --- issue 13, item 6: Ready only once the current generation is rolled out ----------------------------------

def rolling(generation=3, replicas=2, updated=1, ready=1, conditions=(), hash_="h-new"):
    """The engine Deployment mid-rollout: the previous spec's replica serves, the surge replica is new."""
    return {"metadata": {"generation": generation, "annotations": {"loraplane.io/spec-hash": hash_}},
            "spec": {"replicas": 1},
            "status": {"observedGeneration": generation, "replicas": replicas, "updatedReplicas": updated,
                       "readyReplicas": ready, "availableReplicas": ready, "conditions": list(conditions)}}


def serving_old_pod():
    return pod("r-old", ready=True, report=report("r-old", {"a--1": ("Ready", "Loaded")}))


def test_route_is_not_ready_while_the_new_generation_cannot_roll_out():
    """spec.engine.image changed to a tag that does not exist: the new pod sits in ImagePullBackOff, the old
    replica keeps serving. Ready must be False at the new observedGeneration with the pod's reason (it was
    Ready=True: ready replicas and ready models were all the status looked at)."""
    res = resolve(ROUTE, [adapter("a")])
    later = "2026-01-01T00:05:00Z"
    pull = {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}},
            "image": "vllm/vllm-openai:v9.9.9"}
    pods = [serving_old_pod(), engine_pod("r-new", created=later, containers={"vllm": pull, "adapter-loader": {}})]
    st = route_status(ROUTE, res, rolling(), pods, 3, ModelRouteStatus(), "h-new", router=ROUTER_UP)
    ready = st.condition("Ready")
    assert (ready.status, ready.reason, ready.observed_generation) == ("False", "ImagePull", 3)
    assert "generation 3 is not rolled out" in ready.message and "1 ready replica(s) keep serving" in ready.message
    assert "vllm/vllm-openai:v9.9.9" in ready.message and "ImagePullBackOff" in ready.message
    assert st.ready_replicas == 1 and st.models[0].ready  # the old replica still serves, and says so
    assert st.phase == "Degraded"

    crash = {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "restartCount": 2,
             "lastState": {"terminated": {"exitCode": 1, "message": "unrecognized arguments: --bad-flag"}}}
    pods = [serving_old_pod(), engine_pod("r-new", created=later, containers={"vllm": crash, "adapter-loader": {}})]
    ready = route_status(ROUTE, res, rolling(), pods, 3, ModelRouteStatus(), "h-new", router=ROUTER_UP).condition("Ready")
    assert ready.reason == "EngineFailing" and "--bad-flag" in ready.message


def test_route_rollout_progress_stall_and_completion():
    res = resolve(ROUTE, [adapter("a")])
    starting = engine_pod("r-new", created="2026-01-01T00:05:00Z", containers={"vllm": {}, "adapter-loader": {}})

    def ready_of(deployment, desired="h-new", pods=None):
        return route_status(ROUTE, res, deployment, pods or [serving_old_pod(), starting], 3, ModelRouteStatus(),
                            desired, router=ROUTER_UP).condition("Ready")

    c = ready_of(rolling())
    assert (c.status, c.reason) == ("False", "Progressing") and "1 replica(s) of the previous spec" in c.message
    c = ready_of(rolling(hash_="h-old", replicas=1, updated=1))   # the store still has the previous Deployment
    assert (c.status, c.reason) == ("False", "Progressing") and "does not have the current spec" in c.message
    unseen = rolling(replicas=1, updated=1)
    unseen["status"]["observedGeneration"] = 2                     # the Deployment controller lags
    assert ready_of(unseen).reason == "Progressing"
    deadline = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
    assert ready_of(rolling(conditions=[deadline])).reason == "RolloutStalled"
    done = rolling(replicas=1, updated=1)
    c = ready_of(done, pods=[serving_old_pod()])
    assert (c.status, c.reason) == ("True", "Ready")
    assert ready_of(done, desired=None, pods=[serving_old_pod()]).status == "True"  # hash unknown: the rest decides


def test_route_is_not_ready_without_a_router_serving_its_endpoint():
    """Issue 13 review p8: Ready looked only at the engine. With router.replicas 0, no router Deployment, a router
    pod that cannot pull its image or a router rollout of the current spec not done, the endpoint has nothing
    (or the previous router) behind it: Ready is False with the router's reason."""
    res = resolve(ROUTE, [adapter("a")])
    pods = [serving_old_pod()]
    done = rolling(replicas=1, updated=1)

    def ready_of(router, route=ROUTE, engine=done, engine_pods=pods):
        return route_status(route, res, engine, engine_pods, 3, ModelRouteStatus(), "h-new",
                            router=router).condition("Ready")

    c = ready_of(ROUTER_UP)
    assert (c.status, c.reason) == ("True", "Ready")
    zero = ROUTE.model_copy(update={"spec": ROUTE.spec.model_copy(update={
        "router": ROUTE.spec.router.model_copy(update={"replicas": 0})})})
    c = ready_of(ROUTER_UP, route=zero)
    assert (c.status, c.reason) == ("False", "RouterScaledToZero")
    c = ready_of(RouterFacts(None))
    assert (c.status, c.reason) == ("False", "RouterNotReady") and "r-router" in c.message
    broken = rolling(replicas=2, updated=1, ready=1)   # the router's new spec: one new pod, not available yet
    pull = {"state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}, "image": "nope/router:0"}
    new_pod = engine_pod("r-router-new", created="2026-01-01T00:05:00Z", containers={"router": pull})
    c = ready_of(RouterFacts(broken, [new_pod], "h-new"))
    assert (c.status, c.reason) == ("False", "RouterFailing") and "nope/router:0" in c.message
    c = ready_of(RouterFacts(broken, [], "h-new"))
    assert (c.status, c.reason) == ("False", "RouterNotReady") and "previous spec keep serving" in c.message
    # The store still holds the router Deployment of the previous spec: not rolled out yet.
    c = ready_of(RouterFacts(ROUTER_UP.deployment | {"metadata": {"generation": 1, "annotations": {
        "loraplane.io/spec-hash": "h-old"}}}, [], "h-new"))
    assert (c.status, c.reason) == ("False", "RouterNotReady")
    # The engine is still starting but the router is broken for good: the Stalled reason wins.
    starting = engine_pod("r-1", containers={"vllm": {}, "adapter-loader": {}})
    c = ready_of(RouterFacts(broken, [new_pod], "h-new"), engine={"status": {"replicas": 1}}, engine_pods=[starting])
    assert (c.status, c.reason) == ("False", "RouterFailing") and "engine: 0 of 1" in c.message


def test_an_adapter_left_out_of_a_full_serving_table_says_so():
    from loraplane.api.adapter import AdapterStatus
    from loraplane.builders.resolution import Verdict
    from loraplane.controllers.adapter import adapter_status

    full = Verdict(False, Reason.ServingTableFull, "Adapter a is left out of route r's serving table: ...")
    st = adapter_status(adapter("a"), [ROUTE], {}, AdapterStatus(), 1, None, {"r": full})
    ready = st.condition("Ready")
    assert (ready.status, ready.reason) == ("False", "ServingTableFull") and "left out" in ready.message
    assert st.condition("Stalled") is not None


# Refusals captured from the v1.20 kube-apiserver with the PodSecurityPolicy plugin and the restricted policy
# (tests/integration/apiserver/test_pod_security_admission.py produces them live): the Deployment's ReplicaFailure
# condition and the Job controller's FailedCreate Event message.
PSP_REFUSAL = ('pods "r-5b78c6f4d-" is forbidden: PodSecurityPolicy: unable to admit pod: '
               '[spec.containers[0].securityContext.runAsNonRoot: Invalid value: false: must be true]')
JOB_REFUSAL = 'Error creating: pods "j-" is forbidden: PodSecurityPolicy: unable to admit pod: ' \
              '[spec.containers[0].securityContext.runAsNonRoot: Invalid value: false: must be true]'


def refused_deployment(generation=1, replicas=1):
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": generation, "conditions": [
                {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
                {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": PSP_REFUSAL}]}}


def test_a_pod_refused_by_admission_shows_in_the_route_status():
    """Issue 12: a pod refused by Pod Security admission never exists, so no pod status can say why; the
    Deployment's ReplicaFailure condition does, and the route's Ready carries it (engine and router)."""
    res = resolve(ROUTE, [adapter("a")])
    ready = route_status(ROUTE, res, refused_deployment(), [], 2, ModelRouteStatus(),
                         router=ROUTER_UP).condition("Ready")
    assert (ready.status, ready.reason) == ("False", "PodsRefused")
    assert "engine pods" in ready.message and "runAsNonRoot: Invalid value: false" in ready.message
    # A rollout whose new pods are refused while an old replica serves: Degraded with the refusal.
    serving = rolling(replicas=1, updated=0, ready=1)
    serving["status"]["conditions"] = refused_deployment()["status"]["conditions"]
    st = route_status(ROUTE, res, serving, [serving_old_pod()], 3, ModelRouteStatus(), "h-new", router=ROUTER_UP)
    assert (st.condition("Ready").reason, st.phase) == ("PodsRefused", "Degraded")
    router = RouterFacts(refused_deployment(replicas=1))
    ready = route_status(ROUTE, res, rolling(replicas=1, updated=1), [serving_old_pod()], 3, ModelRouteStatus(),
                         "h-new", router=router).condition("Ready")
    assert ready.reason == "PodsRefused" and "router pods" in ready.message


def test_a_trainer_pod_refused_by_admission_shows_in_the_job_status():
    """The Job controller writes the refusal only into a FailedCreate Event; run_state shows it while the Job has
    no pod, and a pod that exists wins (its own state says more)."""
    state = run_state(FTJ, job(), [], JOB_REFUSAL)
    assert state.problem is not None and state.problem.reason == "PodsRefused"
    assert "runAsNonRoot" in state.problem.message
    assert run_state(FTJ, job(active=1), [pod("p", "Running")], JOB_REFUSAL).problem is None


PRESIGNED = ("https://bucket.s3.amazonaws.com/lora/a.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=deadbeefcafe")


def test_a_presigned_source_is_recorded_in_status_without_its_signature():
    """Issue 12 ("presigned URIs redacted in status"): status.artifact.uri copied spec.source.uri as is; status is
    read by more than the spec's author. It is recorded scrubbed, and the scrubbed record still matches the
    source (a re-signed URL of the same object is the same source, not a change under the version)."""
    from loraplane.controllers.adapter import record_artifact, version_rejection

    a = Adapter.model_validate({"kind": "Adapter", "metadata": {"name": "a", "namespace": "ns"},
                                "spec": {"baseModel": {"name": "org/base"}, "source": {"uri": PRESIGNED},
                                         "version": "1", "rank": 8}})
    new = AdapterStatus(version="1")
    record_artifact(a, new, {"r-1": "ab" * 32})
    assert new.artifact.uri.startswith("https://bucket.s3.amazonaws.com/lora/a.tar.gz?")
    assert "deadbeefcafe" not in new.artifact.uri and "AKIAEXAMPLE" not in new.artifact.uri
    assert version_rejection(a, new) is None
    moved = a.model_copy(update={"spec": a.spec.model_copy(update={"source": a.spec.source.model_copy(
        update={"uri": PRESIGNED.replace("/a.tar.gz", "/b.tar.gz")})})})
    assert version_rejection(moved, new).reason == "SpecImmutable"


def test_a_presigned_dataset_uri_reaches_the_adapters_provenance_scrubbed():
    """The produced Adapter's provenance.datasetUri quoted the FineTuneJob's dataset URI as is: whoever may read
    the Adapter (a wider audience than the job's) got the dataset's presigned signature."""
    from loraplane.builders.finetunejob import provenance

    job = FTJ.model_copy(update={"spec": FTJ.spec.model_copy(update={"dataset": FTJ.spec.dataset.model_copy(
        update={"uri": PRESIGNED})})})
    uri = provenance(job, None, T)["datasetUri"]
    assert uri.startswith("https://bucket.s3.amazonaws.com/lora/a.tar.gz?")
    assert "deadbeefcafe" not in uri and "AKIAEXAMPLE" not in uri


def test_route_scaled_to_zero_is_settled_not_starting():
    """An autoscaled route whose engine Deployment asks for 0 replicas (KEDA after scaleToZeroAfterSeconds, or by
    hand) is ScaledToZero, an Idle reason (kstatus Current, Argo CD Suspended), not a start that never ends; a
    route with fixed replicas, or one that asks for replicas it does not have yet, is still NoReadyReplicas."""
    from loraplane.api.conditions import IDLE_REASONS

    auto = ROUTE.model_copy(deep=True)
    auto.spec.autoscaling = ModelRoute.model_validate({"kind": "ModelRoute", "metadata": {"name": "x"}, "spec": {
        "baseModel": {"name": "b"}, "autoscaling": {"backend": "keda", "minReplicas": 0, "maxReplicas": 2}}}
    ).spec.autoscaling
    res = resolve(auto, [])
    at_zero = {"spec": {"replicas": 0}, "status": {"observedGeneration": 1}}
    st = route_status(auto, res, at_zero, [], 2, ModelRouteStatus(), router=ROUTER_UP)
    ready = st.condition("Ready")
    assert (st.phase, ready.status, ready.reason) == ("ScaledToZero", "False", "ScaledToZero")
    assert Reason.ScaledToZero in IDLE_REASONS and "300 s" in ready.message
    waking = {"spec": {"replicas": 1}, "status": {"replicas": 1}}
    assert route_status(auto, res, waking, [], 2, ModelRouteStatus(),
                        router=ROUTER_UP).condition("Ready").reason == "NoReadyReplicas"
    fixed = route_status(ROUTE, resolve(ROUTE, []), at_zero, [], 2, ModelRouteStatus(), router=ROUTER_UP)
    assert fixed.condition("Ready").reason == "NoReadyReplicas"
