"""Other projects' CRDs as test fixtures (tests/support/thirdparty_crds/, each file says where it comes from):
validate what loraplane renders for the Prometheus Operator and KEDA against their schemas, offline.

Validation is strict, as the API server's `fieldValidation=Strict` (kubectl's default) is: an object field the
schema does not name is an error, not silently pruned; so is a wrong type, enum value or pattern. The schemas are
OpenAPI v3 (a subset of JSON Schema); `jsonschema` evaluates them, ignoring the `x-kubernetes-*` extensions.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

FIXTURES = Path(__file__).parent / "thirdparty_crds"
FILES = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
         "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
         "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
         "ScaledObject": "keda.sh_scaledobjects.yaml"}


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties and neither
    declares additionalProperties nor preserves unknown fields (what the API server's pruning would drop)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd(kind: str) -> dict:
    """The fixture CRD of `kind` (PodMonitor, ServiceMonitor, PrometheusRule, ScaledObject)."""
    return yaml.safe_load((FIXTURES / FILES[kind]).read_text())


def schema_errors(obj: dict) -> list[str]:
    """What is wrong with `obj` (a rendered manifest of one of FILES' kinds) against its CRD, strictly: one line
    per error, `path: message`; empty when valid. The apiVersion must be the CRD's group and a served version."""
    doc = crd(obj["kind"])
    group = doc["spec"]["group"]
    versions = {v["name"]: v for v in doc["spec"]["versions"] if v.get("served")}
    g, _, v = obj.get("apiVersion", "").rpartition("/")
    if g != group or v not in versions:
        return [f"apiVersion: {obj.get('apiVersion')!r} is not served by {doc['metadata']['name']} "
                f"({', '.join(f'{group}/{x}' for x in versions)})"]
    schema = _strict(copy.deepcopy(versions[v]["schema"]["openAPIV3Schema"]))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
