"""The Adapter controller's side of rollouts: the facts builders.rollout.decide needs (the stable version, the
evaluation, the live window) and the memory of where each analysis window began.

A window begins with a reading of the routers' metrics (controllers.rollout_metrics) and is judged, once an
analysis interval has passed, against a second reading. The first reading is kept in memory, per Adapter and
(candidate, step): an operator restart, or a new step, starts the window anew (it never judges traffic of
another split). Reading the routers is the only I/O; `rollout_decision` is pure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from loraplane.api.adapter import Adapter, AdapterStatus, served_name
from loraplane.api.evaluation import EvaluationResult
from loraplane.api.modelroute import ModelRoute
from loraplane.api.rollout import RolloutPolicy, RolloutStatus, effective_policy
from loraplane.builders.common import label_value
from loraplane.builders.rollout import (
    ANALYSED,
    Candidate,
    RolloutDecision,
    RolloutFacts,
    Window,
    analysis_due,
    decide,
)
from loraplane.controllers.rollout_metrics import Reading, RouterMetricsReader, window_between
from loraplane.kube.informer import Key, Store


def policy_of(adapter: Adapter, selecting: list[ModelRoute]) -> RolloutPolicy | None:
    """The policy `adapter` rolls out with (api.rollout.effective_policy): its spec.rollout over the
    spec.adapterRollout of the first route by name among `selecting` (the routes that select it) that has one."""
    defaults = next((r.spec.adapter_rollout for r in sorted(selecting, key=lambda r: r.metadata.name or "")
                     if r.spec.adapter_rollout is not None), None)
    return effective_policy(adapter.spec.rollout, defaults)


def rollout_decision(adapter: Adapter, policy: RolloutPolicy | None, previous: AdapterStatus,
                     evaluation: EvaluationResult | None, candidate_ready: bool, now: datetime,
                     window: Window | None = None) -> RolloutDecision:
    """builders.rollout.decide for `adapter` given its last (owned) status and the evaluation of spec's version
    (pure). The stable version is the last status.rollout's, else the version the status says serves (an
    Adapter from before rollouts): status.version once its artifact was recorded, which happens when a replica
    first served it (controllers.adapter.record_artifact)."""
    spec = adapter.spec
    candidate = Candidate(version=spec.version or adapter.served_name().rpartition("--")[2],
                          uri=spec.source.uri, sha256=spec.source.sha256)
    return decide(RolloutFacts(
        policy=policy, candidate=candidate, evaluation=evaluation,
        previous=previous.rollout, history=list(previous.history), candidate_ready=candidate_ready, now=now,
        stable=previous.version if previous.artifact is not None and previous.artifact.uri else None,
        window=window))


@dataclass
class _Baseline:
    tag: tuple[str | None, int | None]   # (candidate, step) the window belongs to
    at: float                            # monotonic seconds of the reading
    reading: dict[str, Reading]


class RolloutWindows:
    """Where each Adapter's analysis window began, and the reading of the routers that serve it."""

    def __init__(self, router_pods: Store, reader: RouterMetricsReader | None = None):
        self.router_pods = router_pods
        self.reader = reader or RouterMetricsReader()
        self._baselines: dict[Key, _Baseline] = {}

    def forget(self, key: Key) -> None:
        """Drop `key`'s window (the Adapter is gone)."""
        self._baselines.pop(key, None)

    def _pods(self, namespace: str, routes: list[ModelRoute]) -> list[dict]:
        return [p for r in routes for p in self.router_pods.group(namespace, label_value(r.metadata.name or ""))]

    async def window(self, key: Key, policy: RolloutPolicy | None, rollout: RolloutStatus | None,
                     routes: list[ModelRoute], now: datetime) -> tuple[Window | None, dict[str, Reading] | None]:
        """The window to judge now, if an analysis is due and one began earlier (else None), and the reading
        taken (None when none was needed). A window that has not begun begins now."""
        if rollout is None or rollout.state not in ANALYSED or policy is None or policy.analysis is None:
            self._baselines.pop(key, None)
            return None, None
        tag = (rollout.candidate, rollout.step)
        base = self._baselines.get(key)
        if base is not None and base.tag == tag and not analysis_due(rollout, policy, now):
            return None, None
        names = [served_name(key[1], v) for v in (rollout.candidate, rollout.stable) if v]
        reading = await self.reader.read(self._pods(key[0], routes), names)
        if base is None or base.tag != tag:
            self._baselines[key] = _Baseline(tag, time.monotonic(), reading)
            return None, None
        cand = served_name(key[1], rollout.candidate or "")
        stable = served_name(key[1], rollout.stable) if rollout.stable else None
        return window_between(base.reading, reading, cand, stable, time.monotonic() - base.at), reading

    async def after(self, key: Key, policy: RolloutPolicy | None, decision: RolloutDecision,
                    reading: dict[str, Reading] | None, routes: list[ModelRoute]) -> None:
        """Begin a new window when the decision judged one or entered a new step: from `reading` when one was
        taken now, else from a fresh reading."""
        new = decision.status
        if new.state not in ANALYSED or policy is None or policy.analysis is None:
            self._baselines.pop(key, None)
            return
        tag = (new.candidate, new.step)
        base = self._baselines.get(key)
        if not decision.new_window and base is not None and base.tag == tag:
            return
        if reading is None:
            names = [served_name(key[1], v) for v in (new.candidate, new.stable) if v]
            reading = await self.reader.read(self._pods(key[0], routes), names)
        self._baselines[key] = _Baseline(tag, time.monotonic(), reading)


__all__ = ["RolloutWindows", "policy_of", "rollout_decision"]
