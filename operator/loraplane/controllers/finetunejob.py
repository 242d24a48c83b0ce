"""The FineTuneJob controller: children (config, RBAC, Job), status from the Job and its pods, the Adapter on
success.

Status follows reality and nothing else: the Job's conditions say whether it finished; the pods say why a
run failed (OOMKilled, an image that cannot be pulled, the trainer's own termination message,
api.wire.trainer.TerminationMessage); the trainer patches `status.progress` itself, so the operator never
writes that key.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from loraplane.api.adapter import Adapter
from loraplane.api.common import now_rfc3339
from loraplane.api.conditions import ConditionState, ConditionStatus, ConditionType
from loraplane.api.finetunejob import (
    AdapterRef, ArtifactRef, Failure, FineTuneJob, FineTuneJobPhase, FineTuneJobSpec, FineTuneJobStatus,
)
from loraplane.api.keys import FINETUNEJOB_LABEL
from loraplane.api.reasons import Reason, quoted_reason, reason_or_unknown
from loraplane.api.validation import format_validation_error
from loraplane.api.wire.trainer import REASONS_BY_EXIT_CODE, TerminationMessage
from loraplane.builders import finetunejob
from loraplane.builders.policy import policy_message
from loraplane.controllers.base import API, Context, Controller
from loraplane.controllers.pods import (JOB_FAILED_CREATE, container_status, image_pull_problem, last_terminated,
                                        pod_name, refusal_text, termination_message, unschedulable)
from loraplane.controllers.status import (
    dump_status, invalid_spec, owned_status, status_patch,
)
from loraplane.kube.apply import owned_by
from loraplane.kube.client import ApiError
from loraplane.kube.events import Event, EventType
from loraplane.kube.informer import Key

OWNED_STATUS = ("phase", "observedGeneration", "conditions", "startTime", "completionTime", "jobName", "attempts",
                "adapterRef", "artifact", "evaluation", "failure")
# Fields a running job may change; everything else in the spec is fixed once the Job exists.
MUTABLE_FIELDS = ("backoffLimit", "activeDeadlineSeconds", "suspend")
TERMINAL = (FineTuneJobPhase.Succeeded, FineTuneJobPhase.Failed)
POD_RUNNING = "Running"  # core/v1 PodPhase
PVC_BOUND = "Bound"  # core/v1 PersistentVolumeClaimPhase
# batch/v1 JobConditionType values the controller reads.
JOB_COMPLETE = "Complete"
JOB_FAILED = "Failed"
# Ready reasons that post a Warning Event when they appear.
WARNING_REASONS = (Reason.SpecImmutable, Reason.ImagePull, Reason.Unschedulable, Reason.Retrying, Reason.Preempted,
                   Reason.AdapterExists, Reason.PodsRefused, Reason.ArtifactClaimMissing)
# Kubernetes vocabulary read here: the kubelet's pod status reason of an eviction, and the Job condition reason
# of a run its podFailurePolicy failed.
POD_EVICTED = "Evicted"
JOB_FAILED_BY_POLICY = "PodFailurePolicy"
FALSE = ConditionStatus.FALSE
# How often an unfinished Job with no pod is looked at again for a FailedCreate Event (seconds).
POD_REFUSAL_RECHECK_SECONDS = 15.0

log = logging.getLogger(__name__)


def _normalised(spec: dict) -> dict:
    """`spec` with every default filled in (as the current API model writes it), so a configuration written by an
    older operator, which lacks fields added since (e.g. output.allowExistingAdapter), compares equal to the same
    spec written now; a spec the model no longer accepts is compared as it is."""
    try:
        return FineTuneJobSpec.model_validate(spec).model_dump(by_alias=True, exclude_none=True, mode="json")
    except (ValidationError, ValueError):
        return spec


def immutable_changes(accepted: dict, desired: dict) -> list[str]:
    """spec.* fields whose value differs from the accepted (running) configuration."""
    accepted, desired = _normalised(accepted), _normalised(desired)
    keys = sorted((set(accepted) | set(desired)) - set(MUTABLE_FIELDS))
    return [f"spec.{k}" for k in keys if accepted.get(k) != desired.get(k)]


def _trainer_terminated(pod: dict) -> dict | None:
    return last_terminated(container_status(pod, finetunejob.TRAINER_CONTAINER))


def pod_failure(pod: dict) -> Failure | None:
    """Why a trainer pod failed, categorised: the trainer's reason, OOMKilled, Evicted, or the exit code."""
    status = pod.get("status") or {}
    name = pod["metadata"]["name"]
    term = _trainer_terminated(pod)
    if term and term.get("exitCode", 0) != 0:
        if term.get("reason") == Reason.OOMKilled:
            return Failure(reason=Reason.OOMKilled, message=(
                f"pod {name}: the trainer ran out of memory (OOMKilled); lower training.batchSize or "
                "maxSeqLength, enable gradientCheckpointing, use qlora, or raise resources.memory / use larger GPUs"))
        if msg := termination_message(term):
            return Failure(reason=msg.reason, message=f"pod {name}: {msg.message}".rstrip(": "))
        tail = (term.get("message") or "").strip()[-600:]
        code = term.get("exitCode")
        if reason := REASONS_BY_EXIT_CODE.get(code):  # message lost: the exit code says why
            return Failure(reason=reason, message=f"pod {name}: the trainer exited with code {code} ({reason})"
                           + (f": {tail}" if tail else ""))
        return Failure(reason=Reason.TrainerError, message=f"pod {name}: the trainer exited with code {code}"
                       + (f": {tail}" if tail else ""))
    if status.get("phase") == FineTuneJobPhase.Failed and status.get("reason"):
        # The kubelet's reason (Evicted, DeadlineExceeded, OutOf<resource>, ...) becomes the condition reason: only
        # one the operator knows does as it is (an OutOfnvidia.com/gpu would fail the status patch's pattern).
        raw = status["reason"]
        if raw == POD_EVICTED or reason_or_unknown(raw) != Reason.UnknownReason:
            return Failure(reason=str(raw), message=f"pod {name}: {status.get('message', '')}")
        return Failure(reason=Reason.UnknownReason,
                       message=f"pod {name} failed with reason {quoted_reason(raw)}: {status.get('message', '')}")
    return None


