"""What a pod's status says about why it does not run, in words a user can act on.

Shared by the FineTuneJob status (trainer pods) and the ModelRoute status (engine pods): users should read
"cannot pull vllm/vllm-openai:v0.11.0", "0/4 nodes have a free nvidia.com/gpu" or vLLM's last log lines in
`kubectl get`, not dig for them with `kubectl describe` and `kubectl logs`.
"""

from __future__ import annotations

import json
from typing import Any

IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})
MESSAGE_TAIL = 600  # characters of a termination message (a log tail) carried into a condition


def parse_message(message: str | None) -> dict[str, Any] | None:
    """A termination message in loraplane's {"reason", "message"} JSON form (trainer, fetch-model), else None."""
    if not message:
        return None
    try:
        value = json.loads(message.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def pod_name(pod: dict) -> str:
    return (pod.get("metadata") or {}).get("name", "?")


def container_status(pod: dict, name: str, init: bool = False) -> dict:
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
    for name in names:
        cs = container_status(pod, name, init)
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            return (f"pod {pod_name(pod)} cannot pull the image of its {name} container ({cs.get('image', '?')}): "
                    f"{waiting.get('reason')}: {waiting.get('message', '')}".rstrip(": "))
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
    own = parse_message(term.get("message"))  # ours: quote its message; anything else is a log tail
    tail = (str(own.get("message", "")) if own else (term.get("message") or "")).strip()[-MESSAGE_TAIL:]
    return (f"pod {pod_name(pod)}: container {name} {what}" + (f" ({restarts} restarts)" if restarts else "")
            + (f": {tail}" if tail else ""))
