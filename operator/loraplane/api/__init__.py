"""The API of loraplane.io/v1alpha1: pydantic models, the single source of truth for the CRDs."""

from loraplane.api.adapter import Adapter, AdapterSpec, AdapterStatus
from loraplane.api.common import API_VERSION, GROUP, VERSION, Condition, Resource, set_condition
from loraplane.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from loraplane.api.modelroute import ModelRoute, ModelRouteSpec, ModelRouteStatus

KINDS: dict[str, type[Resource]] = {cls.KIND: cls for cls in (FineTuneJob, Adapter, ModelRoute)}


def parse(obj: dict) -> Resource:
    """Validate a manifest of one of our kinds; raises pydantic.ValidationError naming the bad field.

    A manifest is the wire form: its fields are the camelCase names of the CRD schema only. The Python names
    (`validation_split`) that ApiModel's populate_by_name admits for code are unknown fields here, as the API
    server refuses them (kubectl's strict field validation) or prunes them: a file `loraplane validate` passes
    must be one the cluster takes as written."""
    kind = obj.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not a loraplane.io kind (expected one of {', '.join(KINDS)})")
    return KINDS[kind].model_validate(obj, by_alias=True, by_name=False)


__all__ = [
    "API_VERSION", "GROUP", "VERSION", "KINDS", "Adapter", "AdapterSpec", "AdapterStatus", "Condition",
    "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus", "ModelRoute", "ModelRouteSpec", "ModelRouteStatus",
    "Resource", "parse", "set_condition",
]