def disrupted(pod: dict, failure: Failure) -> bool:
    """Ended by the cluster (preemption, eviction, drain) or by SIGTERM after a checkpoint: not the run's fault."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return failure.reason in (Reason.Preempted, POD_EVICTED) or any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in conditions)


def pod_waiting_problem(pod: dict) -> ConditionState | None:
    """Why a trainer pod does not start: an image it cannot pull, or no node with what it asks for."""
    if problem := image_pull_problem(pod, (finetunejob.TRAINER_CONTAINER,)):
        return ConditionState(FALSE, Reason.ImagePull,
                              f"{problem}; check spec.image (or the chart's trainerImage) and imagePullSecrets")
    if message := unschedulable(pod):
        return ConditionState(FALSE, Reason.Unschedulable, (
            f"pod {pod_name(pod)} cannot be scheduled: {message}; check spec.resources (gpus, gpuType, "
            "nodeSelector, tolerations) against the cluster's free capacity"))
    return None


def success_result(pods: list[dict]) -> TerminationMessage | None:
    """The trainer's result message of the newest pod that exited 0, else None."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True):
        term = _trainer_terminated(pod)
        if term and term.get("exitCode") == 0:
            return termination_message(term)
    return None


def artifact_of(result: TerminationMessage | None, fallback_uri: str) -> tuple[str, str | None]:
    """(uri, sha256) of the trained adapter: the result's `artifact`, else the job's output location unverified."""
    if result is not None and result.artifact is not None:
        return result.artifact.uri, result.artifact.sha256
    return fallback_uri, None


def _job_condition(job: dict | None, type_: str) -> dict | None:
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


@dataclass(frozen=True)
class RunState:
    """Where a training run stands, read from its Job and pods (`run_state`)."""

    phase: FineTuneJobPhase
    attempts: int = 0                         # pods started: active + failed + succeeded
    start_time: str | None = None
    completion_time: str | None = None
    failure: Failure | None = None            # why a Failed run failed
    problem: ConditionState | None = None     # why a Pending/Running run does not progress (Ready=False)
    result: TerminationMessage | None = None  # a Succeeded run's result message


