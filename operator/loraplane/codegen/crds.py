"""Generate CustomResourceDefinitions from the pydantic models.

pydantic's JSON Schema is turned into a Kubernetes *structural* schema: references inlined, optional
(`anyOf: [X, null]`) collapsed to X, `const` to `enum`, numeric exclusive bounds to the boolean form,
titles dropped. Defaults are not written into the CRD: they live in the models (the operator applies
them), so what a user applies round-trips unchanged and GitOps tools see no server-side drift; the
default is stated in each field's description instead, for `kubectl explain`.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

from loraplane.api import KINDS
from loraplane.api.common import GROUP, VERSION, Resource

CATEGORIES = ["loraplane"]


class SchemaError(ValueError):
    """A pydantic schema construct that has no structural (Kubernetes CRD) equivalent, e.g. a union."""

    pass


def _overlay(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with field-level keys (description, ...) from `extra` winning; CEL rules of both kept."""
    for k, v in extra.items():
        base[k] = base.get(k, []) + v if k == "x-kubernetes-validations" else v
    return base


def _resolve(node: Any, defs: dict[str, Any], path: str) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs, f"{path}[{i}]") for i, n in enumerate(node)]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        return _resolve(_overlay(copy.deepcopy(target), node), defs, path)
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise SchemaError(f"{path}: allOf with {len(parts)} parts cannot be made structural")
        node = _overlay(_resolve(parts[0], defs, path), node)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(f"{path}: a union of {len(options)} types is not structural; "
                              "use int-or-string or a single type")
        node.pop("default", None)  # the null default of an Optional
        node = _overlay(_resolve(options[0], defs, path), node)
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {name: _resolve(p, defs, f"{path}.{name}") for name, p in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = _resolve(v, defs, f"{path}[]")
        else:
            out[k] = v
    return out


def _structural(node: Any) -> Any:
    """Rewrite the JSON Schema constructs Kubernetes rejects into their structural equivalents."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in ("title", "$defs"):
            continue
        if k == "properties":
            out[k] = {name: _structural(p) for name, p in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = _structural(v)
        else:
            out[k] = v
    if "const" in out:
        out["enum"] = [out.pop("const")]
        out.setdefault("type", "string")
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), (int, float)) and not isinstance(out.get(bound), bool):
            out[plain] = out.pop(bound)
            out[bound] = True
    if "properties" in out:
        out.pop("additionalProperties", None)  # extra=forbid: the server prunes, the models reject
        out.setdefault("type", "object")
        if not out["properties"]:
            del out["properties"]
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
    if "default" in out:
        default = out.pop("default")
        if isinstance(default, (str, int, float, bool)) and default != "":
            shown = json.dumps(default) if not isinstance(default, str) else default
            desc = out.get("description", "").rstrip()
            out["description"] = (desc + " " if desc else "") + f"Default: {shown}."
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def model_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs, model.__name__))


def crd_for(kind: type[Resource]) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of `kind`: one served and stored version with
    the status subresource, printer columns and the structural schemas of its spec and status."""
    fields = kind.model_fields
    spec_schema = model_schema(fields["spec"].annotation)
    status_type = [a for a in fields["status"].annotation.__args__ if a is not type(None)][0]
    status_schema = model_schema(status_type)
    # The operator keeps kopf's bookkeeping in status (fewer writes than annotations); keep it from pruning.
    status_schema.setdefault("properties", {})["kopf"] = {
        "type": "object", "x-kubernetes-preserve-unknown-fields": True,
        "description": "Operator bookkeeping (handler progress); not part of the API."}
    schema = {
        "type": "object",
        "description": kind.DESCRIPTION,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "required": ["spec"],
    }
    singular = kind.KIND.lower()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "loraplane"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.KIND,
                "listKind": f"{kind.KIND}List",
                "plural": kind.PLURAL,
                "singular": singular,
                "shortNames": list(kind.SHORT_NAMES),
                "categories": CATEGORIES,
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [dict(c) for c in kind.PRINTER_COLUMNS],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD, for every kind."""
    return {f"{GROUP}_{k.PLURAL}.yaml": crd_for(k) for k in KINDS.values()}


HEADER = "# Generated from operator/loraplane/api by `loraplane crds`. Do not edit by hand.\n"


def render(crd: dict[str, Any]) -> str:
    """A CRD as YAML (key order kept, lines up to 120 characters) under the do-not-edit header."""
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=120)
