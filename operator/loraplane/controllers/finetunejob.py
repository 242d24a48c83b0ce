"""FineTuneJob reconcile: children (config, RBAC, Job), status from the Job and its pods, the Adapter on
success.

Status follows reality and nothing else: the Job's conditions say whether it finished; the pods say why a
run failed (OOMKilled, an image that cannot be pulled, the trainer's own {"reason","message"} termination
message); the trainer patches `status.progress` itself, so the operator never writes that key.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from loraplane.api.adapter import Adapter
from loraplane.api.common import API_VERSION, now_rfc3339, set_condition
from loraplane.api.finetunejob import AdapterRef, ArtifactRef, Failure, FineTuneJob, FineTuneJobStatus
from loraplane.builders import finetunejob
from loraplane.api.validation import format_validation_error
from loraplane.controllers.pods import (container_status, image_pull_problem, last_terminated, parse_message,
                                        pod_name, unschedulable)
from loraplane.controllers.runtime import Key, dump_status, owned_status, status_patch, write_invalid
from loraplane.api.wire.trainer import REASONS_BY_EXIT_CODE

if TYPE_CHECKING:
    from loraplane.controllers.operator import Operator

API = API_VERSION
OWNED_STATUS = ("phase", "observedGeneration", "conditions", "startTime", "completionTime", "jobName", "attempts",
                "adapterRef", "artifact", "failure")
# Fields a running job may change; everything else in the spec is fixed once the Job exists.
MUTABLE_FIELDS = ("backoffLimit", "activeDeadlineSeconds", "suspend")
TERMINAL = ("Succeeded", "Failed")


def immutable_changes(accepted: dict, desired: dict) -> list[str]:
    """spec.* fields whose value differs from the accepted (running) configuration."""
    keys = sorted((set(accepted) | set(desired)) - set(MUTABLE_FIELDS))
    return [f"spec.{k}" for k in keys if accepted.get(k) != desired.get(k)]


def _container_status(pod: dict) -> dict:
    return container_status(pod, finetunejob.TRAINER_CONTAINER)


def pod_failure(pod: dict) -> tuple[str, str] | None:
    """Why a trainer pod failed, categorised: the trainer's reason, OOMKilled, Evicted, or the exit code."""
    status = pod.get("status") or {}
    name = pod["metadata"]["name"]
    term = last_terminated(_container_status(pod))
    if term and term.get("exitCode", 0) != 0:
        msg = parse_message(term.get("message"))
        if term.get("reason") == "OOMKilled":
            return "OOMKilled", (f"pod {name}: the trainer ran out of memory (OOMKilled); lower "
                                 "training.batchSize or maxSeqLength, enable gradientCheckpointing, use qlora, "
                                 "or raise resources.memory / use larger GPUs")
        if msg and msg.get("reason"):
            return str(msg["reason"]), f"pod {name}: {msg.get('message', '')}".rstrip(": ")
        tail = (term.get("message") or "").strip()[-600:]
        if reason := REASONS_BY_EXIT_CODE.get(term.get("exitCode")):  # message lost: the exit code says why
            return reason, f"pod {name}: the trainer exited with code {term.get('exitCode')} ({reason})" + (
                f": {tail}" if tail else "")
        return "TrainerError", (f"pod {name}: the trainer exited with code {term.get('exitCode')}"
                                + (f": {tail}" if tail else ""))
    if status.get("phase") == "Failed" and status.get("reason"):
        return str(status["reason"]), f"pod {name}: {status.get('message', '')}"
    return None


