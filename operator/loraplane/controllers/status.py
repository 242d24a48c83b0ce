"""Status bookkeeping shared by the controllers: the owned part of a status, the InvalidSpec status,
and the merge patch that writes only what changed.

A controller owns a fixed set of status keys (OWNED_STATUS in each controller): other writers' keys (the
trainer's `status.progress`, an Adapter's `provenance` written on behalf of its FineTuneJob) are neither read
into the computation nor patched. Conditions keep `lastTransitionTime` unless their status flips
(api.common.set_condition) and carry `observedGeneration`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from loraplane.api.common import StatusBase
from loraplane.api.conditions import ConditionState, ConditionStatus, ConditionType
from loraplane.api.reasons import Reason
from loraplane.kube.events import Event, EventType

S = TypeVar("S", bound=StatusBase)


def owned_status(status_cls: type[S], current: dict, owned: tuple[str, ...]) -> S:
    """The part of the stored status this controller owns, parsed; empty when it is unreadable (a status
    written by an older version, or by hand), since the reconcile recomputes it anyway."""
    try:
        return status_cls.model_validate({k: v for k, v in current.items() if k in owned})
    except ValidationError:
        return status_cls()


def ready_reason(current: dict | None) -> str | None:
    """The reason of the stored Ready condition (`current` is a status in wire form), else None."""
    return next((c.get("reason") for c in (current or {}).get("conditions") or []
                 if c.get("type") == ConditionType.Ready), None)


def status_patch(current: dict | None, desired: dict, owned: tuple[str, ...]) -> dict:
    """The merge patch that turns `current` into `desired` on the `owned` keys (others are left alone:
    the trainer's progress, another controller's fields). Empty when nothing changed."""
    current = current or {}
    patch: dict[str, Any] = {}
    for k in owned:
        want = desired.get(k)
        if not same_value(current.get(k), want):
            patch[k] = merge_value(current.get(k), want)
    return patch


def same_value(stored: Any, want: Any) -> bool:
    """Whether a stored status value already is `want`: equal as Python values (a number without a fraction is
    stored by the API server as an integer, so the 1.0 a float field dumps comes back as 1; == also compares
    nested objects without serialising them), or equal by `canonical` (None, [] and {} alike)."""
    return stored == want or canonical(stored) == canonical(want)


def merge_value(current: Any, want: Any) -> Any:
    """The value a JSON merge patch sends to turn `current` into `want` (RFC 7386): the API server merges an object
    into the stored one key by key, so each key of `current` that `want` lacks is sent as null (at every depth);
    anything else (a list, a scalar, an object replacing a non-object) replaces what is stored."""
    if not (isinstance(current, dict) and isinstance(want, dict)):
        return want
    out: dict[str, Any] = {k: None for k in current if k not in want}
    out.update((k, merge_value(current.get(k), v)) for k, v in want.items())
    return out


def canonical(value: Any) -> str:
    """JSON with sorted keys, None/[]/{} alike ("null"): what two status values are compared by."""
    if value in (None, [], {}):
        return "null"
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def dump_status(model: BaseModel) -> dict:
    """A status model in wire form (camelCase keys, unset fields left out)."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


# What a status write changes in an object's metadata: its resourceVersion and the writer's managedFields entry.
WRITE_NOISE = ("resourceVersion", "managedFields")


def merge_patch(target: Any, patch: Any) -> Any:
    """`target` with the JSON merge patch `patch` applied (RFC 7386: objects merge key by key, null deletes, any
    other value replaces); a new value, `target` is not changed."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def with_status_patch(body: dict, patch: dict) -> dict:
    """The object `body` as the API server stores it once the merge patch {"status": patch} is written to its status
    subresource, but for WRITE_NOISE (compare with `same_but_noise`). A new dict; `body` is not changed."""
    return {**body, "status": merge_patch(body.get("status") or {}, patch)}


def same_but_noise(expected: dict, obj: dict) -> bool:
    """Whether the watched object `obj` is `expected` (with_status_patch) in every field but WRITE_NOISE: spec,
    status, labels, annotations, generation, finalizers, deletionTimestamp and every other key alike. Default
    values or pruning the API server applied, or any other writer's change, make them differ."""
    if expected.keys() != obj.keys():
        return False
    for k, v in expected.items():
        if k != "metadata":
            if obj[k] != v:
                return False
            continue
        meta = obj[k] if isinstance(obj[k], dict) else {}
        if not isinstance(v, dict) or ({m: x for m, x in v.items() if m not in WRITE_NOISE}
                                       != {m: x for m, x in meta.items() if m not in WRITE_NOISE}):
            return False
    return True


def invalid_spec(current: dict, generation: int | None, message: str,
                 reason: Reason = Reason.InvalidSpec) -> tuple[dict, Event | None]:
    """For a spec that fails validation (or the operator's policy: `reason` PolicyViolation): the status patch
    (Ready=False with `reason`, naming the field; the other keys are left as they were) and a Warning Event when
    the message is new."""
    previous = StatusBase.model_validate({"conditions": current.get("conditions") or []})
    state = ConditionState(ConditionStatus.FALSE, reason, message)
    previous.set_condition(ConditionType.Ready, state, generation)
    desired = {"observedGeneration": generation,
               "conditions": [c.model_dump(by_alias=True, exclude_none=True) for c in previous.conditions]}
    patch = status_patch(current, desired, ("observedGeneration", "conditions"))
    old = next((c for c in current.get("conditions") or [] if c.get("type") == ConditionType.Ready), None)
    new_message = not old or old.get("reason") != reason or old.get("message") != message
    return patch, Event(EventType.Warning, reason, message) if patch and new_message else None


__all__ = ["WRITE_NOISE", "canonical", "dump_status", "invalid_spec", "merge_patch", "merge_value", "owned_status",
           "ready_reason", "same_but_noise", "same_value", "status_patch", "with_status_patch"]
