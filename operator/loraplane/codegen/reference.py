"""Generate docs/api-reference.md from the same structural schemas that go into the CRDs."""

from __future__ import annotations

from typing import Any

from loraplane.api import KINDS
from loraplane.api.common import API_VERSION
from loraplane.codegen.crds import crd_for


def _type_of(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    t = node.get("type", "")
    if t == "array":
        return f"[]{_type_of(node.get('items', {}))}"
    if t == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type_of(node['additionalProperties'])}"
    if node.get("enum"):
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    return t


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    for key, label in (("minimum", ">="), ("maximum", "<="), ("minLength", "min length"),
                       ("maxLength", "max length"), ("minItems", "min items"), ("maxItems", "max items")):
        if key in node:
            op = label
            if key == "minimum" and node.get("exclusiveMinimum"):
                op = ">"
            if key == "maximum" and node.get("exclusiveMaximum"):
                op = "<"
            parts.append(f"{op} {node[key]}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    rules = node.get("x-kubernetes-validations", [])
    if node.get("type") == "array":  # rules on each item are shown on the list's row
        rules = rules + (node.get("items") or {}).get("x-kubernetes-validations", [])
    for rule in rules:
        parts.append(f"rule: {rule['message']}")
    return "; ".join(parts)


def _rows(node: dict[str, Any], path: str, required: bool, rows: list[str]) -> None:
    desc = (node.get("description") or "").replace("\n", " ").replace("|", "\\|")
    cons = _constraints(node)
    req = "yes" if required else ""
    rows.append(f"| `{path}` | {_type_of(node)} | {req} | {desc} | {cons.replace('|', chr(92) + '|')} |")
    target = node
    suffix = ""
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        target, suffix = node["items"], "[]"
    req_set = set(target.get("required", []))
    for name, sub in (target.get("properties") or {}).items():
        _rows(sub, f"{path}{suffix}.{name}", name in req_set, rows)


def render() -> str:
    """docs/api-reference.md: per kind its description, names and one table row per spec and status field
    (type, required, description, constraints and CEL rule messages)."""
    out = [
        "# API reference",
        "",
        f"Generated from `operator/loraplane/api` by `loraplane crds`; do not edit by hand. API version "
        f"`{API_VERSION}`. Defaults are applied by the operator (they are not written into stored objects).",
        "",
    ]
    for kind in KINDS.values():
        crd = crd_for(kind)
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        names = crd["spec"]["names"]
        out += [f"## {kind.KIND}", "", kind.DESCRIPTION, "",
                f"Plural `{names['plural']}`, short names {', '.join(f'`{s}`' for s in names['shortNames'])}, "
                f"category `{names['categories'][0]}`.", ""]
        for part in ("spec", "status"):
            rows: list[str] = []
            node = schema["properties"][part]
            for name, sub in (node.get("properties") or {}).items():
                if part == "status" and name == "kopf":
                    continue
                _rows(sub, f"{part}.{name}", name in set(node.get("required", [])), rows)
            out += [f"### {kind.KIND}.{part}", "", "| field | type | required | description | constraints |",
                    "|---|---|---|---|---|", *rows, ""]
    return "\n".join(out)
