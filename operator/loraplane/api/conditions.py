"""Condition types and statuses loraplane sets, and the typed (status, reason, message) a controller decides.

Conditions follow the Kubernetes convention (metav1.Condition) that kstatus, Flux, Argo CD and `kubectl wait
--for=condition=Ready` read: `Ready` on every kind, with `observedGeneration`; Adapters also carry `Compatible`.
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
