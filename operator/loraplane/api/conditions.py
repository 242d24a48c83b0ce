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

from loraplane.api.reasons import Reason


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
    """What a controller decided a condition should say; `set_condition` adds the transition time."""

    status: ConditionStatus
    reason: Reason
    message: str = ""


class Progress(StrEnum):
    """What a Ready=False reason says about progress: which of kstatus' Reconciling / Stalled is True."""

    Reconciling = "Reconciling"
    """Work is under way (scheduling, pulling, training, loading, rolling out): waiting helps."""
    Stalled = "Stalled"
    """Nothing changes until someone fixes the spec, the artifact, the credentials or the cluster."""
    Idle = "Idle"
    """Settled on purpose (a suspended job) or until another object refers to it (an Adapter no route selects):
    neither condition; kstatus falls back to Ready=False (InProgress), Argo CD shows Suspended."""


# Ready=False reasons that need someone to act (every terminal FineTuneJob failure, every gate refusal, a pod that
# cannot pull its image or crashes, an invalid or immutable-violating spec).
STALLED_REASONS: frozenset[Reason] = frozenset({
    Reason.InvalidSpec, Reason.SpecImmutable, Reason.PolicyViolation,
    Reason.InvalidConfig, Reason.InvalidDataset, Reason.DatasetNotFound, Reason.DatasetAccessDenied,
    Reason.DatasetUnavailable, Reason.ModelNotFound, Reason.TargetModulesNotFound, Reason.OutOfMemory,
    Reason.OOMKilled, Reason.OutputWriteFailed, Reason.ImagePull, Reason.DeadlineExceeded,
    Reason.BackoffLimitExceeded, Reason.JobFailed, Reason.InternalError, Reason.TrainerError,
    Reason.AdapterNotFound, Reason.BaseModelMismatch, Reason.BaseModelRevisionMismatch, Reason.RankTooLarge,
    Reason.RankMismatch, Reason.UnsupportedModulesToSave, Reason.UnsupportedAdapterFeature,
    Reason.UnsupportedAdapterType, Reason.UnsupportedDtype, Reason.UnsupportedQuantization, Reason.InvalidAdapter,
    Reason.InvalidArtifact, Reason.ChecksumMismatch, Reason.FetchFailed, Reason.AccessDenied, Reason.LoadFailed,
    Reason.NoEffect, Reason.ModelFetchFailed, Reason.EngineFailing, Reason.RolloutStalled,
})
# Ready=False reasons of an object that is settled rather than progressing or stuck.
IDLE_REASONS: frozenset[Reason] = frozenset({Reason.Suspended, Reason.NoRoute})


def progress_of(reason: str) -> Progress:
    """The Progress a Ready=False `reason` means; any reason not listed as stalled or idle is progressing (a new
    reason reads as InProgress, what kstatus made of every Ready=False before these conditions existed)."""
    if reason in STALLED_REASONS:
        return Progress.Stalled
    return Progress.Idle if reason in IDLE_REASONS else Progress.Reconciling
