"""The API of loraplane.io/v1alpha1: pydantic models, the single source of truth for the CRDs."""

from loraplane.api.adapter import Adapter, AdapterSpec, AdapterStatus
from loraplane.api.common import API_VERSION, GROUP, VERSION, Condition, Resource, set_condition
from loraplane.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from loraplane.api.modelroute import ModelRoute, ModelRouteSpec, ModelRouteStatus

KINDS: dict[str, type[Resource]] = {cls.KIND: cls for cls in (FineTuneJob, Adapter, ModelRoute)}


def parse(obj: dict) -> Resource:
    """Validate a manifest of one of our kinds; raises pydantic.ValidationError naming the bad field."""
    kind = obj.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not a loraplane.io kind (expected one of {', '.join(KINDS)})")
    return KINDS[kind].model_validate(obj)


__all__ = [
    "API_VERSION", "GROUP", "VERSION", "KINDS", "Adapter", "AdapterSpec", "AdapterStatus", "Condition",
    "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus", "ModelRoute", "ModelRouteSpec", "ModelRouteStatus",
    "Resource", "parse", "set_condition",
]