def run_state(ftj: FineTuneJob, job: dict | None, pods: list[dict], refused: str | None = None) -> RunState:
    """Phase, failure and waiting problem from the Job and its pods (pure). `refused` is the API server's
    refusal of the Job's pods (`pods_refused_message`), shown while the run has no pod."""
    pods = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    js = (job or {}).get("status") or {}
    attempts = (js.get("active") or 0) + (js.get("failed") or 0) + (js.get("succeeded") or 0)
    start, completion = js.get("startTime"), js.get("completionTime")
    failed_pods = [(p, f) for p, f in ((p, pod_failure(p)) for p in pods) if f]
    failures = [f for _, f in failed_pods]
    # With the Job's podFailurePolicy, disruptions and input errors are handled by Kubernetes (see
    # builders.finetunejob.pod_failure_policy); status.failed then counts only what uses up backoffLimit.
    policy = bool(((job or {}).get("spec") or {}).get("podFailurePolicy"))
    if _job_condition(job, JOB_COMPLETE):
        return RunState(FineTuneJobPhase.Succeeded, attempts, start, completion, result=success_result(pods))
    if cond := _job_condition(job, JOB_FAILED):
        completion = completion or cond.get("lastTransitionTime")
        job_reason = cond.get("reason") or Reason.JobFailed
        if job_reason == Reason.DeadlineExceeded:
            failure = Failure(reason=Reason.DeadlineExceeded, message=(
                f"the run exceeded activeDeadlineSeconds={ftj.spec.active_deadline_seconds}: "
                f"{cond.get('message', '')}".rstrip(": ")
                + "; raise activeDeadlineSeconds or train fewer steps (checkpoints are kept)"))
        elif failures and job_reason == JOB_FAILED_BY_POLICY:
            failure = Failure(reason=failures[-1].reason,
                              message=f"{failures[-1].message} (not retried: a new pod would fail the same way)")
        elif failures:
            failure = Failure(reason=failures[-1].reason, message=(
                f"{failures[-1].message} (failed {len(failures)} time(s); backoffLimit {ftj.spec.backoff_limit} "
                "reached)"))
        else:
            failure = Failure(reason=job_reason, message=cond.get("message") or "the Job failed")
        return RunState(FineTuneJobPhase.Failed, attempts, start, completion, failure=failure)
    if (job or {}).get("spec", {}).get("suspend"):
        return RunState(FineTuneJobPhase.Suspended, attempts, start, completion)
    phase = (FineTuneJobPhase.Running if any((p.get("status") or {}).get("phase") == POD_RUNNING for p in pods)
             else FineTuneJobPhase.Pending)
    problem = None
    if problems := [w for w in (pod_waiting_problem(p) for p in pods) if w]:
        problem = problems[-1]
    elif refused and not pods:
        problem = ConditionState(FALSE, Reason.PodsRefused, f"the API server refuses the trainer Job's pods: "
                                 f"{refused}")
    elif failed_pods and phase == FineTuneJobPhase.Pending:
        last_pod, last = failed_pods[-1]
        used = (js.get("failed") or 0) if policy else len(failures)
        if disrupted(last_pod, last):
            problem = ConditionState(FALSE, Reason.Preempted, f"{last.message}; a new pod resumes from the newest "
                                     "checkpoint" + (" (disruptions do not count against backoffLimit)" if policy
                                                     else f" ({used} of {ftj.spec.backoff_limit} retries used)"))
        else:
            problem = ConditionState(FALSE, Reason.Retrying, f"{last.message}; retrying ({used} of "
                                     f"{ftj.spec.backoff_limit} retries used), resuming from the newest checkpoint")
    return RunState(phase, attempts, start, completion, problem=problem)


@dataclass
class FineTuneJobFacts:
    """What a FineTuneJob reconcile observed."""

    body: dict                          # the object as stored
    ftj: FineTuneJob | None             # None when the spec is invalid (`invalid` says why)
    invalid: str | None = None
    accepted_spec: dict | None = None   # the spec the running Job was created from (None: not created yet)
    run: RunState | None = None         # None: terminal and the Job is gone (the status is kept)
    existing_adapter: dict | None = None  # the Adapter named by spec.output.adapterName, when it exists
    job_exists: bool = False            # the batch/v1 Job of this run exists (the run has started)
    now: str = ""                       # RFC 3339, the provenance's completedAt when the trainer gave none
    output_claim: str | None = None     # the PVC the run writes to (pvc:// output), read while the run waits
    claim: dict | None = None           # that PVC as the API server has it (None: missing, or not read)


@dataclass
class ProducedAdapter:
    """The Adapter a succeeded run creates or bumps, and its provenance."""

    manifest: dict
    job: str                            # the FineTuneJob's name
    apply: bool                         # False: the live Adapter already is this job's output
    created: bool                       # no Adapter of that name existed
    live: dict | None                   # the live Adapter (None when it does not exist yet)
    provenance: dict[str, Any]


