"""Condition types and statuses loraplane sets, and the typed (status, reason, message) a controller decides.

Conditions follow the Kubernetes convention (metav1.Condition) that kstatus, Flux, Argo CD and `kubectl wait
--for=condition=Ready` read: `Ready` on every kind, with `observedGeneration`; Adapters also carry `Compatible`.
`Reconciling` and `Stalled` are kstatus' abnormal-true conditions
(https://github.com/kubernetes-sigs/cli-utils/blob/master/pkg/kstatus/README.md): present, and True, only while
the object is being worked on or cannot make progress; absent otherwise. They are derived from Ready's reason
(`PROGRESS`) wherever Ready is set (api.common.StatusBase.set_condition), so no controller sets them itself.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from loraplane.api.reasons import Progress, Reason


class ConditionType(StrEnum):
    """The condition types loraplane sets."""

    Ready = "Ready"
    """The object does what it is for: a FineTuneJob succeeded, an Adapter is loaded, a ModelRoute serves."""
    Compatible = "Compatible"
    """(Adapter) the metadata checks against every selecting route's base model passed."""
    Reconciling = "Reconciling"
    """(kstatus) True while the operator or Kubernetes works toward the spec (Ready's reason and message);
    absent otherwise. kstatus reads the object as InProgress."""
    Stalled = "Stalled"
    """(kstatus) True while the object cannot make progress until someone changes something (Ready's reason
    names what, its `fix` in docs/troubleshooting.md says how); absent otherwise. kstatus reads it as Failed."""


class ConditionStatus(StrEnum):
    """metav1.ConditionStatus: exactly these three strings."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"

    @classmethod
    def of(cls, value: "bool | str | ConditionStatus") -> "ConditionStatus":
        """True/False map to TRUE/FALSE; a string must be one of the three (ValueError otherwise)."""
        if isinstance(value, bool):
            return cls.TRUE if value else cls.FALSE
        return cls(value)


class ConditionState(NamedTuple):
    """What a controller decided a condition should say; `set_condition` adds the transition time. `progress`
    overrides what the reason alone says about progress (progress_of): e.g. a replica's Failed state is terminal
    whatever reason its (untrusted) report gives."""

    status: ConditionStatus
    reason: Reason
    message: str = ""
    progress: Progress | None = None


# Every Reason carries its Progress (api.reasons); these sets are derived from it.
STALLED_REASONS: frozenset[Reason] = frozenset(r for r in Reason if r.progress == Progress.Stalled)
IDLE_REASONS: frozenset[Reason] = frozenset(r for r in Reason if r.progress == Progress.Idle)


def progress_of(reason: str) -> Progress:
    """The Progress a Ready=False `reason` means: the reason's own `progress` (Reason.progress). A string that is
    no Reason (only an untrusted report can carry one) reads as Reconciling; a Done reason (of Ready=True or an
    event) as Idle: neither condition."""
    try:
        progress = Reason(reason).progress
    except ValueError:
        return Progress.Reconciling
    return Progress.Idle if progress == Progress.Done else progress
