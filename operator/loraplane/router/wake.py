"""Waking the route's engine Deployment from zero replicas through its scale subresource.

When the router holds a request (hold.py) and the route's autoscaler is an HPA, the router reads the engine
Deployment's `/scale` and, if it is at zero, sets it to one. An HPA never scales a target that is at zero (it
reports ScalingDisabled until something else brings it back), so this is what brings a route parked at zero
(`kubectl scale --replicas=0`) back on its first request; the HPA then takes over again. Routes on KEDA are woken
by KEDA itself, on the router's `loraplane_router_held_requests` metric: a replica the router added there would be
removed again by KEDA's next poll if that poll saw no demand yet (docs/operations.md, "Scale to zero").

The grant is the narrowest RBAC can express: `get` and `patch` of `deployments/scale`, resourceNames the one
engine Deployment (builders/modelroute.py, router_rbac). The router can change that Deployment's replica count
and nothing else: not its pod template, not another Deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time

from loraplane.kube.client import ApiError, KubeClient, resource_path

log = logging.getLogger("loraplane.router")

# At most one wake-up attempt this often (seconds): every held request signals demand, the API server needs
# to hear it once.
WAKE_INTERVAL = 10.0


class ScaleWaker:
    """Sets Deployment `namespace`/`deployment` from 0 to 1 replica through its scale subresource when asked
    (`demand`), at most once per `interval` seconds. `metrics` is the router's RouterMetrics (its
    scale_wakeups counter, by result)."""

    def __init__(self, kube: KubeClient, namespace: str, deployment: str, metrics, interval: float = WAKE_INTERVAL):
        self.kube, self.namespace, self.deployment = kube, namespace, deployment
        self.metrics = metrics
        self.interval = interval
        self._last = float("-inf")
        self._task: asyncio.Task | None = None

    def demand(self) -> None:
        """A request is held: start a wake-up unless one runs or ran less than `interval` seconds ago."""
        now = time.monotonic()
        if (self._task is not None and not self._task.done()) or now - self._last < self.interval:
            return
        self._last = now
        self._task = asyncio.get_running_loop().create_task(self.wake())

    async def wake(self) -> str:
        """One attempt; returns its result: `scaled` (0 -> 1), `not_zero` (replicas already asked for: a
        replica is starting), `conflict` (the scale changed between read and write: someone else acted) or
        `error` (logged with the fix; a 403 means the router's Role lacks the grant)."""
        path = resource_path("apps/v1", "Deployment", self.namespace, self.deployment, "scale")
        result = "error"
        try:
            scale = await self.kube.request("GET", path, what=f"get deployments/{self.deployment}/scale")
            if (scale.get("spec") or {}).get("replicas", 0) != 0:
                result = "not_zero"
            else:
                # resourceVersion makes the write conditional: two router pods waking at once scale to 1, not 2.
                patch = {"metadata": {"resourceVersion": scale["metadata"]["resourceVersion"]},
                         "spec": {"replicas": 1}}
                await self.kube.request("PATCH", path, patch, content_type="application/merge-patch+json",
                                        what=f"patch deployments/{self.deployment}/scale", result=False)
                result = "scaled"
                log.info("Deployment %s/%s was at zero replicas: scaled to 1 for held requests", self.namespace,
                         self.deployment)
        except ApiError as exc:
            if exc.status == 409:
                result = "conflict"
            else:
                log.error("waking Deployment %s/%s from zero failed (%s): %s%s", self.namespace, self.deployment,
                          exc.status, exc.message,
                          " (the router's Role needs get/patch on deployments/scale for it)" if exc.status == 403
                          else "")
        except Exception as exc:  # the network, a malformed answer: the held requests still wait
            log.error("waking Deployment %s/%s from zero failed: %s", self.namespace, self.deployment, exc)
        self.metrics.scale_wakeups.labels(result).inc()
        return result
