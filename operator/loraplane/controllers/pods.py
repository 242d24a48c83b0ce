"""What a pod's status says about why it does not run, in words a user can act on.

Shared by the FineTuneJob status (trainer pods) and the ModelRoute status (engine pods): users should read
"cannot pull vllm/vllm-openai:v0.32.0", "0/4 nodes have a free nvidia.com/gpu" or vLLM's last log lines in
`kubectl get`, not dig for them with `kubectl describe` and `kubectl logs`.
"""

from __future__ import annotations

import functools

import json

from pydantic import ValidationError

from loraplane.api.adapter import adapter_of_served_name
from loraplane.api.redaction import redacted
from loraplane.api.wire.serving import REPORT_ANNOTATION, ReplicaReport
from loraplane.api.wire.trainer import TerminationMessage

# kubelet's waiting reason when a container's env or volumes name a Secret, ConfigMap or key that does not exist.
CREATE_CONFIG_ERROR = "CreateContainerConfigError"
IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})
POD_READY = "Ready"  # core/v1 PodConditionType
MESSAGE_TAIL = 600  # characters of a termination message (a log tail) carried into a condition
# apps/v1 DeploymentCondition: a ReplicaSet of the Deployment could not create a pod (the deployment controller
# copies the ReplicaSet's ReplicaFailure condition, reason FailedCreate, message the API server's refusal).
DEPLOYMENT_REPLICA_FAILURE = "ReplicaFailure"
# The Job controller's Event reason when the API server refuses one of its pods.
JOB_FAILED_CREATE = "FailedCreate"
# Kubernetes' refusals can be long (a PodSecurityPolicy refusal lists every rule); a condition message stays short.
REFUSAL_MESSAGE_CHARS = 1024


def refusal_text(message: object) -> str:
    """An API server refusal fit for a condition: scrubbed of credentials, cut to REFUSAL_MESSAGE_CHARS."""
    return redacted(str(message), REFUSAL_MESSAGE_CHARS)


def pods_refused(deployment: dict | None) -> str | None:
    """The API server's refusal of the Deployment's pods (its ReplicaFailure=True condition's message, through
    `refusal_text`), else None (pure). A pod refused by admission (Pod Security, a PodSecurityPolicy, a quota)
    never exists, so no pod can show it: the ReplicaSet's FailedCreate, copied into the Deployment, is where it
    is written."""
    for c in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == DEPLOYMENT_REPLICA_FAILURE and c.get("status") == "True":
            return refusal_text(c.get("message") or c.get("reason") or "pod creation failed")
    return None


def termination_message(terminated: dict | None) -> TerminationMessage | None:
    """The loraplane termination message (trainer, fetch-model) of a container's `terminated` state, else None
    (no message, or a log tail written by terminationMessagePolicy FallbackToLogsOnError)."""
    return TerminationMessage.parse((terminated or {}).get("message"))


def pod_name(pod: dict) -> str:
    """metadata.name, "?" when missing."""
    return (pod.get("metadata") or {}).get("name", "?")


def container_status(pod: dict, name: str, init: bool = False) -> dict:
    """status.containerStatuses[] (initContainerStatuses[] with `init`) entry of container `name`, else {}."""
    key = "initContainerStatuses" if init else "containerStatuses"
    for cs in (pod.get("status") or {}).get(key) or []:
        if cs.get("name") == name:
            return cs
    return {}


def last_terminated(cs: dict) -> dict | None:
    """The container's termination now, else its previous one (a restarted container keeps it there)."""
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")


def unschedulable(pod: dict) -> str | None:
    """The scheduler's message when the pod fits no node (e.g. "0/4 nodes are available: 4 Insufficient
    nvidia.com/gpu"), else None."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return c.get("message") or "no node fits the pod"
    return None


def image_pull_problem(pod: dict, names: tuple[str, ...], init: bool = False) -> str | None:
    """Which of the containers `names` waits on an image it cannot pull, and why, else None."""
    for name in names:
        cs = container_status(pod, name, init)
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            return (f"pod {pod_name(pod)} cannot pull the image of its {name} container ({cs.get('image', '?')}): "
                    f"{waiting.get('reason')}: {waiting.get('message', '')}".rstrip(": "))
    return None


def config_problem(pod: dict, names: tuple[str, ...], init: bool = False) -> str | None:
    """Which of the containers `names` cannot be created because a Secret, ConfigMap or key it reads is missing
    (waiting CreateContainerConfigError, e.g. `secret "r-engine-key-<uid>" not found`), and kubelet's message, else
    None."""
    for name in names:
        cs = container_status(pod, name, init)
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == CREATE_CONFIG_ERROR:
            return (f"pod {pod_name(pod)} cannot create its {name} container: {CREATE_CONFIG_ERROR}: "
                    f"{waiting.get('message', '')}".rstrip(": "))
    return None


def crash_problem(pod: dict, name: str, init: bool = False) -> str | None:
    """A container that exited with an error (and is being restarted): its exit and the message's tail."""
    cs = container_status(pod, name, init)
    term = last_terminated(cs)
    if not term or term.get("exitCode", 0) == 0:
        return None
    restarts = cs.get("restartCount") or 0
    what = "was OOMKilled (raise the memory limit)" if term.get("reason") == "OOMKilled" else (
        f"exited with code {term.get('exitCode')}")
    own = termination_message(term)  # ours: quote its message; anything else is a log tail
    tail = (own.message if own else (term.get("message") or "")).strip()[-MESSAGE_TAIL:]
    return (f"pod {pod_name(pod)}: container {name} {what}" + (f" ({restarts} restarts)" if restarts else "")
            + (f": {tail}" if tail else ""))


def pod_ready(pod: dict) -> bool:
    """The pod's Ready condition is True and it is not being deleted."""
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == POD_READY and c.get("status") == "True" for c in status.get("conditions") or [])


def replica_report(pod: dict | None) -> ReplicaReport | None:
    """The ReplicaReport an engine pod's loader wrote into its REPORT_ANNOTATION, else None (none yet, or
    unreadable). The result is shared between callers (parsed once per distinct annotation): read it only."""
    raw = (((pod or {}).get("metadata") or {}).get("annotations") or {}).get(REPORT_ANNOTATION)
    if not raw or not isinstance(raw, str):
        return None
    return _parse_report(raw)


@functools.lru_cache(maxsize=1024)
def _parse_report(raw: str) -> ReplicaReport | None:
    # One report lists every adapter of its replica, and every Adapter's reconcile reads the reports of the
    # replicas of its routes: without this cache a burst over N adapters parses the same JSON N times per pod.
    # 1024 entries: several reports per engine pod in flight, far more pods than a namespace usually has.
    try:
        return ReplicaReport.model_validate_json(raw)
    except (ValidationError, ValueError):
        return None


def reported_adapters(pod: dict | None) -> set[str]:
    """Adapter object names in a pod's report (served names: api.adapter.served_name)."""
    raw = (((pod or {}).get("metadata") or {}).get("annotations") or {}).get(REPORT_ANNOTATION)
    if not raw:
        return set()
    try:
        served = json.loads(raw).get("adapters") or {}
    except (ValueError, AttributeError):
        return set()
    return {a for s in served if isinstance(s, str) and (a := adapter_of_served_name(s))}