@dataclass
class FineTuneJobPlan:
    """What a FineTuneJob reconcile writes, in this order."""

    body: dict
    children: list[list[dict]] = field(default_factory=list)  # apply stages; empty: leave the children alone
    fresh: bool = False                 # never reconciled: its children cannot exist yet (no GET before apply)
    spec: dict | None = None            # the spec the children are rendered from, remembered once applied
    adapter: ProducedAdapter | None = None
    create_claim: dict | None = None    # the artifact store's PVC, created (never updated) before the children
    status: dict = field(default_factory=dict)  # merge patch of the status; empty: unchanged
    events: list[Event] = field(default_factory=list)


class FineTuneJobController(Controller):
    """Reconciles FineTuneJobs. Remembers, per job (namespace, name, uid), the spec its Job was created from,
    to refuse changes of immutable fields; it is re-read from the job's config ConfigMap after a restart."""

    kind = "FineTuneJob"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self._accepted: dict[tuple[str, str, str], dict] = {}

    def on_change(self, source: str, obj: dict, old: dict | None) -> None:
        """Schedule the FineTuneJob itself, or the job named by the loraplane.io/finetunejob label of a changed
        Job, training pod or produced Adapter."""
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or ""
        if source == "FineTuneJob":
            self.schedule((ns, meta.get("name") or ""))
        elif source in ("Job", "TrainPod", "Adapter"):
            # A child changed, or a produced Adapter (labelled with its job): the job may be waiting for it.
            if owner := (meta.get("labels") or {}).get(FINETUNEJOB_LABEL):
                self.schedule((ns, self.owner_of_label(ns, owner)))
            if source == "Adapter":
                # A job refused because this Adapter exists (AdapterExists) may go on once it is deleted.
                for key in self.store.keys_in(ns):
                    body = self.store.get(key) or {}
                    if ((body.get("spec") or {}).get("output") or {}).get("adapterName") == meta.get("name"):
                        self.schedule(key)

    def owner_of_label(self, namespace: str, value: str) -> str:
        """The FineTuneJob name a loraplane.io/finetunejob label value stands for: the value itself, or for a
        name beyond 63 characters the job whose shortened label (builders' owner_label) it is."""
        if (namespace, value) in self.store.objects:
            return value
        return next((name for ns, name in self.store.keys_in(namespace)
                     if finetunejob.owner_label(name) == value), value)

    async def reconcile(self, key: Key) -> None:
        """observe -> plan -> execute for one FineTuneJob; a deleted one is forgotten (its children are
        garbage-collected through their ownerReferences)."""
        facts = await self.observe(key)
        if facts is None:  # deleted: its children are garbage-collected through their ownerReferences
            self.forget(key)
            return
        await self.execute(self.plan(facts))

    # ---- observe -----------------------------------------------------------------------------------------

    async def observe(self, key: Key) -> FineTuneJobFacts | None:
        """The facts to plan from: the parsed job (or its validation error), the spec it was accepted with,
        its Job and pods' run state and, once it succeeded, the Adapter to create or bump. None when deleted."""
        body = self.store.get(key)
        if body is None:
            return None
        ftj = self.store.parsed(key, FineTuneJob)
        if isinstance(ftj, ValidationError):
            return FineTuneJobFacts(body, None, invalid=format_validation_error(ftj, "spec field "))
        ns, name = key
        current = body.get("status") or {}
        accepted = await self.accepted_spec(ftj) if current else None  # never reconciled: nothing accepted yet
        # Children are found by computed name and label, which another FineTuneJob's may equal (a shortened long
        # name is a valid short one): only those whose controller ownerReference is this job's uid (its Job's, for
        # pods) are its own. Another owner's Job is never read as this job's run; applying shows NameConflict.
        job = self.stores.Job.get((ns, finetunejob.job_name(ftj)))
        if job is not None and not owned_by(job, ftj.metadata.uid):
            job = None
        job_uid = ((job or {}).get("metadata") or {}).get("uid")
        pods = [p for p in self.stores.TrainPod.group(ns, finetunejob.owner_label(name)) if owned_by(p, job_uid)]
        previous = owned_status(FineTuneJobStatus, current, OWNED_STATUS)
        refused = await self.pods_refused(key, job) if job is not None and not pods else None
        run = None if previous.phase in TERMINAL and job is None else run_state(ftj, job, pods, refused)
        adapter_key = (ns, ftj.spec.output.adapter_name)
        facts = FineTuneJobFacts(body, ftj, accepted_spec=accepted, run=run, now=now_rfc3339(),
                                 existing_adapter=self.stores.Adapter.get(adapter_key), job_exists=job is not None)
        if run is not None and run.phase == FineTuneJobPhase.Pending:
            # A run that waits may wait for its output claim: read it (missing, or not bound) to say so, and so
            # the artifact store's claim is created when missing (plan). Only while Pending: one GET per pass.
            accepted_output = ((accepted or {}).get("output") or {}).get("uri")
            facts.output_claim = finetunejob.output_claim(
                accepted_output or finetunejob.output_uri(ftj, self.ctx.build))
            if facts.output_claim:
                facts.claim = await self.kube.get("v1", "PersistentVolumeClaim", ns, facts.output_claim)
        if (run.phase if run else previous.phase) == FineTuneJobPhase.Succeeded and previous.adapter_ref is None \
                and facts.existing_adapter is None:
            # The watch may lag behind a write of ours: ask the API server when the store has none.
            facts.existing_adapter = await self.kube.get(API, "Adapter", *adapter_key)
        return facts

    async def pods_refused(self, key: Key, job: dict) -> str | None:
        """The newest message of the Job's FailedCreate Events (the API server refused its pod: Pod Security
        admission, a PodSecurityPolicy, a quota), else None. batch/v1 Job status has no condition for it, and the
        refused pod never exists, so the Job controller's Event is the only place it is written. Only asked while
        an unfinished Job has no pod; the job is looked at again after POD_REFUSAL_RECHECK_SECONDS, since the
        Event changes nothing the informers watch. A list that fails (e.g. a chart without `list events`) is
        logged and read as no refusal: it never fails the reconcile."""
        if _job_condition(job, JOB_COMPLETE) or _job_condition(job, JOB_FAILED) or (job.get("spec") or {}).get(
                "suspend"):
            return None
        self.schedule_later(key, POD_REFUSAL_RECHECK_SECONDS)
        uid = (job.get("metadata") or {}).get("uid")
        if not uid:
            return None
        try:
            events = await self.kube.list("v1", "Event", key[0],
                                          field_selector=f"involvedObject.uid={uid},reason={JOB_FAILED_CREATE}")
        except ApiError as exc:
            log.warning("cannot read the FailedCreate Events of Job %s/%s: %s", key[0], job["metadata"].get("name"),
                        exc)
            return None
        newest = max((e for e in events if isinstance(e, dict)), default=None,
                     key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
        return refusal_text(newest.get("message") or JOB_FAILED_CREATE) if newest else None

    async def accepted_spec(self, ftj: FineTuneJob) -> dict | None:
        """The spec the job's Job runs with: from memory, else from its config ConfigMap."""
        ident = (ftj.metadata.namespace or "", ftj.metadata.name or "", ftj.metadata.uid or "")
        if ident in self._accepted:
            return self._accepted[ident]
        cm = await self.kube.get("v1", "ConfigMap", ident[0], finetunejob.config_name(ftj))
        if cm is None or not owned_by(cm, ident[2]):
            return None
        try:
            spec = json.loads((cm.get("data") or {}).get(finetunejob.CONFIG_KEY, ""))["spec"]
        except (ValueError, KeyError, TypeError):
            return None
        self._accepted[ident] = spec
        return spec

    def forget(self, key: Key) -> None:
        """Drop what was remembered about a deleted job and its children (a later GET re-learns it)."""
        for ident in [i for i in self._accepted if i[:2] == key]:
            del self._accepted[ident]
        self.ctx.applier.forget(key[0], f"{key[1]}-")

    # ---- plan (pure) -------------------------------------------------------------------------------------

    def plan(self, facts: FineTuneJobFacts) -> FineTuneJobPlan:
        """Children, status patch, produced Adapter and Events from the facts (no I/O)."""
        body = facts.body
        generation = body["metadata"].get("generation")
        current = body.get("status") or {}
        out = FineTuneJobPlan(body)
        if facts.ftj is None:
            patch, event = invalid_spec(current, generation, facts.invalid or "")
            out.status, out.events = patch, [event] if event else []
            return out
        ftj, settings = facts.ftj, self.ctx.build
        if violations := settings.violations(ftj):
            # The operator's policy refuses the spec (an image, a ServiceAccount): nothing is created or changed.
            patch, event = invalid_spec(current, generation, policy_message(violations), Reason.PolicyViolation)
            out.status, out.events = patch, [event] if event else []
            return out
        status = owned_status(FineTuneJobStatus, current, OWNED_STATUS)
        # A run keeps the output location it started with (its checkpoints are there): the accepted spec is this
        # uid's own (accepted_spec), so another run never shares it.
        output = ((facts.accepted_spec or {}).get("output") or {}).get("uri") or finetunejob.output_uri(ftj, settings)
        desired_spec = finetunejob.trainer_config(ftj, settings, output)["spec"]
        rejected = immutable_changes(facts.accepted_spec, desired_spec) if facts.accepted_spec is not None else []
        refusal = adapter_refusal(ftj, facts.existing_adapter)
        if not rejected and status.phase not in TERMINAL and not (refusal and not facts.job_exists):
            # The version the run would replace, which spec.evaluation scores too (in the trainer's config only:
            # the Job's pod template must not change when the Adapter does).
            previous = finetunejob.previous_version(ftj, facts.existing_adapter)
            kids = finetunejob.children(ftj, settings, output, previous)
            out.children, out.fresh, out.spec = [kids[:-1], kids[-1:]], not current, desired_spec

        new = status.model_copy(deep=True)
        new.observed_generation = generation
        new.job_name = finetunejob.job_name(ftj)
        run = facts.run
        if run is not None:
            new.phase, new.attempts = run.phase, run.attempts
            new.start_time, new.completion_time = run.start_time, run.completion_time
            new.failure = run.failure
        event: Event | None = None
        if new.phase == FineTuneJobPhase.Succeeded and new.evaluation is None and run is not None \
                and run.result is not None and run.result.evaluation is not None:
            new.evaluation = run.result.evaluation
        if new.phase == FineTuneJobPhase.Succeeded and new.adapter_ref is None and refusal:
            # Trained, but not published into an Adapter it may not bump: keep where the artifact is.
            uri, sha = artifact_of(run.result if run else None, output)
            new.artifact = ArtifactRef(uri=uri, sha256=sha)
            refusal = ConditionState(FALSE, Reason.AdapterExists, f"{refusal.message}. The trained adapter is at "
                                     f"{uri}" + (f" (sha256 {sha})" if sha else "") + ", unpublished")
        elif new.phase == FineTuneJobPhase.Succeeded and new.adapter_ref is None:
            result = run.result if run else None
            uri, sha = artifact_of(result, output)
            out.adapter = produced_adapter(ftj, uri, sha, result, facts.existing_adapter,
                                           new.completion_time or facts.now)
            version = out.adapter.manifest["spec"]["version"]
            new.adapter_ref = AdapterRef(name=ftj.spec.output.adapter_name, version=version)
            new.artifact = ArtifactRef(uri=uri, sha256=sha)
            event = Event(EventType.Normal, Reason.Succeeded, (
                f"training finished; Adapter {ftj.spec.output.adapter_name} version {version} points at {uri}"
                + (f"; evaluation {new.evaluation.summary()}" if new.evaluation else "")
                + ("" if result else " (the trainer reported no result message: no sha256, metrics or dataset "
                                     "digest)")))
        # The refusal shows where it blocks: before the Job starts, and on success (nothing published).
        blocks = (new.phase == FineTuneJobPhase.Succeeded and new.adapter_ref is None) or (
            not facts.job_exists and new.phase not in TERMINAL)
        claim_problem = None
        if facts.output_claim and out.children:
            out.create_claim, claim_problem = self.claim_plan(ftj, facts)
        ready = ready_state(ftj, new, run, rejected, refusal if blocks else None, claim_problem)
        new.set_condition(ConditionType.Ready, ready, generation)
        out.status = status_patch(current, dump_status(new), OWNED_STATUS)
        if event is None and status.phase != new.phase and new.phase != FineTuneJobPhase.Succeeded:
            if new.phase == FineTuneJobPhase.Failed:
                event = Event(EventType.Warning, new.failure.reason if new.failure else Reason.JobFailed,
                              new.failure.message if new.failure else "failed")
            elif new.phase:
                event = Event(EventType.Normal, new.phase, ready.message)
        old_ready = status.condition(ConditionType.Ready)
        if not event and ready.reason != (old_ready.reason if old_ready else None) and ready.reason in WARNING_REASONS:
            event = Event(EventType.Warning, ready.reason, ready.message)
        out.events = [event] if event else []
        return out

    def claim_plan(self, ftj: FineTuneJob, facts: FineTuneJobFacts) -> tuple[dict | None, ConditionState | None]:
        """(the claim to create, why the run waits for its claim) for a Pending run writing to a PVC: the artifact
        store's claim is created when missing and the chart allows it (operator.artifacts.createClaim); any
        other missing claim is ArtifactClaimMissing; an unbound one is ArtifactClaimPending, naming its
        StorageClass and access modes."""
        settings, ns, claim = self.ctx.build, ftj.metadata.namespace or "", facts.output_claim or ""
        if facts.claim is None:
            if claim == finetunejob.store_claim(settings) and settings.artifact_claim.create:
                c = settings.artifact_claim
                return finetunejob.artifact_claim(ns, claim, settings), ConditionState(
                    FALSE, Reason.ArtifactClaimPending, (
                        f"creating PersistentVolumeClaim {claim} for the artifact store ({c.access_mode}, {c.size}, "
                        f"StorageClass {c.storage_class or '(the default)'}); the trainer starts once it is bound"))
            how = ("set spec.output.uri to an existing claim or s3://, or create it" if claim !=
                   finetunejob.store_claim(settings) else "create it, or enable the chart's "
                   "operator.artifacts.createClaim")
            return None, ConditionState(FALSE, Reason.ArtifactClaimMissing, (
                f"PersistentVolumeClaim {claim}, where this run writes its adapter, does not exist in namespace "
                f"{ns}: {how}"))
        spec, status = facts.claim.get("spec") or {}, facts.claim.get("status") or {}
        if status.get("phase") == PVC_BOUND:
            return None, None
        modes = ", ".join(spec.get("accessModes") or []) or "none"
        return None, ConditionState(FALSE, Reason.ArtifactClaimPending, (
            f"PersistentVolumeClaim {claim} is not bound (phase {status.get('phase') or 'not reported yet'}; StorageClass "
            f"{spec.get('storageClassName') or '(the default)'}, access modes {modes}): the trainer pod cannot "
            f"start until it is. A WaitForFirstConsumer StorageClass binds once the pod is scheduled; otherwise "
            f"`kubectl describe pvc {claim} -n {ns}` shows why (no default StorageClass, an access mode the class "
            "cannot provide)"))

    # ---- execute -----------------------------------------------------------------------------------------

    async def execute(self, plan: FineTuneJobPlan) -> None:
        """Apply the children, create or bump the produced Adapter, patch the status, post the Events."""
        body = plan.body
        ns, name = body["metadata"].get("namespace"), body["metadata"]["name"]
        if plan.create_claim is not None:
            # Created, never applied: a claim that appeared meanwhile (the user's) is left as it is (HTTP 409).
            claim = plan.create_claim["metadata"]["name"]
            try:
                if await self.kube.create_if_absent(plan.create_claim):
                    await self.ctx.events.post(body, Event(EventType.Normal, Reason.ArtifactClaimPending,
                                                           f"created PersistentVolumeClaim {claim} for the artifact store"))
            except ApiError as exc:   # e.g. refused by a quota or an admission policy: say so, go on
                await self.ctx.events.post(body, Event(EventType.Warning, Reason.ArtifactClaimMissing, (
                    f"could not create PersistentVolumeClaim {claim} for the artifact store: {exc.message}; create it "
                    "yourself or set spec.output.uri")))
        if plan.children:
            applied = await self.apply_children(body, plan.children, plan.fresh)
            if applied is None:
                return  # shown as InvalidSpec (apply_children): not retried until the job changes
            if applied:
                meta = body["metadata"]
                self._accepted[(ns or "", name, meta.get("uid") or "")] = plan.spec
        if plan.adapter is not None:
            await self._write_adapter(plan.adapter)
        if plan.status:
            await self.kube.patch_status(API, self.kind, ns, name, plan.status)
        for event in plan.events:
            await self.ctx.events.post(body, event)

    async def _write_adapter(self, produced: ProducedAdapter) -> None:
        manifest, live = produced.manifest, produced.live
        if produced.apply:
            live = await self.kube.apply(manifest)
            await self.ctx.events.post(
                manifest | {"metadata": {**manifest["metadata"], "uid": live["metadata"]["uid"]}},
                Event(EventType.Normal, Reason.Created if produced.created else Reason.VersionBumped,
                      f"version {manifest['spec']['version']} from FineTuneJob {produced.job}"))
        # status_patch: the previous run's keys this run has not (its evaluation) are sent as null, not merged into.
        patch = status_patch((live or {}).get("status"), {"provenance": produced.provenance}, ("provenance",))
        if patch:
            meta = manifest["metadata"]
            await self.kube.patch_status(API, "Adapter", meta["namespace"], meta["name"], patch)


def produced_adapter(ftj: FineTuneJob, uri: str, sha: str | None, result: TerminationMessage | None,
                     existing_body: dict | None, completed_at: str) -> ProducedAdapter:
    """The Adapter `ftj` produced (builders.finetunejob.produced_adapter) and whether it must be written: not when
    the live one already carries this job's uid and the same spec (a restarted operator bumps nothing)."""
    existing = None
    if existing_body is not None:
        existing = Adapter.model_validate(
            {k: v for k, v in existing_body.items() if k in ("apiVersion", "kind", "metadata", "spec")})
    manifest = finetunejob.produced_adapter(ftj, uri, sha, existing)
    already = (existing is not None and existing.metadata.annotations.get(finetunejob.PRODUCED_BY_ANNOTATION)
               == ftj.metadata.uid and existing.spec.wire() == Adapter.model_validate(manifest).spec.wire())
    provenance = finetunejob.provenance(ftj, result, (result.completed_at if result else None) or completed_at)
    return ProducedAdapter(manifest, job=ftj.metadata.name or "", apply=not already, created=existing is None,
                           live=existing_body, provenance=provenance)


def adapter_refusal(ftj: FineTuneJob, existing: dict | None) -> ConditionState | None:
    """Why `ftj` may not publish a version of the Adapter it names (Reason.AdapterExists), else None: the Adapter
    exists, this job (its uid) did not create it, and spec.output.allowExistingAdapter is not set. Without this
    rule any FineTuneJob could replace what any Adapter of the namespace serves just by naming it."""
    if existing is None or ftj.spec.output.allow_existing_adapter:
        return None
    meta = existing.get("metadata") or {}
    producer = (meta.get("annotations") or {}).get(finetunejob.PRODUCED_BY_ANNOTATION)
    if ftj.metadata.uid and producer == ftj.metadata.uid:
        return None
    made_by = (f"FineTuneJob {(meta.get('labels') or {}).get(FINETUNEJOB_LABEL)} (another run)"
               if producer else "hand (not by a FineTuneJob)")
    return ConditionState(FALSE, Reason.AdapterExists, (
        f"Adapter {ftj.spec.output.adapter_name} already exists, made by {made_by}; this FineTuneJob publishes a "
        "new version of it only with spec.output.allowExistingAdapter: true (recreate the job with it, or with "
        "another spec.output.adapterName)"))


def ready_state(ftj: FineTuneJob, new: FineTuneJobStatus, run: RunState | None,
                rejected: list[str], refusal: ConditionState | None = None,
                claim: ConditionState | None = None) -> ConditionState:
    """The Ready condition: kstatus reads it; the reason says what the user is waiting for or must fix
    (`refusal`: why the produced Adapter may not be written, adapter_refusal; `claim`: why a Pending run waits for
    its output PVC, FineTuneJobController.claim_plan, which explains an Unschedulable pod better than the
    scheduler's message)."""
    if rejected:
        return ConditionState(FALSE, Reason.SpecImmutable, (
            f"{', '.join(rejected)} cannot change while the job exists (immutable); revert the change or create "
            "a new FineTuneJob. The running job keeps its original spec."))
    if refusal is not None:
        return refusal
    if new.phase == FineTuneJobPhase.Succeeded:
        return ConditionState(ConditionStatus.TRUE, Reason.Succeeded, f"Adapter {ftj.spec.output.adapter_name} "
                              f"version {(new.adapter_ref.version if new.adapter_ref else '')} created")
    if new.phase == FineTuneJobPhase.Failed:
        return ConditionState(FALSE, new.failure.reason if new.failure else Reason.JobFailed,
                              new.failure.message if new.failure else "the Job failed")
    if claim is not None and new.phase == FineTuneJobPhase.Pending and (
            run is None or run.problem is None or run.problem.reason == Reason.Unschedulable):
        return claim
    if run is not None and run.problem is not None:
        return run.problem
    if new.phase == FineTuneJobPhase.Running:
        return ConditionState(FALSE, Reason.Running, "training; see status.progress")
    if new.phase == FineTuneJobPhase.Suspended:
        return ConditionState(FALSE, Reason.Suspended, "spec.suspend is true")
    return ConditionState(FALSE, Reason.Pending, f"waiting for Job {finetunejob.job_name(ftj)} to start a pod")


