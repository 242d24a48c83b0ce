"""Check that an OpenAPI schema is *structural*, as Kubernetes requires of CRD schemas.

The API server would reject (or silently drop parts of) a schema that is not; this finds every offending
node with its path, so a model change that produces one fails in the unit tests, not in a cluster.
"""

from __future__ import annotations

from typing import Any

# Keys that are valid in a Kubernetes JSONSchemaProps. Anything else is dropped by the server (so a rule
# written with it would silently not apply) or, for $ref/const/titles, is not structural.
ALLOWED_KEYS = {
    "type", "format", "description", "properties", "required", "items", "additionalProperties", "enum",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "minProperties", "maxProperties", "multipleOf", "nullable", "example",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def check(schema: dict[str, Any], path: str = "") -> list[str]:
    """All structural violations in `schema`, each as 'PATH: problem'."""
    problems: list[str] = []
    _check(schema, path or "<root>", problems)
    return problems


def _check(node: Any, path: str, problems: list[str]) -> None:
    if not isinstance(node, dict):
        problems.append(f"{path}: schema node is not an object")
        return
    for key in node:
        if key not in ALLOWED_KEYS:
            why = {
                "$ref": "references must be inlined",
                "anyOf": "unions are not structural (use x-kubernetes-int-or-string)",
                "oneOf": "unions are not structural", "allOf": "allOf is not structural",
                "not": "not is not structural", "const": "use enum with one value",
                "title": "titles are not allowed", "uniqueItems": "uniqueItems is not allowed (use a set list-type)",
                "default": "defaults live in the models, not the CRD",
                "$defs": "definitions must be inlined",
            }.get(key, "not a Kubernetes schema keyword")
            problems.append(f"{path}: {key!r}: {why}")
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    typ = node.get("type")
    if int_or_string:
        if typ is not None:
            problems.append(f"{path}: x-kubernetes-int-or-string must not set a type")
    elif typ is None:
        problems.append(f"{path}: every node needs a type")
    elif typ not in TYPES:
        problems.append(f"{path}: type {typ!r} is not one of {sorted(TYPES)}")
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            problems.append(f"{path}: {bound} must be a boolean (OpenAPI v3.0), not a number")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false is not allowed (the server prunes unknown fields)")
    if node.get("x-kubernetes-preserve-unknown-fields") is False:
        problems.append(f"{path}: x-kubernetes-preserve-unknown-fields must be true or absent")
    if typ is not None and typ != "object" and ("properties" in node or "additionalProperties" in node):
        problems.append(f"{path}: properties on a non-object")
    if typ == "array":
        if not isinstance(node.get("items"), dict):
            problems.append(f"{path}: an array needs a single items schema")
    elif "items" in node:
        problems.append(f"{path}: items on a non-array")
    for req in node.get("required", []):
        if req not in node.get("properties", {}):
            problems.append(f"{path}: required field {req!r} is not among the properties")
    if node.get("x-kubernetes-list-type") == "map":
        item_props = (node.get("items") or {}).get("properties", {})
        item_req = (node.get("items") or {}).get("required", [])
        for key in node.get("x-kubernetes-list-map-keys", []):
            if key not in item_props or key not in item_req:
                problems.append(f"{path}: list-map key {key!r} must be a required property of the items")
    for rule in node.get("x-kubernetes-validations", []):
        if set(rule) - {"rule", "message", "messageExpression", "reason", "fieldPath"} or "rule" not in rule:
            problems.append(f"{path}: malformed x-kubernetes-validations entry {rule!r}")
    for name, sub in (node.get("properties") or {}).items():
        _check(sub, f"{path}.{name}", problems)
    if isinstance(node.get("additionalProperties"), dict):
        _check(node["additionalProperties"], f"{path}.*", problems)
    if isinstance(node.get("items"), dict):
        _check(node["items"], f"{path}[]", problems)