def disrupted(pod: dict, failure: tuple[str, str]) -> bool:
    """Ended by the cluster (preemption, eviction, drain) or by SIGTERM after a checkpoint: not the run's fault."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return failure[0] in ("Preempted", "Evicted") or any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in conditions)


def pod_waiting_problem(pod: dict) -> tuple[str, str] | None:
    """Why a trainer pod does not start: an image it cannot pull, or no node with what it asks for."""
    if problem := image_pull_problem(pod, (finetunejob.TRAINER_CONTAINER,)):
        return "ImagePull", f"{problem}; check spec.image (or the chart's trainerImage) and imagePullSecrets"
    if message := unschedulable(pod):
        return "Unschedulable", (f"pod {pod_name(pod)} cannot be scheduled: {message}; check "
                                 "spec.resources (gpus, gpuType, nodeSelector, tolerations) against the cluster's "
                                 "free capacity")
    return None


def success_result(pods: list[dict]) -> dict[str, Any] | None:
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True):
        term = last_terminated(_container_status(pod))
        if term and term.get("exitCode") == 0:
            return parse_message(term.get("message")) or {}
    return None


def artifact_of(result: dict[str, Any], fallback_uri: str) -> tuple[str, str | None]:
    art = result.get("artifact") if isinstance(result.get("artifact"), dict) else {}
    uri = art.get("uri") or result.get("artifactUri") or result.get("artifact_uri") or fallback_uri
    sha = art.get("sha256") or result.get("artifactSha256") or result.get("artifact_sha256")
    return uri, sha


def _job_condition(job: dict | None, type_: str) -> dict | None:
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def observe(ftj: FineTuneJob, job: dict | None, pods: list[dict]) -> dict[str, Any]:
    """Phase, failure and waiting problem from the Job and its pods (pure)."""
    pods = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    js = (job or {}).get("status") or {}
    out: dict[str, Any] = {"phase": "Pending", "failure": None, "problem": None,
                           "attempts": (js.get("active") or 0) + (js.get("failed") or 0) + (js.get("succeeded") or 0),
                           "startTime": js.get("startTime"), "completionTime": js.get("completionTime")}
    failed_pods = [(p, f) for p, f in ((p, pod_failure(p)) for p in pods) if f]
    failures = [f for _, f in failed_pods]
    # With the Job's podFailurePolicy, disruptions and input errors are handled by Kubernetes (see
    # builders.training.pod_failure_policy); status.failed then counts only what uses up backoffLimit.
    policy = bool(((job or {}).get("spec") or {}).get("podFailurePolicy"))
    if _job_condition(job, "Complete"):
        out["phase"] = "Succeeded"
        out["result"] = success_result(pods)
    elif cond := _job_condition(job, "Failed"):
        out["phase"] = "Failed"
        out["completionTime"] = out["completionTime"] or cond.get("lastTransitionTime")
        job_reason = cond.get("reason") or "JobFailed"
        if job_reason == "DeadlineExceeded":
            out["failure"] = ("DeadlineExceeded", f"the run exceeded activeDeadlineSeconds="
                              f"{ftj.spec.active_deadline_seconds}: {cond.get('message', '')}".rstrip(": ")
                              + "; raise activeDeadlineSeconds or train fewer steps (checkpoints are kept)")
        elif failures and job_reason == "PodFailurePolicy":
            reason, message = failures[-1]
            out["failure"] = (reason, f"{message} (not retried: a new pod would fail the same way)")
        elif failures:
            reason, message = failures[-1]
            out["failure"] = (reason, f"{message} (failed {len(failures)} time(s); backoffLimit "
                                      f"{ftj.spec.backoff_limit} reached)")
        else:
            out["failure"] = (job_reason, cond.get("message") or "the Job failed")
    elif (job or {}).get("spec", {}).get("suspend"):
        out["phase"] = "Suspended"
    elif any((p.get("status") or {}).get("phase") == "Running" for p in pods):
        out["phase"] = "Running"
    if out["phase"] in ("Pending", "Running"):
        problems = [w for w in (pod_waiting_problem(p) for p in pods) if w]
        if problems:
            out["problem"] = problems[-1]
        elif failed_pods and out["phase"] == "Pending":
            last_pod, (reason, message) = failed_pods[-1]
            used = (js.get("failed") or 0) if policy else len(failures)
            if disrupted(last_pod, (reason, message)):
                out["problem"] = ("Preempted", f"{message}; a new pod resumes from the newest checkpoint" + (
                    " (disruptions do not count against backoffLimit)" if policy else
                    f" ({used} of {ftj.spec.backoff_limit} retries used)"))
            else:
                out["problem"] = ("Retrying", f"{message}; retrying ({used} of {ftj.spec.backoff_limit} "
                                              "retries used), resuming from the newest checkpoint")
    return out


async def reconcile(op: "Operator", key: Key) -> None:
    body = op.ftjs.get(key)
    if body is None:  # deleted: its children are garbage-collected through their ownerReferences
        op.forget(key)
        return
    ftj = op.ftjs.parsed(key, FineTuneJob)
    meta = body["metadata"]
    generation = meta.get("generation")
    current = body.get("status") or {}
    if isinstance(ftj, ValidationError):
        await write_invalid(op, body, current, generation, format_validation_error(ftj, "spec field "))
        return
    ns, name = key
    status = owned_status(FineTuneJobStatus, current, OWNED_STATUS)
    settings = op.settings.build
    config = finetunejob.trainer_config(ftj, settings)
    accepted = await op.accepted_ftj_spec(ftj) if current else None  # never reconciled: nothing accepted yet
    rejected = immutable_changes(accepted, config["spec"]) if accepted is not None else []
    terminal = status.phase in TERMINAL
    if not rejected and not terminal:
        kids = finetunejob.children(ftj, settings)
        written = await op.applier.ensure([kids[:-1], kids[-1:]], fresh=not current)
        if written:
            op.remember_ftj_spec(ftj, config["spec"])
    job = op.jobs.get((ns, finetunejob.job_name(ftj)))
    pods = op.train_pods.group(ns, name)
    seen = observe(ftj, job, pods)
    if terminal and job is None:
        seen = {"phase": status.phase, "failure": None, "problem": None, "attempts": status.attempts,
                "startTime": status.start_time, "completionTime": status.completion_time, "keep": True}

    new = status.model_copy(deep=True)
    new.observed_generation = generation
    new.job_name = finetunejob.job_name(ftj)
    event: tuple[str, str, str] | None = None
    if not seen.get("keep"):
        new.phase = seen["phase"]
        new.attempts = seen["attempts"]
        new.start_time = seen["startTime"]
        new.completion_time = seen["completionTime"]
        if seen["failure"]:
            reason, message = seen["failure"]
            new.failure = Failure(reason=reason, message=message)
        else:
            new.failure = None
    if new.phase == "Succeeded" and new.adapter_ref is None:
        result = seen.get("result") or {}
        uri, sha = artifact_of(result, finetunejob.output_uri(ftj, settings))
        version = await ensure_adapter(op, ftj, uri, sha, result, new.completion_time)
        new.adapter_ref = AdapterRef(name=ftj.spec.output.adapter_name, version=version)
        new.artifact = ArtifactRef(uri=uri, sha256=sha)
        event = ("Normal", "Succeeded", f"training finished; Adapter {ftj.spec.output.adapter_name} version "
                                        f"{version} points at {uri}"
                 + ("" if seen.get("result") else " (the trainer reported no result message: no sha256, "
                                                  "metrics or dataset digest)"))
    # Ready: kstatus reads it; the reason says what the user is waiting for or must fix.
    if rejected:
        ready = ("False", "SpecImmutable",
                 f"{', '.join(rejected)} cannot change while the job exists (immutable); revert the change "
                 "or create a new FineTuneJob. The running job keeps its original spec.")
    elif new.phase == "Succeeded":
        ready = ("True", "Succeeded", f"Adapter {ftj.spec.output.adapter_name} version "
                                      f"{(new.adapter_ref.version if new.adapter_ref else '')} created")
    elif new.phase == "Failed":
        ready = ("False", new.failure.reason if new.failure else "Failed",
                 new.failure.message if new.failure else "the Job failed")
    elif seen.get("problem"):
        ready = ("False", *seen["problem"])
    elif new.phase == "Running":
        ready = ("False", "Running", "training; see status.progress")
    elif new.phase == "Suspended":
        ready = ("False", "Suspended", "spec.suspend is true")
    else:
        ready = ("False", "Pending", f"waiting for Job {finetunejob.job_name(ftj)} to start a pod")
    new.conditions = set_condition(new.conditions, "Ready", ready[0], ready[1], ready[2],
                                   observed_generation=generation)
    desired = dump_status(new)
    patch = status_patch(current, desired, OWNED_STATUS)
    if patch:
        await op.kube.patch_status(API, "FineTuneJob", ns, name, patch)
    if event is None and status.phase != new.phase and new.phase != "Succeeded":
        if new.phase == "Failed":
            event = ("Warning", new.failure.reason if new.failure else "Failed",
                     new.failure.message if new.failure else "failed")
        elif new.phase:
            event = ("Normal", new.phase, ready[2])
    old_ready = status.condition("Ready")
    if not event and ready[1] != (old_ready.reason if old_ready else None) and ready[1] in (
            "SpecImmutable", "ImagePull", "Unschedulable", "Retrying", "Preempted"):
        event = ("Warning", ready[1], ready[2])
    if event:
        await op.events.post(body, *event)


async def ensure_adapter(op: "Operator", ftj: FineTuneJob, uri: str, sha: str | None, result: dict,
                         completed_at: str | None) -> str:
    """Create (or bump) the Adapter this job produced and record its provenance; returns its version."""
    ns = ftj.metadata.namespace or "default"
    key = (ns, ftj.spec.output.adapter_name)
    existing_body = op.adapters.get(key)
    if existing_body is None:  # the watch may lag behind a write of ours: ask the API server
        existing_body = await op.kube.get(API, "Adapter", ns, key[1])
    existing = None
    if existing_body is not None:
        parsed = Adapter.model_validate(
            {k: v for k, v in existing_body.items() if k in ("apiVersion", "kind", "metadata", "spec")})
        existing = parsed
    manifest = finetunejob.produced_adapter(ftj, uri, sha, existing)
    already = (existing is not None and existing.metadata.annotations.get(finetunejob.PRODUCED_BY_ANNOTATION)
               == ftj.metadata.uid and existing.spec.wire() == Adapter.model_validate(manifest).spec.wire())
    live = existing_body
    if not already:
        live = await op.kube.apply(manifest)
        await op.events.post(manifest | {"metadata": {**manifest["metadata"], "uid": live["metadata"]["uid"]}},
                             "Normal", "Created" if existing is None else "VersionBumped",
                             f"version {manifest['spec']['version']} from FineTuneJob {ftj.metadata.name}")
    provenance = finetunejob.provenance(ftj, result, result.get("completedAt") or completed_at or now_rfc3339())
    if json.dumps((live.get("status") or {}).get("provenance"), sort_keys=True) != json.dumps(provenance,
                                                                                            sort_keys=True):
        await op.kube.patch_status(API, "Adapter", ns, key[1], {"provenance": provenance})
    return manifest["spec"]["version"]
